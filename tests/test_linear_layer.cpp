#include <gtest/gtest.h>

#include <cmath>

#include "mixpeft/layers/linear.hpp"
#include "mixpeft/testing/gradcheck.hpp"

using namespace mixpeft;
using namespace mixpeft::testing;

namespace {
using LinearD = Linear<double>;

LinearD make(std::size_t in, std::size_t out, bool bias = true, bool train_w = true, bool train_b = true,
             std::uint64_t seed = 1) {
  Rng rng(seed);
  return LinearD({.in = in, .out = out, .bias = bias, .trainable_weight = train_w, .trainable_bias = train_b}, rng);
}
}  // namespace

TEST(LinearLayer, ForwardHandComputed) {
  auto layer = make(2, 3);
  layer.weight().value = Tensor<double>{{1, 0}, {0, 1}, {1, 1}};
  layer.bias().value = Tensor<double>{0.5, -0.5, 1};
  LinearD::Cache cache;
  const Tensor<double> y = layer.forward(Tensor<double>{{1, 2}, {3, 4}}, cache);
  EXPECT_EQ(y, (Tensor<double>{{1.5, 1.5, 4}, {3.5, 3.5, 8}}));
}

TEST(LinearLayer, InitFollowsNnLinear) {
  auto layer = make(64, 32);
  const double bound = 1.0 / std::sqrt(64.0);
  for (double v : layer.weight().value) EXPECT_LE(std::abs(v), bound);
  for (double v : layer.bias().value) EXPECT_LE(std::abs(v), bound);
  EXPECT_GT(xt::amax(xt::abs(layer.weight().value))(), 0.9 * bound);
}

TEST(LinearLayer, ParameterNamesAndDecay) {
  auto layer = make(4, 3);
  auto params = parameters_of<double>(layer, "model.q_proj");
  ASSERT_EQ(params.size(), 2u);
  EXPECT_EQ(params[0].name, "model.q_proj.weight");
  EXPECT_EQ(params[1].name, "model.q_proj.bias");
  EXPECT_TRUE(params[0].param->weight_decay);
  EXPECT_FALSE(params[1].param->weight_decay);
  auto no_bias = make(4, 3, false);
  EXPECT_EQ(parameters_of<double>(no_bias).size(), 1u);
}

TEST(LinearLayer, GradientCheckAllParametersAndInput) {
  auto layer = make(5, 4);
  Rng rng(2);
  Tensor<double> x = random_tensor<double>({2, 3, 5}, rng), R = random_tensor<double>({2, 3, 4}, rng);
  auto loss = [&] {
    LinearD::Cache c;
    return dot(layer.forward(x, c), R);
  };
  LinearD::Cache cache;
  layer.forward(x, cache);
  Tensor<double> dx = layer.backward(cache, R);
  ASSERT_EQ(shape_of(dx), shape_of(x));
  EXPECT_LT(gradient_error(loss, x, dx), 1e-6);
  const Tensor<double> dW = layer.weight().grad, db = layer.bias().grad;
  EXPECT_LT(gradient_error(loss, layer.weight().value, dW), 1e-6);
  EXPECT_LT(gradient_error(loss, layer.bias().value, db), 1e-6);
}

TEST(LinearLayer, FrozenWeightGetsNoGradientAndNoCache) {
  auto layer = make(5, 4, true, /*train_w=*/false, /*train_b=*/false);
  Rng rng(3);
  Tensor<double> x = random_tensor<double>({6, 5}, rng), R = random_tensor<double>({6, 4}, rng);
  LinearD::Cache cache;
  layer.forward(x, cache);
  EXPECT_EQ(cache.x.dimension(), 0u);  // never written: a frozen layer caches nothing
  const Tensor<double> dx = layer.backward(cache, R);
  EXPECT_EQ(layer.weight().grad.size(), 0u);
  EXPECT_EQ(layer.bias().grad.size(), 0u);
  auto loss = [&] {
    LinearD::Cache c;
    return dot(layer.forward(x, c), R);
  };
  EXPECT_LT(gradient_error(loss, x, dx), 1e-6);
}

TEST(LinearLayer, FrozenWeightTrainableBias) {
  auto layer = make(3, 2, true, /*train_w=*/false, /*train_b=*/true);
  Rng rng(4);
  Tensor<double> x = random_tensor<double>({4, 3}, rng), R = random_tensor<double>({4, 2}, rng);
  LinearD::Cache cache;
  layer.forward(x, cache);
  layer.backward(cache, R);
  EXPECT_EQ(layer.weight().grad.size(), 0u);
  EXPECT_NEAR(layer.bias().grad(1), R(0, 1) + R(1, 1) + R(2, 1) + R(3, 1), 1e-12);
}

TEST(LinearLayer, GradientsAccumulate) {
  auto layer = make(3, 2);
  Rng rng(5);
  Tensor<double> x = random_tensor<double>({4, 3}, rng), R = random_tensor<double>({4, 2}, rng);
  LinearD::Cache cache;
  layer.forward(x, cache);
  layer.backward(cache, R);
  const Tensor<double> once = layer.weight().grad;
  layer.backward(cache, R);
  EXPECT_LT(max_abs_diff(layer.weight().grad, Tensor<double>(2.0 * once)), 1e-12);
}

TEST(LinearLayer, BadConfigThrows) {
  Rng rng(0);
  EXPECT_THROW(LinearD({.in = 0, .out = 3}, rng), ConfigError);
  try {
    LinearD({.in = 4, .out = 0}, rng);
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_STREQ(e.what(), "Linear: in and out must be > 0 (got in = 4, out = 0)");
  }
}

TEST(LinearLayer, WrongShapesThrow) {
  auto layer = make(4, 3);
  LinearD::Cache cache;
  try {
    layer.forward(zeros<double>({2, 5}), cache);
    FAIL();
  } catch (const ShapeError& e) {
    EXPECT_STREQ(e.what(), "Linear: x has shape [2, 5], expected [..., 4]");
  }
  layer.forward(zeros<double>({2, 4}), cache);
  EXPECT_THROW(layer.backward(cache, zeros<double>({2, 4})), ShapeError);
  EXPECT_THROW(layer.backward(cache, zeros<double>({3, 3})), ShapeError);
}
