#include <gtest/gtest.h>

#include "mixpeft/layers/adapter.hpp"
#include "mixpeft/layers/linear.hpp"
#include "mixpeft/testing/gradcheck.hpp"

using namespace mixpeft;
using namespace mixpeft::testing;

namespace {
using AdapterD = Adapter<double>;

// An adapter with every parameter non-zero, so each gradient path carries signal.
AdapterD make(std::size_t d, std::size_t h, std::size_t g, double dropout, std::uint64_t seed = 1) {
  Rng rng(seed);
  AdapterD layer({.dim = d, .hidden = h, .groups = g, .scale = 0.7, .dropout = dropout}, rng);
  layer.a().value = random_tensor<double>({h}, rng);
  layer.B().value = random_tensor<double>({d, h / g}, rng);
  layer.b().value = random_tensor<double>({d}, rng);
  return layer;
}

Tensor<double> run(AdapterD layer, const Tensor<double>& x) {  // by value: a copy replays the same dropout mask
  AdapterD::Cache cache;
  return layer.forward(x, cache);
}

// Reference: the grouped up-projection expanded into a dense block-diagonal [d, h] matrix.
Tensor<double> dense_up(const Tensor<double>& B, std::size_t groups) {
  const std::size_t d = B.shape()[0], hg = B.shape()[1], dg = d / groups;
  Tensor<double> dense = zeros<double>({d, hg * groups});
  for (std::size_t i = 0; i < d; ++i)
    for (std::size_t c = 0; c < hg; ++c) dense(i, (i / dg) * hg + c) = B(i, c);
  return dense;
}

void gradient_check(const AdapterD& layer, const Shape& x_shape) {
  Rng rng(7);
  Tensor<double> x = random_tensor<double>(x_shape, rng);
  AdapterD probe = layer;
  AdapterD::Cache cache;
  const Tensor<double> y = probe.forward(x, cache);
  const Tensor<double> R = random_tensor<double>(shape_of(y), rng);
  const Tensor<double> dx = probe.backward(cache, R);
  ASSERT_EQ(shape_of(dx), x_shape);
  AdapterD perturbed = layer;
  auto loss = [&] { return dot(run(perturbed, x), R); };
  EXPECT_LT(gradient_error(loss, x, dx), 1e-6);
  EXPECT_LT(gradient_error(loss, perturbed.A().value, probe.A().grad), 1e-6);
  EXPECT_LT(gradient_error(loss, perturbed.a().value, probe.a().grad), 1e-6);
  EXPECT_LT(gradient_error(loss, perturbed.B().value, probe.B().grad), 1e-6);
  EXPECT_LT(gradient_error(loss, perturbed.b().value, probe.b().grad), 1e-6);
}
}  // namespace

TEST(Adapter, FreshAdapterIsExactlyTheIdentity) {
  Rng rng(1);
  AdapterD layer({.dim = 16, .hidden = 8}, rng);  // training mode, dropout 0.1
  const Tensor<double> x = random_tensor<double>({2, 5, 16}, rng);
  EXPECT_EQ(run(layer, x), x);
  for (double v : layer.B().value) EXPECT_EQ(v, 0.0);
  for (double v : layer.a().value) EXPECT_EQ(v, 0.0);
  EXPECT_EQ(shape_of(layer.B().value), (Shape{16, 4}));
  const double bound = std::sqrt(6.0 / (16 + 8));  // xavier
  for (double v : layer.A().value) EXPECT_LE(std::abs(v), bound);
}

TEST(Adapter, ForwardHandComputed) {
  Rng rng(0);
  AdapterD layer({.dim = 2, .hidden = 2, .groups = 2, .scale = 2.0, .dropout = 0.0}, rng);
  layer.A().value = Tensor<double>{{1.0, 0.0}, {1.0, 1.0}};
  layer.a().value = Tensor<double>{0.0, -1.0};
  layer.B().value = Tensor<double>{3.0, 5.0};
  layer.B().value.reshape({2, 1});
  layer.b().value = Tensor<double>{1.0, 0.0};
  // x = [1, 2]: z = [1, 2]; group 0: 3 * 1 + 1 = 4, group 1: 5 * 2 + 0 = 10; out = x + 2 * [4, 10]
  EXPECT_EQ(run(layer, Tensor<double>{{1.0, 2.0}, {0.0, 0.0}}), (Tensor<double>{{9.0, 22.0}, {2.0, -10.0}}));
}

TEST(Adapter, GroupedEqualsDenseBlockDiagonal) {
  for (std::size_t g : {1u, 2u, 4u}) {
    auto layer = make(8, 8, g, 0.0);
    Rng rng(2);
    const Tensor<double> x = random_tensor<double>({5, 8}, rng);
    Tensor<double> z, ref;
    linear_forward(x, layer.A().value, &layer.a().value, z);
    const Tensor<double> dense = dense_up(layer.B().value, g);
    linear_forward(z, dense, &layer.b().value, ref);
    ref = x + 0.7 * ref;
    EXPECT_LT(max_abs_diff(run(layer, x), ref), 1e-12) << "groups = " << g;
  }
}

TEST(Adapter, GradientCheckEval) {
  auto layer = make(6, 4, 2, 0.5);
  layer.set_training(false);
  gradient_check(layer, {2, 3, 6});
}

TEST(Adapter, GradientCheckOneGroup) { gradient_check(make(6, 3, 1, 0.0), {4, 6}); }

TEST(Adapter, GradientCheckWithDropoutFixedSeed) {
  auto layer = make(8, 4, 2, 0.3);
  gradient_check(layer, {3, 4, 8});
  Rng rng(3);
  const Tensor<double> x = random_tensor<double>({4, 8}, rng);
  AdapterD eval = layer;
  eval.set_training(false);
  EXPECT_GT(max_abs_diff(run(layer, x), run(eval, x)), 1e-6);
}

TEST(Adapter, FrozenParametersGetNoGradients) {
  auto layer = make(6, 4, 2, 0.2);
  layer.A().set_trainable(false);
  layer.a().set_trainable(false);
  layer.b().set_trainable(false);
  Rng rng(4);
  const Tensor<double> x = random_tensor<double>({3, 6}, rng);
  AdapterD::Cache cache;
  const Tensor<double> y = layer.forward(x, cache);
  EXPECT_EQ(cache.x.dimension(), 0u);  // x is needed only for dA and da
  layer.backward(cache, y);
  EXPECT_EQ(layer.A().grad.size(), 0u);
  EXPECT_EQ(layer.a().grad.size(), 0u);
  EXPECT_EQ(layer.b().grad.size(), 0u);
  EXPECT_GT(xt::amax(xt::abs(layer.B().grad))(), 0.0);
  auto params = parameters_of<double>(layer);
  EXPECT_EQ(count_parameters(params, /*trainable_only=*/true), 6u * 2);
}

TEST(Adapter, ParameterNamesFollowLaVIN) {
  auto layer = make(8, 4, 2, 0.1);
  auto params = parameters_of<double>(layer, "layers.3.adapter_attn");
  ASSERT_EQ(params.size(), 4u);
  EXPECT_EQ(params[0].name, "layers.3.adapter_attn.conv_A.weight");
  EXPECT_EQ(params[1].name, "layers.3.adapter_attn.conv_A.bias");
  EXPECT_EQ(params[2].name, "layers.3.adapter_attn.conv_B.weight");
  EXPECT_EQ(params[3].name, "layers.3.adapter_attn.conv_B.bias");
  EXPECT_FALSE(params[1].param->weight_decay);
  EXPECT_TRUE(params[2].param->weight_decay);
}

TEST(Adapter, FoldMatchesEvalForwardAndFollowingLinear) {
  auto layer = make(8, 4, 2, 0.1);
  layer.set_training(false);
  Rng rng(5);
  const Tensor<double> x = random_tensor<double>({6, 8}, rng);
  const auto fold = layer.fold();
  Tensor<double> affine;
  linear_forward(x, fold.M, &fold.c, affine);  // x M^T + c = (M x + c) row-wise
  const Tensor<double> out = run(layer, x);
  EXPECT_LT(max_abs_diff(affine, out), 1e-12);

  Linear<double> q({.in = 8, .out = 5, .bias = false}, rng);
  const auto folded = fold_into_linear(fold, q.weight().value, nullptr);
  Linear<double> q_folded({.in = 8, .out = 5, .bias = true}, rng);
  q_folded.weight().value = folded.weight;
  q_folded.bias().value = folded.bias;
  Linear<double>::Cache c1, c2;
  EXPECT_LT(max_abs_diff(q_folded.forward(x, c1), q.forward(out, c2)), 1e-12);
}

TEST(Adapter, BadConfigThrows) {
  Rng rng(6);
  try {
    AdapterD({.dim = 8, .hidden = 6, .groups = 4}, rng);
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_STREQ(e.what(), "Adapter: groups (4) must divide hidden (6) and dim (8)");
  }
  EXPECT_THROW(AdapterD({.dim = 6, .hidden = 8, .groups = 4}, rng), ConfigError);
  EXPECT_THROW(AdapterD({.dim = 8, .hidden = 8, .groups = 0}, rng), ConfigError);
  EXPECT_THROW(AdapterD({.dim = 0}, rng), ConfigError);
  EXPECT_THROW(AdapterD({.dim = 8, .hidden = 0}, rng), ConfigError);
  EXPECT_THROW(AdapterD({.dim = 8, .dropout = -0.1}, rng), ConfigError);
}

TEST(Adapter, WrongShapesThrow) {
  auto layer = make(8, 4, 2, 0.0);
  AdapterD::Cache cache;
  try {
    layer.forward(zeros<double>({3, 7}), cache);
    FAIL();
  } catch (const ShapeError& e) {
    EXPECT_STREQ(e.what(), "Adapter: x has shape [3, 7], expected [..., 8]");
  }
  layer.forward(zeros<double>({3, 8}), cache);
  EXPECT_THROW(layer.backward(cache, zeros<double>({3, 4})), ShapeError);
  EXPECT_THROW(layer.backward(cache, zeros<double>({2, 8})), ShapeError);
}
