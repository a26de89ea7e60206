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
// first; clear() the RouterGrads every step). The losses keep no state: backward counts again, O(L N K), unless
// BalanceLoss::backward is handed the Counts its forward filled in.
// A NaN or Inf loss throws NumericError.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string_view>
#include <utility>
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

// ================================ tally ops (CPU; a device backend provides the same four) ================================
//
// Valid token i: mask absent or mask[i] != 0; its group g(i) = group_ids[i], or 0 when group_ids is absent.
//   tally_experts             adds valid[g] += 1, prob_sum[g, j] += p_ij, count[g, e_is] += 1 (s < slots);
//                             ConfigError for a group or expert id out of range, before anything is added
//   add_group_coefficients    dprobs[i, j] += coef[g(i), j]                 (the probability gradients)
//   router_z_sums             adds sum over valid rows of lse_i^2, and the number of valid rows
//   router_z_backward_add     dlogits[i, j] += coef * lse_i * softmax(l_i)_j

// Per group (sample, or one group for all tokens): valid tokens, probability sums and assignment counts.
struct ExpertTally {
  std::size_t experts = 0;                     // K
  std::vector<double> valid, prob_sum, count;  // [G], [G K], [G K]
};

template <class T>
void tally_experts(std::string_view op, const Tensor<T>& probs, const Tensor<std::int32_t>& experts, std::size_t slots,
                   const Tensor<T>& mask, const Tensor<std::int32_t>& group_ids, ExpertTally& tally) {
  expect_shape(op, "probs", probs, {any_extent, tally.experts});
  const std::size_t n = probs.shape()[0], K = tally.experts, groups = tally.valid.size();
  expect_shape(op, "experts", experts, {n, any_extent});
  const std::size_t k = experts.shape()[1];
  require<ShapeError>(slots <= k, op, ": counting ", slots, " slots of a top-", k, " routing");
  const bool masked = detail::present(mask), ids = detail::present(group_ids);
  if (masked) expect_shape(op, "mask", mask, {n});
  if (ids) expect_shape(op, "group_ids", group_ids, {n});
  require<ShapeError>(tally.prob_sum.size() == groups * K && tally.count.size() == groups * K, op,
                      ": the tally is not sized for ", groups, " groups of ", K, " experts");
  const auto valid = [&](std::size_t i) { return !masked || mask.data()[i] != T(0); };
  for (std::size_t i = 0; i < n; ++i) {  // every id is checked before anything is added
    if (!valid(i)) continue;
    const std::int32_t g = ids ? group_ids.data()[i] : 0;
    require<ConfigError>(g >= 0 && std::size_t(g) < groups, op, ": group id ", g, " is out of range [0, ", groups,
                         ")");
    for (std::size_t s = 0; s < slots; ++s) {
      const std::int32_t e = experts.data()[i * k + s];
      require<ConfigError>(e >= 0 && std::size_t(e) < K, op, ": expert id ", e, " is out of range [0, ", K, ")");
    }
  }
  for (std::size_t i = 0; i < n; ++i) {
    if (!valid(i)) continue;
    const std::size_t g = ids ? std::size_t(group_ids.data()[i]) : 0;
    tally.valid[g] += 1;
    for (std::size_t j = 0; j < K; ++j) tally.prob_sum[g * K + j] += double(probs.data()[i * K + j]);
    for (std::size_t s = 0; s < slots; ++s) tally.count[g * K + std::size_t(experts.data()[i * k + s])] += 1;
  }
}

template <class T>
void add_group_coefficients(const Tensor<T>& mask, const Tensor<std::int32_t>& group_ids, std::span<const double> coef,
                            Tensor<T>& dprobs) {
  expect_shape("add_group_coefficients", "dprobs", dprobs, {any_extent, any_extent});
  const std::size_t n = dprobs.shape()[0], K = dprobs.shape()[1], groups = K > 0 ? coef.size() / K : 0;
  const bool masked = detail::present(mask), ids = detail::present(group_ids);
  if (masked) expect_shape("add_group_coefficients", "mask", mask, {n});
  if (ids) expect_shape("add_group_coefficients", "group_ids", group_ids, {n});
  for (std::size_t i = 0; i < n; ++i) {
    if (masked && mask.data()[i] == T(0)) continue;
    const std::size_t g = ids ? std::size_t(group_ids.data()[i]) : 0;
    if (g >= groups) continue;  // tally_experts has rejected it
    for (std::size_t j = 0; j < K; ++j) dprobs.data()[i * K + j] += T(coef[g * K + j]);
  }
}

namespace detail {
// Calls f(row, lse) for every valid row of logits [N, K] (lse in double, max-shifted).
template <class T, class F>
void for_valid_logit_rows(const Tensor<T>& logits, const Tensor<T>& mask, F&& f) {
  expect_shape("router_z_loss", "logits", logits, {any_extent, any_extent});
  const std::size_t n = logits.shape()[0], K = logits.shape()[1];
  const bool masked = present(mask);
  if (masked) expect_shape("router_z_loss", "mask", mask, {n});
  for (std::size_t i = 0; i < n; ++i) {
    if (masked && mask.data()[i] == T(0)) continue;
    const T* row = logits.data() + i * K;
    double m = double(row[0]), s = 0;
    for (std::size_t j = 1; j < K; ++j) m = std::max(m, double(row[j]));
    for (std::size_t j = 0; j < K; ++j) s += std::exp(double(row[j]) - m);
    f(i, m + std::log(s));
  }
}
}  // namespace detail

template <class T>
void router_z_sums(const Tensor<T>& logits, const Tensor<T>& mask, double& sum_lse2, double& valid) {
  detail::for_valid_logit_rows(logits, mask, [&](std::size_t, double lse) {
    sum_lse2 += lse * lse;
    valid += 1;
  });
}

template <class T>
void router_z_backward_add(const Tensor<T>& logits, const Tensor<T>& mask, double coef, Tensor<T>& dlogits) {
  expect_same_shape("router_z_backward_add", "dlogits", dlogits, "logits", logits);
  const std::size_t K = logits.shape()[1];
  detail::for_valid_logit_rows(logits, mask, [&](std::size_t i, double lse) {
    const T* row = logits.data() + i * K;
    T* out = dlogits.data() + i * K;
    for (std::size_t j = 0; j < K; ++j) out[j] += T(coef * lse * std::exp(double(row[j]) - lse));
  });
}

// ================================ the losses from their counts (any backend) ================================

namespace detail {

template <class T, class Backend>
using RoutingSpan = std::span<const RoutingResult<T, Backend>* const>;

// The tallies of all layers together, by sample or as one group.
template <class T, class Backend>
ExpertTally tally_layers(std::string_view op, RoutingSpan<T, Backend> layers, const BalanceTokens<T, Backend>& tokens,
                         bool by_sample, bool all_slots) {
  require<ShapeError>(!layers.empty(), op, ": no layers");
  const std::size_t n = layers[0]->tokens(), K = layers[0]->num_experts();
  require<ShapeError>(n > 0 && K > 0, op, ": the routing is empty (a router with K = 1 has none)");
  const std::size_t groups = by_sample ? tokens.samples : 1;
  require<ConfigError>(groups > 0, op, ": samples must be > 0");
  ExpertTally t{K, std::vector<double>(groups, 0.0), std::vector<double>(groups * K, 0.0),
                std::vector<double>(groups * K, 0.0)};
  using IndexTensor = typename Backend::template tensor<std::int32_t>;
  const IndexTensor none = Backend::template zeros<std::int32_t>(Shape{0});
  for (const auto* r : layers) {
    require<ShapeError>(r->tokens() == n, op, ": layers route ", r->tokens(), " and ", n, " tokens");
    tally_experts(op, r->probs, r->experts, all_slots ? r->k : 1, tokens.mask, by_sample ? tokens.sample_ids : none,
                  t);
  }
  return t;
}

// grads[l]->dprobs += coef[group, j] over the valid tokens of every layer (buffers sized and zeroed on first use).
template <class T, class Backend>
void add_prob_grads(RoutingSpan<T, Backend> layers, const BalanceTokens<T, Backend>& tokens, bool by_sample,
                    std::span<RouterGrad<T, Backend>* const> grads, std::span<const double> coef) {
  require<ShapeError>(grads.size() == layers.size(), "balance loss backward: ", grads.size(),
                      " router gradients for ", layers.size(), " layers");
  using IndexTensor = typename Backend::template tensor<std::int32_t>;
  const IndexTensor none = Backend::template zeros<std::int32_t>(Shape{0});
  for (std::size_t l = 0; l < layers.size(); ++l) {
    const auto& probs = layers[l]->probs;
    auto& d = grads[l]->dprobs;
    if (!has_shape(d, {probs.shape()[0], probs.shape()[1]})) {
      resize_to(d, shape_of(probs));
      set_zero(d);
    }
    add_group_coefficients(tokens.mask, by_sample ? tokens.sample_ids : none, coef, d);
  }
}

inline double finite_loss(std::string_view op, double value) {
  require<NumericError>(std::isfinite(value), op, ": loss is ", value);
  return value;
}

// Each count-based loss from its tally: the loss value, and the coefficients coef[group, j] of dL/dp_tj (times scale).
struct BalanceMath {
  const char* op;
  bool by_sample, all_slots;  // what tally_layers counts for it
  double (*value)(const ExpertTally&);
  std::vector<double> (*coefficients)(const ExpertTally&, double scale);
};

inline double mole_value(const ExpertTally& t) {
  double total = 0, used = 0;
  for (std::size_t b = 0; b < t.valid.size(); ++b) {
    if (t.valid[b] == 0) continue;
    double lb = 0;
    for (std::size_t j = 0; j < t.experts; ++j) lb += t.prob_sum[b * t.experts + j] * t.count[b * t.experts + j];
    total += lb / (t.valid[b] * t.valid[b]);
    used += 1;
  }
  return used > 0 ? total / used : 0.0;
}
inline std::vector<double> mole_coefficients(const ExpertTally& t, double scale) {
  double used = 0;
  for (double v : t.valid) used += v > 0;
  std::vector<double> coef(t.count.size(), 0.0);
  for (std::size_t b = 0; b < t.valid.size(); ++b)
    for (std::size_t j = 0; j < t.experts && t.valid[b] > 0; ++j)
      coef[b * t.experts + j] = scale * t.count[b * t.experts + j] / (t.valid[b] * t.valid[b] * used);
  return coef;
}

inline double assigned(const ExpertTally& t) {
  double a = 0;
  for (double c : t.count) a += c;
  return a;
}
inline double switch_value(const ExpertTally& t) {
  if (t.valid[0] == 0) return 0.0;
  double fp = 0;
  for (std::size_t i = 0; i < t.experts; ++i) fp += t.count[i] / assigned(t) * t.prob_sum[i] / t.valid[0];
  return double(t.experts) * fp;
}
inline std::vector<double> switch_coefficients(const ExpertTally& t, double scale) {
  std::vector<double> coef(t.experts, 0.0);
  for (std::size_t i = 0; i < t.experts && t.valid[0] > 0; ++i)
    coef[i] = scale * double(t.experts) * (t.count[i] / assigned(t)) / t.valid[0];
  return coef;
}

inline double gshard_value(const ExpertTally& t) {
  if (t.valid[0] == 0) return 0.0;
  double s = 0;
  for (std::size_t i = 0; i < t.experts; ++i) s += t.count[i] * t.prob_sum[i];
  return s / (double(t.experts) * t.valid[0] * t.valid[0]);
}
inline std::vector<double> gshard_coefficients(const ExpertTally& t, double scale) {
  std::vector<double> coef(t.experts, 0.0);
  for (std::size_t i = 0; i < t.experts && t.valid[0] > 0; ++i)
    coef[i] = scale * t.count[i] / (double(t.experts) * t.valid[0] * t.valid[0]);
  return coef;
}

inline constexpr BalanceMath mole_math{"mole_balance", true, false, mole_value, mole_coefficients};
inline constexpr BalanceMath switch_math{"switch_balance", false, true, switch_value, switch_coefficients};
inline constexpr BalanceMath gshard_math{"gshard_balance", false, false, gshard_value, gshard_coefficients};

template <class T, class Backend>
ExpertTally tally_for(const BalanceMath& m, RoutingSpan<T, Backend> layers, const BalanceTokens<T, Backend>& tokens) {
  return tally_layers(m.op, layers, tokens, m.by_sample, m.all_slots);
}

template <class T>
T balance_value(const BalanceMath& m, const ExpertTally& t) {
  return T(finite_loss(m.op, m.value(t)));
}

template <class T, class Backend>
void balance_gradient(const BalanceMath& m, RoutingSpan<T, Backend> layers, const BalanceTokens<T, Backend>& tokens,
                      const ExpertTally& t, T scale, std::span<RouterGrad<T, Backend>* const> grads) {
  const std::vector<double> coef = m.coefficients(t, double(scale));
  add_prob_grads(layers, tokens, m.by_sample, grads, std::span<const double>(coef));
}

// Sum of lse^2 and the number of valid (layer, token) pairs over all layers.
template <class T, class Backend>
std::pair<double, double> z_sums(RoutingSpan<T, Backend> layers, const BalanceTokens<T, Backend>& tokens) {
  constexpr std::string_view op = "router_z_loss";
  require<ShapeError>(!layers.empty(), op, ": no layers");
  const std::size_t n = layers[0]->tokens(), K = layers[0]->num_experts();
  require<ShapeError>(n > 0 && K > 0, op, ": the routing is empty (a router with K = 1 has none)");
  double sum = 0, valid = 0;
  for (const auto* r : layers) {
    expect_shape(op, "logits", r->logits, {n, K});
    router_z_sums(r->logits, tokens.mask, sum, valid);
  }
  return {sum, valid};
}

// grads[l]->dlogits += scale dL/dl for `valid` counted (layer, token) pairs.
template <class T, class Backend>
void z_gradient(RoutingSpan<T, Backend> layers, const BalanceTokens<T, Backend>& tokens, double valid, T scale,
                std::span<RouterGrad<T, Backend>* const> grads) {
  require<ShapeError>(grads.size() == layers.size(), "router_z_loss backward: ", grads.size(),
                      " router gradients for ", layers.size(), " layers");
  for (std::size_t l = 0; l < layers.size(); ++l) {
    auto& d = grads[l]->dlogits;
    const auto& logits = layers[l]->logits;
    if (!has_shape(d, {logits.shape()[0], logits.shape()[1]})) {
      resize_to(d, shape_of(logits));
      set_zero(d);
    }
    if (valid > 0) router_z_backward_add(logits, tokens.mask, double(scale) * 2.0 / valid, d);
  }
}
}  // namespace detail

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

  // What a forward counted, one entry per loss group (each layer, or all layers together), so that a backward on
  // the same routing and tokens need not count again (on the GPU each count is a reduction read back by the host).
  struct Counts {
    std::vector<ExpertTally> tallies;  // MoLE, Switch, GShard
    std::vector<double> z_valid;       // ZLoss: the valid (layer, token) pairs of each group
  };

  explicit BalanceLoss(const Config& config) : config_(config) {
    require<ConfigError>(std::isfinite(config.weight) && config.weight >= 0, "BalanceLoss: weight must be >= 0 (got ",
                         config.weight, ")");
  }

  // w * (sum over layers of each layer's loss | the loss over all layers' tokens). counts (optional) receives what
  // was counted, for backward.
  T forward(std::span<const Routing* const> layers, const Tokens& tokens, Counts* counts = nullptr) const {
    if (counts) *counts = Counts{};
    T total = 0;
    for_each_group(layers, [&](std::span<const Routing* const> group, std::size_t) {
      total += value(group, tokens, counts);
    });
    return T(config_.weight) * total;
  }

  // grads[l] += dloss * d(forward)/d(probs, logits of layer l). counts: what forward counted on these very layers
  // and tokens (nullptr: count again).
  void backward(std::span<const Routing* const> layers, const Tokens& tokens, std::span<Grad* const> grads,
                T dloss = T(1), const Counts* counts = nullptr) const {
    require<ShapeError>(grads.size() == layers.size(), "BalanceLoss::backward: ", grads.size(),
                        " router gradients for ", layers.size(), " layers");
    const T scale = T(config_.weight) * dloss;
    const std::size_t groups = config_.scope == BalanceScope::AcrossLayers ? 1 : layers.size();
    if (counts) {
      const std::size_t kept = config_.kind == BalanceKind::ZLoss ? counts->z_valid.size() : counts->tallies.size();
      require<ShapeError>(kept == groups, "BalanceLoss::backward: counts of ", kept, " groups for a loss of ", groups);
    }
    for_each_group(layers, [&](std::span<const Routing* const> group, std::size_t g) {
      const auto group_grads = config_.scope == BalanceScope::AcrossLayers ? grads : grads.subspan(g, 1);
      gradient(group, tokens, scale, group_grads, counts, g);
    });
  }

  const Config& config() const { return config_; }

 private:
  // f(group of layers, group index) for each loss group.
  template <class F>
  void for_each_group(std::span<const Routing* const> layers, F&& f) const {
    if (config_.scope == BalanceScope::AcrossLayers) return f(layers, 0);
    for (std::size_t l = 0; l < layers.size(); ++l) f(layers.subspan(l, 1), l);
  }

  static const detail::BalanceMath& math(BalanceKind kind) {
    switch (kind) {
      case BalanceKind::Switch: return detail::switch_math;
      case BalanceKind::GShard: return detail::gshard_math;
      case BalanceKind::MoLE:
      case BalanceKind::ZLoss: break;  // the z-loss counts no experts (value / gradient handle it first)
    }
    return detail::mole_math;
  }

  T value(std::span<const Routing* const> group, const Tokens& tokens, Counts* counts) const {
    if (config_.kind == BalanceKind::ZLoss) {
      const auto [sum, valid] = detail::z_sums(group, tokens);
      if (counts) counts->z_valid.push_back(valid);
      return T(detail::finite_loss("router_z_loss", valid > 0 ? sum / valid : 0.0));
    }
    const auto& m = math(config_.kind);
    ExpertTally t = detail::tally_for(m, group, tokens);
    const T v = detail::balance_value<T>(m, t);
    if (counts) counts->tallies.push_back(std::move(t));
    return v;
  }

  void gradient(std::span<const Routing* const> group, const Tokens& tokens, T scale, std::span<Grad* const> grads,
                const Counts* counts, std::size_t g) const {
    if (config_.kind == BalanceKind::ZLoss) {
      const double valid = counts ? counts->z_valid[g] : detail::z_sums(group, tokens).second;
      return detail::z_gradient(group, tokens, valid, scale, grads);
    }
    const auto& m = math(config_.kind);
    if (counts) return detail::balance_gradient(m, group, tokens, counts->tallies[g], scale, grads);
    detail::balance_gradient(m, group, tokens, detail::tally_for(m, group, tokens), scale, grads);
  }

  Config config_;
};

}  // namespace mixpeft
