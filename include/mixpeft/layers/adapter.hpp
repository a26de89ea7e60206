// mixpeft/layers/adapter.hpp — RepAdapter: a linear bottleneck with a grouped up-projection, in a residual.
//
//   forward:   z   = x A^T + a                                    // [N, h]   A: [h, d], a: [h]
//              u   = dropout(z)                                   (identity in eval or when p = 0)
//              out = x + s * (grouped(u, B) + b)                  // [N, d]   B: [d, h/g], b: [d]
//   grouped(u, B): the h hidden units split into g groups of h/g; group j feeds only output slice j:
//              grouped(u, B)[:, j-th d/g slice] = u[:, j-th h/g slice] B_j^T,   B_j = rows j d/g .. (j+1) d/g - 1
//              (the op grouped_projection_forward / _backward, ops/grouped_projection.hpp)
//   backward:  du  = s * grouped^T(dy, B)     du[:, slice_j(h)] = dy[:, slice_j(d)] B_j
//              dB_j += s * dy[:, slice_j(d)]^T u[:, slice_j(h)]    db += s * sum_rows dy
//              dz  = dropout_backward(du);  dA += dz^T x;  da += sum_rows dz
//              dx  = dy + dz A                                     (written)
// Parameter gradients accumulate and are skipped for frozen parameters.
// Cache: z, plus u and the mask when dropout is on, and, while A or a is trainable, x; du and dz are backward
// workspaces.
// Init: A xavier_uniform, a = 0, B = 0, b = 0, so a fresh adapter is exactly the identity.
// Parameter names follow LaVIN's RepAdapter: "conv_A.weight" [h, d], "conv_A.bias", "conv_B.weight" [d, h/g],
// "conv_B.bias". The reference stores them as Conv1d weights [h, d, 1] and [d, h/g, 1]; the trailing kernel axis
// of size 1 is squeezed here (a checkpoint loader drops or restores it).
// Folding (RepAdapter's re-parameterisation): the adapter is affine, out = M x + c with
//   M = I + s B_dense A,  c = s (B_dense a + b),  B_dense [d, h] the block-diagonal expansion of B,
// and fold_into_linear turns a following Linear(W, b') into Linear(W M, W c + b'). B_dense^T [h, d] is built as
// grouped(I_h, B) (the identity's rows pushed through the grouped projection).
// Shapes: x [..., d] (leading axes are rows, N in total), h hidden width, g groups.
// Backends: device-generic. Every computation is an unqualified op call (linear_forward / linear_backward,
// grouped_projection_forward / _backward, dropout_forward / _backward, the tensor-level gemm, assign, resize_to),
// so Adapter<T, Cuda> runs on cuda::DeviceTensor unchanged (cuda/grouped_projection.cuh: strided-batched
// cuBLASLt over the groups). A is initialised on the host with the CPU layer's Rng draws and moved over with
// Backend::from_host, a, B, b start as Backend::zeros, and the dropout Rng stays on the host (the CUDA dropout
// draws the CPU op's masks for the same seed), so Adapter<T, Cuda> and Adapter<T, Cpu> built from Rng(s) hold
// the same weights and drop the same hidden units. fold() and fold_into_linear run on the backend too (the
// identities are made on the host and handed over with from_host).
#pragma once

#include <array>
#include <cstddef>
#include <string>
#include <utility>

#include <xtensor/xbuilder.hpp>

#include "mixpeft/core/backend.hpp"
#include "mixpeft/core/error.hpp"
#include "mixpeft/core/init.hpp"
#include "mixpeft/core/parameter.hpp"
#include "mixpeft/core/rng.hpp"
#include "mixpeft/ops/dropout.hpp"
#include "mixpeft/ops/grouped_projection.hpp"
#include "mixpeft/ops/matmul.hpp"

namespace mixpeft {

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
  gemm(Trans::No, Trans::No, out, d, d, T(1), W, fold.M, T(0), folded.weight);
  linear_forward(fold.c, W, b, folded.bias);
  return folded;
}

namespace detail {
// M = I + s E A and c = s (E a + e) for the grouped up-projection E ([d, h/g], or [1, d, h/g] with e [1, d]) and
// its bias e. E_dense^T [h, d] is built by pushing the identity's rows through the grouped projection.
template <class T, class Backend>
AdapterFold<T, Backend> fold_adapter(std::size_t h, std::size_t d, std::size_t groups, T s,
                                     const typename Backend::template tensor<T>& A,
                                     const typename Backend::template tensor<T>& a,
                                     const typename Backend::template tensor<T>& E,
                                     const typename Backend::template tensor<T>& e) {
  using Tensor = typename Backend::template tensor<T>;
  ::mixpeft::Tensor<T> eye_h = xt::eye<T>(h), eye_d = xt::eye<T>(d);
  const Tensor identity_h = Backend::template from_host<T>(std::move(eye_h));
  Tensor Et;
  grouped_projection_forward(identity_h, E, nullptr, groups, T(1), T(0), Et);  // [h, d]
  AdapterFold<T, Backend> fold;
  grouped_projection_forward(a, E, &e, groups, s, T(0), fold.c);  // [d]
  fold.M = Backend::template from_host<T>(std::move(eye_d));
  gemm(Trans::Yes, Trans::No, d, d, h, s, Et, A, T(1), fold.M);
  return fold;
}
}  // namespace detail

template <class T, class Backend = Cpu>
class Adapter {
 public:
  using Tensor = typename Backend::template tensor<T>;
  using HostTensor = ::mixpeft::Tensor<T>;

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
    HostTensor A = empty<T>({h, d});
    init::xavier_uniform(A, rng);
    A_ = Parameter<T, Backend>("conv_A.weight", Backend::template from_host<T>(std::move(A)), true);
    a_ = Parameter<T, Backend>("conv_A.bias", Backend::template zeros<T>(Shape{h}), true, /*decay=*/false);
    B_ = Parameter<T, Backend>("conv_B.weight", Backend::template zeros<T>(Shape{d, h / config.groups}), true);
    b_ = Parameter<T, Backend>("conv_B.bias", Backend::template zeros<T>(Shape{d}), true, /*decay=*/false);
    dropout_rng_ = rng.split();
  }

  Tensor forward(const Tensor& x, Cache& cache) {
    expect_width("Adapter", "x", x, config_.dim);
    linear_forward(x, A_.value, &a_.value, cache.z);
    const bool drop = training_ && config_.dropout > 0;
    if (drop) dropout_forward(cache.z, config_.dropout, true, dropout_rng_, cache.u, cache.mask);
    else resize_to(cache.mask, Shape{0});
    if (A_.trainable || a_.trainable) assign(cache.x, x);
    Tensor out;
    assign(out, x);
    grouped_projection_forward(drop ? cache.u : cache.z, B_.value, &b_.value, config_.groups, T(config_.scale), T(1),
                               out);
    return out;
  }

  Tensor backward(Cache& cache, const Tensor& dy) {
    expect_width("Adapter", "dy", dy, config_.dim);
    const std::size_t n = rows(dy), h = config_.hidden, d = config_.dim;
    require<ShapeError>(cache.z.dimension() >= 1 && rows(cache.z) == n, "Adapter: dy has shape ",
                        shape_string(dy.shape()), " but the cached forward has shape ", shape_string(cache.z.shape()));
    const bool drop = cache.mask.size() > 0;
    grouped_projection_backward(dy, drop ? cache.u : cache.z, B_.value, config_.groups, T(config_.scale), &cache.du,
                                B_.trainable ? &B_.grad : nullptr, b_.trainable ? &b_.grad : nullptr);
    if (drop) dropout_backward(cache.du, cache.mask, cache.dz);
    const Tensor& dz = drop ? cache.dz : cache.du;
    if (A_.trainable || a_.trainable)
      linear_backward(cache.x, A_.value, dz, nullptr, A_.trainable ? &A_.grad : nullptr,
                      a_.trainable ? &a_.grad : nullptr);
    Tensor dx;
    assign(dx, dy);
    gemm(Trans::No, Trans::No, n, d, h, T(1), dz, A_.value, T(1), dx);
    return dx;
  }

  // The affine map of the adapter in eval mode: out = M x + c.
  AdapterFold<T, Backend> fold() const {
    return detail::fold_adapter<T, Backend>(config_.hidden, config_.dim, config_.groups, T(config_.scale), A_.value,
                                            a_.value, B_.value, b_.value);
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
