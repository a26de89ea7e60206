// mixpeft/ops/matmul.hpp — GEMM on row-major matrices (Eigen) and the linear op.
//
//   gemm:             C[M, N] = alpha * op(A) op(B) + beta * C,  op(X) = X or X^T
//                     on raw row-major storage, or on whole tensors holding exactly M*K, K*N and M*N elements
//                     (the tensor form has the signature of the CUDA gemm in cuda/matmul.cuh, so layers call
//                     it unqualified on either backend; on the CPU it checks the counts and forwards)
//   linear_forward:   y[..., out] = x[..., in] W[out, in]^T (+ b[out])
//   linear_backward:  dx[..., in] = dy W           (written;     skipped when dx is null)
//                     dW[out, in] += dy^T x        (accumulated; skipped when dW is null: frozen weight)
//                     db[out]     += sum_rows dy   (accumulated; skipped when db is null)
// Leading axes of x are flattened into rows. Caches nothing: backward needs x and W.
#pragma once

#include <string_view>
#include <type_traits>

#include "mixpeft/core/tensor.hpp"

namespace mixpeft {

enum class Trans { No, Yes };

// C = alpha * op(A) op(B) + beta * C on raw row-major storage. C must not alias A or B.
template <class T>
void gemm(Trans ta, Trans tb, std::size_t m, std::size_t n, std::size_t k, T alpha, const T* a, const T* b,
          T beta, T* c) {
  // Row-major A is [m, k] (or [k, m] when transposed); likewise B is [k, n] or [n, k].
  auto C = matrix_view(c, m, n);
  auto run = [&](const auto& opa, const auto& opb) {
    if (beta == T(0)) C.noalias() = alpha * (opa * opb);
    else {
      if (beta != T(1)) C *= beta;
      C.noalias() += alpha * (opa * opb);
    }
  };
  const auto A = ta == Trans::No ? matrix_view(a, m, k) : matrix_view(a, k, m);
  const auto B = tb == Trans::No ? matrix_view(b, k, n) : matrix_view(b, n, k);
  if (ta == Trans::No && tb == Trans::No) run(A, B);
  else if (ta == Trans::No) run(A, B.transpose());
  else if (tb == Trans::No) run(A.transpose(), B);
  else run(A.transpose(), B.transpose());
}

// C[m, n] = alpha * op(A) op(B) + beta * C on whole tensors holding exactly m*k, k*n and m*n elements (their
// shapes are otherwise free: a [B, T, in] activation is the [B*T, in] matrix). C must not alias A or B.
namespace detail {
// The element counts of the tensor-level gemm's operands (shared by the CPU and CUDA versions).
template <class A, class B, class C>
void expect_gemm_sizes(const A& a, const B& b, const C& c, std::size_t m, std::size_t n, std::size_t k) {
  constexpr std::string_view op = "gemm";
  require<ShapeError>(a.size() == m * k, op, ": A has shape ", shape_string(a.shape()), ", expected ", m * k,
                      " elements (M = ", m, ", K = ", k, ")");
  require<ShapeError>(b.size() == k * n, op, ": B has shape ", shape_string(b.shape()), ", expected ", k * n,
                      " elements (K = ", k, ", N = ", n, ")");
  require<ShapeError>(c.size() == m * n, op, ": C has shape ", shape_string(c.shape()), ", expected ", m * n,
                      " elements (M = ", m, ", N = ", n, ")");
}
}  // namespace detail

template <class T>
void gemm(Trans ta, Trans tb, std::size_t m, std::size_t n, std::size_t k, std::type_identity_t<T> alpha,
          const Tensor<T>& a, const Tensor<T>& b, std::type_identity_t<T> beta, Tensor<T>& c) {
  detail::expect_gemm_sizes(a, b, c, m, n, k);
  gemm(ta, tb, m, n, k, alpha, a.data(), b.data(), beta, c.data());
}

template <class T>
void linear_forward(const Tensor<T>& x, const Tensor<T>& W, const std::type_identity_t<Tensor<T>>* b, Tensor<T>& y) {
  constexpr std::string_view op = "linear_forward";
  expect_shape(op, "W", W, {any_extent, any_extent});
  const std::size_t out = W.shape()[0], in = W.shape()[1];
  expect_width(op, "x", x, in);
  if (b) expect_shape(op, "b", *b, {out});
  resize_to(y, with_last(shape_of(x), out));
  const std::size_t n = rows(x);
  auto Y = matrix_view(y.data(), n, out);
  Y.noalias() = matrix_view(x.data(), n, in) * matrix_view(W.data(), out, in).transpose();
  if (b) Y.rowwise() += matrix_view(b->data(), 1, out).row(0);
}

template <class T>
void linear_backward(const Tensor<T>& x, const Tensor<T>& W, const Tensor<T>& dy, std::type_identity_t<Tensor<T>>* dx,
                     std::type_identity_t<Tensor<T>>* dW, std::type_identity_t<Tensor<T>>* db) {
  constexpr std::string_view op = "linear_backward";
  expect_shape(op, "W", W, {any_extent, any_extent});
  const std::size_t out = W.shape()[0], in = W.shape()[1];
  expect_width(op, "x", x, in);
  expect_width(op, "dy", dy, out);
  const std::size_t n = rows(x);
  require<ShapeError>(rows(dy) == n, op, ": dy has shape ", shape_string(dy.shape()), " but x has shape ",
                      shape_string(x.shape()));
  const auto X = matrix_view(x.data(), n, in);
  const auto dY = matrix_view(dy.data(), n, out);
  if (dx) {
    resize_to(*dx, shape_of(x));
    matrix_view(dx->data(), n, in).noalias() = dY * matrix_view(W.data(), out, in);
  }
  if (dW) {
    expect_same_shape(op, "dW", *dW, "W", W);
    matrix_view(dW->data(), out, in).noalias() += dY.transpose() * X;
  }
  if (db) {
    expect_shape(op, "db", *db, {out});
    matrix_view(db->data(), 1, out).row(0) += dY.colwise().sum();
  }
}

}  // namespace mixpeft
