// mixpeft/ops/grouped_projection.hpp — the grouped (block-diagonal) projection of the adapters: a Conv1d with
// kernel size 1 and g groups.
//
// The h inputs split into g groups of h/g; group j feeds only the j-th slice of d/g outputs:
//   grouped(u, W)[:, slice_j(d)] = u[:, slice_j(h)] W_j^T,    W [d, h/g],  W_j = rows slice_j(d) of W
//   grouped_projection_forward:   y = beta * y + alpha * (grouped(u, W) + b)          (b optional; beta = 0
//                                                                                      overwrites y unread)
//   grouped_projection_backward:  du  = alpha * grouped^T(dy, W):  du[:, slice_j(h)] = dy[:, slice_j(d)] W_j
//                                                                   (written; skipped when du is null)
//                                 dW_j += alpha * dy[:, slice_j(d)]^T u[:, slice_j(h)]   (accumulated; null: skip)
//                                 db   += alpha * sum_rows dy                             (accumulated; null: skip)
// Per-sequence weights: W may also be [S, d, h/g] (and b [S, d]): the rows of u, y and dy are then S equal
// consecutive blocks (sequences; u [S, T, h] for instance) and block s uses W[s], b[s]; dW and db have the
// shapes of W and b and collect each block's gradient in its own entry. (The MM-Adapter mixes one weight per
// sequence from its routing weights: ops/routed_mix.hpp.)
// Backward needs dy, W and (for dW only) the forward's u; u is not read when dW is null.
// Shapes: u, du [..., h] (N rows), y, dy [..., d] (N rows), W [d, h/g] or [S, d, h/g], b [d] or [S, d];
// g divides d, h = g * cols(W). y must not alias u or W; with beta != 0 it must already be [N rows, d].
// CPU: g small GEMMs (Eigen) on column blocks of the row-major storage per sequence; the CUDA op
// (cuda/grouped_projection.cuh) is strided-batched cuBLASLt.
#pragma once

#include <cstddef>
#include <string_view>
#include <type_traits>

#include "mixpeft/core/error.hpp"
#include "mixpeft/core/parallel.hpp"
#include "mixpeft/core/tensor.hpp"

namespace mixpeft {

namespace detail {
template <class T>
using StridedView = Eigen::Map<RowMatrix<T>, 0, Eigen::OuterStride<>>;
template <class T>
using ConstStridedView = Eigen::Map<const RowMatrix<T>, 0, Eigen::OuterStride<>>;

// Columns [first, first + width) of a row-major [n, ld] matrix.
template <class T>
StridedView<T> column_block(T* p, std::size_t n, std::size_t ld, std::size_t first, std::size_t width) {
  return StridedView<T>(p + first, Eigen::Index(n), Eigen::Index(width), Eigen::OuterStride<>(Eigen::Index(ld)));
}
template <class T>
ConstStridedView<T> column_block(const T* p, std::size_t n, std::size_t ld, std::size_t first, std::size_t width) {
  return ConstStridedView<T>(p + first, Eigen::Index(n), Eigen::Index(width), Eigen::OuterStride<>(Eigen::Index(ld)));
}

// The raw kernels on one block of n rows: u [n, h], W [d, h/g], y and dy [n, d]; outputs must not alias inputs.
// y = beta * y + alpha * (grouped(u, W) + b)      (b may be null)
template <class T>
void grouped_projection_forward(std::size_t n, std::size_t h, std::size_t d, std::size_t groups, T alpha, const T* u,
                                const T* W, const T* b, T beta, T* y) {
  const std::size_t hg = h / groups, dg = d / groups;
  for (std::size_t j = 0; j < groups; ++j) {
    auto Y = column_block(y, n, d, j * dg, dg);
    const auto U = column_block(u, n, h, j * hg, hg);
    const auto Wj = matrix_view(W + j * dg * hg, dg, hg);
    if (beta == T(0)) Y.noalias() = alpha * (U * Wj.transpose());
    else {
      if (beta != T(1)) Y *= beta;
      Y.noalias() += alpha * (U * Wj.transpose());
    }
  }
  if (b) {
    const auto row = (alpha * matrix_view(b, 1, d)).eval();
    parallel_ranges(n, d, [&](std::size_t first, std::size_t last) {
      matrix_view(y + first * d, last - first, d).rowwise() += row.row(0);
    });
  }
}

// du = beta * du + alpha * grouped^T(dy, W)
template <class T>
void grouped_projection_backward_input(std::size_t n, std::size_t h, std::size_t d, std::size_t groups, T alpha,
                                       const T* dy, const T* W, T beta, T* du) {
  const std::size_t hg = h / groups, dg = d / groups;
  for (std::size_t j = 0; j < groups; ++j) {
    auto dU = column_block(du, n, h, j * hg, hg);
    const auto dY = column_block(dy, n, d, j * dg, dg);
    const auto Wj = matrix_view(W + j * dg * hg, dg, hg);
    if (beta == T(0)) dU.noalias() = alpha * (dY * Wj);
    else {
      if (beta != T(1)) dU *= beta;
      dU.noalias() += alpha * (dY * Wj);
    }
  }
}

// dW += alpha * grouped outer product of dy and u;  db += alpha * sum_rows dy   (either may be null: frozen)
template <class T>
void grouped_projection_backward_params(std::size_t n, std::size_t h, std::size_t d, std::size_t groups, T alpha,
                                        const T* dy, const T* u, T* dW, T* db) {
  const std::size_t hg = h / groups, dg = d / groups;
  if (dW) {
    for (std::size_t j = 0; j < groups; ++j)
      matrix_view(dW + j * dg * hg, dg, hg).noalias() +=
          alpha * (column_block(dy, n, d, j * dg, dg).transpose() * column_block(u, n, h, j * hg, hg));
  }
  if (db) matrix_view(db, 1, d).row(0) += alpha * matrix_view(dy, n, d).colwise().sum();
}

// The sizes of a grouped projection, checked: S sequences (1 for a shared W) of `seq_rows` rows each.
struct GroupedDims {
  std::size_t rows = 0, sequences = 1, seq_rows = 0, h = 0, d = 0, groups = 1, hg = 0, dg = 0;
  bool per_sequence = false;
};

// Checks W ([d, h/g] or [S, d, h/g]) against `groups` and the row count of the activations; the shapes of the
// other tensors are checked by the ops.
template <class W_t>
GroupedDims grouped_dims(std::string_view op, const W_t& W, std::size_t groups, std::size_t rows) {
  require<ConfigError>(groups > 0, op, ": groups must be > 0");
  require<ShapeError>(W.dimension() == 2 || W.dimension() == 3, op, ": W has shape ", shape_string(W.shape()),
                      ", expected [d, h/g] or [S, d, h/g]");
  GroupedDims g;
  g.per_sequence = W.dimension() == 3;
  g.sequences = g.per_sequence ? W.shape()[0] : 1;
  g.d = W.shape()[W.dimension() - 2];
  g.hg = W.shape()[W.dimension() - 1];
  g.groups = groups;
  g.h = g.hg * groups;
  require<ShapeError>(g.d % groups == 0, op, ": W has shape ", shape_string(W.shape()), ", whose ", g.d,
                      " outputs do not split into ", groups, " groups");
  g.dg = g.d / groups;
  require<ShapeError>(g.sequences > 0 && rows % g.sequences == 0, op, ": ", rows,
                      " rows do not split into the ", g.sequences, " sequences of W (shape ",
                      shape_string(W.shape()), ")");
  g.rows = rows;
  g.seq_rows = rows / g.sequences;
  return g;
}

// b (or db) must be [d] for a shared W and [S, d] for per-sequence weights.
template <class B_t>
void expect_grouped_bias(std::string_view op, std::string_view name, const B_t& b, const GroupedDims& g) {
  if (g.per_sequence) expect_shape(op, name, b, {g.sequences, g.d});
  else expect_shape(op, name, b, {g.d});
}
}  // namespace detail

template <class T>
void grouped_projection_forward(const Tensor<T>& u, const Tensor<T>& W, const std::type_identity_t<Tensor<T>>* b,
                                std::size_t groups, std::type_identity_t<T> alpha, std::type_identity_t<T> beta,
                                Tensor<T>& y) {
  constexpr std::string_view op = "grouped_projection_forward";
  require<ShapeError>(u.dimension() >= 1, op, ": u has shape ", shape_string(u.shape()), ", expected [..., h]");
  const detail::GroupedDims g = detail::grouped_dims(op, W, groups, rows(u));
  expect_width(op, "u", u, g.h);
  if (b) detail::expect_grouped_bias(op, "b", *b, g);
  require<ConfigError>((u.size() == 0 || y.data() != u.data()) && (W.size() == 0 || y.data() != W.data()), op,
                       ": y must not alias u or W");
  if (beta == T(0)) resize_to(y, with_last(shape_of(u), g.d));
  else
    require<ShapeError>(y.dimension() >= 1 && cols(y) == g.d && rows(y) == g.rows, op, ": y has shape ",
                        shape_string(y.shape()), ", expected ", g.rows, " rows of ", g.d, " (beta != 0 adds into y)");
  const std::size_t sw = g.d * g.hg;
  for (std::size_t s = 0; s < g.sequences; ++s)
    detail::grouped_projection_forward(g.seq_rows, g.h, g.d, g.groups, T(alpha), u.data() + s * g.seq_rows * g.h,
                                       W.data() + s * sw, b ? b->data() + s * g.d : static_cast<const T*>(nullptr),
                                       T(beta), y.data() + s * g.seq_rows * g.d);
}

template <class T>
void grouped_projection_backward(const Tensor<T>& dy, const Tensor<T>& u, const Tensor<T>& W, std::size_t groups,
                                 std::type_identity_t<T> alpha, std::type_identity_t<Tensor<T>>* du,
                                 std::type_identity_t<Tensor<T>>* dW, std::type_identity_t<Tensor<T>>* db) {
  constexpr std::string_view op = "grouped_projection_backward";
  require<ShapeError>(dy.dimension() >= 1, op, ": dy has shape ", shape_string(dy.shape()), ", expected [..., d]");
  const detail::GroupedDims g = detail::grouped_dims(op, W, groups, rows(dy));
  expect_width(op, "dy", dy, g.d);
  if (dW) {
    expect_width(op, "u", u, g.h);
    require<ShapeError>(rows(u) == g.rows, op, ": u has shape ", shape_string(u.shape()), " but dy has shape ",
                        shape_string(dy.shape()));
    expect_same_shape(op, "dW", *dW, "W", W);
  }
  if (db) detail::expect_grouped_bias(op, "db", *db, g);
  const std::size_t sw = g.d * g.hg;
  if (du) {
    require<ConfigError>(du != &dy && (dy.size() == 0 || du->data() != dy.data()), op, ": du must not alias dy");
    resize_to(*du, with_last(shape_of(dy), g.h));
  }
  // Sequence by sequence, the parameter gradients and then du, while the sequence's dy is still in cache.
  for (std::size_t s = 0; s < g.sequences; ++s) {
    const T* dy_s = dy.data() + s * g.seq_rows * g.d;
    if (dW || db)
      detail::grouped_projection_backward_params(g.seq_rows, g.h, g.d, g.groups, T(alpha), dy_s,
                                                 dW ? u.data() + s * g.seq_rows * g.h : static_cast<const T*>(nullptr),
                                                 dW ? dW->data() + s * sw : static_cast<T*>(nullptr),
                                                 db ? db->data() + s * g.d : static_cast<T*>(nullptr));
    if (du)
      detail::grouped_projection_backward_input(g.seq_rows, g.h, g.d, g.groups, T(alpha), dy_s, W.data() + s * sw,
                                                T(0), du->data() + s * g.seq_rows * g.h);
  }
}

}  // namespace mixpeft
