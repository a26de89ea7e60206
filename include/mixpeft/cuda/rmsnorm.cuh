// mixpeft/cuda/rmsnorm.cuh — RMSNorm over the last axis on the device (ops/rmsnorm.hpp).
//
//   forward:   r = 1 / sqrt(mean_j x_j^2 + eps),   y_j = x_j * r * w_j
//   backward:  g = dy * w
//              dx = r * g - (r^3 / D) * x * sum_j g_j x_j          (written)
//              dw += sum_rows dy * x * r                          (accumulated; skipped when dw is null: frozen)
// Backward needs x, w and the cached r of every row. One block per row for the row passes (block reductions
// in acc_t<T>); dw is a deterministic two-stage column reduction (cuda/reduce.cuh).
// Shapes: x, y, dy, dx [..., D] seen as N = rows(x) rows (N = B*T tokens); w, dw [D]; rstd [N].
#pragma once

#include <cmath>
#include <cstddef>
#include <string_view>
#include <type_traits>

#include "mixpeft/core/error.hpp"
#include "mixpeft/cuda/device_tensor.cuh"
#include "mixpeft/cuda/error.cuh"
#include "mixpeft/cuda/kernel_utils.cuh"
#include "mixpeft/cuda/reduce.cuh"

namespace mixpeft::cuda {
namespace detail {

template <class T>
__global__ void rmsnorm_forward_kernel(const T* x, const T* __restrict__ w, std::size_t d,
                                       acc_t<T> eps, T* y, T* __restrict__ rstd) {
  using A = acc_t<T>;
  const std::size_t row = blockIdx.x;
  const T* xr = x + row * d;
  T* yr = y + row * d;
  A ss = 0;
  for (std::size_t j = threadIdx.x; j < d; j += blockDim.x) {
    const A v = widen(xr[j]);
    ss += v * v;
  }
  ss = block_sum(ss);
  const A r = A(1) / dev_sqrt(ss / A(d) + eps);
  if (threadIdx.x == 0) rstd[row] = narrow<T>(r);
  for (std::size_t j = threadIdx.x; j < d; j += blockDim.x) yr[j] = narrow<T>(widen(xr[j]) * r * widen(w[j]));
}

template <class T>
__global__ void rmsnorm_backward_kernel(const T* x, const T* __restrict__ w, const T* __restrict__ rstd,
                                        const T* dy, std::size_t d, T* dx) {
  using A = acc_t<T>;
  const std::size_t row = blockIdx.x;
  const T* xr = x + row * d;
  const T* dyr = dy + row * d;
  T* dxr = dx + row * d;
  const A r = widen(rstd[row]);
  A dot = 0;
  for (std::size_t j = threadIdx.x; j < d; j += blockDim.x) dot += widen(dyr[j]) * widen(w[j]) * widen(xr[j]);
  dot = block_sum(dot);
  const A c = r * r * r / A(d) * dot;
  for (std::size_t j = threadIdx.x; j < d; j += blockDim.x)
    dxr[j] = narrow<T>(r * widen(dyr[j]) * widen(w[j]) - c * widen(xr[j]));
}

template <class T>
struct RmsnormWeightGrad {  // dy * x * rstd[row]
  const T* dy;
  const T* x;
  const T* rstd;
  std::size_t d;
  __device__ acc_t<T> operator()(std::size_t r, std::size_t c) const {
    return widen(dy[r * d + c]) * widen(x[r * d + c]) * widen(rstd[r]);
  }
};

}  // namespace detail

template <class T>
void rmsnorm_forward(const DeviceTensor<T>& x, const DeviceTensor<T>& w, double eps, DeviceTensor<T>& y,
                     DeviceTensor<T>& rstd) {
  constexpr std::string_view op = "rmsnorm_forward";
  require<ConfigError>(eps >= 0.0 && std::isfinite(eps), op, ": eps must be finite and >= 0, got ", eps);
  expect_shape(op, "w", w, {any_extent});
  const std::size_t d = w.shape()[0];
  require<ShapeError>(d > 0, op, ": w has shape [0], expected a non-empty feature axis");
  expect_width(op, "x", x, d);
  const std::size_t n = rows(x);
  resize_to(y, shape_of(x));
  resize_to(rstd, Shape{n});
  if (n == 0) return;
  detail::rmsnorm_forward_kernel<<<unsigned(n), row_block_size(d), 0, current_stream()>>>(
      x.data(), w.data(), d, acc_t<T>(eps), y.data(), rstd.data());
  check_launch("rmsnorm_forward");
}

template <class T>
void rmsnorm_backward(const DeviceTensor<T>& x, const DeviceTensor<T>& w, const DeviceTensor<T>& rstd,
                      const DeviceTensor<T>& dy, DeviceTensor<T>& dx, std::type_identity_t<DeviceTensor<T>>* dw) {
  constexpr std::string_view op = "rmsnorm_backward";
  expect_shape(op, "w", w, {any_extent});
  const std::size_t d = w.shape()[0];
  require<ShapeError>(d > 0, op, ": w has shape [0], expected a non-empty feature axis");
  expect_width(op, "x", x, d);
  const std::size_t n = rows(x);
  expect_shape(op, "rstd", rstd, {n});
  expect_same_shape(op, "dy", dy, "x", x);
  if (dw) expect_same_shape(op, "dw", *dw, "w", w);
  resize_to(dx, shape_of(x));
  if (n == 0) return;
  detail::rmsnorm_backward_kernel<<<unsigned(n), row_block_size(d), 0, current_stream()>>>(
      x.data(), w.data(), rstd.data(), dy.data(), d, dx.data());
  check_launch("rmsnorm_backward");
  if (dw)
    column_sum_accumulate("rmsnorm_backward dw", n, d,
                          detail::RmsnormWeightGrad<T>{dy.data(), x.data(), rstd.data(), d}, dw->data());
}

}  // namespace mixpeft::cuda
