// mixpeft/ops/rmsnorm.hpp — RMSNorm over the last axis (LLaMA).
//
//   forward:   r = 1 / sqrt(mean_j x_j^2 + eps),   y_j = x_j * r * w_j
//   backward:  g = dy * w
//              dx = r * g - (r^3 / D) * x * sum_j g_j x_j          (written)
//              dw += sum_rows dy * x * r                          (accumulated; skipped when dw is null: frozen)
// Backward needs x, w and the cached r of every row.
// Shapes: x, y, dy, dx [..., D] seen as N = rows(x) rows (N = B*T tokens); w, dw [D]; rstd [N].
#pragma once

#include <cmath>
#include <string_view>
#include <type_traits>

#include "mixpeft/core/error.hpp"
#include "mixpeft/core/parallel.hpp"
#include "mixpeft/core/tensor.hpp"

namespace mixpeft {

template <class T>
void rmsnorm_forward(const Tensor<T>& x, const Tensor<T>& w, double eps, Tensor<T>& y, Tensor<T>& rstd) {
  constexpr std::string_view op = "rmsnorm_forward";
  require<ConfigError>(eps >= 0.0 && std::isfinite(eps), op, ": eps must be finite and >= 0, got ", eps);
  expect_shape(op, "w", w, {any_extent});
  const std::size_t d = w.shape()[0];
  require<ShapeError>(d > 0, op, ": w has shape [0], expected a non-empty feature axis");
  expect_width(op, "x", x, d);
  const std::size_t n = rows(x);
  resize_to(y, shape_of(x));
  resize_to(rstd, Shape{n});
  using Row = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;
  using ConstRow = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>;
  const auto len = Eigen::Index(d);
  const ConstRow W(w.data(), len);
  const T e = T(eps);
  parallel_rows(n, 3 * d, [&](std::size_t i) {
    const ConstRow X(x.data() + i * d, len);
    const T r = T(1) / std::sqrt(X.square().mean() + e);
    rstd.data()[i] = r;
    Row(y.data() + i * d, len) = X * r * W;
  });
}

template <class T>
void rmsnorm_backward(const Tensor<T>& x, const Tensor<T>& w, const Tensor<T>& rstd, const Tensor<T>& dy,
                      Tensor<T>& dx, std::type_identity_t<Tensor<T>>* dw) {
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
  using Row = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;
  using ConstRow = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>;
  const auto len = Eigen::Index(d);
  const ConstRow W(w.data(), len);
  const T inv_d = T(1) / T(d);
  parallel_rows(n, 5 * d, [&](std::size_t i) {
    const ConstRow X(x.data() + i * d, len), dY(dy.data() + i * d, len);
    const T r = rstd.data()[i];
    const T c = r * r * r * inv_d * (dY * W * X).sum();
    Row(dx.data() + i * d, len) = r * (dY * W) - c * X;
  });
  if (!dw) return;
  // Column blocks per thread: each thread owns a slice of dw and streams every row (no races, deterministic).
  parallel_ranges(d, 2 * n, [&](std::size_t c0, std::size_t c1) {
    const auto width = Eigen::Index(c1 - c0);
    Row dW(dw->data() + c0, width);
    for (std::size_t i = 0; i < n; ++i)
      dW += ConstRow(dy.data() + i * d + c0, width) * ConstRow(x.data() + i * d + c0, width) * rstd.data()[i];
  });
}

}  // namespace mixpeft
