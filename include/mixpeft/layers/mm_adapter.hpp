// mixpeft/layers/mm_adapter.hpp — LaVIN's Mixture-of-Modality adapter (RepAdapter with a soft modality router).
//
//   forward:   w_b = softmax((W_m t_b + b_m) / tau)                 // [B, 2]  one routing token t_b per sequence
//              z   = x A^T + a,  u = dropout(z)                      // [B, T, h]  shared down-projection
//              out_b = x_b + s * (w_b0 (grouped(u_b, B) + b) + w_b1 (grouped(u_b, D) + d))      // [B, T, d]
//                    = x_b + grouped(u_b, E_b) + e_b,   E_b = s (w_b0 B + w_b1 D),  e_b = s (w_b0 b + w_b1 d)
//   backward:  G_b = grouped outer(dy_b, u_b),  r_b = sum_rows dy_b   // [d, h/g], [d]: one pass over dy_b
//              dw_b0 = s (<B, G_b> + <b, r_b>),  dw_b1 = s (<D, G_b> + <d, r_b>)
//              dB += s w_b0 G_b,  db += s w_b0 r_b,  dD += s w_b1 G_b,  dd += s w_b1 r_b     (summed over b)
//              du_b = grouped^T(dy_b, E_b);  dz = dropout_backward(du)
//              dA += dz^T x,  da += sum_rows dz,  dx = dy + dz A       (written)
//              d route_tokens = router backward of dw                 (written; returned apart from dx)
// grouped(.) is the grouped up-projection of adapter.hpp (h/g hidden units feed each d/g output slice); the
// identity <dy, grouped(u, W)> = <W, grouped outer(dy, u)> gives the routing gradient from the small G_b.
// Mixing the two up-projections into E_b first makes each sequence cost one grouped GEMM forward and two backward.
// Parameter gradients accumulate and are skipped for frozen parameters.
// Cache: the router's cache and the weights w, z (plus u and the dropout mask when dropout is on) and, while A or a is trainable, x.
//
// Routing token: the caller passes route_tokens [B, d] explicitly, normally row 0 of each normed sequence (the
// modality token, which no other token attends to). Its gradient comes back separately as `route_tokens` in
// Grads; the caller adds it to row 0 of its own input gradient when the token is part of x.
// The router (SoftRouter, 2 experts, temperature tau) is read on the host to mix the weights of each sequence.
// Init: A xavier_uniform, a = 0; B, D, b, d = 0 (a fresh block is exactly the identity); router as nn.Linear.
// Parameter names follow LaVIN's RepAdapter_Router: "conv_A.{weight,bias}" ([h, d], [h]),
// "conv_B.{weight,bias}", "conv_D.{weight,bias}" ([d, h/g], [d]), "expert_weights.{weight,bias}" ([2, d], [2]);
// the Conv1d kernel axis of size 1 is squeezed.
// Folding for inference: for one modality's routing weights w the block is affine, out = M x + c with
//   M = I + s (w0 B_dense + w1 D_dense) A,  c = s ((w0 B_dense + w1 D_dense) a + w0 b + w1 d),
// and fold_into_linear (adapter.hpp) merges it into each following projection (q, k, v).
// Shapes: B sequences, T tokens, d width, h hidden width, g groups.
#pragma once

#include <array>
#include <cmath>
#include <cstddef>
#include <string>

#include "mixpeft/core/backend.hpp"
#include "mixpeft/core/error.hpp"
#include "mixpeft/core/init.hpp"
#include "mixpeft/core/parameter.hpp"
#include "mixpeft/core/rng.hpp"
#include "mixpeft/layers/adapter.hpp"
#include "mixpeft/layers/router.hpp"
#include "mixpeft/ops/dropout.hpp"
#include "mixpeft/ops/matmul.hpp"

namespace mixpeft {

namespace detail {
// y = alpha * x + beta * y over n contiguous entries (the small mixed weights and their gradients);
// beta = 0 overwrites y without reading it.
template <class T>
void blend(std::size_t n, T alpha, const T* x, T beta, T* y) {
  auto Y = matrix_view(y, 1, n);
  if (beta == T(0)) Y = alpha * matrix_view(x, 1, n);
  else Y = alpha * matrix_view(x, 1, n) + beta * Y;
}
// <x, y> over n contiguous entries.
template <class T>
T inner_product(std::size_t n, const T* x, const T* y) {
  return matrix_view(x, 1, n).row(0).dot(matrix_view(y, 1, n).row(0));
}
}  // namespace detail

template <class T, class Backend = Cpu>
class MMAdapter {
 public:
  using Tensor = typename Backend::template tensor<T>;
  using Router = SoftRouter<T, Backend>;
  static constexpr std::size_t branches = 2;

  struct Config {
    std::size_t dim = 0;        // d
    std::size_t hidden = 8;     // h
    std::size_t groups = 2;     // g
    double scale = 1.0;         // s
    double dropout = 0.1;
    double temperature = 10.0;  // tau
  };

  struct Cache {
    typename Router::Cache router;
    Tensor weights;     // [B, 2]     routing weights
    Tensor x;           // [B, T, d]  while A or a is trainable
    Tensor z;           // [B, T, h]  x A^T + a
    Tensor u;           // [B, T, h]  dropout(z), when dropout is on
    Tensor mask;        // [B, T, h]  empty when dropout is off
    Tensor mixed;       // [d, h/g]   workspace: E_b
    Tensor mixed_bias;  // [d]        workspace: e_b
    Tensor outer;       // [d, h/g]   backward workspace: G_b
    Tensor row_sum;     // [d]        backward workspace: r_b
    Tensor du;          // [B, T, h]  backward workspace
    Tensor dz;          // [B, T, h]  backward workspace (dropout on)
    Tensor dweights;    // [B, 2]     backward workspace
  };

  // The input gradients: dx [B, T, d] and d route_tokens [B, d].
  struct Grads {
    Tensor x;
    Tensor route_tokens;
  };

  MMAdapter(const Config& config, Rng& rng)
      : config_(validated(config)),
        router_({.in = config.dim, .experts = branches, .temperature = config.temperature, .bias = true}, rng) {
    const std::size_t d = config.dim, h = config.hidden;
    Tensor A = empty<T>({h, d});
    init::xavier_uniform(A, rng);
    A_ = Parameter<T, Backend>("conv_A.weight", std::move(A), true);
    a_ = Parameter<T, Backend>("conv_A.bias", zeros<T>({h}), true, /*decay=*/false);
    const char* names[branches] = {"conv_B", "conv_D"};
    for (std::size_t k = 0; k < branches; ++k) {
      up_[k] = Parameter<T, Backend>(std::string(names[k]) + ".weight", zeros<T>({d, h / config.groups}), true);
      up_bias_[k] = Parameter<T, Backend>(std::string(names[k]) + ".bias", zeros<T>({d}), true, /*decay=*/false);
    }
    dropout_rng_ = rng.split();
  }

  // x [B, T, d], route_tokens [B, d] -> out [B, T, d].
  Tensor forward(const Tensor& x, const Tensor& route_tokens, Cache& cache) {
    const std::size_t d = config_.dim, h = config_.hidden;
    expect_shape("MMAdapter", "x", x, {any_extent, any_extent, d});
    const std::size_t nb = x.shape()[0], nt = x.shape()[1];
    expect_shape("MMAdapter", "route_tokens", route_tokens, {nb, d});
    cache.weights = router_.forward(route_tokens, cache.router);
    linear_forward(x, A_.value, &a_.value, cache.z);
    const bool drop = training_ && config_.dropout > 0;
    if (drop) dropout_forward(cache.z, config_.dropout, true, dropout_rng_, cache.u, cache.mask);
    else resize_to(cache.mask, Shape{0});
    if (A_.trainable || a_.trainable) cache.x = x;
    const T* u = (drop ? cache.u : cache.z).data();
    Tensor out = x;
    for (std::size_t b = 0; b < nb; ++b) {
      mix(cache, b);
      detail::grouped_projection_forward(nt, h, d, config_.groups, T(1), u + b * nt * h, cache.mixed.data(),
                                         cache.mixed_bias.data(), T(1), out.data() + b * nt * d);
    }
    return out;
  }

  Grads backward(Cache& cache, const Tensor& dy) {
    const std::size_t d = config_.dim, h = config_.hidden, g = config_.groups;
    require<ShapeError>(cache.z.dimension() == 3, "MMAdapter: backward called before forward");
    const std::size_t nb = cache.z.shape()[0], nt = cache.z.shape()[1];
    expect_shape("MMAdapter", "dy", dy, {nb, nt, d});
    const T s = T(config_.scale);
    const bool drop = cache.mask.size() > 0;
    const T* u = (drop ? cache.u : cache.z).data();
    const std::size_t wsize = d * (h / g);
    resize_to(cache.outer, Shape{d, h / g});
    resize_to(cache.row_sum, Shape{d});
    resize_to(cache.du, shape_of(cache.z));
    resize_to(cache.dweights, Shape{nb, branches});
    for (std::size_t b = 0; b < nb; ++b) {
      const T* dy_b = dy.data() + b * nt * d;
      const T* u_b = u + b * nt * h;
      set_zero(cache.outer);
      set_zero(cache.row_sum);
      detail::grouped_projection_backward_params(nt, h, d, g, T(1), dy_b, u_b, cache.outer.data(),
                                                 cache.row_sum.data());
      for (std::size_t k = 0; k < branches; ++k) {
        Parameter<T, Backend>& W = up_[k];
        Parameter<T, Backend>& c = up_bias_[k];
        cache.dweights.data()[b * branches + k] =
            s * (detail::inner_product(wsize, W.value.data(), cache.outer.data()) +
                 detail::inner_product(d, c.value.data(), cache.row_sum.data()));
        const T sw = s * cache.weights.data()[b * branches + k];
        if (W.trainable) detail::blend(wsize, sw, cache.outer.data(), T(1), W.grad.data());
        if (c.trainable) detail::blend(d, sw, cache.row_sum.data(), T(1), c.grad.data());
      }
      mix(cache, b);
      detail::grouped_projection_backward_input(nt, h, d, g, T(1), dy_b, cache.mixed.data(), T(0),
                                                cache.du.data() + b * nt * h);
    }
    if (drop) dropout_backward(cache.du, cache.mask, cache.dz);
    const Tensor& dz = drop ? cache.dz : cache.du;
    if (A_.trainable || a_.trainable)
      linear_backward(cache.x, A_.value, dz, nullptr, A_.trainable ? &A_.grad : nullptr,
                      a_.trainable ? &a_.grad : nullptr);
    Grads grads;
    grads.x = dy;
    gemm(Trans::No, Trans::No, nb * nt, d, h, T(1), dz.data(), A_.value.data(), T(1), grads.x.data());
    grads.route_tokens = router_.backward(cache.router, cache.dweights);
    return grads;
  }

  // Routing weights [B, 2] for route_tokens [B, d] (the router's forward, nothing kept).
  Tensor routing_weights(const Tensor& route_tokens) {
    expect_shape("MMAdapter", "route_tokens", route_tokens, {any_extent, config_.dim});
    typename Router::Cache cache;
    return router_.forward(route_tokens, cache);
  }

  // The affine map of the block in eval mode for one modality's routing weights w [2] (a row of
  // routing_weights): out = M x + c.
  AdapterFold<T, Backend> fold(const Tensor& w) const {
    require<ShapeError>(w.size() == branches && cols(w) == branches, "MMAdapter: routing weights have shape ",
                        shape_string(w.shape()), ", expected [2]");
    return detail::fold_adapter<T, Backend, branches>(
        config_.hidden, config_.dim, config_.groups, T(config_.scale), A_.value.data(), a_.value.data(),
        {w.data()[0], w.data()[1]}, {up_[0].value.data(), up_[1].value.data()},
        {up_bias_[0].value.data(), up_bias_[1].value.data()});
  }

  void collect_parameters(ParameterList<T, Backend>& list, const std::string& prefix) {
    add_parameter(list, prefix, A_);
    add_parameter(list, prefix, a_);
    for (std::size_t k = 0; k < branches; ++k) {
      add_parameter(list, prefix, up_[k]);
      add_parameter(list, prefix, up_bias_[k]);
    }
    router_.collect_parameters(list, join_name(prefix, "expert_weights"));
  }
  // The SoftRouter draws no noise: only the dropout stream.
  void collect_rngs(NamedRngs& list, const std::string& prefix) {
    list.emplace_back(join_name(prefix, "dropout_rng"), &dropout_rng_);
  }

  void set_training(bool on) {
    training_ = on;
    router_.set_training(on);
  }
  bool training() const { return training_; }

  const Config& config() const { return config_; }
  Parameter<T, Backend>& A() { return A_; }
  Parameter<T, Backend>& a() { return a_; }
  Parameter<T, Backend>& B() { return up_[0]; }
  Parameter<T, Backend>& b() { return up_bias_[0]; }
  Parameter<T, Backend>& D() { return up_[1]; }
  Parameter<T, Backend>& d() { return up_bias_[1]; }
  Router& router() { return router_; }

 private:
  static const Config& validated(const Config& c) {
    require<ConfigError>(c.dim > 0 && c.hidden > 0, "MMAdapter: dim and hidden must be > 0 (got dim = ", c.dim,
                         ", hidden = ", c.hidden, ")");
    require<ConfigError>(c.groups > 0 && c.hidden % c.groups == 0 && c.dim % c.groups == 0, "MMAdapter: groups (",
                         c.groups, ") must divide hidden (", c.hidden, ") and dim (", c.dim, ")");
    require<ConfigError>(c.dropout >= 0 && c.dropout < 1, "MMAdapter: dropout must be in [0, 1) (got ", c.dropout,
                         ")");
    require<ConfigError>(std::isfinite(c.temperature) && c.temperature > 0,
                         "MMAdapter: temperature must be > 0 (got ", c.temperature, ")");
    return c;
  }

  // cache.mixed = E_b = s (w_b0 B + w_b1 D),  cache.mixed_bias = e_b = s (w_b0 b + w_b1 d).
  void mix(Cache& cache, std::size_t b) const {
    const std::size_t d = config_.dim, wsize = d * (config_.hidden / config_.groups);
    resize_to(cache.mixed, shape_of(up_[0].value));
    resize_to(cache.mixed_bias, Shape{d});
    for (std::size_t k = 0; k < branches; ++k) {
      const T sw = T(config_.scale) * cache.weights.data()[b * branches + k];
      const T keep = k == 0 ? T(0) : T(1);
      detail::blend(wsize, sw, up_[k].value.data(), keep, cache.mixed.data());
      detail::blend(d, sw, up_bias_[k].value.data(), keep, cache.mixed_bias.data());
    }
  }

  Config config_;
  Router router_;                                     // "expert_weights": [2, d], [2]
  Parameter<T, Backend> A_;                           // [h, d]
  Parameter<T, Backend> a_;                           // [h]
  std::array<Parameter<T, Backend>, branches> up_;       // B, D: [d, h/g]
  std::array<Parameter<T, Backend>, branches> up_bias_;  // b, d: [d]
  bool training_ = true;
  Rng dropout_rng_;
};

}  // namespace mixpeft
