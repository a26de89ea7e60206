// mixpeft/cuda/balance_loss.cuh — the tally ops of layers/balance_loss.hpp on the device (same names, same argument
// order; DeviceTensor<T> where the CPU takes Tensor<T>, the host ExpertTally and double results as on the CPU).
//
// Shapes: N tokens, K experts, k experts per token, G groups (samples, or one). Token i is valid when the mask is
// absent (size 0) or mask[i] != 0; its group g(i) = group_ids[i], or 0 when group_ids is absent.
//   tally_experts:           ADDS to the host tally, over the valid tokens:
//                              valid[g] += 1, prob_sum[g K + j] += double(p_ij), count[g K + e_is] += 1 (s < slots).
//                            Two kernels, no atomics on values: block b owns a fixed range of consecutive tokens
//                            (the ranges depend on N only, at most 256 of them), stages each 256-token tile's
//                            group (-1: not counted) in shared memory, then one thread per output column (the K prob
//                            columns, the K count columns, the valid column) walks the range in token order and
//                            adds into its own shared-memory slots [G (2K + 1)] in double; partials [blocks,
//                            G (2K + 1)] are then summed over the blocks in order by one thread per column. Same
//                            inputs, same bits, on any device. The G (2K + 1) totals are downloaded (a sync of the
//                            current stream) and added into the tally.
//   add_group_coefficients:  dprobs[i, j] += coef[g(i) K + j] for valid rows (coef [G K] uploaded from the host span,
//                            G = size(coef) / K); computed as acc_t<T>(dprobs) + coef in double, rounded once to T.
//                            A row whose group is outside [0, G) is skipped (tally_experts has rejected it).
//   router_z_sums:           ADDS sum over valid rows of lse_i^2 to sum_lse2 and the valid row count to valid.
//                            One warp per row computes lse_i = m + log sum_j exp(l_ij - m) (m = the row max) in
//                            acc_t<T> and writes lse_i^2 in double ([N] scratch); one block then sums the rows in a
//                            fixed order (strided per thread, then the block tree) in double: deterministic.
//   router_z_backward_add:   dlogits[i, j] += coef * lse_i * exp(l_ij - lse_i) for valid rows; one warp per row,
//                            lse_i as in router_z_sums, the add in double, rounded once to T.
// Scratch from the pool, stream-ordered: tally 8 (blocks + 1) G (2K + 1) + 16 bytes, z sums 8 N bytes plus 16, the
// coefficients 8 G K bytes.
//
// Differences from the CPU ops:
// - Ids are checked on the device: every kernel skips a bad group or expert id, and tally_experts records the first
//   bad one (lowest token; for a token, its group before its experts: the CPU's order) and throws ConfigError with
//   the CPU's message after the download, before anything is added to the tally (as on the CPU).
// - Sums are associated differently (per block, then over blocks), so prob sums and z sums agree with the CPU to
//   rounding; counts and valid counts are exact. lse is computed in acc_t<T> (float for float and bf16), the CPU
//   computes it in double; gradients are rounded once to T where the CPU rounds the term to T before adding.
// - K = 0: the z ops see lse = -inf (the logsumexp of no entries), so sum_lse2 becomes inf; add_group_coefficients
//   does nothing.
// - Limits (ConfigError): tally_experts G (2K + 1) <= 6016 (the per-block tally lives in 48 KiB of shared memory);
//   K, k and G below 2^31 (int32 ids).
// Types: float, double, __nv_bfloat16 (and __half) values; ids are int32.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <type_traits>
#include <vector>

#include "mixpeft/core/error.hpp"
#include "mixpeft/core/tensor.hpp"
#include "mixpeft/cuda/device_tensor.cuh"
#include "mixpeft/cuda/error.cuh"
#include "mixpeft/cuda/kernel_utils.cuh"
#include "mixpeft/cuda/memory.cuh"
#include "mixpeft/layers/balance_loss.hpp"

namespace mixpeft::cuda {
namespace detail::balance {

inline constexpr unsigned kTile = 256;                      // tokens staged per step (and staging threads' stride)
inline constexpr std::size_t kMaxBlocks = 256;              // token ranges of the tally (fixed: device-independent)
inline constexpr std::size_t kMaxWidth = (48 * 1024 - kTile * sizeof(int)) / sizeof(double);  // G (2K + 1) <= 6016
inline constexpr unsigned long long kNone = ~0ull;          // no bad id met
inline constexpr unsigned kRowWarps = 8;                    // rows per block of the z kernels
inline constexpr unsigned kSumThreads = 1024;               // the one block of the z sum

// acc_t<T> or double -> T with one rounding.
template <class T>
__device__ inline T round_to(double v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __double2bfloat16(v);
  else if constexpr (std::is_same_v<T, __half>) return __double2half(v);
  else return static_cast<T>(v);
}

template <class T>
__device__ inline bool is_valid(const T* mask, std::size_t i) {
  return !mask || widen(mask[i]) != acc_t<T>(0);
}

// partial[b, g C + c], C = 2K + 1: c = 0 the valid count, 1 + j the prob sum of j, 1 + K + j the count of j.
// bad[0]: the lowest valid token with a group id outside [0, G); bad[1]: the lowest assignment i k + s (s < slots)
// of a valid, well-grouped token with an expert id outside [0, K).
template <class T>
__global__ void tally_kernel(const T* __restrict__ probs, const std::int32_t* __restrict__ experts, std::size_t n,
                             int K, std::size_t k, std::size_t slots, const T* __restrict__ mask,
                             const std::int32_t* __restrict__ groups, int G, std::size_t per_block,
                             double* __restrict__ partial, unsigned long long* bad) {
  extern __shared__ double acc[];  // [G C]
  __shared__ int tile_group[kTile];
  const std::size_t C = 2 * std::size_t(K) + 1, width = std::size_t(G) * C;
  for (std::size_t c = threadIdx.x; c < width; c += blockDim.x) acc[c] = 0.0;
  const std::size_t begin = blockIdx.x * per_block, end = begin + per_block < n ? begin + per_block : n;
  // This thread's columns: its registers hold the running sum of group `cur_g` (flushed when the group changes,
  // so every slot still sees its tokens one at a time, in order).
  for (std::size_t t0 = begin; t0 < end; t0 += kTile) {
    const std::size_t t1 = t0 + kTile < end ? t0 + kTile : end;
    __syncthreads();  // the previous tile's readers are done (and acc is zeroed)
    for (std::size_t i = t0 + threadIdx.x; i < t1; i += blockDim.x) {
      int g = -1;
      if (is_valid(mask, i)) {
        const std::int32_t id = groups ? groups[i] : 0;
        if (id < 0 || id >= G) {
          atomicMin(bad, (unsigned long long)i);
        } else {
          g = id;
          for (std::size_t s = 0; s < slots; ++s) {
            const std::int32_t e = experts[i * k + s];
            if (e < 0 || e >= K) atomicMin(bad + 1, (unsigned long long)(i * k + s));
          }
        }
      }
      tile_group[i - t0] = g;
    }
    __syncthreads();
    for (std::size_t c = threadIdx.x; c < C; c += blockDim.x) {
      int cur_g = -1;
      double run = 0.0;
      for (std::size_t i = t0; i < t1; ++i) {
        const int g = tile_group[i - t0];
        if (g < 0) continue;
        if (g != cur_g) {
          if (cur_g >= 0) acc[std::size_t(cur_g) * C + c] = run;
          cur_g = g;
          run = acc[std::size_t(g) * C + c];
        }
        if (c == 0) {
          run += 1.0;
        } else if (c <= std::size_t(K)) {
          run += double(widen(probs[i * std::size_t(K) + (c - 1)]));
        } else {
          const std::int32_t j = std::int32_t(c - 1 - std::size_t(K));
          for (std::size_t s = 0; s < slots; ++s) run += experts[i * k + s] == j ? 1.0 : 0.0;
        }
      }
      if (cur_g >= 0) acc[std::size_t(cur_g) * C + c] = run;
    }
  }
  __syncthreads();
  for (std::size_t c = threadIdx.x; c < width; c += blockDim.x) partial[blockIdx.x * width + c] = acc[c];
}

// total[c] = sum over b < blocks of partial[b, c], b in order.
__global__ void tally_finish_kernel(const double* __restrict__ partial, std::size_t blocks, std::size_t width,
                                    double* __restrict__ total) {
  for (std::size_t c = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; c < width;
       c += std::size_t(gridDim.x) * blockDim.x) {
    double s = 0.0;
    for (std::size_t b = 0; b < blocks; ++b) s += partial[b * width + c];
    total[c] = s;
  }
}

template <class T>
__global__ void add_coefficients_kernel(const T* __restrict__ mask, const std::int32_t* __restrict__ groups,
                                        const double* __restrict__ coef, std::size_t n, std::size_t K,
                                        std::size_t G, T* __restrict__ dprobs) {
  const std::size_t total = n * K;
  for (std::size_t e = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; e < total;
       e += std::size_t(gridDim.x) * blockDim.x) {
    const std::size_t i = e / K, j = e - i * K;
    if (!is_valid(mask, i)) continue;
    const std::int32_t g = groups ? groups[i] : 0;
    if (g < 0 || std::size_t(g) >= G) continue;
    dprobs[e] = round_to<T>(double(widen(dprobs[e])) + coef[std::size_t(g) * K + j]);
  }
}

// lse of the K entries of row p, every lane of the warp gets it (acc_t<T>, max-shifted).
template <class T>
__device__ inline acc_t<T> warp_lse(const T* __restrict__ p, std::size_t K, unsigned lane) {
  using A = acc_t<T>;
  A m = -std::numeric_limits<A>::infinity();
  for (std::size_t j = lane; j < K; j += 32) {
    const A v = widen(p[j]);
    m = v > m ? v : m;
  }
  m = warp_reduce(m, MaxOp{});
  A s = 0;
  for (std::size_t j = lane; j < K; j += 32) s += dev_exp(widen(p[j]) - m);
  s = warp_reduce(s, SumOp{});
  return m + dev_log(s);
}

// lse2[i] = lse_i^2 for valid rows, 0 otherwise.
template <class T>
__global__ void z_rows_kernel(const T* __restrict__ logits, const T* __restrict__ mask, std::size_t n, std::size_t K,
                              double* __restrict__ lse2) {
  const unsigned lane = threadIdx.x % 32;
  const std::size_t warps = std::size_t(gridDim.x) * (blockDim.x / 32);
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x / 32) + threadIdx.x / 32; i < n; i += warps) {
    if (!is_valid(mask, i)) {  // warp-uniform
      if (lane == 0) lse2[i] = 0.0;
      continue;
    }
    const double lse = double(warp_lse(logits + i * K, K, lane));
    if (lane == 0) lse2[i] = lse * lse;
  }
}

// out[0] = sum_i lse2[i], out[1] = the valid rows; one block of kSumThreads, a fixed order.
template <class T>
__global__ void z_sum_kernel(const double* __restrict__ lse2, const T* __restrict__ mask, std::size_t n,
                             double* __restrict__ out) {
  double s = 0.0, v = 0.0;
  for (std::size_t i = threadIdx.x; i < n; i += blockDim.x) {
    s += lse2[i];
    v += is_valid(mask, i) ? 1.0 : 0.0;
  }
  s = block_sum(s);
  v = block_sum(v);
  if (threadIdx.x == 0) {
    out[0] = s;
    out[1] = v;
  }
}

template <class T>
__global__ void z_backward_kernel(const T* __restrict__ logits, const T* __restrict__ mask, std::size_t n,
                                  std::size_t K, double coef, T* __restrict__ dlogits) {
  const unsigned lane = threadIdx.x % 32;
  const std::size_t warps = std::size_t(gridDim.x) * (blockDim.x / 32);
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x / 32) + threadIdx.x / 32; i < n; i += warps) {
    if (!is_valid(mask, i)) continue;  // warp-uniform
    const T* p = logits + i * K;
    const acc_t<T> lse = warp_lse(p, K, lane);
    const double c = coef * double(lse);
    T* d = dlogits + i * K;
    for (std::size_t j = lane; j < K; j += 32)
      d[j] = round_to<T>(double(widen(d[j])) + c * double(dev_exp(widen(p[j]) - lse)));
  }
}

template <class T>
bool present(const DeviceTensor<T>& t) {
  return t.dimension() > 0 && t.size() > 0;
}

// The value of one device element (a sync; the error path only).
inline std::int32_t fetch(const std::int32_t* p) {
  std::int32_t v = 0;
  MIXPEFT_CUDA_CHECK(cudaMemcpyAsync(&v, p, sizeof v, cudaMemcpyDeviceToHost, current_stream()));
  synchronize();
  return v;
}

}  // namespace detail::balance

// Adds the valid counts, probability sums and slot counts of the valid tokens to tally (see the header comment).
template <class T>
void tally_experts(std::string_view op, const DeviceTensor<T>& probs, const DeviceTensor<std::int32_t>& experts,
                   std::size_t slots, const DeviceTensor<T>& mask, const DeviceTensor<std::int32_t>& group_ids,
                   ExpertTally& tally) {
  namespace b = detail::balance;
  expect_shape(op, "probs", probs, {any_extent, tally.experts});
  const std::size_t n = probs.shape()[0], K = tally.experts, groups = tally.valid.size();
  expect_shape(op, "experts", experts, {n, any_extent});
  const std::size_t k = experts.shape()[1];
  require<ShapeError>(slots <= k, op, ": counting ", slots, " slots of a top-", k, " routing");
  const bool masked = b::present(mask), ids = b::present(group_ids);
  if (masked) expect_shape(op, "mask", mask, {n});
  if (ids) expect_shape(op, "group_ids", group_ids, {n});
  require<ShapeError>(tally.prob_sum.size() == groups * K && tally.count.size() == groups * K, op,
                      ": the tally is not sized for ", groups, " groups of ", K, " experts");
  if (n == 0) return;
  constexpr std::size_t int_max = std::size_t(std::numeric_limits<std::int32_t>::max());
  require<ConfigError>(K < int_max && groups < int_max, op, ": ", groups, " groups of ", K,
                       " experts do not fit int32 ids");
  const std::size_t C = 2 * K + 1, width = groups * C;
  require<ConfigError>(width <= b::kMaxWidth, op, ": the device tally supports G (2K + 1) <= ", b::kMaxWidth,
                       ", got ", groups, " groups of ", K, " experts");

  const std::size_t tiles = (n + b::kTile - 1) / b::kTile;
  const std::size_t blocks_wanted = std::min(tiles, b::kMaxBlocks);
  const std::size_t per_block = (tiles + blocks_wanted - 1) / blocks_wanted * b::kTile;
  const std::size_t blocks = (n + per_block - 1) / per_block;
  const unsigned threads = unsigned(std::clamp<std::size_t>((C + 31) / 32 * 32, 64, 256));

  const cudaStream_t stream = current_stream();
  DeviceTensor<double> partial(Shape{blocks * width + width});  // [blocks, width] then the totals [width]
  DeviceTensor<unsigned long long> bad(Shape{2});
  MIXPEFT_CUDA_CHECK(cudaMemsetAsync(bad.data(), 0xff, 2 * sizeof(unsigned long long), stream));
  b::tally_kernel<<<unsigned(blocks), threads, width * sizeof(double), stream>>>(
      probs.data(), experts.data(), n, int(K), k, slots, masked ? mask.data() : nullptr,
      ids ? group_ids.data() : nullptr, int(groups), per_block, partial.data(), bad.data());
  check_launch("tally_experts");
  double* total = partial.data() + blocks * width;
  if (width > 0) {
    constexpr unsigned finish_block = 256;
    b::tally_finish_kernel<<<grid_size(width, finish_block), finish_block, 0, stream>>>(partial.data(), blocks,
                                                                                        width, total);
    check_launch("tally_experts (finish)");
  }
  std::vector<double> host(width);
  unsigned long long first_bad[2] = {b::kNone, b::kNone};
  MIXPEFT_CUDA_CHECK(cudaMemcpyAsync(first_bad, bad.data(), sizeof first_bad, cudaMemcpyDeviceToHost, stream));
  if (width > 0)
    MIXPEFT_CUDA_CHECK(cudaMemcpyAsync(host.data(), total, width * sizeof(double), cudaMemcpyDeviceToHost, stream));
  synchronize(stream);

  if (first_bad[0] != b::kNone || first_bad[1] != b::kNone) {
    // The CPU's first error: the lowest token, its group before its experts.
    const unsigned long long bad_group_token = first_bad[0];
    const unsigned long long bad_expert_token = first_bad[1] == b::kNone ? b::kNone : first_bad[1] / k;
    if (bad_group_token <= bad_expert_token) {
      const std::int32_t g = ids ? b::fetch(group_ids.data() + bad_group_token) : 0;
      throw ConfigError(mixpeft::detail::concat(op, ": group id ", g, " is out of range [0, ", groups, ")"));
    }
    const std::int32_t e = b::fetch(experts.data() + first_bad[1]);
    throw ConfigError(mixpeft::detail::concat(op, ": expert id ", e, " is out of range [0, ", K, ")"));
  }
  for (std::size_t g = 0; g < groups; ++g) {
    tally.valid[g] += host[g * C];
    for (std::size_t j = 0; j < K; ++j) {
      tally.prob_sum[g * K + j] += host[g * C + 1 + j];
      tally.count[g * K + j] += host[g * C + 1 + K + j];
    }
  }
}

// dprobs[i, j] += coef[g(i) K + j] for the valid rows (K = cols of dprobs, G = size(coef) / K).
template <class T>
void add_group_coefficients(const DeviceTensor<T>& mask, const DeviceTensor<std::int32_t>& group_ids,
                            std::span<const double> coef, DeviceTensor<T>& dprobs) {
  namespace b = detail::balance;
  constexpr std::string_view op = "add_group_coefficients";
  expect_shape(op, "dprobs", dprobs, {any_extent, any_extent});
  const std::size_t n = dprobs.shape()[0], K = dprobs.shape()[1];
  const bool masked = b::present(mask), ids = b::present(group_ids);
  if (masked) expect_shape(op, "mask", mask, {n});
  if (ids) expect_shape(op, "group_ids", group_ids, {n});
  if (n == 0 || K == 0) return;
  const std::size_t groups = coef.size() / K;
  if (groups == 0) return;
  const DeviceTensor<double> coef_dev = upload(coef.first(groups * K));
  constexpr unsigned block = 256;
  b::add_coefficients_kernel<<<grid_size(n * K, block), block, 0, current_stream()>>>(
      masked ? mask.data() : nullptr, ids ? group_ids.data() : nullptr, coef_dev.data(), n, K, groups,
      dprobs.data());
  check_launch("add_group_coefficients");
}

// sum_lse2 += sum over valid rows of lse_i^2, valid += the number of valid rows (downloads: a sync).
template <class T>
void router_z_sums(const DeviceTensor<T>& logits, const DeviceTensor<T>& mask, double& sum_lse2, double& valid) {
  namespace b = detail::balance;
  constexpr std::string_view op = "router_z_loss";
  expect_shape(op, "logits", logits, {any_extent, any_extent});
  const std::size_t n = logits.shape()[0], K = logits.shape()[1];
  const bool masked = b::present(mask);
  if (masked) expect_shape(op, "mask", mask, {n});
  if (n == 0) return;
  const cudaStream_t stream = current_stream();
  DeviceTensor<double> scratch(Shape{n + 2});  // lse2 [N], then the two sums
  const T* m = masked ? mask.data() : nullptr;
  b::z_rows_kernel<<<grid_size(n, b::kRowWarps), 32 * b::kRowWarps, 0, stream>>>(logits.data(), m, n, K,
                                                                                  scratch.data());
  check_launch("router_z_sums");
  b::z_sum_kernel<<<1, b::kSumThreads, 0, stream>>>(scratch.data(), m, n, scratch.data() + n);
  check_launch("router_z_sums (sum)");
  double host[2] = {0.0, 0.0};
  MIXPEFT_CUDA_CHECK(cudaMemcpyAsync(host, scratch.data() + n, sizeof host, cudaMemcpyDeviceToHost, stream));
  synchronize(stream);
  sum_lse2 += host[0];
  valid += host[1];
}

// dlogits[i, j] += coef * lse_i * exp(l_ij - lse_i) for the valid rows.
template <class T>
void router_z_backward_add(const DeviceTensor<T>& logits, const DeviceTensor<T>& mask, double coef,
                           DeviceTensor<T>& dlogits) {
  namespace b = detail::balance;
  expect_same_shape("router_z_backward_add", "dlogits", dlogits, "logits", logits);
  expect_shape("router_z_loss", "logits", logits, {any_extent, any_extent});
  const std::size_t n = logits.shape()[0], K = logits.shape()[1];
  const bool masked = b::present(mask);
  if (masked) expect_shape("router_z_loss", "mask", mask, {n});
  if (n == 0 || K == 0) return;
  b::z_backward_kernel<<<grid_size(n, b::kRowWarps), 32 * b::kRowWarps, 0, current_stream()>>>(
      logits.data(), masked ? mask.data() : nullptr, n, K, coef, dlogits.data());
  check_launch("router_z_backward_add");
}

}  // namespace mixpeft::cuda
