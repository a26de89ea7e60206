// mixpeft/cuda/layernorm.cuh — LayerNorm over the last axis on the device (ops/layernorm.hpp).
//
//   forward:   mu = mean_j x_j,  r = 1 / sqrt(mean_j (x_j - mu)^2 + eps)   (biased variance, as PyTorch)
//              xh = (x - mu) * r,  y = xh * w + b
//   backward:  g = dy * w
//              dx = r * (g - mean_j g_j - xh * mean_j g_j xh_j)          (written)
//              dw += sum_rows dy * xh                                    (accumulated; skipped when dw is null)
//              db += sum_rows dy                                         (accumulated; skipped when db is null)
// Backward needs x, w and the cached mu and r of every row (xh is recomputed). One block per row, two passes
// for the variance (no cancellation); dw and db are deterministic column reductions (cuda/reduce.cuh).
// Shapes: x, y, dy, dx [..., D] seen as N = rows(x) rows (N = B*T tokens); w, b, dw, db [D]; mean, rstd [N].
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
__global__ void layernorm_forward_kernel(const T* x, const T* __restrict__ w, const T* __restrict__ b,
                                         std::size_t d, acc_t<T> eps, T* y, T* __restrict__ mean,
                                         T* __restrict__ rstd) {
  using A = acc_t<T>;
  const std::size_t row = blockIdx.x;
  const T* xr = x + row * d;
  T* yr = y + row * d;
  A s = 0;
  for (std::size_t j = threadIdx.x; j < d; j += blockDim.x) s += widen(xr[j]);
  const A mu = block_sum(s) / A(d);
  A ss = 0;
  for (std::size_t j = threadIdx.x; j < d; j += blockDim.x) {
    const A v = widen(xr[j]) - mu;
    ss += v * v;
  }
  const A r = A(1) / dev_sqrt(block_sum(ss) / A(d) + eps);
  if (threadIdx.x == 0) {
    mean[row] = narrow<T>(mu);
    rstd[row] = narrow<T>(r);
  }
  for (std::size_t j = threadIdx.x; j < d; j += blockDim.x)
    yr[j] = narrow<T>((widen(xr[j]) - mu) * r * widen(w[j]) + widen(b[j]));
}

template <class T>
__global__ void layernorm_backward_kernel(const T* x, const T* __restrict__ w,
                                          const T* __restrict__ mean, const T* __restrict__ rstd,
                                          const T* dy, std::size_t d, T* dx) {
  using A = acc_t<T>;
  const std::size_t row = blockIdx.x;
  const T* xr = x + row * d;
  const T* dyr = dy + row * d;
  T* dxr = dx + row * d;
  const A mu = widen(mean[row]), r = widen(rstd[row]);
  A g_sum = 0, gxh_sum = 0;
  for (std::size_t j = threadIdx.x; j < d; j += blockDim.x) {
    const A g = widen(dyr[j]) * widen(w[j]);
    g_sum += g;
    gxh_sum += g * (widen(xr[j]) - mu) * r;
  }
  const A g_mean = block_sum(g_sum) / A(d);
  const A gxh_mean = block_sum(gxh_sum) / A(d);
  for (std::size_t j = threadIdx.x; j < d; j += blockDim.x) {
    const A g = widen(dyr[j]) * widen(w[j]);
    dxr[j] = narrow<T>(r * (g - g_mean - (widen(xr[j]) - mu) * r * gxh_mean));
  }
}

template <class T>
struct LayernormWeightGrad {  // dy * (x - mean[row]) * rstd[row]
  const T* dy;
  const T* x;
  const T* mean;
  const T* rstd;
  std::size_t d;
  __device__ acc_t<T> operator()(std::size_t r, std::size_t c) const {
    return widen(dy[r * d + c]) * (widen(x[r * d + c]) - widen(mean[r])) * widen(rstd[r]);
  }
};

template <class T>
struct LayernormBiasGrad {  // dy
  const T* dy;
  std::size_t d;
  __device__ acc_t<T> operator()(std::size_t r, std::size_t c) const { return widen(dy[r * d + c]); }
};

}  // namespace detail

template <class T>
void layernorm_forward(const DeviceTensor<T>& x, const DeviceTensor<T>& w, const DeviceTensor<T>& b, double eps,
                       DeviceTensor<T>& y, DeviceTensor<T>& mean, DeviceTensor<T>& rstd) {
  constexpr std::string_view op = "layernorm_forward";
  require<ConfigError>(eps >= 0.0 && std::isfinite(eps), op, ": eps must be finite and >= 0, got ", eps);
  expect_shape(op, "w", w, {any_extent});
  const std::size_t d = w.shape()[0];
  require<ShapeError>(d > 0, op, ": w has shape [0], expected a non-empty feature axis");
  expect_same_shape(op, "b", b, "w", w);
  expect_width(op, "x", x, d);
  const std::size_t n = rows(x);
  resize_to(y, shape_of(x));
  resize_to(mean, Shape{n});
  resize_to(rstd, Shape{n});
  if (n == 0) return;
  detail::layernorm_forward_kernel<<<unsigned(n), row_block_size(d), 0, current_stream()>>>(
      x.data(), w.data(), b.data(), d, acc_t<T>(eps), y.data(), mean.data(), rstd.data());
  check_launch("layernorm_forward");
}

template <class T>
void layernorm_backward(const DeviceTensor<T>& x, const DeviceTensor<T>& w, const DeviceTensor<T>& mean,
                        const DeviceTensor<T>& rstd, const DeviceTensor<T>& dy, DeviceTensor<T>& dx,
                        std::type_identity_t<DeviceTensor<T>>* dw, std::type_identity_t<DeviceTensor<T>>* db) {
  constexpr std::string_view op = "layernorm_backward";
  expect_shape(op, "w", w, {any_extent});
  const std::size_t d = w.shape()[0];
  require<ShapeError>(d > 0, op, ": w has shape [0], expected a non-empty feature axis");
  expect_width(op, "x", x, d);
  const std::size_t n = rows(x);
  expect_shape(op, "mean", mean, {n});
  expect_shape(op, "rstd", rstd, {n});
  expect_same_shape(op, "dy", dy, "x", x);
  if (dw) expect_same_shape(op, "dw", *dw, "w", w);
  if (db) expect_same_shape(op, "db", *db, "w", w);
  resize_to(dx, shape_of(x));
  if (n == 0) return;
  detail::layernorm_backward_kernel<<<unsigned(n), row_block_size(d), 0, current_stream()>>>(
      x.data(), w.data(), mean.data(), rstd.data(), dy.data(), d, dx.data());
  check_launch("layernorm_backward");
  if (dw)
    column_sum_accumulate("layernorm_backward dw", n, d,
                          detail::LayernormWeightGrad<T>{dy.data(), x.data(), mean.data(), rstd.data(), d},
                          dw->data());
  if (db) column_sum_accumulate("layernorm_backward db", n, d, detail::LayernormBiasGrad<T>{dy.data(), d}, db->data());
}

}  // namespace mixpeft::cuda
