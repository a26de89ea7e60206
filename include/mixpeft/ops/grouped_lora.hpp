// mixpeft/ops/grouped_lora.hpp — LoRA GEMMs of K experts on expert-grouped rows (CPU; cuda/grouped_lora.cuh is
// the device version, same names and arguments).
//
// Rows are grouped by expert (router.hpp: group_by_expert): expert e owns the contiguous row block
// j in [offsets[e], offsets[e + 1]). For j in block e (c[j] an optional per-row gate, 1 when absent):
//   grouped_lora_shrink             t[j, :]  = x[j, :] A_e^T                                      (written)
//   grouped_lora_expand             y[j, :] (=|+=) s c[j] t[j, :] B_e^T                           (accumulate)
//   grouped_lora_expand_backward    u[j, :]  = s dy[j, :] B_e;  dt[j, :] = c[j] u[j, :]           (written)
//                                   dgates[j] += <u[j, :], h[j, :]>  (h = the ungated t; optional)
//   grouped_lora_shrink_backward    dx[j, :] (=|+=) dt[j, :] A_e
//   grouped_lora_grad_B             dB_e += s sum_{j in e} c[j] dy[j, :]^T t[j, :]                (accumulated)
//   grouped_lora_grad_A             dA_e += sum_{j in e} dt[j, :]^T x[j, :]                       (accumulated)
//   one_block_offsets               offsets = [0, m]: all rows in one block (a single LoRA)
// Shapes: x, dx [M, in] (or [..., in]); A, dA [K, r, in]; t, h, dt [M, r]; B, dB [K, out, r]; y, dy [M, out];
// gates, dgates [M] or [M, 1]; offsets [K + 1] int32. A 2-D weight ([r, in], [out, r]) is one expert (K = 1), so
// a single LoRA keeps PEFT's parameter shapes.
// Offsets are checked here (0, non-decreasing, M); the device ops trust them (they live on the device).
// Threads: each row op is one parallel region in which threads take equal slices of all M rows (balanced
// whatever the routing; as many regions for K experts as for one) and run serial GEMMs on the parts of the
// blocks inside their slice; the weight gradients are sums over rows, so threads split dW's wider axis instead.
// An expert without rows does no work (its dA_e, dB_e are untouched).
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <type_traits>
#include <utility>

#include "mixpeft/core/error.hpp"
#include "mixpeft/core/parallel.hpp"
#include "mixpeft/core/tensor.hpp"

namespace mixpeft {

namespace detail {

// A stacked weight [K, rows, cols], or one expert's [rows, cols].
struct StackedDims {
  std::size_t experts, rows, cols;
};
inline StackedDims stacked_dims(std::string_view op, std::string_view name, const Shape& s, std::string_view layout) {
  require<ShapeError>(s.size() == 2 || s.size() == 3, op, ": ", name, " has shape ", shape_string(s), ", expected ",
                      layout);
  return s.size() == 3 ? StackedDims{s[0], s[1], s[2]} : StackedDims{1, s[0], s[1]};
}

// The host-side checks both backends make: offsets [K + 1] for K experts sharing M rows.
inline void check_grouping(std::string_view op, const StackedDims& d, const Shape& offsets, std::size_t m) {
  require<ShapeError>(offsets.size() == 1 && offsets[0] == d.experts + 1, op, ": offsets has shape ",
                      shape_string(offsets), ", expected [", d.experts + 1, "] for ", d.experts, " experts");
  require<ShapeError>(d.experts > 0 || m == 0, op, ": ", m, " rows but no experts");
}
inline void check_rows_of(std::string_view op, std::string_view name, const Shape& s, std::size_t m,
                          std::size_t width) {
  std::size_t n = 1;
  for (std::size_t i = 0; i + 1 < s.size(); ++i) n *= s[i];
  require<ShapeError>(!s.empty() && n == m && s.back() == width, op, ": ", name, " has shape ", shape_string(s),
                      ", expected [", m, ", ", width, "]");
}
inline void check_per_row(std::string_view op, std::string_view name, const Shape& s, std::size_t m) {
  require<ShapeError>((s.size() == 1 && s[0] == m) || (s.size() == 2 && s[0] == m && s[1] == 1), op, ": ", name,
                      " has shape ", shape_string(s), ", expected [", m, "] or [", m, ", 1]");
}

// Offsets rise from 0 to m (the CPU can afford to look).
inline void check_offsets(std::string_view op, const Tensor<std::int32_t>& offsets, std::size_t experts,
                          std::size_t m) {
  const std::int32_t* o = offsets.data();
  bool ok = o[0] == 0 && std::size_t(o[experts]) == m;
  for (std::size_t e = 0; e < experts; ++e) ok = ok && o[e] <= o[e + 1];
  require<ShapeError>(ok, op, ": offsets must rise from 0 to the ", m, " rows");
}

// Calls f(e, begin, end) on the part of every expert's block inside this thread's slice of the m rows.
template <class F>
void for_expert_rows(const Tensor<std::int32_t>& offsets, std::size_t experts, std::size_t m, std::size_t work_per_row,
                     F&& f) {
  parallel_ranges(m, work_per_row, [&](std::size_t r0, std::size_t r1) {
    for (std::size_t e = 0; e < experts; ++e) {
      const std::size_t lo = std::max(std::size_t(offsets.data()[e]), r0);
      const std::size_t hi = std::min(std::size_t(offsets.data()[e + 1]), r1);
      if (lo < hi) f(e, lo, hi);
    }
  });
}

template <class T>
using ColumnMap = Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, 1>>;

// Rows b .. e of x [M, width] times expert g's weight [rows, cols] (ld = rows * cols per expert).
template <class T>
auto expert_matrix(const T* w, std::size_t g, std::size_t rows, std::size_t cols) {
  return matrix_view(w + g * rows * cols, rows, cols);
}
template <class T>
auto expert_matrix(T* w, std::size_t g, std::size_t rows, std::size_t cols) {
  return matrix_view(w + g * rows * cols, rows, cols);
}

}  // namespace detail

// offsets = [0, m]: one block of all rows.
inline void one_block_offsets(std::size_t m, Tensor<std::int32_t>& offsets) {
  resize_to(offsets, {2});
  offsets.data()[0] = 0;
  offsets.data()[1] = std::int32_t(m);
}

// t[j, :] = x[j, :] A_e^T. x [M, in], A [K, r, in] -> t [M, r].
template <class T>
void grouped_lora_shrink(const Tensor<T>& x, const Tensor<T>& A, const Tensor<std::int32_t>& offsets, Tensor<T>& t) {
  constexpr std::string_view op = "grouped_lora_shrink";
  const auto d = detail::stacked_dims(op, "A", shape_of(A), "[K, r, in] or [r, in]");
  expect_width(op, "x", x, d.cols);
  const std::size_t m = rows(x), r = d.rows, in = d.cols;
  detail::check_grouping(op, d, shape_of(offsets), m);
  detail::check_offsets(op, offsets, d.experts, m);
  resize_to(t, {m, r});
  detail::for_expert_rows(offsets, d.experts, m, r * in, [&](std::size_t e, std::size_t b, std::size_t end) {
    matrix_view(t.data() + b * r, end - b, r).noalias() =
        matrix_view(x.data() + b * in, end - b, in) * detail::expert_matrix(A.data(), e, r, in).transpose();
  });
}

// y[j, :] (=|+=) scale c[j] t[j, :] B_e^T. t [M, r], B [K, out, r], gates [M] or null -> y [M, out].
template <class T>
void grouped_lora_expand(const Tensor<T>& t, const Tensor<T>& B, const Tensor<std::int32_t>& offsets, double scale,
                         const std::type_identity_t<Tensor<T>>* gates, bool accumulate, Tensor<T>& y) {
  constexpr std::string_view op = "grouped_lora_expand";
  const auto d = detail::stacked_dims(op, "B", shape_of(B), "[K, out, r] or [out, r]");
  const std::size_t out = d.rows, r = d.cols;
  expect_width(op, "t", t, r);
  const std::size_t m = rows(t);
  detail::check_grouping(op, d, shape_of(offsets), m);
  detail::check_offsets(op, offsets, d.experts, m);
  if (gates) detail::check_per_row(op, "gates", shape_of(*gates), m);
  if (accumulate) detail::check_rows_of(op, "y", shape_of(y), m, out);
  else resize_to(y, {m, out});
  const T s = T(scale);
  detail::for_expert_rows(offsets, d.experts, m, r * out, [&](std::size_t e, std::size_t b, std::size_t end) {
    auto Y = matrix_view(y.data() + b * out, end - b, out);
    const auto Bt = detail::expert_matrix(B.data(), e, out, r).transpose();
    const auto Tm = matrix_view(t.data() + b * r, end - b, r);
    if (gates) {
      const auto C = detail::ColumnMap<T>(gates->data() + b, Eigen::Index(end - b));
      const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> tc = C.asDiagonal() * Tm;
      if (accumulate) Y.noalias() += s * (tc * Bt);
      else Y.noalias() = s * (tc * Bt);
    } else {
      if (accumulate) Y.noalias() += s * (Tm * Bt);
      else Y.noalias() = s * (Tm * Bt);
    }
  });
}

// u[j, :] = scale dy[j, :] B_e;  dt[j, :] = c[j] u[j, :];  dgates[j] += <u[j, :], h[j, :]> (when dgates is given).
// dy [M, out], B [K, out, r] -> dt [M, r].
template <class T>
void grouped_lora_expand_backward(const Tensor<T>& dy, const Tensor<T>& B, const Tensor<std::int32_t>& offsets,
                                  double scale, const std::type_identity_t<Tensor<T>>* gates, Tensor<T>& dt,
                                  const std::type_identity_t<Tensor<T>>* h = nullptr,
                                  std::type_identity_t<Tensor<T>>* dgates = nullptr) {
  constexpr std::string_view op = "grouped_lora_expand_backward";
  const auto d = detail::stacked_dims(op, "B", shape_of(B), "[K, out, r] or [out, r]");
  const std::size_t out = d.rows, r = d.cols;
  expect_width(op, "dy", dy, out);
  const std::size_t m = rows(dy);
  detail::check_grouping(op, d, shape_of(offsets), m);
  detail::check_offsets(op, offsets, d.experts, m);
  if (gates) detail::check_per_row(op, "gates", shape_of(*gates), m);
  if (dgates) {
    require<ShapeError>(h != nullptr, op, ": dgates needs h (the forward's ungated t)");
    detail::check_per_row(op, "dgates", shape_of(*dgates), m);
    detail::check_rows_of(op, "h", shape_of(*h), m, r);
    require<ShapeError>(h != &dt, op, ": h and dt must be different tensors");
  }
  resize_to(dt, {m, r});
  const T s = T(scale);
  detail::for_expert_rows(offsets, d.experts, m, r * out, [&](std::size_t e, std::size_t b, std::size_t end) {
    auto dT = matrix_view(dt.data() + b * r, end - b, r);
    dT.noalias() = s * (matrix_view(dy.data() + b * out, end - b, out) * detail::expert_matrix(B.data(), e, out, r));
    if (dgates) {
      Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, 1>>(dgates->data() + b, Eigen::Index(end - b)) +=
          dT.cwiseProduct(matrix_view(h->data() + b * r, end - b, r)).rowwise().sum();
    }
    if (gates) dT = detail::ColumnMap<T>(gates->data() + b, Eigen::Index(end - b)).asDiagonal() * dT;
  });
}

// dx[j, :] (=|+=) dt[j, :] A_e. dt [M, r], A [K, r, in] -> dx [M, in].
template <class T>
void grouped_lora_shrink_backward(const Tensor<T>& dt, const Tensor<T>& A, const Tensor<std::int32_t>& offsets,
                                  bool accumulate, Tensor<T>& dx) {
  constexpr std::string_view op = "grouped_lora_shrink_backward";
  const auto d = detail::stacked_dims(op, "A", shape_of(A), "[K, r, in] or [r, in]");
  const std::size_t r = d.rows, in = d.cols;
  expect_width(op, "dt", dt, r);
  const std::size_t m = rows(dt);
  detail::check_grouping(op, d, shape_of(offsets), m);
  detail::check_offsets(op, offsets, d.experts, m);
  if (accumulate) detail::check_rows_of(op, "dx", shape_of(dx), m, in);
  else resize_to(dx, {m, in});
  detail::for_expert_rows(offsets, d.experts, m, r * in, [&](std::size_t e, std::size_t b, std::size_t end) {
    auto dX = matrix_view(dx.data() + b * in, end - b, in);
    const auto dT = matrix_view(dt.data() + b * r, end - b, r);
    const auto Ae = detail::expert_matrix(A.data(), e, r, in);
    if (accumulate) dX.noalias() += dT * Ae;
    else dX.noalias() = dT * Ae;
  });
}

namespace detail {
// dW_e += alpha * u[block e]^T v[block e] for every expert: dW [K, p, q], u [M, p], v [M, q]; threads split
// the wider of p and q.
template <class T>
void grouped_weight_grad(const T* u, const T* v, const Tensor<std::int32_t>& offsets, std::size_t experts,
                         std::size_t m, std::size_t p, std::size_t q, T alpha, T* dw) {
  const bool split_p = p >= q;
  parallel_ranges(split_p ? p : q, m * (split_p ? q : p), [&](std::size_t c0, std::size_t c1) {
    for (std::size_t e = 0; e < experts; ++e) {
      const std::size_t b = std::size_t(offsets.data()[e]), end = std::size_t(offsets.data()[e + 1]);
      if (b == end) continue;
      const auto U = matrix_view(u + b * p, end - b, p);
      const auto V = matrix_view(v + b * q, end - b, q);
      auto dW = expert_matrix(dw, e, p, q);
      if (split_p) dW.middleRows(c0, c1 - c0).noalias() += alpha * (U.middleCols(c0, c1 - c0).transpose() * V);
      else dW.middleCols(c0, c1 - c0).noalias() += alpha * (U.transpose() * V.middleCols(c0, c1 - c0));
    }
  });
}
}  // namespace detail

// dB_e += scale sum_{j in e} c[j] dy[j, :]^T t[j, :]. dy [M, out], t [M, r] (ungated), dB [K, out, r].
template <class T>
void grouped_lora_grad_B(const Tensor<T>& dy, const Tensor<T>& t, const Tensor<std::int32_t>& offsets, double scale,
                         const std::type_identity_t<Tensor<T>>* gates, Tensor<T>& dB) {
  constexpr std::string_view op = "grouped_lora_grad_B";
  const auto d = detail::stacked_dims(op, "dB", shape_of(dB), "[K, out, r] or [out, r]");
  const std::size_t out = d.rows, r = d.cols;
  expect_width(op, "dy", dy, out);
  const std::size_t m = rows(dy);
  detail::check_rows_of(op, "t", shape_of(t), m, r);
  detail::check_grouping(op, d, shape_of(offsets), m);
  detail::check_offsets(op, offsets, d.experts, m);
  const T* tv = t.data();
  Tensor<T> gated;
  if (gates) {
    detail::check_per_row(op, "gates", shape_of(*gates), m);
    gated = empty<T>({m, r});
    matrix_view(gated.data(), m, r).noalias() =
        detail::ColumnMap<T>(gates->data(), Eigen::Index(m)).asDiagonal() * matrix_view(t.data(), m, r);
    tv = gated.data();
  }
  detail::grouped_weight_grad(dy.data(), tv, offsets, d.experts, m, out, r, T(scale), dB.data());
}

// dA_e += sum_{j in e} dt[j, :]^T x[j, :]. dt [M, r] (gated, as expand_backward writes it), x [M, in], dA [K, r, in].
template <class T>
void grouped_lora_grad_A(const Tensor<T>& dt, const Tensor<T>& x, const Tensor<std::int32_t>& offsets, Tensor<T>& dA) {
  constexpr std::string_view op = "grouped_lora_grad_A";
  const auto d = detail::stacked_dims(op, "dA", shape_of(dA), "[K, r, in] or [r, in]");
  const std::size_t r = d.rows, in = d.cols;
  expect_width(op, "x", x, in);
  const std::size_t m = rows(x);
  detail::check_rows_of(op, "dt", shape_of(dt), m, r);
  detail::check_grouping(op, d, shape_of(offsets), m);
  detail::check_offsets(op, offsets, d.experts, m);
  detail::grouped_weight_grad(dt.data(), x.data(), offsets, d.experts, m, r, in, T(1), dA.data());
}

}  // namespace mixpeft
