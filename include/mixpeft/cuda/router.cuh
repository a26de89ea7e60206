// mixpeft/cuda/router.cuh — the routing ops of layers/router.hpp on the device (same names, same argument order).
//
// Shapes: N tokens, D router input width, K experts, k experts per token, M = N k assignments a = i k + s.
//   router_linear_forward:   l = (x W^T + b) / tau                     x [..., D], W [K, D], b [K], l [..., K]
//                            one cuBLASLt GEMM with alpha = 1/tau and the bias b/tau (a K-vector scaled first) as
//                            its epilogue: one rounding of l for bf16.
//   router_linear_backward:  dx = (dl / tau) W (written, GEMM alpha = 1/tau); dW += (dl / tau)^T x (GEMM, beta = 1);
//                            db += colsum(dl / tau) (the deterministic two-stage column sum); dW / db null: frozen.
//   top_k_forward:           experts[i, s], gates[i, s]: the k largest probs of row i, decreasing, ties to the lower
//                            expert; gates are copies of the probabilities (bit-exact). One warp per row: step s
//                            takes the best entry ranked after step s-1's winner in the strict total order
//                            "larger value first, then lower index" (no taken-mask, so any K works; the first 64
//                            entries of a row sit in registers). Same choice as the CPU for NaN-free rows; a NaN
//                            ranks below every number here (the CPU's choice for NaN depends on its position).
//   top_k_backward:          dprobs[i, experts[i, s]] += dgates[i, s] (one thread per row, s in order: CPU's order).
//   group_by_expert:         counts [K], offsets [K + 1], perm [M]: the stable counting sort of the assignments by
//                            expert, built on the device without host synchronisation:
//                              1. count: warp w owns a tile of 512 consecutive assignments and counts its experts in
//                                 shared memory -> tile_counts[e][t] (expert-major, [K + 1, T], T = ceil(M / 512));
//                              2. an exclusive sum (cub::DeviceScan) over the flattened tile_counts gives every
//                                 (expert, tile) its first grouped row: all of experts < e, then e's earlier tiles;
//                              3. scatter: each warp walks its tile 32 assignments at a time; __match_any_sync
//                                 groups the lanes with one expert, a lane's rank among its lower peers plus the
//                                 expert's running cursor (shared memory) is its row, so token order is kept.
//                            O(M + K T) work, three kernels plus the scan, all on the current stream.
//   gather_rows:             out[j, :] = x[perm[j] / k, :]                              (16-byte packs when aligned)
//   scatter_add_rows:        out[perm[j] / k, :] += src[j, :], without atomics on values: perm is inverted
//                            (inv[perm[j]] = j), then one block per out row adds its k source rows in increasing j,
//                            the CPU's order, accumulating in acc_t<T>: bit-exact with the CPU for float and double,
//                            one rounding per element for bf16 (the CPU rounds after every add).
//   input_jitter_forward:    y = x * f, f ~ U(1 - eps, 1 + eps) per element (factors cached, rounded to T first).
//   input_jitter_backward:   dx *= factors, in place.
//   logit_noise_forward:     logits += T(stddev * z), z ~ N(0, 1), in place (backward is the identity).
// Caches nothing beyond the outputs listed (the layer caches x', factors and the RoutingResult). Scratch from the
// pool, stream-ordered: group_by_expert 2 ((K + 1) T + 1) ints plus the scan's workspace, scatter_add_rows M ints.
//
// Differences from the CPU ops:
// - Random noise: each call draws ONE 64-bit key from the caller's Rng (the CPU draws one or two values per
//   element), and element i's numbers come from a counter hash of (key, i) (detail::routing::noise_uniform /
//   noise_normal: splitmix64's finaliser at counter i, 53-bit uniforms; Box-Muller from counters 2i and 2i + 1).
//   So the draws differ from the CPU's, but depend only on the seed and the element index: a seeded run repeats
//   its noise exactly, whatever the launch geometry.
// - Bad indices never touch memory out of bounds; instead of throwing at once (which would need a host sync),
//   the kernels record the first bad value in a per-device error record and the caller checks it lazily with
//   check_routing_errors() (synchronises the current stream, throws ConfigError, clears the record):
//     group_by_expert:   an expert id outside [0, K) is not counted; its assignment goes to a tail bucket after
//                        offsets[K], so perm stays a permutation of [0, M) and offsets[K] = the valid count < M;
//     top_k_backward:    an expert id outside [0, K) is skipped;
//     gather_rows:       a perm entry outside [0, rows(x) k) gives a zero row;
//     scatter_add_rows:  a perm entry outside [0, M) is skipped; a repeated one adds only its first row.
//   The first routing call on a device allocates the record (one cudaMalloc, memset and device sync, once).
// - Limits (ConfigError): M < 2^31 - 2^24 (int32 ids); group_by_expert K <= 12287 (shared-memory cursors);
//   scatter_add_rows k <= 8192.
// Types: float, double, __nv_bfloat16 (and __half) values with acc_t<T> arithmetic; ids are int32.
#pragma once

#include <cub/device/device_scan.cuh>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <numbers>
#include <string>
#include <string_view>
#include <type_traits>

#include "mixpeft/core/error.hpp"
#include "mixpeft/core/rng.hpp"
#include "mixpeft/core/tensor.hpp"
#include "mixpeft/cuda/device_tensor.cuh"
#include "mixpeft/cuda/elementwise.cuh"
#include "mixpeft/cuda/error.cuh"
#include "mixpeft/cuda/kernel_utils.cuh"
#include "mixpeft/cuda/matmul.cuh"
#include "mixpeft/cuda/memory.cuh"
#include "mixpeft/cuda/reduce.cuh"

namespace mixpeft::cuda {
namespace detail::routing {

// ---- the lazily checked error record ------------------------------------------------------------

enum RoutingOp : unsigned {
  kGroupByExpert = 1u,   // expert id out of range
  kTopKBackward = 2u,    // expert id out of range
  kGatherRows = 4u,      // perm entry out of range
  kScatterAddRows = 8u,  // perm entry out of range
  kScatterRepeat = 16u,  // perm entry repeated
};

struct ErrorRecord {
  unsigned int ops;  // bitwise or of the RoutingOp values met
  int claimed;       // 0 until the first report fills the fields below
  unsigned int op;
  int pad;
  long long value;   // the bad id or perm entry
  long long bound;   // its valid range is [0, bound)
};

__device__ inline void report(ErrorRecord* r, unsigned op, long long value, long long bound) {
  atomicOr(&r->ops, op);
  if (atomicCAS(&r->claimed, 0, 1) == 0) {
    r->op = op;
    r->value = value;
    r->bound = bound;
  }
}

inline ErrorRecord* error_record() {
  static std::mutex mutex;
  static std::map<int, ErrorRecord*> records;
  const int device = current_device();
  std::lock_guard lock(mutex);
  ErrorRecord*& r = records[device];
  if (!r) {
    void* p = nullptr;
    MIXPEFT_CUDA_CHECK(cudaMalloc(&p, sizeof(ErrorRecord)));
    MIXPEFT_CUDA_CHECK(cudaMemset(p, 0, sizeof(ErrorRecord)));
    MIXPEFT_CUDA_CHECK(cudaDeviceSynchronize());  // once per device: the memset ran before any stream uses it
    r = static_cast<ErrorRecord*>(p);
  }
  return r;
}

inline const char* op_name(unsigned op) {
  switch (op) {
    case kGroupByExpert: return "group_by_expert: expert id";
    case kTopKBackward: return "top_k_backward: expert id";
    case kGatherRows: return "gather_rows: perm entry";
    case kScatterAddRows: return "scatter_add_rows: perm entry";
    case kScatterRepeat: return "scatter_add_rows: repeated perm entry";
    default: return "routing: index";
  }
}

// ---- counter-based noise (host and device, so tests can recompute it) --------------------------------

__host__ __device__ inline std::uint64_t noise_bits(std::uint64_t key, std::uint64_t index) {
  std::uint64_t z = key + (index + 1) * 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Uniform in [0, 1) with 53 random bits (as Rng::uniform).
__host__ __device__ inline double noise_uniform(std::uint64_t key, std::uint64_t index) {
  return double(noise_bits(key, index) >> 11) * (1.0 / 9007199254740992.0);
}

// Standard normal for element i (Box-Muller on counters 2i and 2i + 1; the first uniform is taken in (0, 1]).
__host__ __device__ inline double noise_normal(std::uint64_t key, std::uint64_t i) {
  const double u1 = 1.0 - noise_uniform(key, 2 * i);
  const double u2 = noise_uniform(key, 2 * i + 1);
  return ::sqrt(-2.0 * ::log(u1)) * ::cos(2.0 * std::numbers::pi * u2);
}

// ---- element-wise functors (map_elements) ------------------------------------------------------------

template <class T>
struct Scale {  // y = s * x
  acc_t<T> s;
  template <class A>
  __device__ void operator()(std::size_t, const A (&x)[1], A (&y)[1]) const {
    y[0] = s * x[0];
  }
};

template <class T>
struct JitterForward {  // x -> y = x * f, f
  std::uint64_t key;
  double lo, width;
  template <class A>
  __device__ void operator()(std::size_t i, const A (&x)[1], A (&y)[2]) const {
    const double u = noise_uniform(key, i);
    const A f = widen(narrow<T>(__dadd_rn(lo, __dmul_rn(width, u))));  // the factor as stored
    y[0] = x[0] * f;
    y[1] = f;
  }
};

struct Product {  // a, b -> a * b
  template <class A>
  __device__ void operator()(std::size_t, const A (&x)[2], A (&y)[1]) const {
    y[0] = x[0] * x[1];
  }
};

template <class T>
struct LogitNoise {  // l -> l + T(stddev * z)
  std::uint64_t key;
  double stddev;
  template <class A>
  __device__ void operator()(std::size_t i, const A (&x)[1], A (&y)[1]) const {
    const A noise = widen(narrow<T>(__dmul_rn(stddev, noise_normal(key, i))));
    y[0] = x[0] + noise;
  }
};

template <class T>
struct ScaledEntry {  // term(r, c) = s * m[r * ld + c]
  const T* m;
  std::size_t ld;
  acc_t<T> s;
  __device__ acc_t<T> operator()(std::size_t r, std::size_t c) const { return s * widen(m[r * ld + c]); }
};

// ---- top-k ------------------------------------------------------------------------------------------------

// (av, ai) ranks strictly before (bv, bi): numbers before NaNs, larger value first, then the lower index.
template <class A>
__device__ inline bool ranks_before(A av, std::uint32_t ai, A bv, std::uint32_t bi) {
  const bool an = isnan(av), bn = isnan(bv);
  if (an != bn) return bn;
  if (!an && av != bv) return av > bv;
  return ai < bi;
}

inline constexpr unsigned kTopKWarps = 8;  // rows per block

template <class T>
__global__ void top_k_kernel(const T* __restrict__ probs, std::size_t n, std::size_t K, std::size_t k,
                             std::int32_t* __restrict__ experts, T* __restrict__ gates) {
  using A = acc_t<T>;
  const unsigned lane = threadIdx.x % 32;
  const std::size_t warps = std::size_t(gridDim.x) * (blockDim.x / 32);
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x / 32) + threadIdx.x / 32; i < n; i += warps) {
    const T* p = probs + i * K;
    const A c0 = lane < K ? widen(p[lane]) : A(0);
    const A c1 = lane + 32 < K ? widen(p[lane + 32]) : A(0);
    A prev_v = A(0);
    std::uint32_t prev_j = 0;
    for (std::size_t s = 0; s < k; ++s) {
      bool have = false;
      A bv = A(0);
      std::uint32_t bj = 0xffffffffu;
      std::size_t t = 0;
      for (std::size_t j = lane; j < K; j += 32, ++t) {
        const A v = t == 0 ? c0 : t == 1 ? c1 : widen(p[j]);
        const auto jj = std::uint32_t(j);
        if (s > 0 && !ranks_before(prev_v, prev_j, v, jj)) continue;  // taken at an earlier step
        if (!have || ranks_before(v, jj, bv, bj)) {
          bv = v;
          bj = jj;
          have = true;
        }
      }
      for (int offset = 16; offset > 0; offset >>= 1) {
        const A ov = __shfl_xor_sync(0xffffffffu, bv, offset);
        const std::uint32_t oj = __shfl_xor_sync(0xffffffffu, bj, offset);
        const bool oh = __shfl_xor_sync(0xffffffffu, int(have), offset) != 0;
        if (oh && (!have || ranks_before(ov, oj, bv, bj))) {
          bv = ov;
          bj = oj;
          have = true;
        }
      }
      // Every lane holds the same winner (a strict total order); s < k <= K leaves one untaken entry.
      if (lane == 0) {
        experts[i * k + s] = std::int32_t(bj);
        gates[i * k + s] = p[bj];
      }
      prev_v = bv;
      prev_j = bj;
    }
  }
}

template <class T>
__global__ void top_k_backward_kernel(const std::int32_t* __restrict__ experts, const T* __restrict__ dgates,
                                      std::size_t n, std::size_t k, std::size_t K, T* __restrict__ dprobs,
                                      ErrorRecord* errors) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
       i += std::size_t(gridDim.x) * blockDim.x) {
    for (std::size_t s = 0; s < k; ++s) {
      const std::int32_t e = experts[i * k + s];
      if (e < 0 || std::size_t(e) >= K) {
        report(errors, kTopKBackward, e, (long long)K);
        continue;
      }
      T& d = dprobs[i * K + std::size_t(e)];
      d = narrow<T>(widen(d) + widen(dgates[i * k + s]));
    }
  }
}

// ---- group_by_expert ------------------------------------------------------------------------------------

inline constexpr int kTileChunks = 16;                          // 32-wide chunks per warp tile
inline constexpr std::size_t kTile = 32 * std::size_t(kTileChunks);  // assignments per warp tile
inline constexpr std::size_t kMaxCursors = 12288;               // (K + 1) ints of shared memory per warp <= 48 KiB
inline constexpr std::size_t kMaxScatterK = 8192;               // k ints of shared memory per scatter block

// tile_counts[e * tiles + t] = assignments of tile t with expert e (e = K: out-of-range ids).
__global__ void tile_count_kernel(const std::int32_t* __restrict__ experts, std::size_t total, int K,
                                  std::size_t tiles, std::int32_t* __restrict__ tile_counts, ErrorRecord* errors) {
  extern __shared__ std::int32_t counts_smem[];
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const std::size_t t = blockIdx.x * std::size_t(blockDim.x / 32) + warp;
  if (t >= tiles) return;  // warp-uniform; warps share nothing
  std::int32_t* count = counts_smem + std::size_t(warp) * (K + 1);
  for (int e = int(lane); e <= K; e += 32) count[e] = 0;
  __syncwarp();
  const std::size_t begin = t * kTile;
  for (int c = 0; c < kTileChunks; ++c) {
    const std::size_t a = begin + std::size_t(c) * 32 + lane;
    if (a < total) {
      const std::int32_t e = experts[a];
      int bucket = e;
      if (e < 0 || e >= K) {
        report(errors, kGroupByExpert, e, K);
        bucket = K;
      }
      atomicAdd(&count[bucket], 1);
    }
  }
  __syncwarp();
  for (int e = int(lane); e <= K; e += 32) tile_counts[std::size_t(e) * tiles + t] = count[e];
}

// base = exclusive sum of tile_counts ([K + 1, tiles] then one 0): base[e * tiles + t] is the first grouped row of
// expert e's assignments in tile t, base[(K + 1) * tiles] = total.
__global__ void expert_scatter_kernel(const std::int32_t* __restrict__ experts, std::size_t total, int K,
                                      std::size_t tiles, const std::int32_t* __restrict__ base,
                                      std::int32_t* __restrict__ perm, std::int32_t* __restrict__ counts,
                                      std::int32_t* __restrict__ offsets) {
  extern __shared__ std::int32_t cursor_smem[];
  if (blockIdx.x == 0) {
    for (int e = int(threadIdx.x); e <= K; e += int(blockDim.x)) {
      offsets[e] = base[std::size_t(e) * tiles];
      if (e < K) counts[e] = base[std::size_t(e + 1) * tiles] - base[std::size_t(e) * tiles];
    }
  }
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const std::size_t t = blockIdx.x * std::size_t(blockDim.x / 32) + warp;
  if (t >= tiles) return;  // warp-uniform
  std::int32_t* cursor = cursor_smem + std::size_t(warp) * (K + 1);
  for (int e = int(lane); e <= K; e += 32) cursor[e] = base[std::size_t(e) * tiles + t];
  __syncwarp();
  const unsigned lower = (1u << lane) - 1u;
  const std::size_t begin = t * kTile;
  for (int c = 0; c < kTileChunks; ++c) {
    const std::size_t a = begin + std::size_t(c) * 32 + lane;
    const bool valid = a < total;
    int bucket = -1;
    if (valid) {
      const std::int32_t e = experts[a];
      bucket = e < 0 || e >= K ? K : e;
    }
    const unsigned active = __ballot_sync(0xffffffffu, valid);
    unsigned peers = 0;
    if (valid) {
      peers = __match_any_sync(active, bucket);  // the lanes of this chunk with the same expert
      perm[cursor[bucket] + __popc(peers & lower)] = std::int32_t(a);
    }
    __syncwarp();  // every lane has read its cursor
    if (valid && (peers & lower) == 0) cursor[bucket] += __popc(peers);  // the lowest peer advances it
    __syncwarp();
  }
}

// ---- gather / scatter -------------------------------------------------------------------------------------

template <class T, int V>
__global__ void gather_rows_kernel(const T* __restrict__ x, std::size_t bound, const std::int32_t* __restrict__ perm,
                                   std::size_t m, std::size_t k, std::size_t c, T* __restrict__ out,
                                   ErrorRecord* errors) {
  const std::size_t per_row = c / V;  // c % V == 0
  const std::size_t packs = m * per_row;
  for (std::size_t p = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; p < packs;
       p += std::size_t(gridDim.x) * blockDim.x) {
    const std::size_t j = p / per_row, q = (p % per_row) * V;
    const std::int32_t a = perm[j];
    Pack<T, V> v;
    if (a >= 0 && std::size_t(a) < bound) {
      v = *reinterpret_cast<const Pack<T, V>*>(x + std::size_t(a) / k * c + q);
    } else {
#pragma unroll
      for (int u = 0; u < V; ++u) v.v[u] = narrow<T>(acc_t<T>(0));
      if (q == 0) report(errors, kGatherRows, a, (long long)bound);
    }
    *reinterpret_cast<Pack<T, V>*>(out + j * c + q) = v;
  }
}

inline constexpr std::int32_t kUnset = 0x7f7f7f7f;  // memset byte 0x7f; larger than any valid row

__global__ void invert_perm_kernel(const std::int32_t* __restrict__ perm, std::size_t m, std::int32_t* __restrict__ inv,
                                   ErrorRecord* errors) {
  for (std::size_t j = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; j < m;
       j += std::size_t(gridDim.x) * blockDim.x) {
    const std::int32_t a = perm[j];
    if (a < 0 || std::size_t(a) >= m) {
      report(errors, kScatterAddRows, a, (long long)m);
      continue;
    }
    if (atomicMin(&inv[a], std::int32_t(j)) != kUnset) report(errors, kScatterRepeat, a, (long long)m);
  }
}

// out[i, :] += sum of src[j, :] over the j with perm[j] / k == i, in increasing j.
template <class T>
__global__ void scatter_add_rows_kernel(const T* __restrict__ src, const std::int32_t* __restrict__ inv,
                                        std::size_t rows_out, std::size_t k, std::size_t c, T* __restrict__ out) {
  using A = acc_t<T>;
  extern __shared__ std::int32_t order[];  // [k]: this row's source rows, increasing
  __shared__ int valid;
  for (std::size_t i = blockIdx.x; i < rows_out; i += gridDim.x) {
    const std::int32_t* js = inv + i * k;
    for (std::size_t s = threadIdx.x; s < k; s += blockDim.x) {
      const std::int32_t j = js[s];
      if (j == kUnset) continue;
      int rank = 0;  // valid entries are distinct, unset ones compare larger
      for (std::size_t u = 0; u < k; ++u) rank += js[u] < j;
      order[rank] = j;
    }
    if (threadIdx.x == 0) {
      int count = 0;
      for (std::size_t u = 0; u < k; ++u) count += js[u] != kUnset;
      valid = count;
    }
    __syncthreads();
    const int count = valid;
    for (std::size_t q = threadIdx.x; q < c; q += blockDim.x) {
      A acc = widen(out[i * c + q]);
      for (int r = 0; r < count; ++r) acc = acc + widen(src[std::size_t(order[r]) * c + q]);
      out[i * c + q] = narrow<T>(acc);
    }
    __syncthreads();  // before the next row overwrites order / valid
  }
}

inline void check_assignments(std::string_view op, std::size_t m) {
  require<ConfigError>(m < std::size_t(kUnset) - (std::size_t(1) << 24), op, ": ", m,
                       " assignments do not fit the device's int32 ids");
}

}  // namespace detail::routing

// Throws ConfigError for the first bad expert id or perm entry a routing kernel met since the last check (see
// the header comment), and clears the record. Synchronises the current stream: call it where the host waits
// anyway (next to a loss download). Kernels on other streams must have been synchronised by the caller.
inline void check_routing_errors() {
  namespace r = detail::routing;
  r::ErrorRecord* device = r::error_record();
  r::ErrorRecord host{};
  MIXPEFT_CUDA_CHECK(cudaMemcpyAsync(&host, device, sizeof host, cudaMemcpyDeviceToHost, current_stream()));
  synchronize();
  if (host.ops == 0) return;
  MIXPEFT_CUDA_CHECK(cudaMemsetAsync(device, 0, sizeof host, current_stream()));
  std::string also;
  for (unsigned op = 1; op <= r::kScatterRepeat; op <<= 1)
    if ((host.ops & op) && op != host.op) also += mixpeft::detail::concat("; also ", r::op_name(op));
  if (host.op == r::kScatterRepeat)
    throw ConfigError(mixpeft::detail::concat("scatter_add_rows: perm entry ", host.value,
                                              " appears more than once (found on the device)", also));
  throw ConfigError(mixpeft::detail::concat(r::op_name(host.op), " ", host.value, " is out of range [0, ", host.bound,
                                            ") (found on the device)", also));
}

// l = (x W^T + b) / tau   x [..., D], W [K, D], b [K] or null, logits [..., K] (resized).
template <class T>
void router_linear_forward(const DeviceTensor<T>& x, const DeviceTensor<T>& W,
                           const std::type_identity_t<DeviceTensor<T>>* b, std::type_identity_t<T> inv_tau,
                           DeviceTensor<T>& logits) {
  constexpr std::string_view op = "router_linear_forward";
  expect_shape(op, "W", W, {any_extent, any_extent});
  const std::size_t K = W.shape()[0], in = W.shape()[1];
  expect_width(op, "x", x, in);
  if (b) expect_shape(op, "b", *b, {K});
  resize_to(logits, with_last(shape_of(x), K));
  const std::size_t n = rows(x);
  const acc_t<T> s = widen(inv_tau);
  DeviceTensor<T> scaled_bias(Shape{b ? K : 0});
  if (b) detail::map_elements<T, 1, 1>("router_linear_forward bias", K, detail::routing::Scale<T>{s}, {b->data()},
                                       {scaled_bias.data()});
  matmul(MatmulCall<T>{.ta = Trans::No, .tb = Trans::Yes, .m = n, .n = K, .k = in, .alpha = double(s), .a = x.data(),
                       .lda = in, .b = W.data(), .ldb = in, .c = logits.data(), .ldc = K,
                       .epilogue = b ? Epilogue::Bias : Epilogue::None, .bias = b ? scaled_bias.data() : nullptr});
}

// dx = (dl / tau) W (written);  dW += (dl / tau)^T x;  db += colsum(dl) / tau   (dW, db skipped when null).
template <class T>
void router_linear_backward(const DeviceTensor<T>& x, const DeviceTensor<T>& W, const DeviceTensor<T>& dlogits,
                            std::type_identity_t<T> inv_tau, DeviceTensor<T>& dx,
                            std::type_identity_t<DeviceTensor<T>>* dW, std::type_identity_t<DeviceTensor<T>>* db) {
  constexpr std::string_view op = "router_linear_backward";
  expect_shape(op, "W", W, {any_extent, any_extent});
  const std::size_t K = W.shape()[0], in = W.shape()[1];
  expect_width(op, "x", x, in);
  expect_width(op, "dlogits", dlogits, K);
  const std::size_t n = rows(x);
  require<ShapeError>(rows(dlogits) == n, op, ": dlogits has shape ", shape_string(dlogits.shape()),
                      " but x has shape ", shape_string(x.shape()));
  if (dW) expect_same_shape(op, "dW", *dW, "W", W);
  if (db) expect_shape(op, "db", *db, {K});
  const acc_t<T> s = widen(inv_tau);
  resize_to(dx, shape_of(x));
  matmul(MatmulCall<T>{.ta = Trans::No, .tb = Trans::No, .m = n, .n = in, .k = K, .alpha = double(s),
                       .a = dlogits.data(), .lda = K, .b = W.data(), .ldb = in, .c = dx.data(), .ldc = in});
  if (dW)
    matmul(MatmulCall<T>{.ta = Trans::Yes, .tb = Trans::No, .m = K, .n = in, .k = n, .alpha = double(s),
                         .a = dlogits.data(), .lda = K, .b = x.data(), .ldb = in, .beta = 1.0, .c = dW->data(),
                         .ldc = in});
  if (db)
    column_sum_accumulate("router_linear_backward db", n, K, detail::routing::ScaledEntry<T>{dlogits.data(), K, s},
                          db->data());
}

// experts [N, k], gates [N, k] from probs [N, K]: the k most probable experts, decreasing, ties to the lower index.
template <class T>
void top_k_forward(const DeviceTensor<T>& probs, std::size_t k, DeviceTensor<std::int32_t>& experts,
                   DeviceTensor<T>& gates) {
  expect_shape("top_k_forward", "probs", probs, {any_extent, any_extent});
  const std::size_t n = probs.shape()[0], K = probs.shape()[1];
  require<ConfigError>(k >= 1 && k <= K, "top_k_forward: k must be in [1, ", K, "], got ", k);
  require<ConfigError>(K <= std::size_t(INT32_MAX), "top_k_forward: ", K, " experts do not fit int32 ids");
  resize_to(experts, {n, k});
  resize_to(gates, {n, k});
  if (n == 0) return;
  constexpr unsigned block = 32 * detail::routing::kTopKWarps;
  detail::routing::top_k_kernel<<<grid_size(n, detail::routing::kTopKWarps), block, 0, current_stream()>>>(
      probs.data(), n, K, k, experts.data(), gates.data());
  check_launch("top_k_forward");
}

// dprobs[i, experts[i, s]] += dgates[i, s].
template <class T>
void top_k_backward(const DeviceTensor<std::int32_t>& experts, const DeviceTensor<T>& dgates, DeviceTensor<T>& dprobs) {
  expect_shape("top_k_backward", "experts", experts, {any_extent, any_extent});
  expect_same_shape("top_k_backward", "dgates", dgates, "experts", experts);
  expect_shape("top_k_backward", "dprobs", dprobs, {experts.shape()[0], any_extent});
  const std::size_t n = experts.shape()[0], k = experts.shape()[1], K = dprobs.shape()[1];
  if (n == 0 || k == 0) return;
  constexpr unsigned block = 256;
  detail::routing::top_k_backward_kernel<<<grid_size(n, block), block, 0, current_stream()>>>(
      experts.data(), dgates.data(), n, k, K, dprobs.data(), detail::routing::error_record());
  check_launch("top_k_backward");
}

// Stable counting sort of the assignments a = i k + s by expert: counts [K], offsets [K + 1], perm [N k].
inline void group_by_expert(const DeviceTensor<std::int32_t>& experts, std::size_t num_experts,
                            DeviceTensor<std::int32_t>& counts, DeviceTensor<std::int32_t>& offsets,
                            DeviceTensor<std::int32_t>& perm) {
  namespace r = detail::routing;
  constexpr std::string_view op = "group_by_expert";
  expect_shape(op, "experts", experts, {any_extent, any_extent});
  const std::size_t total = experts.size();
  r::check_assignments(op, total);
  require<ConfigError>(num_experts + 1 <= r::kMaxCursors, op, ": the device version supports up to ",
                       r::kMaxCursors - 1, " experts, got ", num_experts);
  resize_to(counts, {num_experts});
  resize_to(offsets, {num_experts + 1});
  resize_to(perm, {total});
  if (total == 0) {
    set_zero(counts);
    set_zero(offsets);
    return;
  }
  const int K = int(num_experts);
  const std::size_t tiles = (total + r::kTile - 1) / r::kTile;
  const std::size_t scan_items = (num_experts + 1) * tiles + 1;
  require<ConfigError>(scan_items <= std::size_t(INT32_MAX), op, ": ", num_experts, " experts x ", tiles,
                       " tiles are too many to scan");
  const cudaStream_t stream = current_stream();
  DeviceTensor<std::int32_t> tile_counts(Shape{scan_items}), base(Shape{scan_items});
  MIXPEFT_CUDA_CHECK(cudaMemsetAsync(tile_counts.data() + scan_items - 1, 0, sizeof(std::int32_t), stream));

  const unsigned warps = num_experts + 1 <= r::kMaxCursors / 4 ? 4 : 1;  // warps per block
  const std::size_t smem = std::size_t(warps) * (num_experts + 1) * sizeof(std::int32_t);
  const unsigned blocks_needed = unsigned((tiles + warps - 1) / warps);
  r::tile_count_kernel<<<blocks_needed, 32 * warps, smem, stream>>>(experts.data(), total, K, tiles,
                                                                    tile_counts.data(), r::error_record());
  check_launch("group_by_expert (count)");

  std::size_t scratch_bytes = 0;
  MIXPEFT_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, scratch_bytes, tile_counts.data(), base.data(),
                                                   int(scan_items), stream));
  DeviceTensor<std::int64_t> scratch(Shape{std::max<std::size_t>(1, (scratch_bytes + 7) / 8)});
  MIXPEFT_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(scratch.data(), scratch_bytes, tile_counts.data(), base.data(),
                                                   int(scan_items), stream));

  r::expert_scatter_kernel<<<blocks_needed, 32 * warps, smem, stream>>>(experts.data(), total, K, tiles, base.data(),
                                                                        perm.data(), counts.data(), offsets.data());
  check_launch("group_by_expert (scatter)");
}

// out[j, :] = x[perm[j] / k, :] for j < size(perm); x is seen as [rows, C], out is [size(perm), C].
template <class T>
void gather_rows(const DeviceTensor<T>& x, const DeviceTensor<std::int32_t>& perm, std::size_t k, DeviceTensor<T>& out) {
  require<ShapeError>(x.dimension() >= 1 && k >= 1 && perm.dimension() == 1 && perm.size() == rows(x) * k,
                      "gather_rows: perm has shape ", shape_string(perm.shape()), " but x has shape ",
                      shape_string(x.shape()), " and k = ", k);
  const std::size_t m = perm.size(), c = cols(x);
  detail::routing::check_assignments("gather_rows", m);
  resize_to(out, {m, c});
  if (m == 0 || c == 0) return;
  constexpr int V = sizeof(T) >= 16 ? 1 : int(16 / sizeof(T));
  constexpr unsigned block = 256;
  const cudaStream_t stream = current_stream();
  auto* errors = detail::routing::error_record();
  if (c % V == 0 && is_aligned(x.data(), 16) && is_aligned(out.data(), 16))
    detail::routing::gather_rows_kernel<T, V><<<grid_size(m * (c / V), block), block, 0, stream>>>(
        x.data(), rows(x) * k, perm.data(), m, k, c, out.data(), errors);
  else
    detail::routing::gather_rows_kernel<T, 1><<<grid_size(m * c, block), block, 0, stream>>>(
        x.data(), rows(x) * k, perm.data(), m, k, c, out.data(), errors);
  check_launch("gather_rows");
}

// out[perm[j] / k, :] += src[j, :] (the adjoint of gather_rows).
template <class T>
void scatter_add_rows(const DeviceTensor<T>& src, const DeviceTensor<std::int32_t>& perm, std::size_t k,
                      DeviceTensor<T>& out) {
  require<ShapeError>(k >= 1 && perm.dimension() == 1 && rows(src) == perm.size() && rows(out) * k == perm.size() &&
                          cols(src) == cols(out),
                      "scatter_add_rows: src has shape ", shape_string(src.shape()), ", out has shape ",
                      shape_string(out.shape()), " and perm has shape ", shape_string(perm.shape()), " (k = ", k, ")");
  const std::size_t m = perm.size(), c = cols(src), rows_out = rows(out);
  detail::routing::check_assignments("scatter_add_rows", m);
  require<ConfigError>(k <= detail::routing::kMaxScatterK, "scatter_add_rows: the device version supports k up to ",
                       detail::routing::kMaxScatterK, ", got ", k);
  if (m == 0 || c == 0) return;
  const cudaStream_t stream = current_stream();
  DeviceTensor<std::int32_t> inv(Shape{m});
  MIXPEFT_CUDA_CHECK(cudaMemsetAsync(inv.data(), 0x7f, m * sizeof(std::int32_t), stream));
  constexpr unsigned block = 256;
  detail::routing::invert_perm_kernel<<<grid_size(m, block), block, 0, stream>>>(perm.data(), m, inv.data(),
                                                                                 detail::routing::error_record());
  check_launch("scatter_add_rows (invert)");
  detail::routing::scatter_add_rows_kernel<<<grid_size(rows_out, 1), row_block_size(c), k * sizeof(std::int32_t),
                                             stream>>>(src.data(), inv.data(), rows_out, k, c, out.data());
  check_launch("scatter_add_rows");
}

// y = x * u, u ~ U(1 - eps, 1 + eps) per element (factors cached); one key drawn from rng.
template <class T>
void input_jitter_forward(const DeviceTensor<T>& x, double eps, Rng& rng, DeviceTensor<T>& y, DeviceTensor<T>& factors) {
  require<ConfigError>(eps >= 0.0 && eps < 1.0, "input_jitter: eps must be in [0, 1), got ", eps);
  resize_to(y, shape_of(x));
  resize_to(factors, shape_of(x));
  const double lo = 1.0 - eps, hi = 1.0 + eps;
  const detail::routing::JitterForward<T> f{rng.next_u64(), lo, hi - lo};
  detail::map_elements<T, 1, 2>("input_jitter_forward", x.size(), f, {x.data()}, {y.data(), factors.data()});
}

// dx *= factors, in place.
template <class T>
void input_jitter_backward(const DeviceTensor<T>& factors, DeviceTensor<T>& dx) {
  require<ShapeError>(factors.size() == dx.size(), "input_jitter_backward: factors has shape ",
                      shape_string(factors.shape()), " but dx has shape ", shape_string(dx.shape()));
  detail::map_elements<T, 2, 1>("input_jitter_backward", dx.size(), detail::routing::Product{},
                                {dx.data(), factors.data()}, {dx.data()});
}

// logits += stddev * N(0, 1), in place; one key drawn from rng.
template <class T>
void logit_noise_forward(DeviceTensor<T>& logits, double stddev, Rng& rng) {
  const detail::routing::LogitNoise<T> f{rng.next_u64(), stddev};
  detail::map_elements<T, 1, 1>("logit_noise_forward", logits.size(), f, {logits.data()}, {logits.data()});
}

}  // namespace mixpeft::cuda
