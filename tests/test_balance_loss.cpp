#include <gtest/gtest.h>

#include <cmath>

#include "mixpeft/layers/balance_loss.hpp"
#include "mixpeft/layers/lora_experts.hpp"
#include "mixpeft/layers/router_stats.hpp"
#include "mixpeft/testing/gradcheck.hpp"

using namespace mixpeft;
using namespace mixpeft::testing;

namespace {

using Routing = RoutingResult<double>;
using Tokens = BalanceTokens<double>;
using Index = Tensor<std::int32_t>;

// A RoutingResult built with the routing ops from given logits (top-k over softmax).
Routing routing_from_logits(const Tensor<double>& logits, std::size_t k = 1) {
  Routing r;
  r.k = k;
  r.logits = logits;
  softmax_forward(r.logits, r.probs);
  top_k_forward(r.probs, k, r.experts, r.gates);
  group_by_expert(r.experts, logits.shape()[1], r.counts, r.offsets, r.perm);
  return r;
}

// Uniform probabilities with experts assigned round-robin: perfectly balanced routing.
Routing uniform_routing(std::size_t n, std::size_t K) {
  Routing r = routing_from_logits(zeros<double>({n, K}));
  for (std::size_t i = 0; i < n; ++i) r.experts(i, 0) = std::int32_t(i % K);
  return r;
}

Index ids(std::vector<std::int32_t> v) {
  Index t = empty<std::int32_t>({v.size()});
  std::copy(v.begin(), v.end(), t.begin());
  return t;
}

// L layers of random routing over n tokens and K experts; layer `top2` routes top-2, the others top-1.
std::vector<Routing> random_layers(Rng& rng, std::size_t L, std::size_t n, std::size_t K, std::size_t top2) {
  std::vector<Routing> layers;
  for (std::size_t l = 0; l < L; ++l)
    layers.push_back(routing_from_logits(random_tensor<double>({n, K}, rng), l == top2 ? 2 : 1));
  return layers;
}

std::vector<const Routing*> pointers(const std::vector<Routing>& layers) {
  std::vector<const Routing*> p;
  for (const auto& r : layers) p.push_back(&r);
  return p;
}

}  // namespace

TEST(BalanceLoss, UniformRoutingGivesKnownMinimum) {
  const std::size_t K = 4;
  std::vector<Routing> layers = {uniform_routing(8, K)};
  Tokens tokens;
  batch_sample_ids(2, 4, tokens.sample_ids);
  tokens.samples = 2;
  auto value = [&](BalanceKind kind, double w) {
    return BalanceLoss<double>({.kind = kind, .weight = w}).forward(pointers(layers), tokens);
  };
  EXPECT_NEAR(value(BalanceKind::Switch, 0.3), 0.3, 1e-15);         // alpha
  EXPECT_NEAR(value(BalanceKind::MoLE, 1.0), 1.0 / K, 1e-15);       // 1/K per sample
  EXPECT_NEAR(value(BalanceKind::GShard, 1.0), 1.0 / (K * K), 1e-15);
  EXPECT_NEAR(value(BalanceKind::ZLoss, 1.0), std::log(4.0) * std::log(4.0), 1e-14);  // logits 0: lse = log K
}

TEST(BalanceLoss, CollapsedRoutingCostsMore) {
  // Every token sent to expert 0 with probability 0.7: Switch = K * 1 * 0.7.
  Tensor<double> logits = zeros<double>({6, 3});
  for (std::size_t i = 0; i < 6; ++i) logits(i, 0) = std::log(0.7 / 0.15);
  std::vector<Routing> layers = {routing_from_logits(logits)};
  const double sw = BalanceLoss<double>({.kind = BalanceKind::Switch, .weight = 1.0}).forward(pointers(layers), {});
  EXPECT_NEAR(sw, 3 * 0.7, 1e-12);
  const double mole = BalanceLoss<double>({.kind = BalanceKind::MoLE, .weight = 1.0}).forward(pointers(layers), {});
  EXPECT_NEAR(mole, 0.7, 1e-12);
}

TEST(BalanceLoss, MoLEHandComputedPerSampleWithMask) {
  // Sample 0: tokens 0, 1 (token 1 is padding); sample 1: tokens 2, 3.
  Routing r = routing_from_logits(Tensor<double>{{2, 0}, {0, 2}, {1, 0}, {0, 3}});
  Tokens tokens{.mask = Tensor<double>{1, 0, 1, 1}, .sample_ids = ids({0, 0, 1, 1}), .samples = 2};
  const double p0 = r.probs(0, 0);                                // sample 0: one token, on expert 0
  const double l0 = p0 * 1.0;                                     // P_0 F_0 (F_1 = 0)
  const double P0 = (r.probs(2, 0) + r.probs(3, 0)) / 2, P1 = 1 - P0;
  const double l1 = P0 * 0.5 + P1 * 0.5;                          // one token per expert
  std::vector<Routing> layers = {r};
  const double got = BalanceLoss<double>({.kind = BalanceKind::MoLE, .weight = 2.0}).forward(pointers(layers), tokens);
  EXPECT_NEAR(got, 2.0 * (l0 + l1) / 2, 1e-14);
}

TEST(BalanceLoss, GradientCheckEveryKindAndScope) {
  Rng rng(1);
  const std::size_t L = 3, n = 10, K = 4;
  std::vector<Routing> layers = random_layers(rng, L, n, K, 1);
  Tokens tokens{.mask = Tensor<double>{1, 1, 0, 1, 1, 1, 1, 0, 1, 1}, .sample_ids = Index(), .samples = 3};
  batch_sample_ids(2, 5, tokens.sample_ids);
  tokens.sample_ids(9) = 2;  // an uneven third sample
  for (auto kind : {BalanceKind::MoLE, BalanceKind::Switch, BalanceKind::GShard, BalanceKind::ZLoss}) {
    for (auto scope : {BalanceScope::PerLayer, BalanceScope::AcrossLayers}) {
      BalanceLoss<double> loss_fn({.kind = kind, .weight = 0.7, .scope = scope});
      std::vector<RouterGrad<double>> grads(L);
      std::vector<RouterGrad<double>*> gp;
      for (auto& g : grads) gp.push_back(&g);
      loss_fn.backward(pointers(layers), tokens, gp, 1.5);
      auto loss = [&] { return 1.5 * double(loss_fn.forward(pointers(layers), tokens)); };
      for (std::size_t l = 0; l < L; ++l) {
        if (kind == BalanceKind::ZLoss) {
          EXPECT_LT(gradient_error(loss, layers[l].logits, grads[l].dlogits), 1e-6);
          EXPECT_FALSE(detail::present(grads[l].dprobs));
        } else {
          EXPECT_LT(gradient_error(loss, layers[l].probs, grads[l].dprobs), 1e-6);
          for (std::size_t j = 0; j < K; ++j) EXPECT_EQ(grads[l].dprobs(2, j), 0.0);  // padding
        }
      }
    }
  }
}

// A backward handed the forward's counts gives exactly the gradients of one that counts again; counts of another
// number of groups are refused.
TEST(BalanceLoss, BackwardFromTheForwardCountsEqualsRecounting) {
  Rng rng(5);
  const std::size_t L = 3, n = 10, K = 4;
  std::vector<Routing> layers = random_layers(rng, L, n, K, 2);
  Tokens tokens{.mask = Tensor<double>{1, 0, 1, 1, 1, 1, 1, 1, 0, 1}, .sample_ids = Index(), .samples = 2};
  batch_sample_ids(2, 5, tokens.sample_ids);
  for (auto kind : {BalanceKind::MoLE, BalanceKind::Switch, BalanceKind::GShard, BalanceKind::ZLoss}) {
    for (auto scope : {BalanceScope::PerLayer, BalanceScope::AcrossLayers}) {
      BalanceLoss<double> loss_fn({.kind = kind, .weight = 0.3, .scope = scope});
      BalanceLoss<double>::Counts counts;
      EXPECT_EQ(loss_fn.forward(pointers(layers), tokens, &counts), loss_fn.forward(pointers(layers), tokens));
      std::vector<RouterGrad<double>> kept(L), recounted(L);
      std::vector<RouterGrad<double>*> kp, rp;
      for (std::size_t l = 0; l < L; ++l) kp.push_back(&kept[l]), rp.push_back(&recounted[l]);
      loss_fn.backward(pointers(layers), tokens, kp, 2.0, &counts);
      loss_fn.backward(pointers(layers), tokens, rp, 2.0);
      for (std::size_t l = 0; l < L; ++l) {
        const bool z = kind == BalanceKind::ZLoss;
        EXPECT_EQ(max_abs_diff(z ? kept[l].dlogits : kept[l].dprobs, z ? recounted[l].dlogits : recounted[l].dprobs),
                  0.0);
      }
      const std::vector<const Routing*> two = {&layers[0], &layers[1]};
      std::vector<RouterGrad<double>*> two_grads = {kp[0], kp[1]};
      if (scope == BalanceScope::PerLayer) {
        EXPECT_THROW(loss_fn.backward(two, tokens, two_grads, 1.0, &counts), ShapeError);
      }
    }
  }
}

TEST(BalanceLoss, GradientsAccumulateIntoSharedBuffers) {
  Rng rng(2);
  std::vector<Routing> layers = {routing_from_logits(random_tensor<double>({5, 3}, rng))};
  RouterGrad<double> g;
  std::vector<RouterGrad<double>*> gp = {&g};
  BalanceLoss<double> sw({.kind = BalanceKind::Switch, .weight = 1.0}), z({.kind = BalanceKind::ZLoss, .weight = 1.0});
  sw.backward(pointers(layers), {}, gp);
  const Tensor<double> once = g.dprobs;
  sw.backward(pointers(layers), {}, gp);
  z.backward(pointers(layers), {}, gp);
  EXPECT_LT(max_abs_diff(g.dprobs, Tensor<double>(2.0 * once)), 1e-15);
  EXPECT_EQ(shape_of(g.dlogits), (Shape{5, 3}));
  g.clear();
  EXPECT_FALSE(detail::present(g.dprobs));
}

TEST(BalanceLoss, AcrossLayersPoolsTokensPerLayerSums) {
  Rng rng(3);
  Routing a = routing_from_logits(random_tensor<double>({6, 3}, rng)), b = routing_from_logits(random_tensor<double>({6, 3}, rng));
  for (auto kind : {BalanceKind::MoLE, BalanceKind::Switch, BalanceKind::GShard, BalanceKind::ZLoss}) {
    BalanceLoss<double> per({.kind = kind, .weight = 1.0}), across({.kind = kind, .weight = 1.0, .scope = BalanceScope::AcrossLayers});
    std::vector<Routing> same = {a, a};
    EXPECT_NEAR(per.forward(pointers(same), {}), 2 * across.forward(pointers(same), {}), 1e-14);
    std::vector<Routing> two = {a, b}, only_a = {a}, only_b = {b};
    EXPECT_NEAR(per.forward(pointers(two), {}), per.forward(pointers(only_a), {}) + per.forward(pointers(only_b), {}),
                1e-14);
  }
  // Two layers collapsed onto different experts look balanced when pooled, not per layer.
  Tensor<double> la = zeros<double>({4, 2}), lb = zeros<double>({4, 2});
  for (std::size_t i = 0; i < 4; ++i) la(i, 0) = lb(i, 1) = 3.0;
  std::vector<Routing> opposite = {routing_from_logits(la), routing_from_logits(lb)};
  BalanceLoss<double> per({.kind = BalanceKind::Switch, .weight = 1.0}),
      across({.kind = BalanceKind::Switch, .weight = 1.0, .scope = BalanceScope::AcrossLayers});
  EXPECT_NEAR(across.forward(pointers(opposite), {}), 1.0, 1e-12);
  EXPECT_GT(per.forward(pointers(opposite), {}) / 2, 1.8);
}

TEST(BalanceLoss, NumericAndConfigErrorsAreTyped) {
  Rng rng(4);
  std::vector<Routing> layers = {routing_from_logits(random_tensor<double>({4, 3}, rng))};
  layers[0].probs(1, 2) = NAN;
  try {
    BalanceLoss<double>({.kind = BalanceKind::Switch}).forward(pointers(layers), {});
    FAIL();
  } catch (const NumericError& e) {
    EXPECT_STREQ(e.what(), "switch_balance: loss is nan");
  }
  layers[0].logits(0, 0) = INFINITY;
  EXPECT_THROW(BalanceLoss<double>({.kind = BalanceKind::ZLoss}).forward(pointers(layers), {}), NumericError);
  EXPECT_THROW(BalanceLoss<double>({.weight = -1.0}), ConfigError);

  std::vector<Routing> ok = {routing_from_logits(random_tensor<double>({4, 3}, rng))};
  BalanceLoss<double> mole({.kind = BalanceKind::MoLE});
  Tokens bad_ids{.sample_ids = ids({0, 1, 2, 0}), .samples = 2};
  EXPECT_THROW(mole.forward(pointers(ok), bad_ids), ConfigError);
  Tokens bad_mask{.mask = Tensor<double>{1, 1}};
  EXPECT_THROW(mole.forward(pointers(ok), bad_mask), ShapeError);
  std::vector<RouterGrad<double>*> none;
  EXPECT_THROW(mole.backward(pointers(ok), {}, none), ShapeError);
  std::vector<Routing> empty_routing(1);  // what a K = 1 LoRAExperts leaves in its cache
  EXPECT_THROW(mole.forward(pointers(empty_routing), {}), ShapeError);
}

TEST(BalanceLoss, RouterWeightGradientThroughTopKRouter) {
  Rng rng(5);
  TopKRouter<double> router({.in = 5, .experts = 3}, rng);
  Tensor<double> x = random_tensor<double>({2, 6, 5}, rng);
  Tokens tokens;
  batch_sample_ids(2, 6, tokens.sample_ids);
  tokens.samples = 2;
  for (auto kind : {BalanceKind::MoLE, BalanceKind::ZLoss}) {
    BalanceLoss<double> loss_fn({.kind = kind, .weight = 0.5});
    auto loss = [&] {
      TopKRouter<double>::Cache c;
      const Routing* r = &router.forward(x, c);
      return double(loss_fn.forward(std::span<const Routing* const>(&r, 1), tokens));
    };
    router.weight().zero_grad();
    TopKRouter<double>::Cache cache;
    const Routing* r = &router.forward(x, cache);
    RouterGrad<double> g;
    RouterGrad<double>* gp = &g;
    loss_fn.backward(std::span<const Routing* const>(&r, 1), tokens, std::span<RouterGrad<double>* const>(&gp, 1));
    const Tensor<double> dx = router.backward(cache, g.dprobs, g.dlogits);
    EXPECT_LT(gradient_error(loss, router.weight().value, router.weight().grad), 1e-6);
    EXPECT_LT(gradient_error(loss, x, dx), 1e-6);
  }
}

TEST(BalanceLoss, ReferenceMoLETrainsTheRouterOnlyThroughTheBalanceLoss) {
  // Sparse LoRAExperts without gate scaling: the task loss gives the router nothing, the balance loss does.
  Rng rng(6);
  using Layer = LoRAExperts<double>;
  const Layer::Config cfg{.dim = 5, .hidden = 8, .experts = 3, .rank = 2, .alpha = 4.0, .dropout = 0.0};
  Layer layer(cfg, rng);
  layer.router()->weight().value *= 4.0;
  Tensor<double> x = random_tensor<double>({2, 4, 5}, rng), R = random_tensor<double>({2, 4, 5}, rng);
  Tokens tokens;
  batch_sample_ids(2, 4, tokens.sample_ids);
  tokens.samples = 2;
  BalanceLoss<double> mole({.kind = BalanceKind::MoLE, .weight = 0.1, .scope = BalanceScope::AcrossLayers});
  auto loss = [&] {
    Layer::Cache c;
    const double task = dot(layer.forward(x, c), R);
    const Routing* r = &c.router.routing;
    return task + double(mole.forward(std::span<const Routing* const>(&r, 1), tokens));
  };
  Layer::Cache cache;
  layer.forward(x, cache);
  const Routing* r = &cache.router.routing;
  RouterGrad<double> g;
  RouterGrad<double>* gp = &g;
  mole.backward(std::span<const Routing* const>(&r, 1), tokens, std::span<RouterGrad<double>* const>(&gp, 1));
  const Tensor<double> dx = layer.backward(cache, R, g);
  EXPECT_LT(gradient_error(loss, layer.router()->weight().value, layer.router()->weight().grad), 1e-6);
  EXPECT_LT(gradient_error(loss, layer.router()->bias().value, layer.router()->bias().grad), 1e-6);
  EXPECT_LT(gradient_error(loss, x, dx), 1e-6);
  EXPECT_GT(xt::amax(xt::abs(layer.router()->weight().grad))(), 1e-8);
}

TEST(RouterStats, UsageFractionsPerLayerAndGroup) {
  RouterStats<double> stats(3, 2);
  Routing r0 = routing_from_logits(Tensor<double>{{5, 0, 0}, {5, 0, 0}, {0, 5, 0}, {0, 0, 5}});
  Routing r1 = routing_from_logits(Tensor<double>{{0, 5, 0}, {0, 5, 0}, {0, 5, 0}, {0, 5, 0}});
  const Index domain = ids({0, 0, 1, 1});
  stats.record(0, r0, domain);
  stats.record(2, r1, domain, Tensor<double>{1, 1, 1, 0});
  EXPECT_EQ(stats.layers(), 3u);
  EXPECT_EQ(stats.usage(0), (std::vector<double>{0.5, 0.25, 0.25}));
  EXPECT_EQ(stats.usage(0, 0), (std::vector<double>{1.0, 0.0, 0.0}));
  EXPECT_EQ(stats.usage(0, 1), (std::vector<double>{0.0, 0.5, 0.5}));
  EXPECT_EQ(stats.usage(1), (std::vector<double>{0.0, 0.0, 0.0}));  // a layer between records
  EXPECT_EQ(stats.usage(2), (std::vector<double>{0.0, 1.0, 0.0}));
  EXPECT_EQ(stats.tokens(2), 3.0);
  const auto mp = stats.mean_probs(0);
  EXPECT_NEAR(mp[0] + mp[1] + mp[2], 1.0, 1e-12);
  EXPECT_NEAR(mp[0], (2 * r0.probs(0, 0) + 2 * r0.probs(2, 0)) / 4, 1e-12);
  EXPECT_NEAR(stats.mean_probs(0, 0)[0], r0.probs(0, 0), 1e-12);
  stats.record(0, r0, domain);  // a second micro-batch adds up
  EXPECT_EQ(stats.tokens(0), 8.0);
  EXPECT_EQ(stats.usage(0), (std::vector<double>{0.5, 0.25, 0.25}));
  stats.reset();
  EXPECT_EQ(stats.layers(), 0u);
  EXPECT_THROW(stats.usage(0), ConfigError);
}

TEST(RouterStats, TopKCountsEverySlotAndChecksInputs) {
  Rng rng(7);
  RouterStats<double> stats(4);
  Routing r = routing_from_logits(random_tensor<double>({9, 4}, rng), 2);
  stats.record(0, r);
  const auto u = stats.usage(0);
  double sum = 0;
  for (std::size_t j = 0; j < 4; ++j) {
    EXPECT_NEAR(u[j], double(r.counts(j)) / 18.0, 1e-15);
    sum += u[j];
  }
  EXPECT_NEAR(sum, 1.0, 1e-15);
  EXPECT_THROW(stats.record(0, routing_from_logits(zeros<double>({2, 3}))), ShapeError);
  EXPECT_THROW(stats.record(0, r, ids({0, 0, 0, 0, 0, 0, 0, 0, 1})), ConfigError);
  EXPECT_THROW(stats.usage(0, 1), ConfigError);
  EXPECT_THROW(RouterStats<double>(0), ConfigError);
}
