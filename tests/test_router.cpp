#include <gtest/gtest.h>

#include <cmath>
#include <numeric>

#include "mixpeft/layers/router.hpp"
#include "mixpeft/ops/matmul.hpp"
#include "mixpeft/testing/gradcheck.hpp"

using namespace mixpeft;
using namespace mixpeft::testing;

namespace {

using Index = Tensor<std::int32_t>;

Index column(std::vector<std::int32_t> v) {
  Index t = empty<std::int32_t>({v.size(), 1});
  std::copy(v.begin(), v.end(), t.begin());
  return t;
}

// Smallest gap between the k-th and (k+1)-th largest probability of any row: a top-k choice cannot flip
// under finite-difference perturbations when this is large compared with the step.
double min_top_k_gap(const Tensor<double>& p, std::size_t k) {
  double gap = INFINITY;
  for (std::size_t i = 0; i < p.shape()[0]; ++i) {
    std::vector<double> row(p.data() + i * p.shape()[1], p.data() + (i + 1) * p.shape()[1]);
    std::sort(row.rbegin(), row.rend());
    if (k < row.size()) gap = std::min(gap, row[k - 1] - row[k]);
  }
  return gap;
}

template <class Router>
ParameterList<double> params(Router& r) {
  return parameters_of<double>(r);
}

}  // namespace

// ---------------------------------------------------------------- SoftRouter

TEST(SoftRouter, ForwardHandComputed) {
  Rng rng(1);
  SoftRouter<double> router({.in = 2, .experts = 2, .temperature = 2.0}, rng);
  router.weight().value = Tensor<double>{{1.0, 0.0}, {0.0, 1.0}};
  router.bias().value = Tensor<double>{0.5, -0.5};
  SoftRouter<double>::Cache cache;
  const Tensor<double> p = router.forward(Tensor<double>{{1.0, 3.0}}, cache);
  // logits = ([1, 3] + [0.5, -0.5]) / 2 = [0.75, 1.25]
  const double e0 = std::exp(0.75), e1 = std::exp(1.25);
  EXPECT_NEAR(p(0, 0), e0 / (e0 + e1), 1e-15);
  EXPECT_NEAR(p(0, 1), e1 / (e0 + e1), 1e-15);
}

TEST(SoftRouter, GradientCheckWithLeadingAxesAndTemperature) {
  Rng rng(2);
  SoftRouter<double> router({.in = 5, .experts = 3, .temperature = 1.7}, rng);
  Tensor<double> x = random_tensor<double>({2, 3, 5}, rng), R = random_tensor<double>({2, 3, 3}, rng);
  SoftRouter<double>::Cache cache;
  auto loss = [&] {
    SoftRouter<double>::Cache c;
    return dot(router.forward(x, c), R);
  };
  const Tensor<double> p = router.forward(x, cache);
  ASSERT_EQ(shape_of(p), (Shape{2, 3, 3}));
  const Tensor<double> dx = router.backward(cache, R);
  EXPECT_LT(gradient_error(loss, x, dx), 1e-6);
  EXPECT_LT(gradient_error(loss, router.weight().value, router.weight().grad), 1e-6);
  EXPECT_LT(gradient_error(loss, router.bias().value, router.bias().grad), 1e-6);
}

TEST(SoftRouter, ParameterNamesInitAndFrozen) {
  Rng rng(3);
  SoftRouter<double> router({.in = 400, .experts = 2}, rng);
  auto list = params(router);
  ASSERT_EQ(list.size(), 2u);
  EXPECT_EQ(list[0].name, "weight");
  EXPECT_EQ(list[1].name, "bias");
  EXPECT_FALSE(list[1].param->weight_decay);
  const double bound = 1.0 / std::sqrt(400.0);  // nn.Linear default for both weight and bias
  EXPECT_LE(xt::amax(xt::abs(router.weight().value))(), bound);
  EXPECT_GT(xt::amax(xt::abs(router.weight().value))(), 0.9 * bound);
  EXPECT_LE(xt::amax(xt::abs(router.bias().value))(), bound);

  SoftRouter<double> no_bias({.in = 4, .experts = 2, .bias = false}, rng);
  EXPECT_EQ(params(no_bias).size(), 1u);
  no_bias.weight().set_trainable(false);
  SoftRouter<double>::Cache cache;
  Tensor<double> x = random_tensor<double>({3, 4}, rng);
  no_bias.forward(x, cache);
  const Tensor<double> dx = no_bias.backward(cache, random_tensor<double>({3, 2}, rng));
  EXPECT_EQ(shape_of(dx), (Shape{3, 4}));
  EXPECT_EQ(no_bias.weight().grad.size(), 0u);
}

TEST(SoftRouter, BadConfigAndShapesAreTyped) {
  Rng rng(4);
  EXPECT_THROW(SoftRouter<double>({.in = 0, .experts = 2}, rng), ConfigError);
  EXPECT_THROW(SoftRouter<double>({.in = 3, .experts = 0}, rng), ConfigError);
  EXPECT_THROW(SoftRouter<double>({.in = 3, .experts = 2, .temperature = 0.0}, rng), ConfigError);
  SoftRouter<double> router({.in = 3, .experts = 2}, rng);
  SoftRouter<double>::Cache cache;
  try {
    router.forward(zeros<double>({4, 5}), cache);
    FAIL();
  } catch (const ShapeError& e) {
    EXPECT_STREQ(e.what(), "SoftRouter: x has shape [4, 5], expected [..., 3]");
  }
  router.forward(zeros<double>({4, 3}), cache);
  EXPECT_THROW(router.backward(cache, zeros<double>({4, 3})), ShapeError);
}

// ---------------------------------------------------------------- routing ops

TEST(RoutingOps, TopKOrderAndTies) {
  Tensor<double> p = {{0.1, 0.6, 0.3}, {0.4, 0.2, 0.4}}, gates;
  Index experts;
  top_k_forward(p, 2, experts, gates);
  EXPECT_EQ(experts, (Index{{1, 2}, {0, 2}}));  // tie between 0 and 2 -> 0 first
  EXPECT_EQ(gates, (Tensor<double>{{0.6, 0.3}, {0.4, 0.4}}));
  Tensor<double> dprobs = zeros<double>({2, 3});
  top_k_backward(experts, Tensor<double>{{1.0, 2.0}, {3.0, 4.0}}, dprobs);
  EXPECT_EQ(dprobs, (Tensor<double>{{0.0, 1.0, 2.0}, {3.0, 0.0, 4.0}}));
  EXPECT_THROW(top_k_forward(p, 4, experts, gates), ConfigError);
}

TEST(RoutingOps, GroupByExpertIsStableAndHandlesEmptyExperts) {
  Index experts = column({2, 0, 2, 0, 2}), counts, offsets, perm;
  group_by_expert(experts, 4, counts, offsets, perm);
  EXPECT_EQ(counts, (Index{2, 0, 3, 0}));
  EXPECT_EQ(offsets, (Index{0, 2, 2, 5, 5}));
  EXPECT_EQ(perm, (Index{1, 3, 0, 2, 4}));
  Index bad = column({5});
  EXPECT_THROW(group_by_expert(bad, 4, counts, offsets, perm), ConfigError);
}

TEST(RoutingOps, GatherAndScatterAddAreAdjoint) {
  Rng rng(5);
  // Top-2 assignments of 4 tokens: perm lists assignment ids i * 2 + s.
  Index experts = {{1, 0}, {0, 2}, {2, 1}, {1, 2}}, counts, offsets, perm;
  group_by_expert(experts, 3, counts, offsets, perm);
  Tensor<double> x = random_tensor<double>({4, 3}, rng), y = random_tensor<double>({8, 3}, rng), gx;
  gather_rows(x, perm, 2, gx);
  ASSERT_EQ(shape_of(gx), (Shape{8, 3}));
  for (std::size_t j = 0; j < 8; ++j)
    for (std::size_t c = 0; c < 3; ++c) EXPECT_EQ(gx(j, c), x(std::size_t(perm(j)) / 2, c));
  Tensor<double> sy = zeros<double>({4, 3});
  scatter_add_rows(y, perm, 2, sy);
  EXPECT_NEAR(dot(gx, y), dot(x, sy), 1e-12);
  EXPECT_THROW(scatter_add_rows(y, perm, 1, sy), ShapeError);
}

TEST(RoutingOps, RouterLinearMatchesTheLinearOp) {
  Rng rng(15);
  Tensor<double> x = random_tensor<double>({3, 100, 70}, rng), W = random_tensor<double>({6, 70}, rng),
                 b = random_tensor<double>({6}, rng), dl = random_tensor<double>({3, 100, 6}, rng);
  Tensor<double> l, ref, dx, dx_ref, dW = zeros<double>({6, 70}), dW_ref = zeros<double>({6, 70}),
                 db = zeros<double>({6}), db_ref = zeros<double>({6});
  router_linear_forward(x, W, &b, 0.5, l);
  linear_forward(x, W, &b, ref);
  EXPECT_LT(max_abs_diff(l, Tensor<double>(0.5 * ref)), 1e-12);
  router_linear_backward(x, W, dl, 0.5, dx, &dW, &db);
  const Tensor<double> half = 0.5 * dl;
  linear_backward(x, W, half, &dx_ref, &dW_ref, &db_ref);
  EXPECT_LT(max_abs_diff(dx, dx_ref), 1e-12);
  EXPECT_LT(max_abs_diff(dW, dW_ref), 1e-12);
  EXPECT_LT(max_abs_diff(db, db_ref), 1e-12);
  EXPECT_THROW(router_linear_forward(x, b, nullptr, 1.0, l), ShapeError);
}

// ---------------------------------------------------------------- TopKRouter

TEST(TopKRouter, ForwardHandComputedWithStableGrouping) {
  Rng rng(6);
  TopKRouter<double> router({.in = 2, .experts = 3}, rng);
  router.weight().value = Tensor<double>{{1, 0}, {0, 1}, {-1, -1}};
  router.bias().value = Tensor<double>{0, 0, 0};
  Tensor<double> x = {{2, 0}, {0, 2}, {-2, -2}, {3, 1}, {1, 3}};
  TopKRouter<double>::Cache cache;
  const auto& r = router.forward(x, cache);
  EXPECT_EQ(r.experts, column({0, 1, 2, 0, 1}));
  EXPECT_EQ(r.counts, (Index{2, 2, 1}));
  EXPECT_EQ(r.offsets, (Index{0, 2, 4, 5}));
  EXPECT_EQ(r.perm, (Index{0, 3, 1, 4, 2}));
  const double e2 = std::exp(2.0), e0 = 1.0, em2 = std::exp(-2.0);
  EXPECT_NEAR(r.gates(0, 0), e2 / (e2 + e0 + em2), 1e-15);
  EXPECT_NEAR(r.probs(0, 2), em2 / (e2 + e0 + em2), 1e-15);
  EXPECT_EQ(r.logits(2, 2), 4.0);
  EXPECT_EQ(r.tokens(), 5u);
  EXPECT_EQ(r.num_experts(), 3u);
}

TEST(TopKRouter, CountsSumToTokensTimesK) {
  Rng rng(7);
  for (std::size_t k : {1, 2, 3}) {
    TopKRouter<double> router({.in = 6, .experts = 4, .k = k}, rng);
    TopKRouter<double>::Cache cache;
    const auto& r = router.forward(random_tensor<double>({3, 9, 6}, rng), cache);
    EXPECT_EQ(std::accumulate(r.counts.begin(), r.counts.end(), 0), int(27 * k));
    EXPECT_EQ(r.offsets(4), int(27 * k));
    EXPECT_EQ(shape_of(r.experts), (Shape{27, k}));
    std::vector<int> sorted(r.perm.begin(), r.perm.end());
    std::sort(sorted.begin(), sorted.end());
    for (std::size_t a = 0; a < sorted.size(); ++a) EXPECT_EQ(sorted[a], int(a));  // a permutation
  }
}

TEST(TopKRouter, DeterministicWithoutNoiseEvenInTraining) {
  Rng rng(8);
  TopKRouter<double> router({.in = 5, .experts = 4}, rng);
  Tensor<double> x = random_tensor<double>({10, 5}, rng);
  TopKRouter<double>::Cache a, b;
  router.set_training(true);
  router.forward(x, a);
  router.forward(x, b);
  EXPECT_EQ(a.routing.probs, b.routing.probs);
  EXPECT_EQ(a.routing.experts, b.routing.experts);
  EXPECT_EQ(a.routing.perm, b.routing.perm);
}

TEST(TopKRouter, NoiseOnlyInTrainingAndSeeded) {
  for (auto noise : {RouterNoise::InputJitter, RouterNoise::LogitNoise}) {
    const TopKRouter<double>::Config cfg{.in = 5, .experts = 4, .noise = noise, .noise_level = 0.3};
    Rng r1(9), r2(9), r3(9);
    TopKRouter<double> noisy(cfg, r1), same_seed(cfg, r2);
    TopKRouter<double> clean({.in = 5, .experts = 4}, r3);
    Tensor<double> x = random_tensor<double>({6, 5}, r1);
    TopKRouter<double>::Cache c1, c2, c3;
    noisy.set_training(false);
    noisy.forward(x, c1);
    clean.forward(x, c3);
    EXPECT_EQ(c1.routing.logits, c3.routing.logits);  // eval: no noise
    noisy.set_training(true);
    noisy.forward(x, c1);
    same_seed.forward(x, c2);
    EXPECT_EQ(c1.routing.logits, c2.routing.logits);  // same seed, same noise
    EXPECT_GT(max_abs_diff(c1.routing.logits, c3.routing.logits), 1e-3);
  }
}

TEST(TopKRouter, GradientCheckThroughProbsGatesAndLogits) {
  Rng rng(10);
  for (std::size_t k : {1, 2}) {
    TopKRouter<double> router({.in = 4, .experts = 3, .k = k, .temperature = 0.8}, rng);
    Tensor<double> x = random_tensor<double>({7, 4}, rng, 1.5);
    const Tensor<double> Rp = random_tensor<double>({7, 3}, rng), Rl = random_tensor<double>({7, 3}, rng),
                         Rg = random_tensor<double>({7, k}, rng);
    auto loss = [&] {
      TopKRouter<double>::Cache c;
      const auto& r = router.forward(x, c);
      return dot(r.probs, Rp) + dot(r.logits, Rl) + dot(r.gates, Rg);
    };
    TopKRouter<double>::Cache cache;
    const auto& r = router.forward(x, cache);
    ASSERT_GT(min_top_k_gap(r.probs, k), 1e-3);
    Tensor<double> dprobs = Rp;
    top_k_backward(r.experts, Rg, dprobs);
    const Tensor<double> dx = router.backward(cache, dprobs, Rl);
    EXPECT_LT(gradient_error(loss, x, dx), 1e-6) << "k = " << k;
    EXPECT_LT(gradient_error(loss, router.weight().value, router.weight().grad), 1e-6);
    EXPECT_LT(gradient_error(loss, router.bias().value, router.bias().grad), 1e-6);
  }
}

TEST(TopKRouter, GradientCheckWithNoise) {
  // The noise is a constant of the step: rebuild the router from the same seed for every evaluation.
  for (auto noise : {RouterNoise::InputJitter, RouterNoise::LogitNoise}) {
    const TopKRouter<double>::Config cfg{.in = 4, .experts = 3, .noise = noise, .noise_level = 0.2};
    Rng data(11);
    Tensor<double> x = random_tensor<double>({5, 4}, data), R = random_tensor<double>({5, 3}, data);
    Rng init(12);
    TopKRouter<double> router(cfg, init);
    auto loss = [&] {
      Rng again(12);
      TopKRouter<double> fresh(cfg, again);
      fresh.weight().value = router.weight().value;
      fresh.bias().value = router.bias().value;
      TopKRouter<double>::Cache c;
      return dot(fresh.forward(x, c).probs, R);
    };
    TopKRouter<double>::Cache cache;
    router.forward(x, cache);
    const Tensor<double> dx = router.backward(cache, R, Tensor<double>());
    EXPECT_LT(gradient_error(loss, x, dx), 1e-6);
    EXPECT_LT(gradient_error(loss, router.weight().value, router.weight().grad), 1e-6);
  }
}

TEST(TopKRouter, AbsentGradientsAreZeroAndShapesAreChecked) {
  Rng rng(13);
  TopKRouter<double> router({.in = 3, .experts = 2}, rng);
  TopKRouter<double>::Cache cache;
  router.forward(random_tensor<double>({2, 4, 3}, rng), cache);
  RouterGrad<double> none;
  const Tensor<double> dx = router.backward(cache, none.dprobs, none.dlogits);
  EXPECT_EQ(shape_of(dx), (Shape{2, 4, 3}));
  EXPECT_EQ(xt::amax(xt::abs(dx))(), 0.0);
  EXPECT_EQ(xt::amax(xt::abs(router.weight().grad))(), 0.0);
  EXPECT_THROW(router.backward(cache, zeros<double>({7, 2}), none.dlogits), ShapeError);
}

TEST(TopKRouter, BadConfigIsTyped) {
  Rng rng(14);
  EXPECT_THROW(TopKRouter<double>({.in = 3, .experts = 2, .k = 3}, rng), ConfigError);
  EXPECT_THROW(TopKRouter<double>({.in = 3, .experts = 2, .k = 0}, rng), ConfigError);
  EXPECT_THROW(TopKRouter<double>({.in = 3, .experts = 0}, rng), ConfigError);
  EXPECT_THROW(TopKRouter<double>({.in = 3, .experts = 2, .noise = RouterNoise::InputJitter, .noise_level = 1.0}, rng),
               ConfigError);
  EXPECT_THROW(TopKRouter<double>({.in = 3, .experts = 2, .noise = RouterNoise::LogitNoise, .noise_level = -1.0}, rng),
               ConfigError);
  try {
    TopKRouter<double>({.in = 3, .experts = 2, .temperature = -1.0}, rng);
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_STREQ(e.what(), "TopKRouter: temperature must be > 0 (got -1)");
  }
}
