// mixpeft/cuda/softmax.cuh — softmax over the last axis on the device (ops/softmax.hpp).
//
//   forward:   y[..., C] = exp(x - max x) / sum exp(x - max x)       (row-wise, numerically stable)
//   backward:  dx = y * (dy - sum_c dy_c y_c)                        (dx written)
// Backward needs only the output y. One block per row; the row is read three times (max, sum, write),
// from L2 after the first pass; max and sums are block reductions in acc_t<T>. y may alias x and dx may
// alias dy (each entry is written by the thread that read it, after the reductions).
// Shapes: x, y, dy, dx [..., C] seen as N = rows(x) rows.
#pragma once

#include <cstddef>

#include "mixpeft/cuda/device_tensor.cuh"
#include "mixpeft/cuda/error.cuh"
#include "mixpeft/cuda/kernel_utils.cuh"

namespace mixpeft::cuda {
namespace detail {

// Softmax of entries [begin, end) of a row of c entries held at x; zeros elsewhere (and everywhere when empty).
template <class T>
__device__ void softmax_row(const T* x, T* y, std::size_t c, std::size_t begin, std::size_t end) {
  using A = acc_t<T>;
  A m = -std::numeric_limits<A>::infinity();
  for (std::size_t j = begin + threadIdx.x; j < end; j += blockDim.x) m = MaxOp{}(m, widen(x[j]));
  m = block_max(m);
  A s = 0;
  for (std::size_t j = begin + threadIdx.x; j < end; j += blockDim.x) s += dev_exp(widen(x[j]) - m);
  s = block_sum(s);
  const A inv = A(1) / s;
  for (std::size_t j = threadIdx.x; j < c; j += blockDim.x)
    y[j] = narrow<T>(j >= begin && j < end ? dev_exp(widen(x[j]) - m) * inv : A(0));
}

// dx = y * (dy - sum(dy * y)) over one row of c entries.
template <class T>
__device__ void softmax_backward_row(const T* y, const T* dy, T* dx, std::size_t c) {
  using A = acc_t<T>;
  A s = 0;
  for (std::size_t j = threadIdx.x; j < c; j += blockDim.x) s += widen(dy[j]) * widen(y[j]);
  s = block_sum(s);
  for (std::size_t j = threadIdx.x; j < c; j += blockDim.x) dx[j] = narrow<T>(widen(y[j]) * (widen(dy[j]) - s));
}

template <class T>
__global__ void softmax_forward_kernel(const T* x, T* y, std::size_t c) {
  const std::size_t offset = blockIdx.x * c;
  softmax_row(x + offset, y + offset, c, 0, c);
}

template <class T>
__global__ void softmax_backward_kernel(const T* y, const T* dy, T* dx, std::size_t c) {
  const std::size_t offset = blockIdx.x * c;
  softmax_backward_row(y + offset, dy + offset, dx + offset, c);
}

}  // namespace detail

template <class T>
void softmax_forward(const DeviceTensor<T>& x, DeviceTensor<T>& y) {
  require<ShapeError>(x.dimension() >= 1 && cols(x) > 0, "softmax_forward: x has shape ", shape_string(x.shape()),
                      ", expected a non-empty last axis");
  resize_to(y, shape_of(x));
  const std::size_t n = rows(x), c = cols(x);
  if (n == 0) return;
  detail::softmax_forward_kernel<<<unsigned(n), row_block_size(c), 0, current_stream()>>>(x.data(), y.data(), c);
  check_launch("softmax_forward");
}

template <class T>
void softmax_backward(const DeviceTensor<T>& y, const DeviceTensor<T>& dy, DeviceTensor<T>& dx) {
  expect_same_shape("softmax_backward", "dy", dy, "y", y);
  resize_to(dx, shape_of(y));
  const std::size_t n = rows(y), c = cols(y);
  if (n == 0 || c == 0) return;
  detail::softmax_backward_kernel<<<unsigned(n), row_block_size(c), 0, current_stream()>>>(y.data(), dy.data(),
                                                                                           dx.data(), c);
  check_launch("softmax_backward");
}

}  // namespace mixpeft::cuda
