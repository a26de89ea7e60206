// mixpeft/ops/layernorm.hpp — LayerNorm over the last axis (CLIP).
//
//   forward:   mu = mean_j x_j,  r = 1 / sqrt(mean_j (x_j - mu)^2 + eps)   (biased variance, as PyTorch)
//              xh = (x - mu) * r,  y = xh * w + b
//   backward:  g = dy * w
//              dx = r * (g - mean_j g_j - xh * mean_j g_j xh_j)          (written)
//              dw += sum_rows dy * xh                                    (accumulated; skipped when dw is null)
//              db += sum_rows dy                                         (accumulated; skipped when db is null)
// Backward needs x, w and the cached mu and r of every row (xh is recomputed).
// Shapes: x, y, dy, dx [..., D] seen as N = rows(x) rows (N = B*T tokens); w, b, dw, db [D]; mean, rstd [N].
#pragma once

#include <cmath>
#include <string_view>
#include <type_traits>

#include "mixpeft/core/error.hpp"
#include "mixpeft/core/parallel.hpp"
#include "mixpeft/core/tensor.hpp"

namespace mixpeft {

template <class T>
void layernorm_forward(const Tensor<T>& x, const Tensor<T>& w, const Tensor<T>& b, double eps, Tensor<T>& y,
                       Tensor<T>& mean, Tensor<T>& rstd) {
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
  using Row = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;
  using ConstRow = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>;
  const auto len = Eigen::Index(d);
  const ConstRow W(w.data(), len), B(b.data(), len);
  const T e = T(eps);
  parallel_rows(n, 5 * d, [&](std::size_t i) {
    const ConstRow X(x.data() + i * d, len);
    const T mu = X.mean();
    const T r = T(1) / std::sqrt((X - mu).square().mean() + e);  // two passes: no cancellation
    mean.data()[i] = mu;
    rstd.data()[i] = r;
    Row(y.data() + i * d, len) = (X - mu) * r * W + B;
  });
}

template <class T>
void layernorm_backward(const Tensor<T>& x, const Tensor<T>& w, const Tensor<T>& mean, const Tensor<T>& rstd,
                        const Tensor<T>& dy, Tensor<T>& dx, std::type_identity_t<Tensor<T>>* dw,
                        std::type_identity_t<Tensor<T>>* db) {
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
  using Row = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;
  using ConstRow = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>;
  const auto len = Eigen::Index(d);
  const ConstRow W(w.data(), len);
  parallel_rows(n, 8 * d, [&](std::size_t i) {
    const ConstRow X(x.data() + i * d, len), dY(dy.data() + i * d, len);
    const T mu = mean.data()[i], r = rstd.data()[i];
    const auto xh = (X - mu) * r;
    const auto g = dY * W;
    const T g_mean = g.mean(), gxh_mean = (g * xh).mean();
    Row(dx.data() + i * d, len) = r * (g - g_mean - xh * gxh_mean);
  });
  if (!dw && !db) return;
  // Column blocks per thread: each thread owns a slice of dw / db and streams every row (no races).
  parallel_ranges(d, 3 * n, [&](std::size_t c0, std::size_t c1) {
    const auto width = Eigen::Index(c1 - c0);
    for (std::size_t i = 0; i < n; ++i) {
      const ConstRow X(x.data() + i * d + c0, width), dY(dy.data() + i * d + c0, width);
      if (dw) Row(dw->data() + c0, width) += dY * (X - mean.data()[i]) * rstd.data()[i];
      if (db) Row(db->data() + c0, width) += dY;
    }
  });
}

}  // namespace mixpeft
