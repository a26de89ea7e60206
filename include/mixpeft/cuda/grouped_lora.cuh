// mixpeft/cuda/grouped_lora.cuh — the MoLE expert LoRA GEMMs on expert-grouped rows, one launch per projection.
//
// Rows are grouped by expert (layers/router.hpp: group_by_expert): expert e owns the contiguous row block
// j in [offsets[e], offsets[e+1]). offsets [K+1] is a DEVICE tensor and is read only by the kernels (no host
// sync, no host loop over experts). For j in block e (c[j] an optional per-row gate, 1 when absent):
//   grouped_lora_shrink             t[j, :]  = x[j, :] A_e^T                                      (written)
//   grouped_lora_expand             y[j, :] (=|+=) s c[j] t[j, :] B_e^T                  (accumulate: beta 0|1)
//   grouped_lora_expand_backward    u[j, :]  = s dy[j, :] B_e;  dt[j, :] = c[j] u[j, :]           (written)
//                                   dgates[j] += <u[j, :], h[j, :]>  (h = the ungated t; optional: dc of the gate)
//   grouped_lora_shrink_backward    dx[j, :] (=|+=) dt[j, :] A_e
//   grouped_lora_grad_B             dB_e += s sum_{j in e} c[j] dy[j, :]^T t[j, :]                (accumulated)
//   grouped_lora_grad_A             dA_e += sum_{j in e} dt[j, :]^T x[j, :]                       (accumulated)
// Together: forward  t = shrink(x), y (+)= expand(t);  backward  dt = expand_backward(dy), grad_B(dy, t),
// grad_A(dt, x), dx (+)= shrink_backward(dt): the CPU ExpertLoRA's grouped_linear / scale_rows sequence
// (layers/lora_experts.hpp) with the gate folded into the epilogues instead of a materialised c * t.
// Shapes: x, dx [M, in] (x may be [..., in]); A, dA [K, r, in]; t, h, dt [M, r]; B, dB [K, out, r];
//         y, dy [M, out]; gates, dgates [M] (or [M, 1]); offsets [K+1] int32 on the device. A 2-D weight
//         ([r, in], [out, r]) is one expert. The shape checks are those of the CPU ops (ops/grouped_lora.hpp).
// Caches nothing between calls: backward needs the forward's x and t (and the gates); split-K scratch comes
// from the caching pool per call and goes back to it on return.
//
// Types: the weights' storage type W is float, double, __nv_bfloat16 or __half; activations (x, t, dy, dt, ...)
// and outputs may each be W or, for bf16 / fp16 weights, float (fp32 outputs of low-precision inputs, as in
// matmul.cuh). Every product accumulates in acc_t<W> (fp32; double for double); outputs are rounded once.
// Gates and dgates are acc_t<W> (fp32 router probabilities for bf16 weights). s is passed as a double.
//
// Offsets are trusted (offsets[0] = 0, non-decreasing, offsets[K] = M, as group_by_expert makes them): they
// live on the device, so the host cannot check them without a sync. The kernels clamp every block to [0, M),
// so bad offsets give wrong numbers but never out-of-bounds accesses. Empty experts do no work (their CTAs
// exit at once; their dA_e / dB_e are left untouched).
//
// Two kernel families share the tiling, the CTA -> expert map, the split-K scheme and the epilogues:
//   tensor cores (bf16 / fp16 operands of one type, on sm_80+; cuda/mma_tile.cuh): BK = 32, the operand tiles kept
//     in their storage type in shared memory, 8 warps of mma.sync m16n8k16 with fp32 accumulators, which then go
//     through shared memory into the CUDA-core epilogue mapping below. A gated operand (grad_B's t) is rounded
//     once to the storage type after the gate is applied.
//   CUDA cores (float, double, bf16 / fp16 weights with fp32 activations, and any GPU below sm_80): BK = 16,
//     operands converted to acc_t on load into k-major shared tiles, each thread a TM x TN register micro-tile.
// 256 threads per CTA, tile BM x BN; in the epilogue each thread owns TM x TN outputs (rows ty + 16 i, columns
// tx + 16 j: conflict-free shared reads and coalesced stores). The next k-tile is fetched into registers while the
// current one is multiplied. Configurations: BM x BN = 128 x 32 (N <= 32), 64 x 64 (N <= 64), 64 x 128 (wider).
// Global loads are 16-byte vectors (4 floats, 8 bf16, 2 doubles) when the base pointer and the row pitch are
// 16-byte aligned, element loads otherwise (checked per operand at launch), with bounds checks on every tile edge.
//   Row ops (shrink, expand, expand_backward, shrink_backward): a CTA owns ONE expert's tile of BM rows
//   (it never straddles two experts) and BN columns. The CTA -> (expert, row tile) map is found in the kernel:
//   warp 0 scans ceil(count_e / BM) over the experts from offsets (a warp prefix sum, K / 32 steps), so the
//   grid is the host-known bound ceil(M / BM) + K row tiles (the real count lies in [ceil(M/BM), that]) and the
//   surplus CTAs exit. Shrink / expand_backward have N = r (narrow, full row per CTA) and a long reduction
//   (in / out up to 11008); when the row tiles are too few to fill the GPU (< 2 CTAs per SM) the reduction is
//   split over gridDim.z and fp32 partials [splits, M, r] are summed in order by a second, row-wise kernel
//   (deterministic, no atomics) that also applies s, the gates, beta and the gate dot. Expand /
//   shrink_backward have N = out / in (wide) and K = r <= 128: one launch, no split.
//   Weight gradients: a CTA owns one expert's tile of dW_e (64 or 128 of the wide axis x the r axis) and
//   reduces over that expert's rows in BK-row steps (dA is computed as dA_e^T [in, r] so r is always the
//   narrow N); experts with few CTAs split their rows over gridDim.z with fp32 partials [splits, K, *, r] and
//   an in-order finalize kernel. With one split dW is updated in place by its only owner (deterministic).
// Test hooks: detail::GroupedSplitOverride forces the number of splits (0 = the heuristic);
// detail::GroupedTensorCoreOverride(false) keeps bf16 / fp16 on the CUDA-core kernels.
// Not yet: a Hopper wgmma / TMA pipeline (multi-stage, producer warp, persistent grid over a device tile table).
// At r = 32 these GEMMs do about 32 FLOP per byte moved, so they should be bound by bandwidth rather than by
// mma.sync throughput; whether they reach 90% of a dense GEMM of the same FLOPs is for a GPU run to show.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string_view>
#include <type_traits>

#include "mixpeft/core/error.hpp"
#include "mixpeft/cuda/device_tensor.cuh"
#include "mixpeft/cuda/elementwise.cuh"
#include "mixpeft/cuda/error.cuh"
#include "mixpeft/cuda/kernel_utils.cuh"
#include "mixpeft/cuda/memory.cuh"
#include "mixpeft/cuda/mma_tile.cuh"
#include "mixpeft/ops/grouped_lora.hpp"

namespace mixpeft::cuda {
namespace detail {

// ---- tile configurations -------------------------------------------------------------------------------

inline constexpr int glora_threads = 256;
inline constexpr int glora_pad = 4;  // shared-tile row padding (elements)

// CUDA-core tiles: BM x BN x BK, each thread a TM x TN micro-tile (the epilogue's mapping for both families).
template <int BM_, int BN_, int TM_, int TN_>
struct GloraCfg {
  static constexpr int BM = BM_, BN = BN_, BK = 16, TM = TM_, TN = TN_;
  static constexpr int TX = BN / TN, TY = BM / TM;  // thread grid: TX across columns, TY across rows
  static_assert(TX * TY == glora_threads, "tile must map onto 256 threads");
  static_assert(TX == 16, "the gate-dot shuffle assumes 16 threads per row");
};
using GloraCfg32 = GloraCfg<128, 32, 8, 2>;
using GloraCfg64 = GloraCfg<64, 64, 4, 4>;
using GloraCfg128 = GloraCfg<64, 128, 4, 8>;

// Tensor-core tiles: the same BM x BN (and epilogue mapping), BK = 32, WM x WN warps of mma.sync tiles.
template <class Base, int WM, int WN>
struct GloraMmaCfg : Base {
  static constexpr int BK = 32;
  using Warps = MmaWarps<Base::BM, Base::BN, WM, WN>;
  static_assert(Warps::threads == glora_threads, "the warps must be the CTA's 256 threads");
};
using GloraMmaCfg32 = GloraMmaCfg<GloraCfg32, 8, 1>;    // a warp: 16 x 32
using GloraMmaCfg64 = GloraMmaCfg<GloraCfg64, 4, 2>;    // 16 x 32
using GloraMmaCfg128 = GloraMmaCfg<GloraCfg128, 2, 4>;  // 32 x 32

// ---- test hooks ----------------------------------------------------------------------------------------

// Sets a thread-local setting while alive and restores it after.
template <class T>
class ScopedSetting {
 public:
  ScopedSetting(T& slot, T value) : slot_(slot), saved_(slot) { slot_ = value; }
  ~ScopedSetting() { slot_ = saved_; }
  ScopedSetting(const ScopedSetting&) = delete;
  ScopedSetting& operator=(const ScopedSetting&) = delete;

 private:
  T& slot_;
  T saved_;
};

inline int& grouped_split_override() {
  thread_local int splits = 0;
  return splits;
}
inline bool& grouped_tensor_cores_allowed() {
  thread_local bool allowed = true;
  return allowed;
}

// Forces the number of reduction splits of the grouped LoRA ops on this thread while alive (0: heuristic).
struct GroupedSplitOverride : ScopedSetting<int> {
  explicit GroupedSplitOverride(int splits) : ScopedSetting(grouped_split_override(), splits) {}
};
// Allows or forbids the tensor-core kernels on this thread while alive (forbidden: the CUDA-core kernels run).
struct GroupedTensorCoreOverride : ScopedSetting<bool> {
  explicit GroupedTensorCoreOverride(bool allow) : ScopedSetting(grouped_tensor_cores_allowed(), allow) {}
};

inline bool glora_tensor_cores() { return grouped_tensor_cores_allowed() && tensor_cores_available(); }

// Splits of a reduction of `ktiles` BK-steps run by `ctas` CTAs: enough to give the GPU about two CTAs per SM,
// each split keeping at least 16 steps, at most 32 splits.
inline int glora_splits(std::size_t ctas, std::size_t ktiles) {
  if (const int forced = grouped_split_override(); forced > 0) return forced;
  const std::size_t target = 2 * std::size_t(sm_count());
  if (ctas >= target || ktiles < 32) return 1;
  const std::size_t want = (target + ctas - 1) / std::max<std::size_t>(ctas, 1);
  return int(std::clamp<std::size_t>(std::min(want, ktiles / 16), 1, 32));
}

// ---- tile loader ---------------------------------------------------------------------------------------

// Loads one I x BK operand tile of storage type S into registers (converted to Acc), then stores it to a
// k-major shared tile [BK][I + pad]. Element (i, k) of the tile is the global element
//   KCONTIG:  p[(i0 + i) * ld + (k0 + k)]   (k contiguous)       valid when i0 + i < i_end and k0 + k < k_end
//   !KCONTIG: p[(k0 + k) * ld + (i0 + i)]   (i contiguous)
// Invalid elements read as 0. Vectors of V = 16 / sizeof(S) run along the contiguous axis; `vec` (the base
// and the pitch are 16-byte aligned) enables 16-byte loads for vectors that lie inside the valid range.
// !KCONTIG only: row_scale[k0 + k] (when given) multiplies every element of line k (the gate of a row).
template <class S, class Acc, int I, int BK, bool KCONTIG>
struct GloraTileLoader {
  static constexpr int V = sizeof(S) >= 16 ? 1 : int(16 / sizeof(S));
  static constexpr int CONTIG = KCONTIG ? BK : I;
  static_assert(CONTIG % V == 0, "the contiguous tile extent must hold whole vectors");
  static constexpr int PER_LINE = CONTIG / V;
  static constexpr int NV = I * BK / V;
  static constexpr int ITERS = (NV + glora_threads - 1) / glora_threads;

  Acc v[ITERS][V];

  __device__ void load(const S* __restrict__ p, std::int64_t ld, int i0, int i_end, int k0, int k_end, bool vec,
                       const Acc* __restrict__ row_scale) {
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int idx = int(threadIdx.x) + it * glora_threads;
      if (NV % glora_threads != 0 && idx >= NV) break;
      const int c = (idx % PER_LINE) * V;  // along the contiguous axis
      const int l = idx / PER_LINE;        // along the other axis
      const int line = (KCONTIG ? i0 : k0) + l, line_end = KCONTIG ? i_end : k_end;
      const int c0 = (KCONTIG ? k0 : i0) + c, c_end = KCONTIG ? k_end : i_end;
      if (line < line_end) {
        const S* q = p + std::int64_t(line) * ld + c0;
        if (vec && c0 + V <= c_end) {
          const Pack<S, V> pack = *reinterpret_cast<const Pack<S, V>*>(q);
#pragma unroll
          for (int j = 0; j < V; ++j) v[it][j] = Acc(widen(pack.v[j]));
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) v[it][j] = c0 + j < c_end ? Acc(widen(q[j])) : Acc(0);
        }
        if constexpr (!KCONTIG) {
          if (row_scale) {
            const Acc g = row_scale[line];
#pragma unroll
            for (int j = 0; j < V; ++j) v[it][j] *= g;
          }
        }
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) v[it][j] = Acc(0);
      }
    }
  }

  __device__ void store(Acc (*tile)[I + glora_pad]) const {
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int idx = int(threadIdx.x) + it * glora_threads;
      if (NV % glora_threads != 0 && idx >= NV) break;
      const int c = (idx % PER_LINE) * V, l = idx / PER_LINE;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if constexpr (KCONTIG) tile[c + j][l] = v[it][j];
        else tile[l][c + j] = v[it][j];
      }
    }
  }
};

// acc[i][j] += sum_k As[k][ty + TY i] * Bs[k][tx + TX j] over one BK step.
template <class Cfg, class Acc>
__device__ inline void glora_tile_fma(const Acc (*As)[Cfg::BM + glora_pad], const Acc (*Bs)[Cfg::BN + glora_pad],
                                Acc (&acc)[Cfg::TM][Cfg::TN], int ty, int tx) {
#pragma unroll
  for (int k = 0; k < Cfg::BK; ++k) {
    Acc a[Cfg::TM], b[Cfg::TN];
#pragma unroll
    for (int i = 0; i < Cfg::TM; ++i) a[i] = As[k][ty + Cfg::TY * i];
#pragma unroll
    for (int j = 0; j < Cfg::TN; ++j) b[j] = Bs[k][tx + Cfg::TX * j];
#pragma unroll
    for (int i = 0; i < Cfg::TM; ++i)
#pragma unroll
      for (int j = 0; j < Cfg::TN; ++j) acc[i][j] += a[i] * b[j];
  }
}

// ---- the tile math of the two kernel families --------------------------------------------------------
//
// A math object owns a CTA's operand tiles (in `smem`, its shared buffer of smem_bytes) and accumulators:
//   run(kb, ktiles, load)   the main loop: load(k0) fetches the operand tiles at reduction index k0 into registers
//                           (load_a / load_b: a tile loader's load); tile kt is stored to shared memory while tile kt + 1 is
//                           fetched, then multiplied
//   result(out)             the accumulators in the CUDA-core epilogue mapping: out[i][j] = (row ty + TY i,
//                           column tx + TX j) of the BM x BN tile, with tx = thread % TX, ty = thread / TX
// Operand A is BM rows of the product (KA: its reduction index is contiguous), B is BN columns (KB likewise).

template <int BK, class Load, class Store, class Multiply>
__device__ inline void glora_main_loop(int kb, int ktiles, Load&& load, Store&& store, Multiply&& multiply) {
  if (ktiles > 0) load(kb);
  for (int kt = 0; kt < ktiles; ++kt) {
    store();
    __syncthreads();
    if (kt + 1 < ktiles) load(kb + (kt + 1) * BK);
    multiply();
    __syncthreads();
  }
}

// CUDA cores: operands converted to Acc on load into k-major shared tiles, TM x TN register micro-tiles.
template <class Cfg, class TA, class TB, class Acc, bool KA, bool KB>
struct GloraSimtMath {
  static constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK;
  static constexpr std::size_t a_bytes = sizeof(Acc) * BK * (BM + glora_pad);
  static constexpr std::size_t smem_bytes = a_bytes + sizeof(Acc) * BK * (BN + glora_pad);

  Acc (*As)[BM + glora_pad];
  Acc (*Bs)[BN + glora_pad];
  GloraTileLoader<TA, Acc, BM, BK, KA> a;
  GloraTileLoader<TB, Acc, BN, BK, KB> b;
  Acc acc[Cfg::TM][Cfg::TN] = {};
  int tx = int(threadIdx.x) % Cfg::TX, ty = int(threadIdx.x) / Cfg::TX;

  __device__ explicit GloraSimtMath(unsigned char* smem)
      : As(reinterpret_cast<Acc (*)[BM + glora_pad]>(smem)),
        Bs(reinterpret_cast<Acc (*)[BN + glora_pad]>(smem + a_bytes)) {}

  // The loaders' load(src, ld, i0, i_end, k0, k_end, vec, row_scale).
  template <class... Args>
  __device__ void load_a(const Args&... args) {
    a.load(args...);
  }
  template <class... Args>
  __device__ void load_b(const Args&... args) {
    b.load(args...);
  }

  template <class Load>
  __device__ void run(int kb, int ktiles, Load&& load) {
    glora_main_loop<BK>(
        kb, ktiles, load,
        [&] {
          a.store(As);
          b.store(Bs);
        },
        [&] { glora_tile_fma<Cfg>(As, Bs, acc, ty, tx); });
  }
  __device__ void result(Acc (&out)[Cfg::TM][Cfg::TN]) const {
#pragma unroll
    for (int i = 0; i < Cfg::TM; ++i)
#pragma unroll
      for (int j = 0; j < Cfg::TN; ++j) out[i][j] = acc[i][j];
  }
};

// Tensor cores (cuda/mma_tile.cuh): operands kept in their 16-bit storage type, 8 warps of mma.sync tiles; the
// accumulators are staged through the same shared buffer into the epilogue mapping.
template <class Cfg, class S, bool KA, bool KB>
struct GloraMmaMath {
  using W = typename Cfg::Warps;
  static constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK;
  using TileA = MmaTile<BM, BK, KA>;
  using TileB = MmaTile<BN, BK, KB>;
  static constexpr std::size_t tiles = TileA::bytes + TileB::bytes, staged = mma_staged_bytes<W>;
  static constexpr std::size_t smem_bytes = tiles > staged ? tiles : staged;

  unsigned char* smem;
  TileA ta;
  TileB tb;
  MmaTileLoader<S, BM, BK, KA, glora_threads> a;
  MmaTileLoader<S, BN, BK, KB, glora_threads> b;
  float acc[W::MI][W::NI][4] = {};

  __device__ explicit GloraMmaMath(unsigned char* buffer)
      : smem(buffer),
        ta{reinterpret_cast<std::uint16_t*>(buffer)},
        tb{reinterpret_cast<std::uint16_t*>(buffer + TileA::bytes)} {}

  template <class... Args>
  __device__ void load_a(const Args&... args) {
    a.load(args..., int(threadIdx.x));
  }
  template <class... Args>
  __device__ void load_b(const Args&... args) {
    b.load(args..., int(threadIdx.x));
  }

  template <class Load>
  __device__ void run(int kb, int ktiles, Load&& load) {
    glora_main_loop<BK>(
        kb, ktiles, load,
        [&] {
          a.store(ta, int(threadIdx.x));
          b.store(tb, int(threadIdx.x));
        },
        [&] { mma_tile_product<W, S, BK>(ta, tb, acc, int(threadIdx.x)); });
  }
  // Every thread must call it (it synchronises the CTA); the operand tiles are dead once run() has returned.
  __device__ void result(float (&out)[Cfg::TM][Cfg::TN]) {
    float* cs = reinterpret_cast<float*>(smem);
    stage_accumulators<W>(acc, cs, int(threadIdx.x));
    __syncthreads();
    const int tx = int(threadIdx.x) % Cfg::TX, ty = int(threadIdx.x) / Cfg::TX;
#pragma unroll
    for (int i = 0; i < Cfg::TM; ++i)
#pragma unroll
      for (int j = 0; j < Cfg::TN; ++j) out[i][j] = cs[(ty + Cfg::TY * i) * (BN + 4) + tx + Cfg::TX * j];
  }
};

// The math of a configuration: tensor cores for a GloraMmaCfg (whose operands are then one 16-bit type).
template <class Cfg, class TA, class TB, class Acc, bool KA, bool KB>
struct GloraMathOf {
  using type = GloraSimtMath<Cfg, TA, TB, Acc, KA, KB>;
};
template <class Cfg, class TA, class TB, class Acc, bool KA, bool KB>
  requires requires { typename Cfg::Warps; }
struct GloraMathOf<Cfg, TA, TB, Acc, KA, KB> {
  static_assert(std::is_same_v<TA, TB> && std::is_same_v<Acc, float>, "tensor-core tiles: one 16-bit operand type");
  using type = GloraMmaMath<Cfg, TA, KA, KB>;
};
template <class Cfg, class TA, class TB, class Acc, bool KA, bool KB>
using GloraMath = typename GloraMathOf<Cfg, TA, TB, Acc, KA, KB>::type;

// Rows [b, e) of expert `expert`, clamped to [0, m).
__device__ inline void glora_expert_rows(const std::int32_t* __restrict__ offsets, int expert, int m, int& b, int& e) {
  b = min(max(offsets[expert], 0), m);
  e = min(max(offsets[expert + 1], b), m);
}

// Warp 0 of the CTA: which expert owns global row tile `tile` (tiles numbered expert by expert, ceil(count / bm)
// each) and its rows [r0, r1). expert = -1 when the tile is past the last one.
__device__ inline void glora_find_row_tile(const std::int32_t* __restrict__ offsets, int experts, int m, int bm, int tile,
                                     int& expert, int& r0, int& r1) {
  const unsigned lane = threadIdx.x % 32;
  expert = -1, r0 = 0, r1 = 0;
  int base = 0;
  for (int e0 = 0; e0 < experts; e0 += 32) {
    const int e = e0 + int(lane);
    int b = 0, en = 0, tiles = 0;
    if (e < experts) {
      glora_expert_rows(offsets, e, m, b, en);
      tiles = (en - b + bm - 1) / bm;
    }
    int incl = tiles;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, incl, d);
      if (int(lane) >= d) incl += y;
    }
    const int excl = incl - tiles;
    const bool mine = tiles > 0 && tile >= base + excl && tile < base + incl;
    const unsigned ballot = __ballot_sync(0xffffffffu, mine);
    if (ballot) {
      const int src = __ffs(int(ballot)) - 1;
      const int row0 = __shfl_sync(0xffffffffu, b + (tile - base - excl) * bm, src);
      const int row_end = __shfl_sync(0xffffffffu, en, src);
      expert = e0 + src, r0 = row0, r1 = min(row0 + bm, row_end);
      return;
    }
    base += __shfl_sync(0xffffffffu, incl, 31);
  }
}

// ---- row ops -------------------------------------------------------------------------------------------

// C[j, n] = g[j] * alpha * sum_k X[j, k] W_e(k, n) (+ C[j, n] when accumulate), for j in block e, where
// W_e(k, n) = w[e * w_stride + n * ldw + k] (WT: W_e stored [N, K], y = x W^T) or w[e * w_stride + k * ldw + n]
// (!WT: W_e stored [K, N]). dgates[j] += sum_n (alpha * (X W)[j, n]) * h[j, n] (before the gate).
template <class TA, class TB, class TC, class Acc>
struct RowsParams {
  const TA* a;
  std::int64_t lda;
  const TB* w;
  std::int64_t ldw, w_stride;
  TC* c;  // [M, N], pitch N
  const std::int32_t* offsets;
  int experts, m, n, k;
  Acc alpha;
  bool accumulate;
  const Acc* gates;  // [M] or null
  const TC* h;       // [M, N] or null
  Acc* dgates;       // [M] or null (then h is given)
  Acc* partial;      // split-K scratch [splits, M, N]: the CTA stores raw sums there instead of the epilogue
  int k_chunk;       // reduction columns per split (a multiple of BK)
  bool vec_a, vec_w;
};

// This CTA's row tile (blockIdx.x): its expert e and rows [r0, r1), found by warp 0 and shared with the CTA.
// e < 0 (uniform over the CTA): past the last tile, nothing to do.
template <int BM>
__device__ inline void glora_cta_row_tile(const std::int32_t* __restrict__ offsets, int experts, int m, int& e,
                                          int& r0, int& r1) {
  __shared__ int tile_info[3];
  if (threadIdx.x < 32) {
    int te, t0, t1;
    glora_find_row_tile(offsets, experts, m, BM, int(blockIdx.x), te, t0, t1);
    if (threadIdx.x == 0) tile_info[0] = te, tile_info[1] = t0, tile_info[2] = t1;
  }
  __syncthreads();
  e = tile_info[0], r0 = tile_info[1], r1 = tile_info[2];
}

// The row ops' epilogue for thread (ty, tx)'s accumulators acc[i][jj] = (row r0 + ty + TY i, column n0 + tx + TX jj):
// raw sums to the split-K scratch, or alpha, the gate dot, the gate and beta applied and the result stored.
template <class Cfg, class TA, class TB, class TC, class Acc>
__device__ inline void glora_rows_epilogue(const RowsParams<TA, TB, TC, Acc>& p, const Acc (&acc)[Cfg::TM][Cfg::TN],
                                           int r0, int r1, int n0, int ty, int tx) {
  if (p.partial) {
    Acc* part = p.partial + std::int64_t(blockIdx.z) * p.m * p.n;
#pragma unroll
    for (int i = 0; i < Cfg::TM; ++i) {
      const int j = r0 + ty + Cfg::TY * i;
      if (j >= r1) continue;
#pragma unroll
      for (int jj = 0; jj < Cfg::TN; ++jj) {
        const int n = n0 + tx + Cfg::TX * jj;
        if (n < p.n) part[std::int64_t(j) * p.n + n] = acc[i][jj];
      }
    }
    return;
  }
  // The CTA holds whole rows when dgates is given (gridDim.y == 1).
#pragma unroll
  for (int i = 0; i < Cfg::TM; ++i) {
    const int j = r0 + ty + Cfg::TY * i;
    const bool row_ok = j < r1;
    const Acc g = row_ok && p.gates ? p.gates[j] : Acc(1);
    Acc dot = 0;
#pragma unroll
    for (int jj = 0; jj < Cfg::TN; ++jj) {
      const int n = n0 + tx + Cfg::TX * jj;
      if (!row_ok || n >= p.n) continue;
      const std::int64_t at = std::int64_t(j) * p.n + n;
      Acc v = p.alpha * acc[i][jj];
      if (p.dgates) dot += v * Acc(widen(p.h[at]));
      v *= g;
      p.c[at] = narrow<TC>(p.accumulate ? Acc(widen(p.c[at])) + v : v);
    }
    if (p.dgates) {  // the 16 threads of a row are 16 aligned lanes of one warp: a fixed butterfly
#pragma unroll
      for (int off = Cfg::TX / 2; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
      if (tx == 0 && row_ok) p.dgates[j] += dot;
    }
  }
}

// The row kernel of either family (Cfg: GloraCfg* or GloraMmaCfg*).
template <class Cfg, bool WT, class TA, class TB, class TC, class Acc>
__global__ void __launch_bounds__(glora_threads) grouped_rows_kernel(RowsParams<TA, TB, TC, Acc> p) {
  using Math = GloraMath<Cfg, TA, TB, Acc, true, WT>;
  __shared__ __align__(16) unsigned char smem[Math::smem_bytes];
  int e, r0, r1;
  glora_cta_row_tile<Cfg::BM>(p.offsets, p.experts, p.m, e, r0, r1);
  if (e < 0) return;
  const int n0 = int(blockIdx.y) * Cfg::BN;
  const int kb = int(blockIdx.z) * p.k_chunk, ke = min(p.k, kb + p.k_chunk);
  const TB* w = p.w + std::int64_t(e) * p.w_stride;
  Math math(smem);
  math.run(kb, ke > kb ? (ke - kb + Cfg::BK - 1) / Cfg::BK : 0, [&](int k0) {
    math.load_a(p.a, p.lda, r0, r1, k0, ke, p.vec_a, nullptr);
    math.load_b(w, p.ldw, n0, p.n, k0, ke, p.vec_w, nullptr);
  });
  Acc out[Cfg::TM][Cfg::TN];
  math.result(out);
  glora_rows_epilogue<Cfg>(p, out, r0, r1, n0, int(threadIdx.x) / Cfg::TX, int(threadIdx.x) % Cfg::TX);
}

// The split-K epilogue, one warp per row: v = alpha * sum_z partial[z, j, :] (in order), then as above.
template <class TC, class Acc>
__global__ void grouped_rows_finalize_kernel(const Acc* __restrict__ partial, int splits, int m, int n, Acc alpha,
                                             bool accumulate, const Acc* __restrict__ gates, const TC* h,
                                             Acc* dgates, TC* c) {
  const int warps = int(blockDim.x) / 32, lane = int(threadIdx.x) % 32;
  for (int j = int(blockIdx.x) * warps + int(threadIdx.x) / 32; j < m; j += int(gridDim.x) * warps) {
    const Acc g = gates ? gates[j] : Acc(1);
    Acc dot = 0;
    for (int q = lane; q < n; q += 32) {
      const std::int64_t at = std::int64_t(j) * n + q;
      Acc s = 0;
      for (int z = 0; z < splits; ++z) s += partial[std::int64_t(z) * m * n + at];
      Acc v = alpha * s;
      if (dgates) dot += v * Acc(widen(h[at]));
      v *= g;
      c[at] = narrow<TC>(accumulate ? Acc(widen(c[at])) + v : v);
    }
    if (dgates) {
      dot = warp_reduce(dot, SumOp{});
      if (lane == 0) dgates[j] += dot;
    }
  }
}

// Operand pairs that run on tensor cores (when the device has them): both bf16 or both fp16.
template <class TA, class TB>
inline constexpr bool glora_mma_types_v = std::is_same_v<TA, TB> && is_reduced_float_v<TA>;

template <class T>
bool glora_vector_ok(const T* p, std::size_t ld) {
  return is_aligned(p, 16) && (ld * sizeof(T)) % 16 == 0;
}

// Launches the row op (and its split-K finalize when needed). narrow: N is r (pick the tile by N, allow
// split-K); wide: N is in / out, the reduction r is short (64 x 128 tiles, no split).
template <bool WT, class TA, class TB, class TC, class Acc>
void launch_grouped_rows(const char* op, bool narrow_n, const TA* a, std::size_t lda, const TB* w, std::size_t ldw,
                         std::size_t w_stride, TC* c, const std::int32_t* offsets, std::size_t experts,
                         std::size_t m, std::size_t n, std::size_t k, double alpha, bool accumulate,
                         const Acc* gates, const TC* h, Acc* dgates) {
  if (m == 0 || n == 0) return;
  require<ConfigError>(m <= std::size_t(INT32_MAX) && n <= std::size_t(INT32_MAX) && k <= std::size_t(INT32_MAX),
                       op, ": extents must fit in int32 (M = ", m, ", N = ", n, ", K = ", k, ")");
  const auto run = [&]<class Cfg>(Cfg) {
    const std::size_t max_tiles = (m + Cfg::BM - 1) / Cfg::BM + experts;
    const std::size_t ntiles = (n + Cfg::BN - 1) / Cfg::BN;
    require<ConfigError>(ntiles <= 65535, op, ": N = ", n, " needs more than 65535 column tiles");
    const std::size_t ktiles = (k + Cfg::BK - 1) / Cfg::BK;
    const std::size_t est_ctas = ((m + Cfg::BM - 1) / Cfg::BM + (experts + 1) / 2) * ntiles;
    int splits = narrow_n && ktiles > 0 ? std::min<int>(glora_splits(est_ctas, ktiles), int(ktiles)) : 1;
    const std::size_t k_chunk = ktiles > 0 ? (ktiles + splits - 1) / splits * Cfg::BK : Cfg::BK;
    if (ktiles > 0) splits = int((k + k_chunk - 1) / k_chunk);
    const bool use_partial = splits > 1 || (dgates && ntiles > 1);
    DeviceTensor<Acc> partial(Shape{use_partial ? std::size_t(splits) * m * n : 0});
    const RowsParams<TA, TB, TC, Acc> p{.a = a, .lda = std::int64_t(lda), .w = w, .ldw = std::int64_t(ldw),
                                        .w_stride = std::int64_t(w_stride), .c = c, .offsets = offsets,
                                        .experts = int(experts), .m = int(m), .n = int(n), .k = int(k),
                                        .alpha = Acc(alpha), .accumulate = accumulate, .gates = gates, .h = h,
                                        .dgates = dgates, .partial = use_partial ? partial.data() : nullptr,
                                        .k_chunk = int(k_chunk), .vec_a = glora_vector_ok(a, lda),
                                        .vec_w = glora_vector_ok(w, ldw)};
    const cudaStream_t stream = current_stream();
    const dim3 grid{unsigned(max_tiles), unsigned(ntiles), unsigned(splits)};
    grouped_rows_kernel<Cfg, WT><<<grid, glora_threads, 0, stream>>>(p);
    check_launch(op);
    if (use_partial) {
      constexpr unsigned block = 256;
      const unsigned grid = grid_size(m * 32, block);
      grouped_rows_finalize_kernel<<<grid, block, 0, stream>>>(partial.data(), splits, int(m), int(n), Acc(alpha),
                                                               accumulate, gates, h, dgates, c);
      check_launch(op);
    }
  };
  const auto pick = [&]<class Simt, class Mma>(Simt, Mma) {
    if constexpr (glora_mma_types_v<TA, TB>)
      if (glora_tensor_cores()) return run(Mma{});
    run(Simt{});
  };
  if (!narrow_n || n > 64) pick(GloraCfg128{}, GloraMmaCfg128{});
  else if (n > 32) pick(GloraCfg64{}, GloraMmaCfg64{});
  else pick(GloraCfg32{}, GloraMmaCfg32{});
}

// ---- weight gradients ----------------------------------------------------------------------------------

// dW_e(m, n) += alpha * sum_{j in e} U[j, m] g[j] V[j, n]   (m < md: the wide axis, n < N = r),
// stored at dw[(e * md + m) * N + n] or, transposed, dw[(e * N + n) * md + m].
template <class TU, class TV, class TD, class Acc>
struct WgradParams {
  const TU* u;  // [M, md]
  const TV* v;  // [M, N]
  const Acc* gates;
  TD* dw;
  const std::int32_t* offsets;
  int experts, rows, md, n, splits, mtiles;
  Acc alpha;
  bool transposed;
  Acc* partial;  // [splits, K, md, N] when splits > 1
  bool vec_u, vec_v;
};

// This CTA's share of expert blockIdx.y's rows: [rb, re), split blockIdx.z of p.splits. false: nothing to do
// (an empty expert with no split: dW_e += 0; with splits the CTA still writes its zero partial sums).
template <class P>
__device__ inline bool glora_wgrad_rows(const P& p, int bk, int& rb, int& re) {
  int b, en;
  glora_expert_rows(p.offsets, int(blockIdx.y), p.rows, b, en);
  const int steps = (en - b + bk - 1) / bk;
  const int chunk = (steps + p.splits - 1) / p.splits * bk;
  rb = min(en, b + int(blockIdx.z) * chunk), re = min(en, rb + chunk);
  return !(p.splits == 1 && rb >= re);
}

// The weight gradients' epilogue for thread (ty, tx)'s accumulators (wide index m0 + ty + TY i, rank n0 + tx + TX jj).
template <class Cfg, class TU, class TV, class TD, class Acc>
__device__ inline void glora_wgrad_epilogue(const WgradParams<TU, TV, TD, Acc>& p, const Acc (&acc)[Cfg::TM][Cfg::TN],
                                            int m0, int n0, int ty, int tx) {
  const int e = int(blockIdx.y);
  const std::int64_t slab = std::int64_t(p.md) * p.n;
#pragma unroll
  for (int i = 0; i < Cfg::TM; ++i) {
    const int m = m0 + ty + Cfg::TY * i;
    if (m >= p.md) continue;
#pragma unroll
    for (int jj = 0; jj < Cfg::TN; ++jj) {
      const int n = n0 + tx + Cfg::TX * jj;
      if (n >= p.n) continue;
      if (p.splits > 1) {
        p.partial[(std::int64_t(blockIdx.z) * p.experts + e) * slab + std::int64_t(m) * p.n + n] = acc[i][jj];
      } else {
        const std::int64_t at =
            std::int64_t(e) * slab + (p.transposed ? std::int64_t(n) * p.md + m : std::int64_t(m) * p.n + n);
        p.dw[at] = narrow<TD>(Acc(widen(p.dw[at])) + p.alpha * acc[i][jj]);
      }
    }
  }
}

// The weight-gradient kernel of either family: both operands run along the reduction (the rows j).
template <class Cfg, class TU, class TV, class TD, class Acc>
__global__ void __launch_bounds__(glora_threads) grouped_wgrad_kernel(WgradParams<TU, TV, TD, Acc> p) {
  using Math = GloraMath<Cfg, TU, TV, Acc, false, false>;
  __shared__ __align__(16) unsigned char smem[Math::smem_bytes];
  const int m0 = int(blockIdx.x) % p.mtiles * Cfg::BM, n0 = int(blockIdx.x) / p.mtiles * Cfg::BN;
  int rb, re;
  if (!glora_wgrad_rows(p, Cfg::BK, rb, re)) return;
  Math math(smem);
  math.run(rb, re > rb ? (re - rb + Cfg::BK - 1) / Cfg::BK : 0, [&](int k0) {
    math.load_a(p.u, p.md, m0, p.md, k0, re, p.vec_u, nullptr);
    math.load_b(p.v, p.n, n0, p.n, k0, re, p.vec_v, p.gates);
  });
  Acc out[Cfg::TM][Cfg::TN];
  math.result(out);
  glora_wgrad_epilogue<Cfg>(p, out, m0, n0, int(threadIdx.x) / Cfg::TX, int(threadIdx.x) % Cfg::TX);
}

template <class TD, class Acc>
__global__ void grouped_wgrad_finalize_kernel(const Acc* __restrict__ partial, int splits, int experts, int md, int n,
                                              Acc alpha, bool transposed, TD* dw) {
  const std::int64_t slab = std::int64_t(md) * n, total = slab * experts;
  for (std::int64_t idx = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += std::int64_t(gridDim.x) * blockDim.x) {
    Acc s = 0;
    for (int z = 0; z < splits; ++z) s += partial[z * total + idx];
    const std::int64_t e = idx / slab, rem = idx % slab, m = rem / n, q = rem % n;
    const std::int64_t at = transposed ? e * slab + q * md + m : idx;
    dw[at] = narrow<TD>(Acc(widen(dw[at])) + alpha * s);
  }
}

template <class TU, class TV, class TD, class Acc>
void launch_grouped_wgrad(const char* op, const TU* u, const TV* v, const Acc* gates, TD* dw, bool transposed,
                          const std::int32_t* offsets, std::size_t experts, std::size_t rows, std::size_t md,
                          std::size_t n, double alpha) {
  if (experts == 0 || md == 0 || n == 0 || rows == 0) return;
  require<ConfigError>(rows <= std::size_t(INT32_MAX) && md <= std::size_t(INT32_MAX) && n <= std::size_t(INT32_MAX),
                       op, ": extents must fit in int32 (M = ", rows, ", ", md, " x ", n, ")");
  require<ConfigError>(experts <= 65535, op, ": at most 65535 experts (got ", experts, ")");
  const auto run = [&]<class Cfg>(Cfg) {
    const std::size_t mtiles = (md + Cfg::BM - 1) / Cfg::BM, ntiles = (n + Cfg::BN - 1) / Cfg::BN;
    const std::size_t per_expert = (rows + experts - 1) / experts;
    const int splits = glora_splits(mtiles * ntiles * experts, (per_expert + Cfg::BK - 1) / Cfg::BK);
    DeviceTensor<Acc> partial(Shape{splits > 1 ? std::size_t(splits) * experts * md * n : 0});
    const WgradParams<TU, TV, TD, Acc> p{.u = u, .v = v, .gates = gates, .dw = dw, .offsets = offsets,
                                         .experts = int(experts), .rows = int(rows), .md = int(md), .n = int(n),
                                         .splits = splits, .mtiles = int(mtiles), .alpha = Acc(alpha),
                                         .transposed = transposed, .partial = splits > 1 ? partial.data() : nullptr,
                                         .vec_u = glora_vector_ok(u, md), .vec_v = glora_vector_ok(v, n)};
    const cudaStream_t stream = current_stream();
    const dim3 grid{unsigned(mtiles * ntiles), unsigned(experts), unsigned(splits)};
    grouped_wgrad_kernel<Cfg><<<grid, glora_threads, 0, stream>>>(p);
    check_launch(op);
    if (splits > 1) {
      constexpr unsigned block = 256;
      grouped_wgrad_finalize_kernel<<<grid_size(experts * md * n, block), block, 0, stream>>>(
          partial.data(), splits, int(experts), int(md), int(n), Acc(alpha), transposed, dw);
      check_launch(op);
    }
  };
  const auto pick = [&]<class Simt, class Mma>(Simt, Mma) {
    if constexpr (glora_mma_types_v<TU, TV>)
      if (glora_tensor_cores()) return run(Mma{});
    run(Simt{});
  };
  if (n > 64) pick(GloraCfg128{}, GloraMmaCfg128{});
  else if (n > 32) pick(GloraCfg64{}, GloraMmaCfg64{});
  else pick(GloraCfg32{}, GloraMmaCfg32{});
}

// ---- host-side checks ----------------------------------------------------------------------------------

template <class W, class... U>
inline constexpr bool glora_same_accumulator_v = (std::is_same_v<acc_t<W>, acc_t<U>> && ...);

template <class W, class U>
inline constexpr bool glora_storage_of_v = std::is_same_v<U, W> || (is_reduced_float_v<W> && std::is_same_v<U, float>);

// K from a stacked weight [K, rows, cols] (or one expert's [rows, cols]), with offsets [K + 1] and M rows to share
// out: the checks of ops/grouped_lora.hpp, on shapes only (the offsets' values stay on the device).
template <class W>
mixpeft::detail::StackedDims glora_check_stacked(std::string_view op, std::string_view name, const DeviceTensor<W>& w,
                                                 std::string_view layout, const DeviceTensor<std::int32_t>& offsets,
                                                 std::size_t m) {
  const auto d = mixpeft::detail::stacked_dims(op, name, w.shape(), layout);
  mixpeft::detail::check_grouping(op, d, offsets.shape(), m);
  return d;
}

}  // namespace detail

// ---- the ops -------------------------------------------------------------------------------------------

// offsets = [0, m] on the device: one block of all rows (a single LoRA). One small host-to-device copy.
inline void one_block_offsets(std::size_t m, DeviceTensor<std::int32_t>& offsets) {
  require<ConfigError>(m <= std::size_t(std::numeric_limits<std::int32_t>::max()), "one_block_offsets: ", m,
                       " rows do not fit int32 offsets");
  resize_to(offsets, Shape{2});
  const std::int32_t host[2] = {0, std::int32_t(m)};
  // Pageable source: the copy is staged before the call returns, so `host` may go out of scope.
  MIXPEFT_CUDA_CHECK(cudaMemcpyAsync(offsets.data(), host, sizeof(host), cudaMemcpyHostToDevice, current_stream()));
}

// t[j, :] = x[j, :] A_e^T on every row block. x [M, in] (or [..., in]), A [K, r, in] -> t [M, r].
template <class TX, class TW, class TT>
void grouped_lora_shrink(const DeviceTensor<TX>& x, const DeviceTensor<TW>& A, const DeviceTensor<std::int32_t>& offsets,
                         DeviceTensor<TT>& t) {
  static_assert(detail::glora_storage_of_v<TW, TX> && detail::glora_storage_of_v<TW, TT>,
                "grouped_lora_shrink: x and t must be stored as A or, for bf16 / fp16 A, as float");
  constexpr std::string_view op = "grouped_lora_shrink";
  const auto d = detail::glora_check_stacked(op, "A", A, "[K, r, in] or [r, in]", offsets, rows(x));
  const std::size_t experts = d.experts, r = d.rows, in = d.cols;
  expect_width(op, "x", x, in);
  const std::size_t m = rows(x);
  resize_to(t, {m, r});
  detail::launch_grouped_rows<true>(op.data(), true, x.data(), in, A.data(), in, r * in, t.data(), offsets.data(),
                                    experts, m, r, in, 1.0, false, static_cast<const acc_t<TW>*>(nullptr),
                                    static_cast<const TT*>(nullptr), static_cast<acc_t<TW>*>(nullptr));
}

// y[j, :] (=|+=) scale * c[j] * t[j, :] B_e^T. t [M, r], B [K, out, r], gates [M] or null -> y [M, out]
// (accumulate: y must already be [M, out]).
template <class TT, class TW, class TY>
void grouped_lora_expand(const DeviceTensor<TT>& t, const DeviceTensor<TW>& B, const DeviceTensor<std::int32_t>& offsets,
                         double scale, const std::type_identity_t<DeviceTensor<acc_t<TW>>>* gates, bool accumulate,
                         DeviceTensor<TY>& y) {
  static_assert(detail::glora_storage_of_v<TW, TT> && detail::glora_storage_of_v<TW, TY>,
                "grouped_lora_expand: t and y must be stored as B or, for bf16 / fp16 B, as float");
  constexpr std::string_view op = "grouped_lora_expand";
  const auto d = detail::glora_check_stacked(op, "B", B, "[K, out, r] or [out, r]", offsets, rows(t));
  const std::size_t experts = d.experts, out = d.rows, r = d.cols;
  expect_width(op, "t", t, r);
  const std::size_t m = rows(t);
  if (gates) mixpeft::detail::check_per_row(op, "gates", gates->shape(), m);
  if (accumulate) mixpeft::detail::check_rows_of(op, "y", y.shape(), m, out);
  else resize_to(y, {m, out});
  detail::launch_grouped_rows<true>(op.data(), false, t.data(), r, B.data(), r, out * r, y.data(), offsets.data(),
                                    experts, m, out, r, scale, accumulate, gates ? gates->data() : nullptr,
                                    static_cast<const TY*>(nullptr), static_cast<acc_t<TW>*>(nullptr));
}

// u[j, :] = scale * dy[j, :] B_e;  dt[j, :] = c[j] * u[j, :] (written);  dgates[j] += <u[j, :], h[j, :]>
// (when dgates is given; h is then the forward's ungated t). dy [M, out], B [K, out, r] -> dt [M, r].
template <class TY, class TW, class TT>
void grouped_lora_expand_backward(const DeviceTensor<TY>& dy, const DeviceTensor<TW>& B,
                                  const DeviceTensor<std::int32_t>& offsets, double scale,
                                  const std::type_identity_t<DeviceTensor<acc_t<TW>>>* gates, DeviceTensor<TT>& dt,
                                  const std::type_identity_t<DeviceTensor<TT>>* h = nullptr,
                                  std::type_identity_t<DeviceTensor<acc_t<TW>>>* dgates = nullptr) {
  static_assert(detail::glora_storage_of_v<TW, TY> && detail::glora_storage_of_v<TW, TT>,
                "grouped_lora_expand_backward: dy and dt must be stored as B or, for bf16 / fp16 B, as float");
  constexpr std::string_view op = "grouped_lora_expand_backward";
  const auto d = detail::glora_check_stacked(op, "B", B, "[K, out, r] or [out, r]", offsets, rows(dy));
  const std::size_t experts = d.experts, out = d.rows, r = d.cols;
  expect_width(op, "dy", dy, out);
  const std::size_t m = rows(dy);
  if (gates) mixpeft::detail::check_per_row(op, "gates", gates->shape(), m);
  if (dgates) {
    require<ShapeError>(h != nullptr, op, ": dgates needs h (the forward's ungated t)");
    mixpeft::detail::check_per_row(op, "dgates", dgates->shape(), m);
    mixpeft::detail::check_rows_of(op, "h", h->shape(), m, r);
    require<ShapeError>(static_cast<const void*>(h) != static_cast<const void*>(&dt), op,
                        ": h and dt must be different tensors");
  }
  resize_to(dt, {m, r});
  // dt = dy B_e: the weight is read as [K = out, N = r] (not transposed).
  detail::launch_grouped_rows<false>(op.data(), true, dy.data(), out, B.data(), r, out * r, dt.data(), offsets.data(),
                                     experts, m, r, out, scale, false, gates ? gates->data() : nullptr,
                                     dgates ? h->data() : nullptr, dgates ? dgates->data() : nullptr);
}

// dx[j, :] (=|+=) dt[j, :] A_e. dt [M, r], A [K, r, in] -> dx [M, in] (accumulate: dx must already be [M, in]).
template <class TT, class TW, class TX>
void grouped_lora_shrink_backward(const DeviceTensor<TT>& dt, const DeviceTensor<TW>& A,
                                  const DeviceTensor<std::int32_t>& offsets, bool accumulate, DeviceTensor<TX>& dx) {
  static_assert(detail::glora_storage_of_v<TW, TT> && detail::glora_storage_of_v<TW, TX>,
                "grouped_lora_shrink_backward: dt and dx must be stored as A or, for bf16 / fp16 A, as float");
  constexpr std::string_view op = "grouped_lora_shrink_backward";
  const auto d = detail::glora_check_stacked(op, "A", A, "[K, r, in] or [r, in]", offsets, rows(dt));
  const std::size_t experts = d.experts, r = d.rows, in = d.cols;
  expect_width(op, "dt", dt, r);
  const std::size_t m = rows(dt);
  if (accumulate) mixpeft::detail::check_rows_of(op, "dx", dx.shape(), m, in);
  else resize_to(dx, {m, in});
  detail::launch_grouped_rows<false>(op.data(), false, dt.data(), r, A.data(), in, r * in, dx.data(), offsets.data(),
                                     experts, m, in, r, 1.0, accumulate, static_cast<const acc_t<TW>*>(nullptr),
                                     static_cast<const TX*>(nullptr), static_cast<acc_t<TW>*>(nullptr));
}

// dB_e += scale * sum_{j in e} c[j] dy[j, :]^T t[j, :]. dy [M, out], t [M, r] (the ungated t; c = gates or 1),
// dB [K, out, r] (stored as the weights, or float for bf16 / fp16 weights).
template <class TY, class TT, class TD>
void grouped_lora_grad_B(const DeviceTensor<TY>& dy, const DeviceTensor<TT>& t, const DeviceTensor<std::int32_t>& offsets,
                         double scale, const std::type_identity_t<DeviceTensor<acc_t<TD>>>* gates, DeviceTensor<TD>& dB) {
  static_assert(detail::glora_same_accumulator_v<TD, TY, TT>, "grouped_lora_grad_B: mixed double and single precision");
  constexpr std::string_view op = "grouped_lora_grad_B";
  const auto d = detail::glora_check_stacked(op, "dB", dB, "[K, out, r] or [out, r]", offsets, rows(dy));
  const std::size_t experts = d.experts, out = d.rows, r = d.cols;
  expect_width(op, "dy", dy, out);
  const std::size_t m = rows(dy);
  mixpeft::detail::check_rows_of(op, "t", t.shape(), m, r);
  if (gates) mixpeft::detail::check_per_row(op, "gates", gates->shape(), m);
  detail::launch_grouped_wgrad(op.data(), dy.data(), t.data(), gates ? gates->data() : nullptr, dB.data(), false,
                               offsets.data(), experts, m, out, r, scale);
}

// dA_e += sum_{j in e} dt[j, :]^T x[j, :]. dt [M, r] (the gated one, as expand_backward writes it), x [M, in],
// dA [K, r, in] (computed as dA_e^T [in, r], so the rank is the narrow tile axis).
template <class TT, class TX, class TD>
void grouped_lora_grad_A(const DeviceTensor<TT>& dt, const DeviceTensor<TX>& x, const DeviceTensor<std::int32_t>& offsets,
                         DeviceTensor<TD>& dA) {
  static_assert(detail::glora_same_accumulator_v<TD, TT, TX>, "grouped_lora_grad_A: mixed double and single precision");
  constexpr std::string_view op = "grouped_lora_grad_A";
  const auto d = detail::glora_check_stacked(op, "dA", dA, "[K, r, in] or [r, in]", offsets, rows(x));
  const std::size_t experts = d.experts, r = d.rows, in = d.cols;
  expect_width(op, "x", x, in);
  const std::size_t m = rows(x);
  mixpeft::detail::check_rows_of(op, "dt", dt.shape(), m, r);
  detail::launch_grouped_wgrad(op.data(), x.data(), dt.data(), static_cast<const acc_t<TD>*>(nullptr), dA.data(), true,
                               offsets.data(), experts, m, in, r, 1.0);
}

}  // namespace mixpeft::cuda
