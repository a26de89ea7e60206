// mixpeft/cuda/mma_tile.cuh — tensor-core tile products for the grouped LoRA kernels: mma.sync m16n8k16 with
// bf16 / fp16 operands and fp32 accumulators, on operand tiles staged in shared memory in their storage type.
//
// A CTA of THREADS threads (WM x WN warps) multiplies an I_A x BK tile of A by a BK x I_B tile of B (I_A = BM rows
// of the product, I_B = BN columns, BK the reduction) into fp32 accumulators: warp w owns the
// (BM / WM) x (BN / WN) block at rows (w / WN) BM / WM, columns (w % WN) BN / WN, as MI x NI mma tiles of 16 x 8.
// An operand tile keeps the layout it has in global memory, so staging it is a straight 16-byte copy:
//   KCONTIG   (k contiguous: x [M, K], a weight stored [N, K]):  tile[I][BK + 8]
//   !KCONTIG  (i contiguous: a weight stored [K, N], x^T):       tile[BK][I + 8]
// A fragment register holds the pair (i, k), (i, k + 1) (k even, the lower k in the low half): one 32-bit load
// from a KCONTIG tile, two 16-bit loads from a !KCONTIG one. The 8-element padding keeps the loads of a warp free
// of bank conflicts in both layouts. Fragments (PTX ISA, mma.m16n8k16; g = lane / 4, q = lane % 4):
//   A 16 x 16:  a[0] = (g, 2q), a[1] = (g + 8, 2q), a[2] = (g, 2q + 8), a[3] = (g + 8, 2q + 8)
//   B 16 x 8:   b[0] = (k 2q, n g), b[1] = (k 2q + 8, n g)
//   C 16 x 8:   c[0], c[1] = (g, 2q), (g, 2q + 1);  c[2], c[3] = (g + 8, 2q), (g + 8, 2q + 1)
// stage_accumulators writes C into a shared fp32 tile [BM][BN + 4], from which a kernel's epilogue reads them in
// any thread mapping. The tile code is __host__ __device__ with the thread index passed in, so a host test can run
// it for every thread of a CTA with an emulated instruction (tests/cuda/test_mma_tile.cu). mma.sync needs sm_80 or newer: tensor_cores_available() says whether this build and the
// current device have them (the kernels are compiled to a trap below sm_80 and never launched there).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "mixpeft/cuda/elementwise.cuh"
#include "mixpeft/cuda/kernel_utils.cuh"
#include "mixpeft/cuda/memory.cuh"

namespace mixpeft::cuda::detail {

inline constexpr int mma_pad = 8;  // elements of padding per shared tile row

// One operand tile in shared memory: I rows of the product by BK of the reduction, in the global layout.
template <int I, int BK, bool KCONTIG>
struct MmaTile {
  static constexpr int lines = KCONTIG ? I : BK;            // rows of the shared array
  static constexpr int pitch = (KCONTIG ? BK : I) + mma_pad;  // elements per row
  static constexpr std::size_t bytes = std::size_t(lines) * pitch * sizeof(std::uint16_t);
  static_assert((pitch * sizeof(std::uint16_t)) % 16 == 0, "shared rows must keep 16-byte alignment");

  std::uint16_t* p;

  // Elements (i, k) and (i, k + 1), k even, packed low to high.
  __host__ __device__ std::uint32_t pair(int i, int k) const {
    if constexpr (KCONTIG) {
      return *reinterpret_cast<const std::uint32_t*>(p + i * pitch + k);
    } else {
      return std::uint32_t(p[k * pitch + i]) | (std::uint32_t(p[(k + 1) * pitch + i]) << 16);
    }
  }
};

// Moves one I x BK operand tile of a 16-bit S from global memory through registers into an MmaTile. Element (i, k) is
//   KCONTIG:  src[(i0 + i) * ld + (k0 + k)]     !KCONTIG:  src[(k0 + k) * ld + (i0 + i)]
// valid when i0 + i < i_end and k0 + k < k_end, 0 otherwise. 16-byte vectors run along the contiguous axis when
// `vec` (base and pitch 16-byte aligned) and the vector lies inside the valid range; single elements otherwise.
// !KCONTIG only: row_scale[k0 + k], when given, multiplies line k (the gate of a row), rounded once to S.
template <class S, int I, int BK, bool KCONTIG, int THREADS>
struct MmaTileLoader {
  static_assert(std::is_same_v<S, __nv_bfloat16> || std::is_same_v<S, __half>, "mma tiles hold bf16 or fp16");
  static constexpr int V = 8;
  static constexpr int CONTIG = KCONTIG ? BK : I;
  static_assert(CONTIG % V == 0, "the contiguous tile extent must hold whole vectors");
  static constexpr int PER_LINE = CONTIG / V;
  static constexpr int NV = I * BK / V;
  static constexpr int ITERS = (NV + THREADS - 1) / THREADS;

  Pack<S, V> v[ITERS];

  __host__ __device__ void load(const S* __restrict__ src, std::int64_t ld, int i0, int i_end, int k0, int k_end,
                                bool vec, const float* __restrict__ row_scale, int thread) {
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int idx = thread + it * THREADS;
      if (NV % THREADS != 0 && idx >= NV) break;
      const int c = (idx % PER_LINE) * V, l = idx / PER_LINE;
      const int line = (KCONTIG ? i0 : k0) + l, line_end = KCONTIG ? i_end : k_end;
      const int c0 = (KCONTIG ? k0 : i0) + c, c_end = KCONTIG ? k_end : i_end;
      if (line < line_end) {
        const S* q = src + std::int64_t(line) * ld + c0;
        if (vec && c0 + V <= c_end) {
          v[it] = *reinterpret_cast<const Pack<S, V>*>(q);
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) v[it].v[j] = c0 + j < c_end ? q[j] : narrow<S>(0.0f);
        }
        if constexpr (!KCONTIG) {
          if (row_scale) {
            const float g = row_scale[line];
#pragma unroll
            for (int j = 0; j < V; ++j) v[it].v[j] = narrow<S>(widen(v[it].v[j]) * g);
          }
        }
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) v[it].v[j] = narrow<S>(0.0f);
      }
    }
  }

  __host__ __device__ void store(const MmaTile<I, BK, KCONTIG>& tile, int thread) const {
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int idx = thread + it * THREADS;
      if (NV % THREADS != 0 && idx >= NV) break;
      const int c = (idx % PER_LINE) * V, l = idx / PER_LINE;
      *reinterpret_cast<Pack<S, V>*>(tile.p + l * tile.pitch + c) = v[it];
    }
  }
};

// d = a b + d for one 16 x 8 x 16 tile (fp32 accumulators), as one warp-wide instruction. Host code never runs it:
// tests on the host pass an emulation of the instruction to mma_tile_product instead.
template <class S>
struct Mma16816 {
  __host__ __device__ void operator()(float (&d)[4], const std::uint32_t (&a)[4], const std::uint32_t (&b)[2]) const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (std::is_same_v<S, __nv_bfloat16>)
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
          "{%0, %1, %2, %3};\n"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    else
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
          "{%0, %1, %2, %3};\n"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(__CUDA_ARCH__)
    __trap();  // below sm_80: tensor_cores_available() keeps these kernels from launching
#else
    (void)d, (void)a, (void)b;
    std::abort();
#endif
  }
};

// The warp layout of a BM x BN product over THREADS threads.
template <int BM_, int BN_, int WM_, int WN_>
struct MmaWarps {
  static constexpr int BM = BM_, BN = BN_, WM = WM_, WN = WN_;
  static constexpr int WARP_M = BM / WM, WARP_N = BN / WN, MI = WARP_M / 16, NI = WARP_N / 8;
  static constexpr int threads = WM * WN * 32;
  static_assert(MI * 16 == WARP_M && NI * 8 == WARP_N, "a warp's block must be whole 16 x 8 tiles");

  __host__ __device__ static int row0(int thread) { return thread / 32 / WN * WARP_M; }
  __host__ __device__ static int col0(int thread) { return thread / 32 % WN * WARP_N; }
};

// acc += A_tile B_tile over the BK of the staged tiles (B indexed (n, k)), for thread `thread` of the CTA.
template <class W, class S, int BK, class TileA, class TileB, class Mma = Mma16816<S>>
__host__ __device__ inline void mma_tile_product(const TileA& a, const TileB& b, float (&acc)[W::MI][W::NI][4],
                                                 int thread, Mma mma = {}) {
  const int lane = thread % 32, g = lane / 4, q2 = lane % 4 * 2;
  const int m0 = W::row0(thread), n0 = W::col0(thread);
#pragma unroll
  for (int k = 0; k < BK; k += 16) {
    std::uint32_t af[W::MI][4], bf[W::NI][2];
#pragma unroll
    for (int mi = 0; mi < W::MI; ++mi) {
      const int i = m0 + 16 * mi + g;
      af[mi][0] = a.pair(i, k + q2);
      af[mi][1] = a.pair(i + 8, k + q2);
      af[mi][2] = a.pair(i, k + q2 + 8);
      af[mi][3] = a.pair(i + 8, k + q2 + 8);
    }
#pragma unroll
    for (int ni = 0; ni < W::NI; ++ni) {
      const int n = n0 + 8 * ni + g;
      bf[ni][0] = b.pair(n, k + q2);
      bf[ni][1] = b.pair(n, k + q2 + 8);
    }
#pragma unroll
    for (int mi = 0; mi < W::MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < W::NI; ++ni) mma(acc[mi][ni], af[mi], bf[ni]);
  }
}

template <class W>
inline constexpr std::size_t mma_staged_bytes = std::size_t(W::BM) * (W::BN + 4) * sizeof(float);

// Writes the warps' accumulators to cs [BM][BN + 4] (shared; the caller synchronises before reading it).
template <class W>
__host__ __device__ inline void stage_accumulators(const float (&acc)[W::MI][W::NI][4], float* cs, int thread) {
  constexpr int pitch = W::BN + 4;
  const int lane = thread % 32, g = lane / 4, q2 = lane % 4 * 2;
#pragma unroll
  for (int mi = 0; mi < W::MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < W::NI; ++ni) {
      const int row = W::row0(thread) + 16 * mi + g, col = W::col0(thread) + 8 * ni + q2;
      cs[row * pitch + col] = acc[mi][ni][0];
      cs[row * pitch + col + 1] = acc[mi][ni][1];
      cs[(row + 8) * pitch + col] = acc[mi][ni][2];
      cs[(row + 8) * pitch + col + 1] = acc[mi][ni][3];
    }
}

template <int = 0>
__global__ void mma_probe_kernel() {}

// Whether mma.sync kernels can run: this build compiled device code for sm_80+ and the current device is sm_80+.
inline bool tensor_cores_available() {
  static const bool compiled = [] {
    cudaFuncAttributes attributes{};
    const bool ok = cudaFuncGetAttributes(&attributes, mma_probe_kernel<>) == cudaSuccess;
    if (!ok) (void)cudaGetLastError();  // not sticky; clear it so the next launch check does not report it
    return ok && attributes.ptxVersion >= 80;
  }();
  return compiled && compute_capability_major() >= 8;
}

}  // namespace mixpeft::cuda::detail
