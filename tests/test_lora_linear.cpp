#include <gtest/gtest.h>

#include <cmath>

#include "mixpeft/layers/lora_linear.hpp"
#include "mixpeft/testing/gradcheck.hpp"

using namespace mixpeft;
using namespace mixpeft::testing;

namespace {
using LoRA = LoRALinear<double>;

// A layer with a non-zero B, so every gradient path carries signal.
LoRA make(LoRA::AdapterConfig ac, bool bias = true, std::uint64_t seed = 1) {
  Rng rng(seed);
  LoRA layer({.in = 6, .out = 5, .bias = bias, .lora = ac}, rng);
  layer.lora_B().value = random_tensor<double>({5, ac.rank}, rng);
  return layer;
}

Tensor<double> run(LoRA layer, const Tensor<double>& x) {  // by value: a copy replays the same dropout mask
  LoRA::Cache cache;
  return layer.forward(x, cache);
}

// Checks dx, dA and dB of `layer` (in its current training mode) against central differences.
void gradient_check(const LoRA& layer, const Shape& x_shape) {
  Rng rng(7);
  Tensor<double> x = random_tensor<double>(x_shape, rng);
  LoRA probe = layer;  // the analytic pass runs on a copy with the same dropout stream
  LoRA::Cache cache;
  const Tensor<double> y = probe.forward(x, cache);
  const Tensor<double> R = random_tensor<double>(shape_of(y), rng);
  const Tensor<double> dx = probe.backward(cache, R);
  ASSERT_EQ(shape_of(dx), x_shape);
  LoRA perturbed = layer;
  auto loss = [&] { return dot(run(perturbed, x), R); };
  EXPECT_LT(gradient_error(loss, x, dx), 1e-6);
  EXPECT_LT(gradient_error(loss, perturbed.lora_A().value, probe.lora_A().grad), 1e-6);
  EXPECT_LT(gradient_error(loss, perturbed.lora_B().value, probe.lora_B().grad), 1e-6);
}
}  // namespace

TEST(LoRALinear, ForwardHandComputed) {
  Rng rng(0);
  LoRA layer({.in = 2, .out = 2, .bias = true, .lora = {.rank = 1, .alpha = 2.0, .dropout = 0.0}}, rng);
  layer.weight().value = Tensor<double>{{1, 0}, {0, 1}};
  layer.bias().value = Tensor<double>{1, -1};
  layer.lora_A().value = Tensor<double>{1.0, 1.0};
  layer.lora_A().value.reshape({1, 2});
  layer.lora_B().value = Tensor<double>{1.0, -2.0};
  layer.lora_B().value.reshape({2, 1});
  // s = 2; y = x + b + 2 * (x0 + x1) * [1, -2]
  const Tensor<double> y = run(layer, Tensor<double>{{1.0, 2.0}, {0.0, 0.0}});
  EXPECT_EQ(y, (Tensor<double>{{1.0 + 1 + 6, 2.0 - 1 - 12}, {1.0, -1.0}}));
}

TEST(LoRALinear, FreshAdapterEqualsBase) {
  Rng rng(1);
  LoRA layer({.in = 8, .out = 4, .lora = {.rank = 2}}, rng);
  Tensor<double> x = random_tensor<double>({3, 8}, rng), y_base;
  linear_forward(x, layer.weight().value, &layer.bias().value, y_base);
  EXPECT_LT(max_abs_diff(run(layer, x), y_base), 1e-15);
  const double bound = 1.0 / std::sqrt(8.0);
  for (double v : layer.lora_A().value) EXPECT_LE(std::abs(v), bound);
  for (double v : layer.lora_B().value) EXPECT_EQ(v, 0.0);
}

TEST(LoRALinear, ScaleAndRsLoRA) {
  Rng rng(2);
  LoRA plain({.in = 4, .out = 4, .lora = {.rank = 16, .alpha = 32}}, rng);
  LoRA rs({.in = 4, .out = 4, .lora = {.rank = 16, .alpha = 32, .use_rslora = true}}, rng);
  EXPECT_DOUBLE_EQ(plain.scale(), 2.0);
  EXPECT_DOUBLE_EQ(rs.scale(), 8.0);
}

TEST(LoRALinear, GradientCheckEval) {
  auto layer = make({.rank = 3, .alpha = 6, .dropout = 0.3});
  layer.set_training(false);
  gradient_check(layer, {2, 4, 6});
}

TEST(LoRALinear, GradientCheckNoDropout) { gradient_check(make({.rank = 2, .alpha = 3, .dropout = 0.0}), {7, 6}); }

TEST(LoRALinear, GradientCheckWithDropoutFixedSeed) {
  auto layer = make({.rank = 4, .alpha = 8, .dropout = 0.4, .use_rslora = true});
  gradient_check(layer, {3, 5, 6});
  // The mask really drops: the training output differs from the eval output.
  Rng rng(9);
  const Tensor<double> x = random_tensor<double>({3, 6}, rng);
  LoRA eval = layer;
  eval.set_training(false);
  EXPECT_GT(max_abs_diff(run(layer, x), run(eval, x)), 1e-6);
}

TEST(LoRALinear, BaseIsFrozenAndGetsNoGradient) {
  auto layer = make({.rank = 2});
  Rng rng(3);
  Tensor<double> x = random_tensor<double>({4, 6}, rng);
  LoRA::Cache cache;
  const Tensor<double> y = layer.forward(x, cache);
  layer.backward(cache, y);
  EXPECT_FALSE(layer.weight().trainable);
  EXPECT_FALSE(layer.bias().trainable);
  EXPECT_EQ(layer.weight().grad.size(), 0u);
  EXPECT_EQ(layer.bias().grad.size(), 0u);
  auto params = parameters_of<double>(layer, "q_proj");
  EXPECT_EQ(count_parameters(params, /*trainable_only=*/true), 2u * 6 + 5u * 2);
}

TEST(LoRALinear, FrozenAdapterGetsNoGradient) {
  auto layer = make({.rank = 2, .dropout = 0.0});
  layer.lora_A().set_trainable(false);
  Rng rng(4);
  Tensor<double> x = random_tensor<double>({4, 6}, rng);
  LoRA::Cache cache;
  const Tensor<double> y = layer.forward(x, cache);
  EXPECT_EQ(cache.x.dimension(), 0u);  // x is needed only for dA
  layer.backward(cache, y);
  EXPECT_EQ(layer.lora_A().grad.size(), 0u);
  EXPECT_GT(xt::amax(xt::abs(layer.lora_B().grad))(), 0.0);
}

TEST(LoRALinear, TrainableBaseGetsGradients) {
  auto layer = make({.rank = 2, .dropout = 0.2});
  layer.weight().set_trainable(true);
  layer.bias().set_trainable(true);
  Rng rng(5);
  Tensor<double> x = random_tensor<double>({4, 6}, rng);
  LoRA probe = layer;
  LoRA::Cache cache;
  const Tensor<double> R = random_tensor<double>({4, 5}, rng);
  probe.forward(x, cache);
  probe.backward(cache, R);
  LoRA perturbed = layer;
  auto loss = [&] { return dot(run(perturbed, x), R); };
  EXPECT_LT(gradient_error(loss, perturbed.weight().value, probe.weight().grad), 1e-6);
  EXPECT_LT(gradient_error(loss, perturbed.bias().value, probe.bias().grad), 1e-6);
}

TEST(LoRALinear, ParameterNamesFollowPeft) {
  Rng rng(6);
  LoRA layer({.in = 4, .out = 3, .lora = {.rank = 2}}, rng);
  layer.add_adapter("medical", {.rank = 4}, rng);
  auto params = parameters_of<double>(layer, "model.layers.0.self_attn.q_proj");
  ASSERT_EQ(params.size(), 6u);
  const std::string p = "model.layers.0.self_attn.q_proj.";
  EXPECT_EQ(params[0].name, p + "weight");
  EXPECT_EQ(params[1].name, p + "bias");
  EXPECT_EQ(params[2].name, p + "lora_A.weight");
  EXPECT_EQ(params[3].name, p + "lora_B.weight");
  EXPECT_EQ(params[4].name, p + "lora_A.medical.weight");
  EXPECT_EQ(params[5].name, p + "lora_B.medical.weight");
  EXPECT_EQ(shape_of(params[4].param->value), (Shape{4, 4}));
  EXPECT_EQ(shape_of(params[5].param->value), (Shape{3, 4}));
}

TEST(LoRALinear, MergedEqualsUnmergedAndUnmergeRestores) {
  auto layer = make({.rank = 3, .alpha = 12, .dropout = 0.1});
  layer.set_training(false);
  Rng rng(8);
  const Tensor<double> x = random_tensor<double>({2, 3, 6}, rng);
  const Tensor<double> W0 = layer.weight().value;
  const Tensor<double> y = run(layer, x);
  layer.merge();
  EXPECT_TRUE(layer.merged());
  EXPECT_GT(max_abs_diff(layer.weight().value, W0), 1e-3);
  EXPECT_LT(max_abs_diff(run(layer, x), y), 1e-12);
  layer.unmerge();
  EXPECT_LT(max_abs_diff(layer.weight().value, W0), 1e-12);
  EXPECT_LT(max_abs_diff(run(layer, x), y), 1e-12);
}

TEST(LoRALinear, MergedEqualsUnmergedInFloat) {
  Rng rng(9);
  LoRALinear<float> layer({.in = 64, .out = 32, .lora = {.rank = 8, .alpha = 16}}, rng);
  for (auto& v : layer.lora_B().value) v = float(rng.normal(0.0, 0.1));
  layer.set_training(false);
  Tensor<float> x = empty<float>({16, 64});
  for (auto& v : x) v = float(rng.normal());
  LoRALinear<float>::Cache cache;
  const Tensor<float> y = layer.forward(x, cache);
  layer.merge();
  const Tensor<float> y_merged = layer.forward(x, cache);
  EXPECT_LT(xt::amax(xt::abs(y - y_merged))(), 1e-4f * (1.0f + xt::amax(xt::abs(y))()));
}

TEST(LoRALinear, TrainingAMergedLayerIsAnError) {
  auto layer = make({.rank = 2});
  layer.set_training(false);
  LoRA::Cache cache;
  const Tensor<double> x = zeros<double>({2, 6});
  layer.merge();
  const Tensor<double> y = layer.forward(x, cache);
  EXPECT_THROW(layer.backward(cache, y), Error);
  layer.set_training(true);
  try {
    layer.forward(x, cache);
    FAIL();
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(),
                 "LoRALinear: adapter 'default' is merged, which is for inference only; call set_training(false) "
                 "or unmerge()");
  }
  EXPECT_THROW(layer.merge(), Error);
  EXPECT_THROW(layer.set_active_adapter("default"), Error);
  layer.unmerge();
  EXPECT_THROW(layer.unmerge(), Error);
}

TEST(LoRALinear, SeveralAdaptersSwitch) {
  Rng rng(10);
  LoRA layer({.in = 6, .out = 5, .lora = {.rank = 2, .dropout = 0.0}}, rng);
  layer.add_adapter("doc", {.rank = 3, .alpha = 6, .dropout = 0.0}, rng);
  layer.lora_B("default").value = random_tensor<double>({5, 2}, rng);
  layer.lora_B("doc").value = random_tensor<double>({5, 3}, rng);
  const Tensor<double> x = random_tensor<double>({4, 6}, rng);
  EXPECT_EQ(layer.active_adapter(), "default");
  const Tensor<double> y_default = run(layer, x);
  layer.set_active_adapter("doc");
  EXPECT_DOUBLE_EQ(layer.scale(), 2.0);
  const Tensor<double> y_doc = run(layer, x);
  EXPECT_GT(max_abs_diff(y_default, y_doc), 1e-6);
  // Only the active adapter receives gradients; merging folds the active adapter.
  gradient_check(layer, {4, 6});
  LoRA::Cache cache;
  layer.forward(x, cache);
  layer.backward(cache, y_doc);
  EXPECT_EQ(xt::amax(xt::abs(layer.lora_A("default").grad))(), 0.0);
  EXPECT_GT(xt::amax(xt::abs(layer.lora_A("doc").grad))(), 0.0);
  layer.set_training(false);
  layer.merge();
  EXPECT_LT(max_abs_diff(run(layer, x), y_doc), 1e-12);
}

TEST(LoRALinear, BadConfigThrows) {
  Rng rng(11);
  EXPECT_THROW(LoRA({.in = 0, .out = 3}, rng), ConfigError);
  try {
    LoRA({.in = 4, .out = 3, .lora = {.rank = 0}}, rng);
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_STREQ(e.what(), "LoRALinear: rank r must be > 0 (got 0)");
  }
  EXPECT_THROW(LoRA({.in = 4, .out = 3, .lora = {.alpha = 0}}, rng), ConfigError);
  EXPECT_THROW(LoRA({.in = 4, .out = 3, .lora = {.dropout = 1.0}}, rng), ConfigError);
  EXPECT_THROW(LoRA({.in = 4, .out = 3, .adapter = ""}, rng), ConfigError);
  LoRA layer({.in = 4, .out = 3}, rng);
  EXPECT_THROW(layer.add_adapter("default", {}, rng), ConfigError);
  EXPECT_THROW(layer.set_active_adapter("missing"), ConfigError);
  EXPECT_THROW(layer.lora_A("missing"), ConfigError);
}

TEST(LoRALinear, WrongShapesThrow) {
  auto layer = make({.rank = 2});
  LoRA::Cache cache;
  try {
    layer.forward(zeros<double>({3, 5}), cache);
    FAIL();
  } catch (const ShapeError& e) {
    EXPECT_STREQ(e.what(), "LoRALinear: x has shape [3, 5], expected [..., 6]");
  }
  layer.forward(zeros<double>({3, 6}), cache);
  EXPECT_THROW(layer.backward(cache, zeros<double>({3, 4})), ShapeError);
  try {
    layer.backward(cache, zeros<double>({2, 5}));
    FAIL();
  } catch (const ShapeError& e) {
    EXPECT_STREQ(e.what(), "LoRALinear: dy has shape [2, 5] but the cached forward has shape [3, 2] (rank 2)");
  }
}
