// mixpeft/ops/routed_mix.hpp — per-sequence mixtures of K (weight, bias) pairs by soft routing weights.
//
//   routed_mix_forward:   E[b] = s sum_k w[b, k] W_k,   e[b] = s sum_k w[b, k] c_k            // [B, ...W], [B, ...c]
//   routed_mix_backward:  given G = dL/dE [B, ...W] and r = dL/de [B, ...c]:
//                         dw[b, k] = s (<W_k, G[b]> + <c_k, r[b]>)                         (written, w's shape)
//                         dW_k += s sum_b w[b, k] G[b],  dc_k += s sum_b w[b, k] r[b]      (accumulated, in b order;
//                                                                                           a null entry: frozen)
// The MM-Adapter (layers/mm_adapter.hpp) mixes its two up-projections B, D and their biases with the router's
// weights into one grouped weight per sequence (E_b = s (w_b0 B + w_b1 D)), runs the per-sequence grouped
// projection (ops/grouped_projection.hpp) with it, and gets the routing gradient from the small dE, dE of one
// sequence being grouped_outer(dy_b, u_b) and de its row sum.
// Backward needs w and the sources W_k, c_k (not E).
// Shapes: w [B, K] (or [K]: B = 1); every W_k one shape, every c_k one shape; E is [B, ...W_k's shape],
// e [B, ...c_k's shape]; G and r have the shapes of E and e. Outputs must not alias inputs.
// CPU: per sequence and source, one vectorised pass (Eigen for E, e and the inner products; the gradient
// accumulation is a fused multiply-add where the target has FMA). The CUDA op (cuda/routed_mix.cuh) reads w on
// the device (no host sync).
#pragma once

#include <array>
#include <cmath>
#include <cstddef>
#include <string_view>
#include <type_traits>

#include "mixpeft/core/error.hpp"
#include "mixpeft/core/tensor.hpp"

namespace mixpeft {

namespace detail {
// y = alpha * x + beta * y over n contiguous entries; beta = 0 overwrites y without reading it.
template <class T>
void blend(std::size_t n, T alpha, const T* x, T beta, T* y) {
  auto Y = matrix_view(y, 1, n);
  if (beta == T(0)) Y = alpha * matrix_view(x, 1, n);
  else Y = alpha * matrix_view(x, 1, n) + beta * Y;
}
// y += alpha * x over n contiguous entries, fused (one rounding per entry) where the target has FMA, so the
// result does not depend on whether the compiler contracts a multiply and an add in the caller's context.
template <class T>
void fused_axpy(std::size_t n, T alpha, const T* x, T* y) {
#ifdef __FMA__
  for (std::size_t i = 0; i < n; ++i) y[i] = std::fma(alpha, x[i], y[i]);
#else
  blend(n, alpha, x, T(1), y);
#endif
}
// <x, y> over n contiguous entries.
template <class T>
T inner_product(std::size_t n, const T* x, const T* y) {
  return matrix_view(x, 1, n).row(0).dot(matrix_view(y, 1, n).row(0));
}

struct RoutedMixDims {
  std::size_t sequences = 0, sources = 0, weight_size = 0, bias_size = 0;
  Shape weight_shape, bias_shape;  // of one source
};

// Checks w against K and that the sources share a shape (W_k, c_k); null sources are a ConfigError.
template <class Tw, class Tsrc, std::size_t K>
RoutedMixDims routed_mix_dims(std::string_view op, const Tw& w, const std::array<const Tsrc*, K>& W,
                              const std::array<const Tsrc*, K>& c) {
  static_assert(K > 0, "routed_mix: at least one source");
  require<ShapeError>((w.dimension() == 1 || w.dimension() == 2) && cols(w) == K, op, ": w has shape ",
                      shape_string(w.shape()), ", expected [B, ", K, "] or [", K, "]");
  for (std::size_t k = 0; k < K; ++k)
    require<ConfigError>(W[k] != nullptr && c[k] != nullptr, op, ": source ", k, " is null");
  RoutedMixDims dims;
  dims.sequences = rows(w);
  dims.sources = K;
  dims.weight_shape = shape_of(*W[0]);
  dims.bias_shape = shape_of(*c[0]);
  dims.weight_size = W[0]->size();
  dims.bias_size = c[0]->size();
  for (std::size_t k = 1; k < K; ++k) {
    expect_same_shape(op, "W_k", *W[k], "W_0", *W[0]);
    expect_same_shape(op, "c_k", *c[k], "c_0", *c[0]);
  }
  return dims;
}

inline Shape stacked_shape(std::size_t first, const Shape& rest) {
  Shape s{first};
  s.insert(s.end(), rest.begin(), rest.end());
  return s;
}
}  // namespace detail

template <class T, std::size_t K>
void routed_mix_forward(const Tensor<T>& w, std::type_identity_t<T> scale, const std::array<const Tensor<T>*, K>& W,
                        const std::array<const Tensor<T>*, K>& c, Tensor<T>& E, Tensor<T>& e) {
  constexpr std::string_view op = "routed_mix_forward";
  const detail::RoutedMixDims dims = detail::routed_mix_dims(op, w, W, c);
  for (std::size_t k = 0; k < K; ++k)
    require<ConfigError>(E.data() != W[k]->data() && e.data() != c[k]->data(), op, ": E, e must not alias a source");
  resize_to(E, detail::stacked_shape(dims.sequences, dims.weight_shape));
  resize_to(e, detail::stacked_shape(dims.sequences, dims.bias_shape));
  const std::size_t nw = dims.weight_size, nc = dims.bias_size;
  for (std::size_t b = 0; b < dims.sequences; ++b)
    for (std::size_t k = 0; k < K; ++k) {
      const T sw = T(scale) * w.data()[b * K + k];
      const T keep = k == 0 ? T(0) : T(1);
      detail::blend(nw, sw, W[k]->data(), keep, E.data() + b * nw);
      detail::blend(nc, sw, c[k]->data(), keep, e.data() + b * nc);
    }
}

template <class T, std::size_t K>
void routed_mix_backward(const Tensor<T>& w, std::type_identity_t<T> scale, const std::array<const Tensor<T>*, K>& W,
                         const std::array<const Tensor<T>*, K>& c, const Tensor<T>& G, const Tensor<T>& r,
                         Tensor<T>& dw, const std::array<Tensor<T>*, K>& dW, const std::array<Tensor<T>*, K>& dc) {
  constexpr std::string_view op = "routed_mix_backward";
  const detail::RoutedMixDims dims = detail::routed_mix_dims(op, w, W, c);
  const std::size_t nb = dims.sequences;
  const Shape G_shape = detail::stacked_shape(nb, dims.weight_shape);
  const Shape r_shape = detail::stacked_shape(nb, dims.bias_shape);
  require<ShapeError>(G.shape() == G_shape, op, ": G has shape ", shape_string(G.shape()), ", expected ",
                      shape_string(G_shape));
  require<ShapeError>(r.shape() == r_shape, op, ": r has shape ", shape_string(r.shape()), ", expected ",
                      shape_string(r_shape));
  for (std::size_t k = 0; k < K; ++k) {
    if (dW[k]) expect_same_shape(op, "dW_k", *dW[k], "W_k", *W[k]);
    if (dc[k]) expect_same_shape(op, "dc_k", *dc[k], "c_k", *c[k]);
  }
  require<ConfigError>(&dw != &w && &dw != &G && &dw != &r, op, ": dw must not alias an input");
  resize_to(dw, shape_of(w));
  const T s = T(scale);
  const std::size_t nw = dims.weight_size, nc = dims.bias_size;
  for (std::size_t b = 0; b < nb; ++b) {
    const T* G_b = G.data() + b * nw;
    const T* r_b = r.data() + b * nc;
    for (std::size_t k = 0; k < K; ++k) {
      dw.data()[b * K + k] =
          s * (detail::inner_product(nw, W[k]->data(), G_b) + detail::inner_product(nc, c[k]->data(), r_b));
      const T sw = s * w.data()[b * K + k];
      if (dW[k]) detail::fused_axpy(nw, sw, G_b, dW[k]->data());
      if (dc[k]) detail::fused_axpy(nc, sw, r_b, dc[k]->data());
    }
  }
}

}  // namespace mixpeft
