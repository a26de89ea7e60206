// mixpeft/layers/balance_loss.hpp — load-balancing losses for routers, with hand-written gradients.
//
// Shapes: L layers, N tokens per layer, K experts, k experts per token, B samples.
// Tokens: v_t = 1 for valid tokens (padding has v_t = 0 and is ignored everywhere), b(t) the sample of token t,
// e_t the top-1 expert (slot 0 of RoutingResult::experts), p_t = probs, l_t = logits of the router.
// Over the valid tokens of one group (one layer, or all layers concatenated), Nv of them:
//   P_i = (1/Nv) sum_t p_ti                 mean router probability (carries the gradient)
//   f_i = (assignments to i) / (k Nv)       fraction of the k-slot assignments (no gradient)
//   c_i = #{t : e_t = i}                    top-1 counts (no gradient)
// Losses (before the weight w):
//   MoLE (reference):  L = mean_b sum_j P_bj F_bj, P and F = mean_{t in b} 1[e_t = j] over the valid tokens of
//                      sample b; samples without valid tokens are left out of the mean (B' samples remain)
//                      dL/dp_tj = F_b(t)j / (n_b(t) B'),  n_b = valid tokens of sample b
//   Switch:            L = K sum_i f_i P_i                dL/dp_ti = K f_i / Nv
//   GShard:            L = (1/K) sum_i (c_i / Nv) P_i     dL/dp_ti = c_i / (K Nv^2)
//   router z-loss:     L = (1/Nv) sum_t lse_t^2           dL/dl_tj = 2 lse_t softmax(l_t)_j / Nv,  lse_t = logsumexp l_t
// Minimum at perfectly uniform routing: MoLE 1/K, Switch 1, GShard 1/K^2.
// Scope: PerLayer (default) sums the loss of each layer over the layers (Switch's recipe; per-layer imbalance
// stays visible); AcrossLayers computes one loss over the tokens of all layers concatenated (the MoLE reference
// code; it can hide imbalance inside single layers). A group with no valid tokens contributes 0.
// Backward writes nothing: it accumulates w * dloss * dL/dp into RouterGrad::dprobs and dL/dl into
// RouterGrad::dlogits of each layer (an absent or wrongly shaped buffer is resized to [N, K] and zeroed
// first; clear() the RouterGrads every step). Nothing is cached: backward recomputes the count terms, O(L N K).
// A NaN or Inf loss throws NumericError.
#pragma once

#include <cmath>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "mixpeft/core/backend.hpp"
#include "mixpeft/core/error.hpp"
#include "mixpeft/core/tensor.hpp"
#include "mixpeft/layers/router.hpp"

namespace mixpeft {

// Which tokens count and which sample each belongs to; shared by all layers of a step.
template <class T, class Backend = Cpu>
struct BalanceTokens {
  using Tensor = typename Backend::template tensor<T>;
  using IndexTensor = typename Backend::template tensor<std::int32_t>;
  Tensor mask{};             // [N] 1 = valid token, 0 = padding; absent: all valid
  IndexTensor sample_ids{};  // [N] values in [0, samples); absent: one sample
  std::size_t samples = 1;
};

// ids[i] = i / seq for a [batch, seq] token layout.
inline void batch_sample_ids(std::size_t batch, std::size_t seq, Tensor<std::int32_t>& ids) {
  resize_to(ids, {batch * seq});
  for (std::size_t i = 0; i < batch * seq; ++i) ids.data()[i] = std::int32_t(i / seq);
}

// ================================ loss ops (CPU) ================================

namespace detail {

// Per group (sample, or one group for all tokens): valid tokens, probability sums and assignment counts.
struct ExpertTally {
  std::size_t experts = 0;
  std::vector<double> valid, prob_sum, count;  // [G], [G K], [G K]
};

template <class T>
ExpertTally tally_experts(std::string_view op, std::span<const RoutingResult<T, Cpu>* const> layers,
                          const BalanceTokens<T, Cpu>& tokens, bool by_sample, bool all_slots) {
  require<ShapeError>(!layers.empty(), op, ": no layers");
  const std::size_t n = layers[0]->tokens(), K = layers[0]->num_experts();
  require<ShapeError>(n > 0 && K > 0, op, ": the routing is empty (a router with K = 1 has none)");
  const bool masked = present(tokens.mask), ids = by_sample && present(tokens.sample_ids);
  if (masked) expect_shape(op, "mask", tokens.mask, {n});
  if (ids) expect_shape(op, "sample_ids", tokens.sample_ids, {n});
  const std::size_t groups = by_sample ? tokens.samples : 1;
  require<ConfigError>(groups > 0, op, ": samples must be > 0");
  ExpertTally t{K, std::vector<double>(groups, 0.0), std::vector<double>(groups * K, 0.0),
                std::vector<double>(groups * K, 0.0)};
  for (const auto* r : layers) {
    expect_shape(op, "probs", r->probs, {n, K});
    const std::size_t k = r->k, slots = all_slots ? k : 1;
    expect_shape(op, "experts", r->experts, {n, k});
    for (std::size_t i = 0; i < n; ++i) {
      if (masked && tokens.mask.data()[i] == T(0)) continue;
      const std::size_t g = ids ? std::size_t(tokens.sample_ids.data()[i]) : 0;
      require<ConfigError>(g < groups, op, ": sample id ", g, " is out of range [0, ", groups, ")");
      t.valid[g] += 1;
      for (std::size_t j = 0; j < K; ++j) t.prob_sum[g * K + j] += double(r->probs.data()[i * K + j]);
      for (std::size_t s = 0; s < slots; ++s) t.count[g * K + std::size_t(r->experts.data()[i * k + s])] += 1;
    }
  }
  return t;
}

// grads[l]->dprobs[i, j] += coefficient(group of token i, j) for the valid tokens of every layer.
template <class T, class Coefficient>
void add_prob_grads(std::span<const RoutingResult<T, Cpu>* const> layers, const BalanceTokens<T, Cpu>& tokens,
                    bool by_sample, std::span<RouterGrad<T, Cpu>* const> grads, const Coefficient& coefficient) {
  require<ShapeError>(grads.size() == layers.size(), "balance loss backward: ", grads.size(),
                      " router gradients for ", layers.size(), " layers");
  const bool masked = present(tokens.mask), ids = by_sample && present(tokens.sample_ids);
  for (std::size_t l = 0; l < layers.size(); ++l) {
    const auto& probs = layers[l]->probs;
    auto& d = grads[l]->dprobs;
    if (!has_shape(d, {probs.shape()[0], probs.shape()[1]})) {
      resize_to(d, shape_of(probs));
      set_zero(d);
    }
    const std::size_t n = probs.shape()[0], K = probs.shape()[1];
    for (std::size_t i = 0; i < n; ++i) {
      if (masked && tokens.mask.data()[i] == T(0)) continue;
      const std::size_t g = ids ? std::size_t(tokens.sample_ids.data()[i]) : 0;
      for (std::size_t j = 0; j < K; ++j) d.data()[i * K + j] += T(coefficient(g, j));
    }
  }
}

inline double finite_loss(std::string_view op, double value) {
  require<NumericError>(std::isfinite(value), op, ": loss is ", value);
  return value;
}

}  // namespace detail

template <class T>
T mole_balance_forward(std::span<const RoutingResult<T, Cpu>* const> layers, const BalanceTokens<T, Cpu>& tokens) {
  const auto t = detail::tally_experts("mole_balance", layers, tokens, true, false);
  double total = 0, used = 0;
  for (std::size_t b = 0; b < t.valid.size(); ++b) {
    if (t.valid[b] == 0) continue;
    double lb = 0;
    for (std::size_t j = 0; j < t.experts; ++j) lb += t.prob_sum[b * t.experts + j] * t.count[b * t.experts + j];
    total += lb / (t.valid[b] * t.valid[b]);
    used += 1;
  }
  return T(detail::finite_loss("mole_balance", used > 0 ? total / used : 0.0));
}

template <class T>
void mole_balance_backward(std::span<const RoutingResult<T, Cpu>* const> layers, const BalanceTokens<T, Cpu>& tokens,
                           T scale, std::span<RouterGrad<T, Cpu>* const> grads) {
  const auto t = detail::tally_experts("mole_balance", layers, tokens, true, false);
  double used = 0;
  for (double v : t.valid) used += v > 0;
  detail::add_prob_grads(layers, tokens, true, grads, [&](std::size_t b, std::size_t j) {
    return double(scale) * t.count[b * t.experts + j] / (t.valid[b] * t.valid[b] * used);
  });
}

template <class T>
T switch_balance_forward(std::span<const RoutingResult<T, Cpu>* const> layers, const BalanceTokens<T, Cpu>& tokens) {
  const auto t = detail::tally_experts("switch_balance", layers, tokens, false, true);
  if (t.valid[0] == 0) return T(0);
  double assigned = 0, fp = 0;
  for (double c : t.count) assigned += c;
  for (std::size_t i = 0; i < t.experts; ++i) fp += t.count[i] / assigned * t.prob_sum[i] / t.valid[0];
  return T(detail::finite_loss("switch_balance", double(t.experts) * fp));
}

template <class T>
void switch_balance_backward(std::span<const RoutingResult<T, Cpu>* const> layers,
                             const BalanceTokens<T, Cpu>& tokens, T scale, std::span<RouterGrad<T, Cpu>* const> grads) {
  const auto t = detail::tally_experts("switch_balance", layers, tokens, false, true);
  double assigned = 0;
  for (double c : t.count) assigned += c;
  detail::add_prob_grads(layers, tokens, false, grads, [&](std::size_t, std::size_t i) {
    return double(scale) * double(t.experts) * (t.count[i] / assigned) / t.valid[0];
  });
}

template <class T>
T gshard_balance_forward(std::span<const RoutingResult<T, Cpu>* const> layers, const BalanceTokens<T, Cpu>& tokens) {
  const auto t = detail::tally_experts("gshard_balance", layers, tokens, false, false);
  if (t.valid[0] == 0) return T(0);
  double s = 0;
  for (std::size_t i = 0; i < t.experts; ++i) s += t.count[i] * t.prob_sum[i];
  return T(detail::finite_loss("gshard_balance", s / (double(t.experts) * t.valid[0] * t.valid[0])));
}

template <class T>
void gshard_balance_backward(std::span<const RoutingResult<T, Cpu>* const> layers,
                             const BalanceTokens<T, Cpu>& tokens, T scale, std::span<RouterGrad<T, Cpu>* const> grads) {
  const auto t = detail::tally_experts("gshard_balance", layers, tokens, false, false);
  detail::add_prob_grads(layers, tokens, false, grads, [&](std::size_t, std::size_t i) {
    return double(scale) * t.count[i] / (double(t.experts) * t.valid[0] * t.valid[0]);
  });
}

namespace detail {
// Calls f(layer, token, lse, row) for every valid token; returns the number of valid (layer, token) pairs.
template <class T, class F>
double for_valid_logit_rows(std::span<const RoutingResult<T, Cpu>* const> layers, const BalanceTokens<T, Cpu>& tokens,
                            F&& f) {
  constexpr std::string_view op = "router_z_loss";
  require<ShapeError>(!layers.empty(), op, ": no layers");
  const std::size_t n = layers[0]->tokens(), K = layers[0]->num_experts();
  require<ShapeError>(n > 0 && K > 0, op, ": the routing is empty (a router with K = 1 has none)");
  const bool masked = present(tokens.mask);
  if (masked) expect_shape(op, "mask", tokens.mask, {n});
  double valid = 0;
  for (std::size_t l = 0; l < layers.size(); ++l) {
    expect_shape(op, "logits", layers[l]->logits, {n, K});
    for (std::size_t i = 0; i < n; ++i) {
      if (masked && tokens.mask.data()[i] == T(0)) continue;
      const T* row = layers[l]->logits.data() + i * K;
      double m = double(row[0]), s = 0;
      for (std::size_t j = 1; j < K; ++j) m = std::max(m, double(row[j]));
      for (std::size_t j = 0; j < K; ++j) s += std::exp(double(row[j]) - m);
      f(l, i, m + std::log(s), row);
      valid += 1;
    }
  }
  return valid;
}
}  // namespace detail

template <class T>
T router_z_loss_forward(std::span<const RoutingResult<T, Cpu>* const> layers, const BalanceTokens<T, Cpu>& tokens) {
  double sum = 0;
  const double valid = detail::for_valid_logit_rows(layers, tokens, [&](std::size_t, std::size_t, double lse, const T*) {
    sum += lse * lse;
  });
  return T(detail::finite_loss("router_z_loss", valid > 0 ? sum / valid : 0.0));
}

template <class T>
void router_z_loss_backward(std::span<const RoutingResult<T, Cpu>* const> layers, const BalanceTokens<T, Cpu>& tokens,
                            T scale, std::span<RouterGrad<T, Cpu>* const> grads) {
  require<ShapeError>(grads.size() == layers.size(), "router_z_loss backward: ", grads.size(),
                      " router gradients for ", layers.size(), " layers");
  const double valid = detail::for_valid_logit_rows(layers, tokens, [](std::size_t, std::size_t, double, const T*) {});
  for (std::size_t l = 0; l < layers.size(); ++l) {
    auto& d = grads[l]->dlogits;
    const auto& logits = layers[l]->logits;
    if (!has_shape(d, {logits.shape()[0], logits.shape()[1]})) {
      resize_to(d, shape_of(logits));
      set_zero(d);
    }
  }
  const std::size_t K = layers[0]->num_experts();
  detail::for_valid_logit_rows(layers, tokens, [&](std::size_t l, std::size_t i, double lse, const T* row) {
    T* out = grads[l]->dlogits.data() + i * K;
    for (std::size_t j = 0; j < K; ++j)
      out[j] += T(double(scale) * 2.0 * lse * std::exp(double(row[j]) - lse) / valid);
  });
}

// ================================ the loss object ================================

enum class BalanceKind { MoLE, Switch, GShard, ZLoss };
enum class BalanceScope { PerLayer, AcrossLayers };

template <class T, class Backend = Cpu>
class BalanceLoss {
 public:
  using Routing = RoutingResult<T, Backend>;
  using Grad = RouterGrad<T, Backend>;
  using Tokens = BalanceTokens<T, Backend>;

  struct Config {
    BalanceKind kind = BalanceKind::MoLE;
    double weight = 1e-2;  // w (Switch's alpha); MoLE's default 1e-2, ST-MoE uses 1e-3 for the z-loss
    BalanceScope scope = BalanceScope::PerLayer;
  };

  explicit BalanceLoss(const Config& config) : config_(config) {
    require<ConfigError>(std::isfinite(config.weight) && config.weight >= 0, "BalanceLoss: weight must be >= 0 (got ",
                         config.weight, ")");
  }

  // w * (sum over layers of each layer's loss | the loss over all layers' tokens).
  T forward(std::span<const Routing* const> layers, const Tokens& tokens) const {
    if (config_.scope == BalanceScope::AcrossLayers) return T(config_.weight) * value(layers, tokens);
    T total = 0;
    for (std::size_t l = 0; l < layers.size(); ++l) total += value(layers.subspan(l, 1), tokens);
    return T(config_.weight) * total;
  }

  // grads[l] += dloss * d(forward)/d(probs, logits of layer l).
  void backward(std::span<const Routing* const> layers, const Tokens& tokens, std::span<Grad* const> grads,
                T dloss = T(1)) const {
    require<ShapeError>(grads.size() == layers.size(), "BalanceLoss::backward: ", grads.size(),
                        " router gradients for ", layers.size(), " layers");
    const T scale = T(config_.weight) * dloss;
    if (config_.scope == BalanceScope::AcrossLayers) return gradient(layers, tokens, scale, grads);
    for (std::size_t l = 0; l < layers.size(); ++l) gradient(layers.subspan(l, 1), tokens, scale, grads.subspan(l, 1));
  }

  const Config& config() const { return config_; }

 private:
  T value(std::span<const Routing* const> layers, const Tokens& tokens) const {
    switch (config_.kind) {
      case BalanceKind::MoLE: return mole_balance_forward(layers, tokens);
      case BalanceKind::Switch: return switch_balance_forward(layers, tokens);
      case BalanceKind::GShard: return gshard_balance_forward(layers, tokens);
      case BalanceKind::ZLoss: return router_z_loss_forward(layers, tokens);
    }
    return T(0);
  }

  void gradient(std::span<const Routing* const> layers, const Tokens& tokens, T scale,
                std::span<Grad* const> grads) const {
    switch (config_.kind) {
      case BalanceKind::MoLE: return mole_balance_backward(layers, tokens, scale, grads);
      case BalanceKind::Switch: return switch_balance_backward(layers, tokens, scale, grads);
      case BalanceKind::GShard: return gshard_balance_backward(layers, tokens, scale, grads);
      case BalanceKind::ZLoss: return router_z_loss_backward(layers, tokens, scale, grads);
    }
  }

  Config config_;
};

}  // namespace mixpeft
