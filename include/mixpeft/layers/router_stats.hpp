// mixpeft/layers/router_stats.hpp — expert-usage telemetry of the routers of one step.
//
// For each layer l, group g (a domain or sample id per token; one group by default) and expert j:
//   count[l][g][j]     = assignments of valid tokens to j (all k slots of the RoutingResult)
//   prob_sum[l][g][j]  = sum over valid tokens of p_tj;   tokens[l][g] = number of valid tokens
//   usage(l[, g])      = count / sum_j count          (fractions; all zero before any record)
//   mean_probs(l[, g]) = prob_sum / tokens
// record() may be called several times per layer (micro-batches); reset() starts a new step. Statistics are
// host-side doubles: accumulate_expert_usage is the op a device backend provides (it copies the sums back).
#pragma once

#include <cstdint>
#include <numeric>
#include <vector>

#include "mixpeft/core/backend.hpp"
#include "mixpeft/core/error.hpp"
#include "mixpeft/core/tensor.hpp"
#include "mixpeft/layers/router.hpp"

namespace mixpeft {

// counts [G K], prob_sums [G K], tokens [G] += the routing's valid tokens, grouped by group_ids ([N] or absent).
template <class T>
void accumulate_expert_usage(const RoutingResult<T, Cpu>& routing, const Tensor<std::int32_t>& group_ids,
                             const Tensor<T>& mask, std::size_t groups, std::vector<double>& counts,
                             std::vector<double>& prob_sums, std::vector<double>& tokens) {
  constexpr std::string_view op = "accumulate_expert_usage";
  const std::size_t n = routing.tokens(), K = routing.num_experts(), k = routing.k;
  require<ShapeError>(counts.size() == groups * K && prob_sums.size() == groups * K && tokens.size() == groups, op,
                      ": statistics sized for another expert count than the routing's ", K);
  const bool ids = detail::present(group_ids), masked = detail::present(mask);
  if (ids) expect_shape(op, "group_ids", group_ids, {n});
  if (masked) expect_shape(op, "mask", mask, {n});
  for (std::size_t i = 0; i < n; ++i) {
    if (masked && mask.data()[i] == T(0)) continue;
    const std::size_t g = ids ? std::size_t(group_ids.data()[i]) : 0;
    require<ConfigError>(g < groups, op, ": group id ", g, " is out of range [0, ", groups, ")");
    tokens[g] += 1;
    for (std::size_t j = 0; j < K; ++j) prob_sums[g * K + j] += double(routing.probs.data()[i * K + j]);
    for (std::size_t s = 0; s < k; ++s) counts[g * K + std::size_t(routing.experts.data()[i * k + s])] += 1;
  }
}

template <class T, class Backend = Cpu>
class RouterStats {
 public:
  using Tensor = typename Backend::template tensor<T>;
  using IndexTensor = typename Backend::template tensor<std::int32_t>;

  explicit RouterStats(std::size_t experts, std::size_t groups = 1) : experts_(experts), groups_(groups) {
    require<ConfigError>(experts > 0 && groups > 0, "RouterStats: experts and groups must be > 0 (got experts = ",
                         experts, ", groups = ", groups, ")");
  }

  // Adds one layer's routing; group_ids and mask are [N] or absent (one group, every token valid).
  void record(std::size_t layer, const RoutingResult<T, Backend>& routing, const IndexTensor& group_ids = {},
              const Tensor& mask = {}) {
    require<ShapeError>(routing.num_experts() == experts_, "RouterStats: routing has ", routing.num_experts(),
                        " experts, expected ", experts_);
    if (layer >= layers_.size()) layers_.resize(layer + 1, Layer(experts_, groups_));
    Layer& s = layers_[layer];
    accumulate_expert_usage(routing, group_ids, mask, groups_, s.counts, s.prob_sums, s.tokens);
  }

  std::size_t layers() const { return layers_.size(); }
  std::size_t experts() const { return experts_; }
  std::size_t groups() const { return groups_; }

  // Fraction of assignments per expert, over all groups or for one group.
  std::vector<double> usage(std::size_t layer) const { return normalised(summed(layer, &Layer::counts), false, layer); }
  std::vector<double> usage(std::size_t layer, std::size_t group) const {
    return normalised(slice(layer, group, &Layer::counts), false, layer, group);
  }
  // Mean router probability per expert, over all groups or for one group.
  std::vector<double> mean_probs(std::size_t layer) const {
    return normalised(summed(layer, &Layer::prob_sums), true, layer);
  }
  std::vector<double> mean_probs(std::size_t layer, std::size_t group) const {
    return normalised(slice(layer, group, &Layer::prob_sums), true, layer, group);
  }
  // Valid tokens recorded for a layer (all groups).
  double tokens(std::size_t layer) const {
    check(layer, 0);
    return std::accumulate(layers_[layer].tokens.begin(), layers_[layer].tokens.end(), 0.0);
  }

  void reset() { layers_.clear(); }

 private:
  struct Layer {
    Layer(std::size_t K, std::size_t G) : counts(G * K, 0.0), prob_sums(G * K, 0.0), tokens(G, 0.0) {}
    std::vector<double> counts, prob_sums, tokens;
  };

  void check(std::size_t layer, std::size_t group) const {
    require<ConfigError>(layer < layers_.size(), "RouterStats: layer ", layer, " has no records (", layers_.size(),
                         " layers recorded)");
    require<ConfigError>(group < groups_, "RouterStats: group ", group, " is out of range [0, ", groups_, ")");
  }
  std::vector<double> slice(std::size_t layer, std::size_t group, std::vector<double> Layer::*field) const {
    check(layer, group);
    const auto& v = layers_[layer].*field;
    return {v.begin() + std::ptrdiff_t(group * experts_), v.begin() + std::ptrdiff_t((group + 1) * experts_)};
  }
  std::vector<double> summed(std::size_t layer, std::vector<double> Layer::*field) const {
    check(layer, 0);
    std::vector<double> out(experts_, 0.0);
    for (std::size_t g = 0; g < groups_; ++g)
      for (std::size_t j = 0; j < experts_; ++j) out[j] += (layers_[layer].*field)[g * experts_ + j];
    return out;
  }
  // Divides by the number of assignments (usage) or of tokens (probabilities) of the layer [and group].
  std::vector<double> normalised(std::vector<double> v, bool by_tokens, std::size_t layer,
                                 std::ptrdiff_t group = -1) const {
    const auto& t = layers_[layer].tokens;
    const double denom = by_tokens ? (group < 0 ? std::accumulate(t.begin(), t.end(), 0.0) : t[std::size_t(group)])
                                   : std::accumulate(v.begin(), v.end(), 0.0);
    if (denom > 0)
      for (double& x : v) x /= denom;
    return v;
  }

  std::size_t experts_, groups_;
  std::vector<Layer> layers_;
};

}  // namespace mixpeft
