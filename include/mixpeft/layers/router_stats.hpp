// mixpeft/layers/router_stats.hpp — expert-usage telemetry of the routers of one step.
//
// For each layer l, group g (a domain or sample id per token; one group by default) and expert j:
//   count[l][g][j]     = assignments of valid tokens to j (all k slots of the RoutingResult)
//   prob_sum[l][g][j]  = sum over valid tokens of p_tj;   tokens[l][g] = number of valid tokens
//   usage(l[, g])      = count / sum_j count          (fractions; all zero before any record)
//   mean_probs(l[, g]) = prob_sum / tokens
// record() may be called several times per layer (micro-batches); reset() starts a new step. Statistics are
// host-side doubles, counted by the tally_experts op of the routing's backend (balance_loss.hpp; on the CUDA
// backend a deterministic device reduction whose G (2K + 1) sums are copied back: one stream sync per record).
#pragma once

#include <cstdint>
#include <numeric>
#include <vector>

#include "mixpeft/core/backend.hpp"
#include "mixpeft/core/error.hpp"
#include "mixpeft/core/tensor.hpp"
#include "mixpeft/layers/balance_loss.hpp"
#include "mixpeft/layers/router.hpp"

namespace mixpeft {

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
    ExpertTally t{experts_, std::vector<double>(groups_, 0.0), std::vector<double>(groups_ * experts_, 0.0),
                  std::vector<double>(groups_ * experts_, 0.0)};
    tally_experts("RouterStats::record", routing.probs, routing.experts, routing.k, mask, group_ids, t);
    for (std::size_t i = 0; i < t.count.size(); ++i) s.counts[i] += t.count[i], s.prob_sums[i] += t.prob_sum[i];
    for (std::size_t g = 0; g < groups_; ++g) s.tokens[g] += t.valid[g];
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
