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
// grouped(.) is the grouped up-projection (ops/grouped_projection.hpp: h/g hidden units feed each d/g output
// slice); the identity <dy, grouped(u, W)> = <W, grouped outer(dy, u)> gives the routing gradient from the small G_b.
// Mixing the two up-projections into E_b first makes each sequence cost one grouped GEMM forward and two backward.
// Ops: routed_mix_forward gives every E_b, e_b at once ([B, d, h/g], [B, d]), grouped_projection_forward with
// those per-sequence weights gives out; backward runs grouped_projection_backward once (G_b and r_b for every
// sequence into [B, d, h/g], [B, d], and du) and routed_mix_backward (dw and dB, db, dD, dd from G, r).
// Parameter gradients accumulate and are skipped for frozen parameters.
// Cache: the router's cache and the weights w, E and e (the mixed weights, kept for backward), z (plus u and the
// dropout mask when dropout is on) and, while A or a is trainable, x; G, r, du, dz, dw are backward workspaces.
//
// Routing token: the caller passes route_tokens [B, d] explicitly, normally row 0 of each normed sequence (the
// modality token, which no other token attends to). Its gradient comes back separately as `route_tokens` in
// Grads; the caller adds it to row 0 of its own input gradient when the token is part of x.
// The router is a SoftRouter (layers/router.hpp; 2 experts, temperature tau).
// Init: A xavier_uniform, a = 0; B, D, b, d = 0 (a fresh block is exactly the identity); router as nn.Linear.
// Parameter names follow LaVIN's RepAdapter_Router: "conv_A.{weight,bias}" ([h, d], [h]),
// "conv_B.{weight,bias}", "conv_D.{weight,bias}" ([d, h/g], [d]), "expert_weights.{weight,bias}" ([2, d], [2]);
// the Conv1d kernel axis of size 1 is squeezed.
// Folding for inference: for one modality's routing weights w the block is affine, out = M x + c with
//   M = I + s (w0 B_dense + w1 D_dense) A,  c = s ((w0 B_dense + w1 D_dense) a + w0 b + w1 d),
// and fold_into_linear (adapter.hpp) merges it into each following projection (q, k, v); fold(w) mixes E, e for
// w with routed_mix_forward and expands them like Adapter::fold.
// Shapes: B sequences, T tokens, d width, h hidden width, g groups.
// Backends: device-generic. Every computation is an unqualified op call (the router's router_linear_forward /
// _backward and softmax ops, linear_forward / linear_backward, routed_mix_forward / _backward,
// grouped_projection_forward / _backward, dropout_forward / _backward, the tensor-level gemm, assign, set_zero),
// so MMAdapter<T, Cuda> runs on cuda::DeviceTensor unchanged, and the routing weights never leave the device
// (routed_mix reads them in its kernels; fold(w) takes them as a device tensor too). A and the router are
// initialised on the host with the CPU layer's Rng draws and moved over with Backend::from_host, a, B, D, b, d
// start as Backend::zeros, and the dropout Rng stays on the host (the CUDA dropout draws the CPU op's masks for
// the same seed), so MMAdapter<T, Cuda> and MMAdapter<T, Cpu> built from Rng(s) hold the same weights and drop
// the same hidden units.
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
#include "mixpeft/ops/grouped_projection.hpp"
#include "mixpeft/ops/matmul.hpp"
#include "mixpeft/ops/routed_mix.hpp"

namespace mixpeft {

template <class T, class Backend = Cpu>
class MMAdapter {
 public:
  using Tensor = typename Backend::template tensor<T>;
  using HostTensor = ::mixpeft::Tensor<T>;
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
    Tensor mixed;       // [B, d, h/g]  E_b, one per sequence (routed_mix_forward)
    Tensor mixed_bias;  // [B, d]       e_b
    Tensor outer;       // [B, d, h/g]  backward workspace: G_b
    Tensor row_sum;     // [B, d]       backward workspace: r_b
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
    HostTensor A = empty<T>({h, d});
    init::xavier_uniform(A, rng);
    A_ = Parameter<T, Backend>("conv_A.weight", Backend::template from_host<T>(std::move(A)), true);
    a_ = Parameter<T, Backend>("conv_A.bias", Backend::template zeros<T>(Shape{h}), true, /*decay=*/false);
    const char* names[branches] = {"conv_B", "conv_D"};
    for (std::size_t k = 0; k < branches; ++k) {
      up_[k] = Parameter<T, Backend>(std::string(names[k]) + ".weight",
                                     Backend::template zeros<T>(Shape{d, h / config.groups}), true);
      up_bias_[k] = Parameter<T, Backend>(std::string(names[k]) + ".bias", Backend::template zeros<T>(Shape{d}), true,
                                          /*decay=*/false);
    }
    dropout_rng_ = rng.split();
  }

  // x [B, T, d], route_tokens [B, d] -> out [B, T, d].
  Tensor forward(const Tensor& x, const Tensor& route_tokens, Cache& cache) {
    const std::size_t d = config_.dim;
    expect_shape("MMAdapter", "x", x, {any_extent, any_extent, d});
    const std::size_t nb = x.shape()[0];
    expect_shape("MMAdapter", "route_tokens", route_tokens, {nb, d});
    cache.weights = router_.forward(route_tokens, cache.router);
    linear_forward(x, A_.value, &a_.value, cache.z);
    const bool drop = training_ && config_.dropout > 0;
    if (drop) dropout_forward(cache.z, config_.dropout, true, dropout_rng_, cache.u, cache.mask);
    else resize_to(cache.mask, Shape{0});
    if (A_.trainable || a_.trainable) assign(cache.x, x);
    routed_mix_forward(cache.weights, T(config_.scale), up_values(), up_bias_values(), cache.mixed, cache.mixed_bias);
    Tensor out;
    assign(out, x);
    grouped_projection_forward(drop ? cache.u : cache.z, cache.mixed, &cache.mixed_bias, config_.groups, T(1), T(1),
                               out);
    return out;
  }

  Grads backward(Cache& cache, const Tensor& dy) {
    const std::size_t d = config_.dim, h = config_.hidden, g = config_.groups;
    require<ShapeError>(cache.z.dimension() == 3, "MMAdapter: backward called before forward");
    const std::size_t nb = cache.z.shape()[0], nt = cache.z.shape()[1];
    expect_shape("MMAdapter", "dy", dy, {nb, nt, d});
    const bool drop = cache.mask.size() > 0;
    // G_b and r_b for every sequence in one pass over dy, and du_b = grouped^T(dy_b, E_b).
    resize_to(cache.outer, Shape{nb, d, h / g});
    resize_to(cache.row_sum, Shape{nb, d});
    set_zero(cache.outer);
    set_zero(cache.row_sum);
    grouped_projection_backward(dy, drop ? cache.u : cache.z, cache.mixed, g, T(1), &cache.du, &cache.outer,
                                &cache.row_sum);
    routed_mix_backward(cache.weights, T(config_.scale), up_values(), up_bias_values(), cache.outer, cache.row_sum,
                        cache.dweights, up_grads(), up_bias_grads());
    if (drop) dropout_backward(cache.du, cache.mask, cache.dz);
    const Tensor& dz = drop ? cache.dz : cache.du;
    if (A_.trainable || a_.trainable)
      linear_backward(cache.x, A_.value, dz, nullptr, A_.trainable ? &A_.grad : nullptr,
                      a_.trainable ? &a_.grad : nullptr);
    Grads grads;
    assign(grads.x, dy);
    gemm(Trans::No, Trans::No, nb * nt, d, h, T(1), dz, A_.value, T(1), grads.x);
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
    Tensor mixed, mixed_bias;  // [1, d, h/g], [1, d]: the routing weights stay on the backend
    routed_mix_forward(w, T(config_.scale), up_values(), up_bias_values(), mixed, mixed_bias);
    return detail::fold_adapter<T, Backend>(config_.hidden, config_.dim, config_.groups, T(1), A_.value, a_.value,
                                            mixed, mixed_bias);
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

  // The up-projections and their biases (and gradients, null while frozen) as the routed_mix ops take them.
  std::array<const Tensor*, branches> up_values() const { return {&up_[0].value, &up_[1].value}; }
  std::array<const Tensor*, branches> up_bias_values() const { return {&up_bias_[0].value, &up_bias_[1].value}; }
  std::array<Tensor*, branches> up_grads() {
    return {up_[0].trainable ? &up_[0].grad : nullptr, up_[1].trainable ? &up_[1].grad : nullptr};
  }
  std::array<Tensor*, branches> up_bias_grads() {
    return {up_bias_[0].trainable ? &up_bias_[0].grad : nullptr, up_bias_[1].trainable ? &up_bias_[1].grad : nullptr};
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
