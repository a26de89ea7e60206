// mixpeft/cuda/kernel_utils.cuh — building blocks shared by the kernels.
//
// Storage and arithmetic types: a kernel loads its storage type T, computes in acc_t<T> (float for float,
// __half and __nv_bfloat16; double for double) and stores back: widen(T) -> acc_t<T>, narrow<T>(acc) -> T
// (round to nearest even). dev_exp / dev_log / dev_sqrt pick the float or double library function (the
// accurate ones, not the __expf intrinsics, so fp32 results stay within a few ulp of the CPU).
// Reductions: warp_reduce (butterfly shuffles, every lane gets the result) and block_reduce (warps, then
// the first warp over the per-warp values in shared memory; every thread of the block gets the result;
// blockDim.x must be a multiple of 32 and every thread of the block must call it).
// Launch sizing: row kernels run one block per row with row_block_size(width) threads; grid-stride kernels
// use grid_size(items, block), capped at a few waves of the device's multiprocessors.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "mixpeft/cuda/memory.cuh"

namespace mixpeft::cuda {

template <class T>
inline constexpr bool is_reduced_float_v = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

template <class T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <class T>
__host__ __device__ inline acc_t<T> widen(T v) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(v);
  else return static_cast<acc_t<T>>(v);
}

template <class T, class A>
__host__ __device__ inline T narrow(A v) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(static_cast<float>(v));
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(static_cast<float>(v));
  else return static_cast<T>(v);
}

__device__ inline float dev_exp(float x) { return expf(x); }
__device__ inline double dev_exp(double x) { return exp(x); }
__device__ inline float dev_log(float x) { return logf(x); }
__device__ inline double dev_log(double x) { return log(x); }
__device__ inline float dev_sqrt(float x) { return sqrtf(x); }
__device__ inline double dev_sqrt(double x) { return sqrt(x); }

template <class A>
__device__ inline A sigmoid(A x) {
  return A(1) / (A(1) + dev_exp(-x));
}

struct SumOp {
  template <class A>
  __device__ A operator()(A a, A b) const { return a + b; }
};
struct MaxOp {
  template <class A>
  __device__ A operator()(A a, A b) const { return a > b ? a : b; }
};
struct MinOp {
  template <class A>
  __device__ A operator()(A a, A b) const { return a < b ? a : b; }
};

template <class A, class Op>
__device__ inline A warp_reduce(A v, Op op) {
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

template <class A, class Op>
__device__ inline A block_reduce(A v, Op op, A identity) {
  __shared__ A partial[32];
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
  v = warp_reduce(v, op);
  __syncthreads();  // an earlier block_reduce may still be reading `partial`
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < warps ? partial[lane] : identity;
  return warp_reduce(v, op);
}

template <class A>
__device__ inline A block_sum(A v) {
  return block_reduce(v, SumOp{}, A(0));
}
template <class A>
__device__ inline A block_max(A v) {
  return block_reduce(v, MaxOp{}, -std::numeric_limits<A>::infinity());
}

// Threads for a one-block-per-row kernel over rows of `width` entries: about 8 entries per thread,
// a power of two in [32, 512].
inline unsigned row_block_size(std::size_t width) {
  unsigned threads = 32;
  while (threads < 512 && std::size_t(threads) * 8 < width) threads *= 2;
  return threads;
}

// Blocks for a grid-stride loop over `items` with `block` threads each (at least 1; callers skip empty work).
inline unsigned grid_size(std::size_t items, unsigned block) {
  const std::size_t wanted = (items + block - 1) / block;
  const std::size_t cap = std::size_t(sm_count()) * 16;
  return unsigned(std::max<std::size_t>(1, std::min(wanted, cap)));
}

inline bool is_aligned(const void* p, std::size_t bytes) { return reinterpret_cast<std::uintptr_t>(p) % bytes == 0; }

}  // namespace mixpeft::cuda
