// mixpeft/cuda/reduce.cuh — deterministic sums over the rows or the columns of a matrix.
//
//   column_sum_accumulate:  dst[c] += sum_r term(r, c)      r < R, c < C   (bias, norm-weight gradients)
//   row_sum:                dst[r]  = sum_c m[r * ld + c]    r < R, c < C
// term(r, c) is a device functor returning the accumulation type, so a caller fuses the per-element
// product (dy * x * rstd[r], ...) into the reduction. Column sums run in two stages without atomics:
// blocks of 32 columns x 8 row lanes sum a chunk of rows each into an fp32 (double for double) scratch
// [chunks, C], then one thread per column adds the chunks in order: same inputs, same bits.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>

#include "mixpeft/cuda/device_tensor.cuh"
#include "mixpeft/cuda/error.cuh"
#include "mixpeft/cuda/kernel_utils.cuh"

namespace mixpeft::cuda {
namespace detail {

inline constexpr unsigned column_tile = 32;  // columns per block (one warp wide)
inline constexpr unsigned column_lanes = 8;  // row lanes per block

template <class A, class Term>
__global__ void column_partial_kernel(std::size_t rows, std::size_t cols, std::size_t rows_per_chunk, Term term,
                                      A* __restrict__ partial) {
  __shared__ A tile[column_lanes][column_tile + 1];
  const std::size_t c = blockIdx.x * std::size_t(column_tile) + threadIdx.x;
  const std::size_t r0 = blockIdx.y * rows_per_chunk;
  const std::size_t r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
  A s = 0;
  if (c < cols)
    for (std::size_t r = r0 + threadIdx.y; r < r1; r += column_lanes) s += term(r, c);
  tile[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    for (unsigned y = 1; y < column_lanes; ++y) s += tile[y][threadIdx.x];
    partial[blockIdx.y * cols + c] = s;
  }
}

template <class T, class A>
__global__ void column_finish_kernel(std::size_t cols, std::size_t chunks, const A* __restrict__ partial,
                                     T* __restrict__ dst) {
  for (std::size_t c = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; c < cols;
       c += std::size_t(gridDim.x) * blockDim.x) {
    A s = 0;
    for (std::size_t k = 0; k < chunks; ++k) s += partial[k * cols + c];
    dst[c] = narrow<T>(widen(dst[c]) + s);
  }
}

template <class TIn, class TOut>
__global__ void row_sum_kernel(const TIn* __restrict__ m, std::size_t cols, std::size_t ld, TOut* __restrict__ dst) {
  using A = acc_t<TOut>;
  const TIn* row = m + blockIdx.x * ld;
  A s = 0;
  for (std::size_t c = threadIdx.x; c < cols; c += blockDim.x) s += A(widen(row[c]));
  s = block_sum(s);
  if (threadIdx.x == 0) dst[blockIdx.x] = narrow<TOut>(s);
}

}  // namespace detail

// dst[c] += sum_{r < rows} term(r, c) for c < cols; term: __device__ acc_t<T> operator()(size_t r, size_t c).
template <class T, class Term>
void column_sum_accumulate(const char* op, std::size_t rows, std::size_t cols, Term term, T* dst) {
  if (rows == 0 || cols == 0) return;
  using A = acc_t<T>;
  const std::size_t chunks_wanted = std::clamp<std::size_t>((rows + 63) / 64, 1, 128);
  const std::size_t rows_per_chunk = (rows + chunks_wanted - 1) / chunks_wanted;
  const std::size_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  DeviceTensor<A> partial(Shape{chunks, cols});
  const cudaStream_t stream = current_stream();
  const dim3 grid(unsigned((cols + detail::column_tile - 1) / detail::column_tile), unsigned(chunks));
  const dim3 block(detail::column_tile, detail::column_lanes);
  detail::column_partial_kernel<A><<<grid, block, 0, stream>>>(rows, cols, rows_per_chunk, term, partial.data());
  check_launch(op);
  constexpr unsigned finish_block = 256;
  detail::column_finish_kernel<<<grid_size(cols, finish_block), finish_block, 0, stream>>>(cols, chunks,
                                                                                          partial.data(), dst);
  check_launch(op);
}

// dst[r] = sum_{c < cols} m[r * ld + c] for r < rows (written).
template <class TIn, class TOut>
void row_sum(const char* op, const TIn* m, std::size_t rows, std::size_t cols, std::size_t ld, TOut* dst) {
  if (rows == 0) return;
  const unsigned block = row_block_size(cols);
  detail::row_sum_kernel<<<unsigned(rows), block, 0, current_stream()>>>(m, cols, ld, dst);
  check_launch(op);
}

}  // namespace mixpeft::cuda
