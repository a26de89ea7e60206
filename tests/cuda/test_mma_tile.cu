// The tensor-core tile code of cuda/mma_tile.cuh run on the host, every thread of a CTA in turn, with mma.sync
// emulated from the PTX ISA's fragment layout (written out here independently of the tile code): the loaders
// (16-byte and element paths, zero fill past the valid extents, row gates), both shared layouts, the fragment
// pairs, the warp layouts of the three grouped-LoRA configurations and the staged accumulators must give the
// product of the two operand tiles. Needs no GPU, so it runs wherever the CUDA code compiles.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "mixpeft/core/rng.hpp"
#include "mixpeft/cuda/mma_tile.cuh"

namespace mixpeft::cuda_test {
namespace {

using cuda::detail::MmaTile;
using cuda::detail::MmaTileLoader;
using cuda::detail::MmaWarps;

constexpr int kThreads = 256, kBK = 32;

template <class S>
float value_of(std::uint16_t bits) {
  S v;
  std::memcpy(&v, &bits, 2);
  return cuda::widen(v);
}

// One warp's mma.sync m16n8k16 calls, emulated in two passes over its lanes: `record` keeps every lane's fragments
// per call; the products are then formed from them; `replay` adds each lane's share of its call's product.
template <class S>
struct WarpMma {
  struct Call {
    std::uint32_t a[32][4], b[32][2];
    float d[32][4];
  };
  std::vector<Call> calls;
  bool replay = false;
  int lane = 0;
  std::size_t next = 0;

  void start_lane(int l) {
    lane = l;
    next = 0;
  }
  void multiply_all() {
    for (Call& c : calls) {
      // A 16 x 16 (row): register r of lane (g, q) holds (row g + 8 (r % 2), columns 2q, 2q + 1 plus 8 (r / 2)).
      // B 16 x 8 (col): register r holds (rows 2q, 2q + 1 plus 8 r, column g). C: (row g + 8 (e / 2), col 2q + e % 2).
      double A[16][16], B[16][8];
      for (int l = 0; l < 32; ++l) {
        const int g = l / 4, q = l % 4;
        for (int r = 0; r < 4; ++r)
          for (int h = 0; h < 2; ++h)
            A[g + 8 * (r % 2)][2 * q + h + 8 * (r / 2)] = value_of<S>(std::uint16_t(c.a[l][r] >> (16 * h)));
        for (int r = 0; r < 2; ++r)
          for (int h = 0; h < 2; ++h) B[2 * q + h + 8 * r][g] = value_of<S>(std::uint16_t(c.b[l][r] >> (16 * h)));
      }
      for (int l = 0; l < 32; ++l) {
        const int g = l / 4, q = l % 4;
        for (int e = 0; e < 4; ++e) {
          const int row = g + 8 * (e / 2), col = 2 * q + e % 2;
          double sum = 0;
          for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
          c.d[l][e] = float(sum);
        }
      }
    }
  }
  void operator()(float (&d)[4], const std::uint32_t (&a)[4], const std::uint32_t (&b)[2]) {
    if (!replay) {
      if (next == calls.size()) calls.emplace_back();
      for (int r = 0; r < 4; ++r) calls[next].a[lane][r] = a[r];
      for (int r = 0; r < 2; ++r) calls[next].b[lane][r] = b[r];
    } else {
      for (int e = 0; e < 4; ++e) d[e] += calls[next].d[lane][e];
    }
    ++next;
  }
};

template <class S>
struct WarpMmaRef {
  WarpMma<S>* mma;
  void operator()(float (&d)[4], const std::uint32_t (&a)[4], const std::uint32_t (&b)[2]) const { (*mma)(d, a, b); }
};

struct AlignedBuffer {
  explicit AlignedBuffer(std::size_t bytes) : p(static_cast<unsigned char*>(std::aligned_alloc(16, (bytes + 15) / 16 * 16))) {
    std::memset(p.get(), 0xff, (bytes + 15) / 16 * 16);  // garbage: everything read must have been written
  }
  struct Free {
    void operator()(unsigned char* q) const { std::free(q); }
  };
  std::unique_ptr<unsigned char, Free> p;
  template <class T>
  T* as() const {
    return reinterpret_cast<T*>(p.get());
  }
};

// A global operand: I x BK logical tile (i, k) at src[(i * ld + k)] (KCONTIG) or src[k * ld + i], ld > extent so
// the pitch matters; values of S, with the valid extents i_end, k_end.
template <class S, bool KCONTIG>
struct Operand {
  int I, ld, i_end, k_end;
  AlignedBuffer buffer;
  S* data;

  Operand(int i_extent, int i_valid, int k_valid, bool aligned_pitch, Rng& rng)
      : I(i_extent), ld((KCONTIG ? kBK : i_extent) + (aligned_pitch ? 8 : 3)), i_end(i_valid), k_end(k_valid),
        buffer(std::size_t(KCONTIG ? i_extent : kBK) * ld * sizeof(S)), data(buffer.as<S>()) {
    const int lines = KCONTIG ? i_extent : kBK;
    for (int l = 0; l < lines; ++l)
      for (int c = 0; c < ld; ++c) data[l * ld + c] = cuda::narrow<S>(float(rng.uniform() * 2 - 1));
  }
  float at(int i, int k) const {
    if (i >= i_end || k >= k_end) return 0.0f;
    return cuda::widen(KCONTIG ? data[i * ld + k] : data[k * ld + i]);
  }
};

// Loads both operand tiles as every thread of the CTA would, multiplies them warp by warp with the emulated
// instruction, stages the accumulators and compares them with the product of the operands as the tiles hold them.
template <class S, class W, bool KA, bool KB>
::testing::AssertionResult tile_product_matches(Rng& rng, bool full, bool vec, bool gated) {
  const int i_end_a = full ? W::BM : W::BM - 5, i_end_b = full ? W::BN : W::BN - 3, k_end = full ? kBK : 27;
  Operand<S, KA> a(W::BM, i_end_a, k_end, vec, rng);
  Operand<S, KB> b(W::BN, i_end_b, k_end, vec, rng);
  std::vector<float> gates(kBK);
  for (float& g : gates) g = float(0.5 + rng.uniform());
  const float* row_scale = gated && !KB ? gates.data() : nullptr;

  using TileA = MmaTile<W::BM, kBK, KA>;
  using TileB = MmaTile<W::BN, kBK, KB>;
  AlignedBuffer sa(TileA::bytes), sb(TileB::bytes);
  const TileA ta{sa.as<std::uint16_t>()};
  const TileB tb{sb.as<std::uint16_t>()};
  for (int t = 0; t < kThreads; ++t) {
    MmaTileLoader<S, W::BM, kBK, KA, kThreads> la;
    MmaTileLoader<S, W::BN, kBK, KB, kThreads> lb;
    la.load(a.data, a.ld, 0, a.i_end, 0, a.k_end, vec, nullptr, t);
    lb.load(b.data, b.ld, 0, b.i_end, 0, b.k_end, vec, row_scale, t);
    la.store(ta, t);
    lb.store(tb, t);
  }

  struct Accumulators {
    float v[W::MI][W::NI][4] = {};
  };
  std::vector<Accumulators> acc(kThreads);
  for (int w = 0; w < kThreads / 32; ++w) {
    WarpMma<S> mma;
    float scratch[W::MI][W::NI][4] = {};
    for (int l = 0; l < 32; ++l) {
      mma.start_lane(l);
      cuda::detail::mma_tile_product<W, S, kBK>(ta, tb, scratch, 32 * w + l, WarpMmaRef<S>{&mma});
    }
    mma.multiply_all();
    mma.replay = true;
    for (int l = 0; l < 32; ++l) {
      mma.start_lane(l);
      cuda::detail::mma_tile_product<W, S, kBK>(ta, tb, acc[32 * w + l].v, 32 * w + l, WarpMmaRef<S>{&mma});
    }
  }
  std::vector<float> cs(std::size_t(W::BM) * (W::BN + 4), std::nanf(""));
  for (int t = 0; t < kThreads; ++t) cuda::detail::stage_accumulators<W>(acc[t].v, cs.data(), t);

  for (int i = 0; i < W::BM; ++i)
    for (int n = 0; n < W::BN; ++n) {
      double want = 0, scale = 0;
      for (int k = 0; k < kBK; ++k) {
        float bv = b.at(n, k);
        if (row_scale) bv = cuda::widen(cuda::narrow<S>(bv * gates[k]));  // the loader rounds the gated value once
        want += double(a.at(i, k)) * bv;
        scale += std::abs(double(a.at(i, k)) * bv);
      }
      const float got = cs[std::size_t(i) * (W::BN + 4) + n];
      if (!(std::abs(got - want) <= 1e-5 * (1 + scale)))
        return ::testing::AssertionFailure() << "C(" << i << ", " << n << ") = " << got << ", want " << want;
    }
  return ::testing::AssertionSuccess();
}

template <class S, class W>
void check_layouts(Rng& rng) {
  for (bool full : {true, false})
    for (bool vec : {true, false}) {
      const std::string what = std::string(" full ") + std::to_string(full) + " vec " + std::to_string(vec);
      EXPECT_TRUE((tile_product_matches<S, W, true, true>(rng, full, vec, false))) << "rows, W^T" << what;
      EXPECT_TRUE((tile_product_matches<S, W, true, false>(rng, full, vec, false))) << "rows, W" << what;
      EXPECT_TRUE((tile_product_matches<S, W, false, false>(rng, full, vec, true))) << "weight gradient" << what;
      EXPECT_TRUE((tile_product_matches<S, W, false, true>(rng, full, vec, false))) << "A^T B^T" << what;
    }
}

// The warp layouts of GloraMmaCfg32 / 64 / 128 (cuda/grouped_lora.cuh).
using Warps32 = MmaWarps<128, 32, 8, 1>;
using Warps64 = MmaWarps<64, 64, 4, 2>;
using Warps128 = MmaWarps<64, 128, 2, 4>;

TEST(MmaTileEmulated, Bf16TileProductsMatchTheOperands) {
  Rng rng(1);
  check_layouts<__nv_bfloat16, Warps32>(rng);
  check_layouts<__nv_bfloat16, Warps64>(rng);
  check_layouts<__nv_bfloat16, Warps128>(rng);
}

TEST(MmaTileEmulated, Fp16TileProductsMatchTheOperands) {
  Rng rng(2);
  check_layouts<__half, Warps32>(rng);
  check_layouts<__half, Warps64>(rng);
  check_layouts<__half, Warps128>(rng);
}

}  // namespace
}  // namespace mixpeft::cuda_test
