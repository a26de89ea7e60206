// mixpeft/layers/router.hpp — routers: soft mixture weights and top-k expert choice.
//
// Shapes: N tokens (the leading axes of x, flattened), D router input width, K experts, k experts per token.
//
// SoftRouter (LaVIN's MM-Adapter router, any soft mixture):
//   forward:   l = (x W^T + b) / tau                                   // [..., K]
//              p = softmax(l)                                           // [..., K]
//   backward:  dl = p * (dp - <dp, p>)                                  (softmax backward)
//              dx = (dl / tau) W                                        (written)
//              dW += (dl / tau)^T x,  db += sum_rows dl / tau           (accumulated; no work when frozen)
//   caches:    x and p.
//
// TopKRouter (LLaVA-MoLE's top-1 router; Switch / GShard top-k routing):
//   forward:   x' = x * U(1 - eps, 1 + eps)       training with InputJitter only (Switch's multiplicative jitter)
//              l  = (x' W^T + b) / tau (+ sigma * N(0, 1) in training with LogitNoise)      // [N, K]
//              p  = softmax(l)                                                            // [N, K]
//              e_i, g_i = the k largest p_i (decreasing; ties go to the lower expert), g = p at e   // [N, k]
//              tokens grouped by expert: perm lists the assignments a = i * k + s expert by expert, token
//              order kept within an expert (stable); expert e owns grouped rows offsets[e] .. offsets[e + 1].
//   backward:  dl = p * (dp - <dp, p>) + dl_extra     dp: from gate values (top_k_backward) and balance losses,
//                                                    dl_extra: from the router z-loss
//              then as SoftRouter; with input jitter dx *= U (the noise is a constant of the step).
//   caches:    x' (flattened to [N, D]), the jitter factors, the RoutingResult.
// Noise is drawn from the router's own generator (split from the constructor's Rng), never in eval.
//
// Routing ops (free functions a device backend provides for its own tensor type):
//   top_k_forward / top_k_backward      selection and the gate gradient dp[i, e_is] += dg[i, s]
//   group_by_expert                     counts, offsets and the stable permutation (counting sort)
//   gather_rows / scatter_add_rows      out[j] = x[perm[j] / k]  and its adjoint  out[perm[j] / k] += src[j]
//                                       (serial: memory-bound row moves, tiny next to the expert GEMMs, and a
//                                        thread barrier each would cost more than it saves on a busy machine)
//   router_linear_forward / _backward   the affine map (serial: see there)
//   input_jitter_* / logit_noise_forward, add_to (dst += src)
// Parameters: "weight" [K, D], "bias" [K] (nn.Linear default init: kaiming-uniform(a = sqrt 5), U(+-1/sqrt D)).
// Backends: both routers are device-generic (every step above is an unqualified op call; cuda/router.cuh and
// cuda/softmax.cuh on the CUDA backend). Weights are drawn on the host in accumulator_t<T> and handed over with
// Backend::from_host, so a router on any backend built from Rng(s) holds the CPU router's weights.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "mixpeft/core/backend.hpp"
#include "mixpeft/core/error.hpp"
#include "mixpeft/core/init.hpp"
#include "mixpeft/core/parallel.hpp"
#include "mixpeft/core/parameter.hpp"
#include "mixpeft/core/rng.hpp"
#include "mixpeft/core/tensor.hpp"
#include "mixpeft/ops/activations.hpp"
#include "mixpeft/ops/elementwise.hpp"
#include "mixpeft/ops/softmax.hpp"

namespace mixpeft {

// ================================ routing ops (CPU) ================================

// The router's affine map. Serial on purpose: with K outputs it is ~K / (3 D_ff) of an FFN's work, too little
// to pay for threads (a threaded GEMM's spin-waits stall on a busy machine); Eigen's lazy products and GEMVs
// vectorise and never start threads.
//   router_linear_forward:   l = (x W^T + b) / tau                                 x [..., D], W [K, D], l [..., K]
//   router_linear_backward:  dx = (dl / tau) W (written);  dW += (dl / tau)^T x;  db += colsum(dl) / tau
//                            (dW, db skipped when null: frozen)
template <class T>
void router_linear_forward(const Tensor<T>& x, const Tensor<T>& W, const std::type_identity_t<Tensor<T>>* b,
                           T inv_tau, Tensor<T>& logits) {
  constexpr std::string_view op = "router_linear_forward";
  expect_shape(op, "W", W, {any_extent, any_extent});
  const std::size_t K = W.shape()[0], in = W.shape()[1];
  expect_width(op, "x", x, in);
  if (b) expect_shape(op, "b", *b, {K});
  resize_to(logits, with_last(shape_of(x), K));
  const std::size_t n = rows(x);
  auto L = matrix_view(logits.data(), n, K);
  L.noalias() = inv_tau * matrix_view(x.data(), n, in).lazyProduct(matrix_view(W.data(), K, in).transpose());
  if (b) L.rowwise() += inv_tau * matrix_view(b->data(), 1, K).row(0);
}

template <class T>
void router_linear_backward(const Tensor<T>& x, const Tensor<T>& W, const Tensor<T>& dlogits, T inv_tau,
                            Tensor<T>& dx, std::type_identity_t<Tensor<T>>* dW,
                            std::type_identity_t<Tensor<T>>* db) {
  constexpr std::string_view op = "router_linear_backward";
  expect_shape(op, "W", W, {any_extent, any_extent});
  const std::size_t K = W.shape()[0], in = W.shape()[1];
  expect_width(op, "x", x, in);
  expect_width(op, "dlogits", dlogits, K);
  const std::size_t n = rows(x);
  require<ShapeError>(rows(dlogits) == n, op, ": dlogits has shape ", shape_string(dlogits.shape()),
                      " but x has shape ", shape_string(x.shape()));
  const auto dL = matrix_view(dlogits.data(), n, K);
  const auto Wm = matrix_view(W.data(), K, in);
  resize_to(dx, shape_of(x));
  matrix_view(dx.data(), n, in).noalias() = (inv_tau * dL).lazyProduct(Wm);  // scaling the product itself is 5x slower
  if (dW) {
    expect_same_shape(op, "dW", *dW, "W", W);
    const auto X = matrix_view(x.data(), n, in);
    auto dWm = matrix_view(dW->data(), K, in);
    for (std::size_t k = 0; k < K; ++k) dWm.row(k).noalias() += inv_tau * (dL.col(k).transpose() * X);  // GEMVs
  }
  if (db) {
    expect_shape(op, "db", *db, {K});
    matrix_view(db->data(), 1, K).row(0) += inv_tau * dL.colwise().sum();
  }
}

// experts[i, s], gates[i, s]: the k most probable experts of row i in decreasing order (ties: lower index first).
template <class T>
void top_k_forward(const Tensor<T>& probs, std::size_t k, Tensor<std::int32_t>& experts, Tensor<T>& gates) {
  expect_shape("top_k_forward", "probs", probs, {any_extent, any_extent});
  const std::size_t n = probs.shape()[0], K = probs.shape()[1];
  require<ConfigError>(k >= 1 && k <= K, "top_k_forward: k must be in [1, ", K, "], got ", k);
  resize_to(experts, {n, k});
  resize_to(gates, {n, k});
  parallel_rows(n, K * k, [&](std::size_t i) {
    const T* p = probs.data() + i * K;
    std::int32_t* e = experts.data() + i * k;
    for (std::size_t s = 0; s < k; ++s) {
      std::size_t best = K;
      for (std::size_t j = 0; j < K; ++j) {
        if (std::find(e, e + s, std::int32_t(j)) != e + s) continue;
        if (best == K || p[j] > p[best]) best = j;
      }
      e[s] = std::int32_t(best);
      gates.data()[i * k + s] = p[best];
    }
  });
}

// dprobs[i, experts[i, s]] += dgates[i, s]  (the gate values are copies of probabilities).
template <class T>
void top_k_backward(const Tensor<std::int32_t>& experts, const Tensor<T>& dgates, Tensor<T>& dprobs) {
  expect_same_shape("top_k_backward", "dgates", dgates, "experts", experts);
  expect_shape("top_k_backward", "dprobs", dprobs, {experts.shape()[0], any_extent});
  const std::size_t n = experts.shape()[0], k = experts.shape()[1], K = dprobs.shape()[1];
  for (std::size_t a = 0; a < n * k; ++a) dprobs.data()[(a / k) * K + std::size_t(experts.data()[a])] += dgates.data()[a];
}

// Counting sort of the assignments a = i * k + s by expert, stable in a.
//   counts [K], offsets [K + 1] (offsets[0] = 0, offsets[K] = N k), perm [N k].
inline void group_by_expert(const Tensor<std::int32_t>& experts, std::size_t num_experts, Tensor<std::int32_t>& counts,
                            Tensor<std::int32_t>& offsets, Tensor<std::int32_t>& perm) {
  expect_shape("group_by_expert", "experts", experts, {any_extent, any_extent});
  const std::size_t total = experts.size();
  resize_to(counts, {num_experts});
  resize_to(offsets, {num_experts + 1});
  resize_to(perm, {total});
  set_zero(counts);
  for (std::size_t a = 0; a < total; ++a) {
    const std::int32_t e = experts.data()[a];
    require<ConfigError>(e >= 0 && std::size_t(e) < num_experts, "group_by_expert: expert id ", e,
                         " is out of range [0, ", num_experts, ")");
    ++counts.data()[e];
  }
  offsets.data()[0] = 0;
  for (std::size_t e = 0; e < num_experts; ++e) offsets.data()[e + 1] = offsets.data()[e] + counts.data()[e];
  std::vector<std::int32_t> cursor(offsets.data(), offsets.data() + num_experts);
  for (std::size_t a = 0; a < total; ++a) perm.data()[cursor[std::size_t(experts.data()[a])]++] = std::int32_t(a);
}

// out[j, :] = x[perm[j] / k, :]  for j < size(perm); x is seen as [rows, C], out is [size(perm), C].
template <class T>
void gather_rows(const Tensor<T>& x, const Tensor<std::int32_t>& perm, std::size_t k, Tensor<T>& out) {
  require<ShapeError>(x.dimension() >= 1 && k >= 1 && perm.dimension() == 1 && perm.size() == rows(x) * k,
                      "gather_rows: perm has shape ", shape_string(perm.shape()), " but x has shape ",
                      shape_string(x.shape()), " and k = ", k);
  const std::size_t m = perm.size(), c = cols(x);
  resize_to(out, {m, c});
  for (std::size_t j = 0; j < m; ++j)
    std::memcpy(out.data() + j * c, x.data() + std::size_t(perm.data()[j]) / k * c, c * sizeof(T));
}

// out[perm[j] / k, :] += src[j, :]  (the adjoint of gather_rows; rows of out may receive several src rows).
template <class T>
void scatter_add_rows(const Tensor<T>& src, const Tensor<std::int32_t>& perm, std::size_t k, Tensor<T>& out) {
  require<ShapeError>(k >= 1 && perm.dimension() == 1 && rows(src) == perm.size() && rows(out) * k == perm.size() &&
                          cols(src) == cols(out),
                      "scatter_add_rows: src has shape ", shape_string(src.shape()), ", out has shape ",
                      shape_string(out.shape()), " and perm has shape ", shape_string(perm.shape()), " (k = ", k, ")");
  const std::size_t m = perm.size(), c = cols(src);
  for (std::size_t j = 0; j < m; ++j) {
    T* o = out.data() + std::size_t(perm.data()[j]) / k * c;
    const T* s = src.data() + j * c;
    for (std::size_t q = 0; q < c; ++q) o[q] += s[q];
  }
}

// y = x * u, u ~ U(1 - eps, 1 + eps) per element (factors cached).
template <class T>
void input_jitter_forward(const Tensor<T>& x, double eps, Rng& rng, Tensor<T>& y, Tensor<T>& factors) {
  require<ConfigError>(eps >= 0.0 && eps < 1.0, "input_jitter: eps must be in [0, 1), got ", eps);
  resize_to(y, shape_of(x));
  resize_to(factors, shape_of(x));
  for (std::size_t i = 0; i < x.size(); ++i) {
    factors.data()[i] = T(rng.uniform(1.0 - eps, 1.0 + eps));
    y.data()[i] = x.data()[i] * factors.data()[i];
  }
}

// dx *= factors, in place.
template <class T>
void input_jitter_backward(const Tensor<T>& factors, Tensor<T>& dx) {
  require<ShapeError>(factors.size() == dx.size(), "input_jitter_backward: factors has shape ",
                      shape_string(factors.shape()), " but dx has shape ", shape_string(dx.shape()));
  for (std::size_t i = 0; i < dx.size(); ++i) dx.data()[i] *= factors.data()[i];
}

// logits += stddev * N(0, 1), in place (backward is the identity).
template <class T>
void logit_noise_forward(Tensor<T>& logits, double stddev, Rng& rng) {
  for (auto& v : logits) v += T(rng.normal(0.0, stddev));
}

// ================================ routers ================================

template <class T, class Backend = Cpu>
struct RoutingResult {
  using Tensor = typename Backend::template tensor<T>;
  using IndexTensor = typename Backend::template tensor<std::int32_t>;

  std::size_t k = 1;    // experts per token
  Tensor logits;        // [N, K] softmax input (after temperature and noise)
  Tensor probs;         // [N, K]
  IndexTensor experts;  // [N, k] chosen experts, most probable first
  Tensor gates;         // [N, k] their probabilities
  IndexTensor counts;   // [K] assignments per expert (sums to N k)
  IndexTensor offsets;  // [K + 1] first grouped row of each expert
  IndexTensor perm;     // [N k] assignment ids i * k + s in grouped order

  std::size_t tokens() const { return probs.dimension() == 2 ? probs.shape()[0] : 0; }
  std::size_t num_experts() const { return counts.dimension() == 1 ? counts.size() : 0; }
};

// Extra gradients on a router's outputs (from balance losses). A tensor that is not [N, K] (default
// constructed, or cleared to shape {0}) stands for zero; balance losses resize and zero it on first use.
template <class T, class Backend = Cpu>
struct RouterGrad {
  using Tensor = typename Backend::template tensor<T>;
  Tensor dprobs;   // [N, K]
  Tensor dlogits;  // [N, K]
  void clear() {
    resize_to(dprobs, Shape{0});
    resize_to(dlogits, Shape{0});
  }
};

enum class RouterNoise { None, InputJitter, LogitNoise };

namespace detail {

// True when an optional gradient tensor holds values (not default-constructed, not shape {0}).
template <class Tensor>
bool present(const Tensor& t) {
  return t.dimension() > 0 && t.size() > 0;
}

// The router's affine map l = (x W^T + b) / tau and its backward, shared by both routers.
template <class T, class Backend>
struct RouterLinear {
  using Tensor = typename Backend::template tensor<T>;

  Parameter<T, Backend> weight, bias;
  bool has_bias;
  T inv_tau;

  RouterLinear(std::string_view layer, std::size_t in, std::size_t experts, double temperature, bool use_bias,
               Rng& rng)
      : has_bias(use_bias), inv_tau(T(1.0 / temperature)) {
    require<ConfigError>(in > 0, layer, ": input width must be > 0 (got ", in, ")");
    require<ConfigError>(experts > 0, layer, ": number of experts must be > 0 (got ", experts, ")");
    require<ConfigError>(temperature > 0 && std::isfinite(temperature), layer, ": temperature must be > 0 (got ",
                         temperature, ")");
    // Initialised on the host, then handed to the backend: the same weights on every backend for one Rng.
    using Host = ::mixpeft::Tensor<accumulator_t<T>>;
    Host w = empty<accumulator_t<T>>({experts, in});
    init::kaiming_uniform(w, rng);
    weight = Parameter<T, Backend>("weight", Backend::template from_host<T>(std::move(w)), true);
    if (has_bias) {
      Host b = empty<accumulator_t<T>>({experts});
      init::linear_bias(b, rng, in);
      bias = Parameter<T, Backend>("bias", Backend::template from_host<T>(std::move(b)), true, /*decay=*/false);
    }
  }

  void forward(const Tensor& x, Tensor& logits) const {
    router_linear_forward(x, weight.value, has_bias ? &bias.value : nullptr, inv_tau, logits);
  }

  // dx written, parameter gradients accumulated.
  void backward(const Tensor& x, const Tensor& dlogits, Tensor& dx) {
    router_linear_backward(x, weight.value, dlogits, inv_tau, dx, weight.trainable ? &weight.grad : nullptr,
                           has_bias && bias.trainable ? &bias.grad : nullptr);
  }

  void collect(ParameterList<T, Backend>& list, const std::string& prefix) {
    add_parameter(list, prefix, weight);
    if (has_bias) add_parameter(list, prefix, bias);
  }
};

}  // namespace detail

template <class T, class Backend = Cpu>
class SoftRouter {
 public:
  using Tensor = typename Backend::template tensor<T>;

  struct Config {
    std::size_t in = 0;
    std::size_t experts = 0;
    double temperature = 1.0;
    bool bias = true;
  };

  struct Cache {
    Tensor x;       // [..., D]
    Tensor logits;  // [..., K] (holds the logit gradient during backward)
    Tensor probs;   // [..., K]
  };

  // Device-generic: the affine map (detail::RouterLinear: router_linear_forward / _backward, weights initialised on
  // the host and handed over with Backend::from_host) and softmax_forward / _backward are unqualified op calls
  // (cuda/router.cuh, cuda/softmax.cuh on the CUDA backend), so SoftRouter<T, Cuda> built from Rng(s) holds the
  // weights of SoftRouter<T, Cpu>.
  SoftRouter(const Config& config, Rng& rng)
      : config_(config), linear_("SoftRouter", config.in, config.experts, config.temperature, config.bias, rng) {}

  // probs [..., K] from x [..., D].
  Tensor forward(const Tensor& x, Cache& cache) {
    expect_width("SoftRouter", "x", x, config_.in);
    assign(cache.x, x);
    linear_.forward(x, cache.logits);
    softmax_forward(cache.logits, cache.probs);
    Tensor probs;
    assign(probs, cache.probs);
    return probs;
  }

  // dprobs [..., K] -> dx [..., D]; weight and bias gradients accumulate.
  Tensor backward(Cache& cache, const Tensor& dprobs) {
    expect_same_shape("SoftRouter::backward", "dprobs", dprobs, "probs", cache.probs);
    softmax_backward(cache.probs, dprobs, cache.logits);
    Tensor dx;
    linear_.backward(cache.x, cache.logits, dx);
    return dx;
  }

  void collect_parameters(ParameterList<T, Backend>& list, const std::string& prefix = "") {
    linear_.collect(list, prefix);
  }
  void set_training(bool) {}  // a soft router has no noise or dropout

  const Config& config() const { return config_; }
  Parameter<T, Backend>& weight() { return linear_.weight; }
  Parameter<T, Backend>& bias() { return linear_.bias; }

 private:
  Config config_;
  detail::RouterLinear<T, Backend> linear_;
};

// The configuration of TopKRouter<T, Backend> (TopKRouter<T, Backend>::Config), shared by every T and backend.
struct TopKRouterConfig {
  std::size_t in = 0;
  std::size_t experts = 0;
  std::size_t k = 1;
  double temperature = 1.0;
  bool bias = true;
  RouterNoise noise = RouterNoise::None;
  double noise_level = 0.0;  // InputJitter: eps (Switch uses 1e-2); LogitNoise: sigma
};

template <class T, class Backend = Cpu>
class TopKRouter {
 public:
  using Tensor = typename Backend::template tensor<T>;
  using Routing = RoutingResult<T, Backend>;

  using Config = TopKRouterConfig;  // one type for every T and backend

  struct Cache {
    Shape x_shape;
    Tensor x;        // [N, D] router input (jittered in training)
    Tensor factors;  // [N, D] jitter factors; empty without jitter
    Routing routing;
    Tensor dlogits;  // [N, K]
  };

  TopKRouter(const Config& config, Rng& rng)
      : config_(validated(config)),
        linear_("TopKRouter", config.in, config.experts, config.temperature, config.bias, rng),
        noise_rng_(rng.split()) {}

  // Routes the rows of x [..., D]; the result lives in the cache until the next forward.
  const Routing& forward(const Tensor& x, Cache& cache) {
    expect_width("TopKRouter", "x", x, config_.in);
    cache.x_shape = shape_of(x);
    const std::size_t n = rows(x);
    Routing& r = cache.routing;
    if (training_ && config_.noise == RouterNoise::InputJitter && config_.noise_level > 0) {
      input_jitter_forward(x, config_.noise_level, noise_rng_, cache.x, cache.factors);
    } else {
      assign(cache.x, x);
      resize_to(cache.factors, Shape{0});
    }
    cache.x.reshape({n, config_.in});
    linear_.forward(cache.x, r.logits);
    if (training_ && config_.noise == RouterNoise::LogitNoise && config_.noise_level > 0)
      logit_noise_forward(r.logits, config_.noise_level, noise_rng_);
    softmax_forward(r.logits, r.probs);
    r.k = config_.k;
    top_k_forward(r.probs, config_.k, r.experts, r.gates);
    group_by_expert(r.experts, config_.experts, r.counts, r.offsets, r.perm);
    return r;
  }

  // dprobs, dlogits: [N, K], or absent (see RouterGrad) for zero. Returns dx shaped like the forward input.
  Tensor backward(Cache& cache, const Tensor& dprobs, const Tensor& dlogits) {
    const Routing& r = cache.routing;
    if (detail::present(dprobs)) {
      expect_same_shape("TopKRouter::backward", "dprobs", dprobs, "probs", r.probs);
      softmax_backward(r.probs, dprobs, cache.dlogits);
    } else {
      resize_to(cache.dlogits, shape_of(r.probs));
      set_zero(cache.dlogits);
    }
    if (detail::present(dlogits)) {
      expect_same_shape("TopKRouter::backward", "dlogits", dlogits, "logits", r.logits);
      add_to(cache.dlogits, dlogits);
    }
    Tensor dx;
    linear_.backward(cache.x, cache.dlogits, dx);
    if (cache.factors.size() > 0) input_jitter_backward(cache.factors, dx);
    dx.reshape(cache.x_shape);
    return dx;
  }

  void collect_parameters(ParameterList<T, Backend>& list, const std::string& prefix = "") {
    linear_.collect(list, prefix);
  }
  void collect_rngs(NamedRngs& list, const std::string& prefix = "") {
    list.emplace_back(join_name(prefix, "noise_rng"), &noise_rng_);
  }
  void set_training(bool on) { training_ = on; }
  bool training() const { return training_; }

  const Config& config() const { return config_; }
  Parameter<T, Backend>& weight() { return linear_.weight; }
  Parameter<T, Backend>& bias() { return linear_.bias; }

 private:
  static const Config& validated(const Config& c) {
    require<ConfigError>(c.experts > 0, "TopKRouter: number of experts must be > 0 (got ", c.experts, ")");
    require<ConfigError>(c.k >= 1 && c.k <= c.experts, "TopKRouter: k must be in [1, experts = ", c.experts,
                         "], got ", c.k);
    require<ConfigError>(c.noise_level >= 0 && std::isfinite(c.noise_level),
                         "TopKRouter: noise_level must be >= 0 (got ", c.noise_level, ")");
    require<ConfigError>(c.noise != RouterNoise::InputJitter || c.noise_level < 1.0,
                         "TopKRouter: input jitter eps must be < 1 (got ", c.noise_level, ")");
    return c;
  }

  Config config_;
  detail::RouterLinear<T, Backend> linear_;
  Rng noise_rng_;
  bool training_ = true;
};

}  // namespace mixpeft
