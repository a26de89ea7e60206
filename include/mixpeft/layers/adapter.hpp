// mixpeft/layers/adapter.hpp — RepAdapter: a linear bottleneck with a grouped up-projection, in a residual.
//
//   forward:   z   = x A^T + a                                    // [N, h]   A: [h, d], a: [h]
//              u   = dropout(z)                                   (identity in eval or when p = 0)
//              out = x + s * (grouped(u, B) + b)                  // [N, d]   B: [d, h/g], b: [d]
//   grouped(u, B): the h hidden units split into g groups of h/g; group j feeds only output slice j:
//              grouped(u, B)[:, j-th d/g slice] = u[:, j-th h/g slice] B_j^T,   B_j = rows j d/g .. (j+1) d/g - 1
//   backward:  du  = s * grouped^T(dy, B)     du[:, slice_j(h)] = dy[:, slice_j(d)] B_j
//              dB_j += s * dy[:, slice_j(d)]^T u[:, slice_j(h)]    db += s * sum_rows dy
//              dz  = dropout_backward(du);  dA += dz^T x;  da += sum_rows dz
//              dx  = dy + dz A                                     (written)
// Parameter gradients accumulate and are skipped for frozen parameters.
// Cache: z, plus u and the mask when dropout is on, and, while A or a is trainable, x.
// Init: A xavier_uniform, a = 0, B = 0, b = 0, so a fresh adapter is exactly the identity.
// Parameter names follow LaVIN's RepAdapter: "conv_A.weight" [h, d], "conv_A.bias", "conv_B.weight" [d, h/g],
// "conv_B.bias". The reference stores them as Conv1d weights [h, d, 1] and [d, h/g, 1]; the trailing kernel axis
// of size 1 is squeezed here (a checkpoint loader drops or restores it).
// Folding (RepAdapter's re-parameterisation): the adapter is affine, out = M x + c with
//   M = I + s B_dense A,  c = s (B_dense a + b),  B_dense [d, h] the block-diagonal expansion of B,
// and fold_into_linear turns a following Linear(W, b') into Linear(W M, W c + b').
// Shapes: x [..., d] (leading axes are rows, N in total), h hidden width, g groups.
#pragma once

#include <array>
#include <cstddef>
#include <string>
#include <utility>

#include <xtensor/xbuilder.hpp>

#include "mixpeft/core/backend.hpp"
#include "mixpeft/core/error.hpp"
#include "mixpeft/core/init.hpp"
#include "mixpeft/core/parallel.hpp"
#include "mixpeft/core/parameter.hpp"
#include "mixpeft/core/rng.hpp"
#include "mixpeft/ops/dropout.hpp"
#include "mixpeft/ops/matmul.hpp"

namespace mixpeft {

// The grouped projection as g small GEMMs over column slices of row-major storage (a Conv1d with kernel size 1
// and `groups` groups). These are ops in the style of gemm; they live here because the adapters are their only
// users. u: [n, h], W: [d, h/g], y and dy: [n, d]; outputs must not alias inputs.
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
}  // namespace detail

// An affine map out = M x + c that an adapter computes (for one routing choice, when it routes).
template <class T, class Backend = Cpu>
struct AdapterFold {
  using Tensor = typename Backend::template tensor<T>;
  Tensor M;  // [d, d]
  Tensor c;  // [d]
};

// The weights of a Linear that absorbed an adapter in front of it.
template <class T, class Backend = Cpu>
struct FoldedLinear {
  using Tensor = typename Backend::template tensor<T>;
  Tensor weight;  // [out, d] = W M
  Tensor bias;    // [out]    = W c + b
};

// Linear(W, b)(M x + c) == Linear(W M, W c + b)(x). `b` may be null (a bias-free projection gains one).
template <class T, class Backend>
FoldedLinear<T, Backend> fold_into_linear(const AdapterFold<T, Backend>& fold,
                                          const typename Backend::template tensor<T>& W,
                                          const typename Backend::template tensor<T>* b) {
  const std::size_t d = fold.c.size();
  expect_shape("fold_into_linear", "W", W, {any_extent, d});
  const std::size_t out = W.shape()[0];
  FoldedLinear<T, Backend> folded;
  resize_to(folded.weight, Shape{out, d});
  gemm(Trans::No, Trans::No, out, d, d, T(1), W.data(), fold.M.data(), T(0), folded.weight.data());
  linear_forward(fold.c, W, b, folded.bias);
  return folded;
}

namespace detail {
// M = I + s E A and c = s (E a + sum_k w_k b_k), E = sum_k w_k dense(B_k), for up-projections (w_k, B_k, b_k).
// E^T [h, d] is built by pushing the identity rows through the grouped projections.
template <class T, class Backend, std::size_t K>
AdapterFold<T, Backend> fold_adapter(std::size_t h, std::size_t d, std::size_t groups, T s, const T* A, const T* a,
                                     const std::array<T, K>& w, const std::array<const T*, K>& B,
                                     const std::array<const T*, K>& b) {
  using Tensor = typename Backend::template tensor<T>;
  const Tensor eye_h = xt::eye<T>(h);
  Tensor Et = empty<T>({h, d});
  AdapterFold<T, Backend> fold;
  fold.M = xt::eye<T>(d);
  fold.c = empty<T>({d});
  for (std::size_t k = 0; k < K; ++k) {
    const T beta = k == 0 ? T(0) : T(1);
    grouped_projection_forward(h, h, d, groups, w[k], eye_h.data(), B[k], static_cast<const T*>(nullptr), beta,
                               Et.data());
    grouped_projection_forward(std::size_t(1), h, d, groups, s * w[k], a, B[k], b[k], beta, fold.c.data());
  }
  gemm(Trans::Yes, Trans::No, d, d, h, s, Et.data(), A, T(1), fold.M.data());
  return fold;
}
}  // namespace detail

template <class T, class Backend = Cpu>
class Adapter {
 public:
  using Tensor = typename Backend::template tensor<T>;

  struct Config {
    std::size_t dim = 0;     // d
    std::size_t hidden = 8;  // h
    std::size_t groups = 2;  // g
    double scale = 1.0;      // s
    double dropout = 0.1;
  };

  struct Cache {
    Tensor x;     // [..., d]  while A or a is trainable
    Tensor z;     // [..., h]  x A^T + a
    Tensor u;     // [..., h]  dropout(z), when dropout is on
    Tensor mask;  // [..., h]  empty when dropout is off
    Tensor du;    // [..., h]  backward workspace
    Tensor dz;    // [..., h]  backward workspace (dropout on)
  };

  Adapter(const Config& config, Rng& rng) : config_(config) {
    require<ConfigError>(config.dim > 0 && config.hidden > 0, "Adapter: dim and hidden must be > 0 (got dim = ",
                         config.dim, ", hidden = ", config.hidden, ")");
    require<ConfigError>(config.groups > 0 && config.hidden % config.groups == 0 && config.dim % config.groups == 0,
                         "Adapter: groups (", config.groups, ") must divide hidden (", config.hidden, ") and dim (",
                         config.dim, ")");
    require<ConfigError>(config.dropout >= 0 && config.dropout < 1, "Adapter: dropout must be in [0, 1) (got ",
                         config.dropout, ")");
    const std::size_t d = config.dim, h = config.hidden;
    Tensor A = empty<T>({h, d});
    init::xavier_uniform(A, rng);
    A_ = Parameter<T, Backend>("conv_A.weight", std::move(A), true);
    a_ = Parameter<T, Backend>("conv_A.bias", zeros<T>({h}), true, /*decay=*/false);
    B_ = Parameter<T, Backend>("conv_B.weight", zeros<T>({d, h / config.groups}), true);
    b_ = Parameter<T, Backend>("conv_B.bias", zeros<T>({d}), true, /*decay=*/false);
    dropout_rng_ = rng.split();
  }

  Tensor forward(const Tensor& x, Cache& cache) {
    expect_width("Adapter", "x", x, config_.dim);
    linear_forward(x, A_.value, &a_.value, cache.z);
    const bool drop = training_ && config_.dropout > 0;
    if (drop) dropout_forward(cache.z, config_.dropout, true, dropout_rng_, cache.u, cache.mask);
    else resize_to(cache.mask, Shape{0});
    if (A_.trainable || a_.trainable) cache.x = x;
    Tensor out = x;
    detail::grouped_projection_forward(rows(x), config_.hidden, config_.dim, config_.groups, T(config_.scale),
                                       (drop ? cache.u : cache.z).data(), B_.value.data(), b_.value.data(), T(1),
                                       out.data());
    return out;
  }

  Tensor backward(Cache& cache, const Tensor& dy) {
    expect_width("Adapter", "dy", dy, config_.dim);
    const std::size_t n = rows(dy), h = config_.hidden, d = config_.dim, g = config_.groups;
    require<ShapeError>(cache.z.dimension() >= 1 && rows(cache.z) == n, "Adapter: dy has shape ",
                        shape_string(dy.shape()), " but the cached forward has shape ", shape_string(cache.z.shape()));
    const T s = T(config_.scale);
    const bool drop = cache.mask.size() > 0;
    if (B_.trainable || b_.trainable)
      detail::grouped_projection_backward_params(n, h, d, g, s, dy.data(), (drop ? cache.u : cache.z).data(),
                                                 B_.trainable ? B_.grad.data() : nullptr,
                                                 b_.trainable ? b_.grad.data() : nullptr);
    resize_to(cache.du, shape_of(cache.z));
    detail::grouped_projection_backward_input(n, h, d, g, s, dy.data(), B_.value.data(), T(0), cache.du.data());
    if (drop) dropout_backward(cache.du, cache.mask, cache.dz);
    const Tensor& dz = drop ? cache.dz : cache.du;
    if (A_.trainable || a_.trainable)
      linear_backward(cache.x, A_.value, dz, nullptr, A_.trainable ? &A_.grad : nullptr,
                      a_.trainable ? &a_.grad : nullptr);
    Tensor dx = dy;
    gemm(Trans::No, Trans::No, n, d, h, T(1), dz.data(), A_.value.data(), T(1), dx.data());
    return dx;
  }

  // The affine map of the adapter in eval mode: out = M x + c.
  AdapterFold<T, Backend> fold() const {
    return detail::fold_adapter<T, Backend, 1>(config_.hidden, config_.dim, config_.groups, T(config_.scale),
                                               A_.value.data(), a_.value.data(), {T(1)}, {B_.value.data()},
                                               {b_.value.data()});
  }

  void collect_parameters(ParameterList<T, Backend>& list, const std::string& prefix) {
    add_parameter(list, prefix, A_);
    add_parameter(list, prefix, a_);
    add_parameter(list, prefix, B_);
    add_parameter(list, prefix, b_);
  }
  void collect_rngs(NamedRngs& list, const std::string& prefix) {
    list.emplace_back(join_name(prefix, "dropout_rng"), &dropout_rng_);
  }

  void set_training(bool on) { training_ = on; }
  bool training() const { return training_; }

  const Config& config() const { return config_; }
  Parameter<T, Backend>& A() { return A_; }
  Parameter<T, Backend>& a() { return a_; }
  Parameter<T, Backend>& B() { return B_; }
  Parameter<T, Backend>& b() { return b_; }

 private:
  Config config_;
  Parameter<T, Backend> A_;  // [h, d]
  Parameter<T, Backend> a_;  // [h]
  Parameter<T, Backend> B_;  // [d, h/g]
  Parameter<T, Backend> b_;  // [d]
  bool training_ = true;
  Rng dropout_rng_;
};

}  // namespace mixpeft
