#include <gtest/gtest.h>

#include <cmath>

#include <xtensor/xview.hpp>

#include "mixpeft/layers/linear.hpp"
#include "mixpeft/layers/mm_adapter.hpp"
#include "mixpeft/testing/gradcheck.hpp"

using namespace mixpeft;
using namespace mixpeft::testing;

namespace {
using MMA = MMAdapter<double>;

// A block with every parameter non-zero and a router whose weights are far from uniform.
MMA make(std::size_t d, std::size_t h, std::size_t g, double dropout, double tau = 10.0, std::uint64_t seed = 1) {
  Rng rng(seed);
  MMA layer({.dim = d, .hidden = h, .groups = g, .scale = 0.8, .dropout = dropout, .temperature = tau}, rng);
  layer.a().value = random_tensor<double>({h}, rng);
  layer.B().value = random_tensor<double>({d, h / g}, rng);
  layer.b().value = random_tensor<double>({d}, rng);
  layer.D().value = random_tensor<double>({d, h / g}, rng);
  layer.d().value = random_tensor<double>({d}, rng);
  layer.router().weight().value = random_tensor<double>({2, d}, rng, 3.0);
  layer.router().bias().value = random_tensor<double>({2}, rng);
  return layer;
}

Tensor<double> run(MMA layer, const Tensor<double>& x, const Tensor<double>& t) {  // by value: same dropout mask
  MMA::Cache cache;
  return layer.forward(x, t, cache);
}

Tensor<double> dense_up(const Tensor<double>& W, std::size_t groups) {
  const std::size_t d = W.shape()[0], hg = W.shape()[1], dg = d / groups;
  Tensor<double> dense = zeros<double>({d, hg * groups});
  for (std::size_t i = 0; i < d; ++i)
    for (std::size_t c = 0; c < hg; ++c) dense(i, (i / dg) * hg + c) = W(i, c);
  return dense;
}

void gradient_check(const MMA& layer, std::size_t nb, std::size_t nt) {
  const std::size_t d = layer.config().dim;
  Rng rng(7);
  Tensor<double> x = random_tensor<double>({nb, nt, d}, rng), t = random_tensor<double>({nb, d}, rng);
  MMA probe = layer;
  MMA::Cache cache;
  const Tensor<double> y = probe.forward(x, t, cache);
  const Tensor<double> R = random_tensor<double>(shape_of(y), rng);
  const MMA::Grads grads = probe.backward(cache, R);
  ASSERT_EQ(shape_of(grads.x), shape_of(x));
  ASSERT_EQ(shape_of(grads.route_tokens), shape_of(t));
  MMA perturbed = layer;
  auto loss = [&] { return dot(run(perturbed, x, t), R); };
  EXPECT_LT(gradient_error(loss, x, grads.x), 1e-6);
  EXPECT_LT(gradient_error(loss, t, grads.route_tokens), 1e-6);
  EXPECT_LT(gradient_error(loss, perturbed.A().value, probe.A().grad), 1e-6);
  EXPECT_LT(gradient_error(loss, perturbed.a().value, probe.a().grad), 1e-6);
  EXPECT_LT(gradient_error(loss, perturbed.B().value, probe.B().grad), 1e-6);
  EXPECT_LT(gradient_error(loss, perturbed.b().value, probe.b().grad), 1e-6);
  EXPECT_LT(gradient_error(loss, perturbed.D().value, probe.D().grad), 1e-6);
  EXPECT_LT(gradient_error(loss, perturbed.d().value, probe.d().grad), 1e-6);
  EXPECT_LT(gradient_error(loss, perturbed.router().weight().value, probe.router().weight().grad), 1e-6);
  EXPECT_LT(gradient_error(loss, perturbed.router().bias().value, probe.router().bias().grad), 1e-6);
}
}  // namespace

TEST(MMAdapter, FreshBlockIsExactlyTheIdentity) {
  Rng rng(1);
  MMA layer({.dim = 16}, rng);  // training mode, dropout 0.1
  const Tensor<double> x = random_tensor<double>({3, 5, 16}, rng), t = random_tensor<double>({3, 16}, rng);
  EXPECT_EQ(run(layer, x, t), x);
  const double bound = 1.0 / std::sqrt(16.0);  // router: nn.Linear init
  for (double v : layer.router().weight().value) EXPECT_LE(std::abs(v), bound);
}

TEST(MMAdapter, RoutingWeightsHandComputed) {
  Rng rng(2);
  MMA layer({.dim = 4, .temperature = 5.0}, rng);
  layer.router().weight().value = zeros<double>({2, 4});
  layer.router().bias().value = Tensor<double>{5.0 * std::log(3.0), 0.0};  // softmax([log 3, 0]) = [3/4, 1/4]
  const Tensor<double> w = layer.routing_weights(zeros<double>({1, 4}));
  EXPECT_NEAR(w(0, 0), 0.75, 1e-15);
  EXPECT_NEAR(w(0, 1), 0.25, 1e-15);
}

TEST(MMAdapter, ForwardMatchesDenseReference) {
  auto layer = make(8, 4, 2, 0.0);
  Rng rng(3);
  const Tensor<double> x = random_tensor<double>({2, 3, 8}, rng), t = random_tensor<double>({2, 8}, rng);
  const Tensor<double> out = run(layer, x, t);
  Tensor<double> logits, w, z, y0, y1;
  linear_forward(t, layer.router().weight().value, &layer.router().bias().value, logits);
  softmax_forward(Tensor<double>(logits / 10.0), w);
  linear_forward(x, layer.A().value, &layer.a().value, z);
  linear_forward(z, dense_up(layer.B().value, 2), &layer.b().value, y0);
  linear_forward(z, dense_up(layer.D().value, 2), &layer.d().value, y1);
  EXPECT_GT(std::abs(w(0, 0) - w(1, 0)), 0.05);  // the two sequences route differently
  for (std::size_t b = 0; b < 2; ++b)
    for (std::size_t i = 0; i < 3; ++i)
      for (std::size_t c = 0; c < 8; ++c)
        EXPECT_NEAR(out(b, i, c), x(b, i, c) + 0.8 * (w(b, 0) * y0(b, i, c) + w(b, 1) * y1(b, i, c)), 1e-12);
}

TEST(MMAdapter, GradientCheckEval) {
  auto layer = make(6, 4, 2, 0.5);
  layer.set_training(false);
  gradient_check(layer, 3, 4);
}

TEST(MMAdapter, GradientCheckOneGroupSharpRouter) { gradient_check(make(4, 4, 1, 0.0, 1.0), 2, 5); }

TEST(MMAdapter, GradientCheckWithDropoutFixedSeed) {
  auto layer = make(8, 4, 2, 0.3);
  gradient_check(layer, 2, 3);
  Rng rng(4);
  const Tensor<double> x = random_tensor<double>({2, 3, 8}, rng), t = random_tensor<double>({2, 8}, rng);
  MMA eval = layer;
  eval.set_training(false);
  EXPECT_GT(max_abs_diff(run(layer, x, t), run(eval, x, t)), 1e-6);
}

// The way a block uses it: the routing token is row 0 of x, and its gradient joins dx there.
TEST(MMAdapter, RoutingFromRowZeroComposes) {
  auto layer = make(6, 4, 2, 0.0, 2.0);
  Rng rng(5);
  Tensor<double> x = random_tensor<double>({2, 4, 6}, rng);
  const Tensor<double> R = random_tensor<double>({2, 4, 6}, rng);
  auto loss = [&] {
    const Tensor<double> t = xt::view(x, xt::all(), 0, xt::all());
    return dot(run(layer, x, t), R);
  };
  MMA::Cache cache;
  const Tensor<double> t = xt::view(x, xt::all(), 0, xt::all());
  layer.forward(x, t, cache);
  MMA::Grads grads = layer.backward(cache, R);
  xt::view(grads.x, xt::all(), 0, xt::all()) += grads.route_tokens;
  EXPECT_LT(gradient_error(loss, x, grads.x), 1e-6);
}

TEST(MMAdapter, FrozenParametersGetNoGradients) {
  auto layer = make(6, 4, 2, 0.1);
  for (auto& ref : parameters_of<double>(layer))
    if (ref.name.rfind("conv_B.", 0) != 0) ref.param->set_trainable(false);
  Rng rng(6);
  const Tensor<double> x = random_tensor<double>({2, 3, 6}, rng), t = random_tensor<double>({2, 6}, rng);
  MMA::Cache cache;
  const Tensor<double> y = layer.forward(x, t, cache);
  EXPECT_EQ(cache.x.dimension(), 0u);
  const MMA::Grads grads = layer.backward(cache, y);
  for (auto& ref : parameters_of<double>(layer)) {
    if (ref.name.rfind("conv_B.", 0) == 0) EXPECT_GT(xt::amax(xt::abs(ref.param->grad))(), 0.0) << ref.name;
    else EXPECT_EQ(ref.param->grad.size(), 0u) << ref.name;
  }
  EXPECT_GT(xt::amax(xt::abs(grads.route_tokens))(), 0.0);  // a frozen router still passes gradient to t
}

TEST(MMAdapter, ParameterNamesFollowLaVIN) {
  auto layer = make(8, 4, 2, 0.1);
  auto params = parameters_of<double>(layer, "layers.0.adapter_attn");
  const char* expected[] = {"conv_A.weight", "conv_A.bias", "conv_B.weight", "conv_B.bias",
                            "conv_D.weight", "conv_D.bias", "expert_weights.weight", "expert_weights.bias"};
  ASSERT_EQ(params.size(), 8u);
  for (std::size_t i = 0; i < 8; ++i) EXPECT_EQ(params[i].name, std::string("layers.0.adapter_attn.") + expected[i]);
  EXPECT_EQ(shape_of(params[4].param->value), (Shape{8, 2}));
  EXPECT_EQ(shape_of(params[6].param->value), (Shape{2, 8}));
  // LaVIN-7B per block: A 8*4096 + 8, B and D 4096*4 + 4096 each, router 2*4096 + 2 = 81,930 (SPEC 1.4).
  Rng rng(0);
  MMAdapter<float> big({.dim = 4096}, rng);
  EXPECT_EQ(count_parameters(parameters_of<float>(big), true), 81930u);
}

TEST(MMAdapter, FoldIntoQKVMatchesAdapterThenProjection) {
  auto layer = make(8, 4, 2, 0.1, 10.0, 9);
  layer.set_training(false);
  Rng rng(10);
  const Tensor<double> x = random_tensor<double>({2, 5, 8}, rng), t = random_tensor<double>({2, 8}, rng);
  const Tensor<double> out = run(layer, x, t);
  const Tensor<double> w = layer.routing_weights(t);
  Linear<double> q({.in = 8, .out = 8, .bias = false}, rng), k({.in = 8, .out = 4, .bias = false}, rng),
      v({.in = 8, .out = 4, .bias = true}, rng);
  for (std::size_t b = 0; b < 2; ++b) {
    const Tensor<double> w_b = xt::view(w, b, xt::all());
    const Tensor<double> x_b = xt::view(x, b, xt::all(), xt::all());
    const Tensor<double> out_b = xt::view(out, b, xt::all(), xt::all());
    const auto fold = layer.fold(w_b);
    for (Linear<double>* proj : {&q, &k, &v}) {
      const auto folded = fold_into_linear(fold, proj->weight().value,
                                           proj->has_bias() ? &proj->bias().value : nullptr);
      Linear<double> merged({.in = 8, .out = proj->config().out, .bias = true}, rng);
      merged.weight().value = folded.weight;
      merged.bias().value = folded.bias;
      Linear<double>::Cache c1, c2;
      EXPECT_LT(max_abs_diff(merged.forward(x_b, c1), proj->forward(out_b, c2)), 1e-12);
    }
  }
}

TEST(MMAdapter, BadConfigThrows) {
  Rng rng(11);
  try {
    MMA({.dim = 6, .hidden = 8, .groups = 4}, rng);
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_STREQ(e.what(), "MMAdapter: groups (4) must divide hidden (8) and dim (6)");
  }
  EXPECT_THROW(MMA({.dim = 8, .hidden = 6, .groups = 4}, rng), ConfigError);
  EXPECT_THROW(MMA({.dim = 0}, rng), ConfigError);
  EXPECT_THROW(MMA({.dim = 8, .groups = 0}, rng), ConfigError);
  EXPECT_THROW(MMA({.dim = 8, .dropout = 1.0}, rng), ConfigError);
  EXPECT_THROW(MMA({.dim = 8, .temperature = 0.0}, rng), ConfigError);
}

TEST(MMAdapter, WrongShapesThrow) {
  auto layer = make(8, 4, 2, 0.0);
  MMA::Cache cache;
  EXPECT_THROW(layer.backward(cache, zeros<double>({2, 3, 8})), ShapeError);
  try {
    layer.forward(zeros<double>({6, 8}), zeros<double>({2, 8}), cache);
    FAIL();
  } catch (const ShapeError& e) {
    EXPECT_STREQ(e.what(), "MMAdapter: x has shape [6, 8], expected [*, *, 8]");
  }
  try {
    layer.forward(zeros<double>({2, 3, 8}), zeros<double>({3, 8}), cache);
    FAIL();
  } catch (const ShapeError& e) {
    EXPECT_STREQ(e.what(), "MMAdapter: route_tokens has shape [3, 8], expected [2, 8]");
  }
  layer.forward(zeros<double>({2, 3, 8}), zeros<double>({2, 8}), cache);
  EXPECT_THROW(layer.backward(cache, zeros<double>({2, 4, 8})), ShapeError);
  EXPECT_THROW(layer.fold(zeros<double>({3})), ShapeError);
}
