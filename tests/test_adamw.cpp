#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "mixpeft/core/parameter.hpp"
#include "mixpeft/core/rng.hpp"
#include "mixpeft/testing/gradcheck.hpp"
#include "mixpeft/train/adamw.hpp"
#include "mixpeft/train/grad_clip.hpp"

using namespace mixpeft;

namespace {

// A scalar parameter holding one value.
Parameter<double> scalar(const std::string& name, double v, bool trainable = true, bool decay = true) {
  Tensor<double> t = zeros<double>({1});
  t(0) = v;
  return Parameter<double>(name, t, trainable, decay);
}

}  // namespace

TEST(AdamW, TwoStepsByHand) {
  Parameter<double> p = scalar("w", 1.0);
  ParameterList<double> list;
  add_parameter(list, "", p);
  AdamW<double> opt(list, {.lr = 0.1, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0.1});

  // Step 1, g = 0.5: decay 1 -> 0.99; m = 0.05, v = 0.00025; m_hat = 0.5, v_hat = 0.25;
  // p = 0.99 - 0.1 * 0.5 / (0.5 + 1e-8).
  p.grad(0) = 0.5;
  opt.step();
  EXPECT_NEAR(p.value(0), 0.99 - 0.1 * 0.5 / (0.5 + 1e-8), 1e-15);
  EXPECT_NEAR(opt.state().at("w").m(0), 0.05, 1e-16);
  EXPECT_NEAR(opt.state().at("w").v(0), 0.00025, 1e-18);
  EXPECT_EQ(opt.state().at("w").step, 1);

  // Step 2, g = -0.25, lr 0.05: m = 0.9 * 0.05 - 0.025 = 0.02, v = 0.999 * 0.00025 + 0.001 * 0.0625;
  // m_hat = m / (1 - 0.81), v_hat = v / (1 - 0.998001).
  const double p1 = p.value(0);
  p.grad(0) = -0.25;
  opt.step(0.05);
  const double m = 0.02, v = 0.999 * 0.00025 + 0.001 * 0.0625;
  const double expected = p1 * (1 - 0.05 * 0.1) - 0.05 * (m / 0.19) / (std::sqrt(v / (1 - 0.998001)) + 1e-8);
  EXPECT_NEAR(p.value(0), expected, 1e-15);
  EXPECT_EQ(opt.config().lr, 0.05);
  EXPECT_EQ(opt.state().at("w").step, 2);
}

TEST(AdamW, MatchesAReferenceLoopOverManySteps) {
  Rng rng(1);
  Parameter<float> a("a", mixpeft::testing::random_tensor<float>({5, 7}, rng), true);
  Parameter<float> b("b", mixpeft::testing::random_tensor<float>({7}, rng), true, /*decay=*/false);
  ParameterList<float> list;
  add_parameter(list, "layer", a);
  add_parameter(list, "layer", b);
  const AdamWConfig cfg{.lr = 3e-3, .beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.02};
  AdamW<float> opt(list, cfg);

  // The same update written out in double, one element at a time.
  struct Ref {
    std::vector<double> w, m, v;
    bool decay;
  };
  std::vector<Ref> ref;
  for (auto* p : {&a, &b})
    ref.push_back({std::vector<double>(p->value.begin(), p->value.end()), std::vector<double>(p->numel()),
                   std::vector<double>(p->numel()), p->weight_decay});
  for (int t = 1; t <= 6; ++t) {
    const double lr = cfg.lr * t / 6.0;
    std::size_t k = 0;
    for (auto* p : {&a, &b}) {
      for (auto& g : p->grad) g = float(rng.normal());
      Ref& r = ref[k++];
      for (std::size_t i = 0; i < r.w.size(); ++i) {
        const double g = p->grad.data()[i];
        if (r.decay) r.w[i] *= 1 - lr * cfg.weight_decay;
        r.m[i] = cfg.beta1 * r.m[i] + (1 - cfg.beta1) * g;
        r.v[i] = cfg.beta2 * r.v[i] + (1 - cfg.beta2) * g * g;
        const double m_hat = r.m[i] / (1 - std::pow(cfg.beta1, t)), v_hat = r.v[i] / (1 - std::pow(cfg.beta2, t));
        r.w[i] -= lr * m_hat / (std::sqrt(v_hat) + cfg.eps);
      }
    }
    opt.step(lr);
  }
  std::size_t k = 0;
  for (auto* p : {&a, &b}) {
    const Ref& r = ref[k++];
    for (std::size_t i = 0; i < r.w.size(); ++i) EXPECT_NEAR(p->value.data()[i], r.w[i], 2e-6);
  }
  EXPECT_EQ(opt.state().size(), 2u);
  EXPECT_EQ(opt.state().at("layer.b").step, 6);
}

TEST(AdamW, FrozenParametersAreUntouchedAndDecayFollowsTheFlag) {
  Parameter<double> frozen = scalar("frozen", 2.0, /*trainable=*/false);
  Parameter<double> decayed = scalar("decayed", 2.0);
  Parameter<double> plain = scalar("plain", 2.0, true, /*decay=*/false);
  ParameterList<double> list;
  for (auto* p : {&frozen, &decayed, &plain}) add_parameter(list, "", *p);
  AdamW<double> opt(list, {.lr = 0.1, .weight_decay = 0.5});
  // Zero gradients: the Adam term is 0 / (0 + eps) = 0, so only decoupled decay moves a parameter.
  opt.step();
  EXPECT_EQ(frozen.value(0), 2.0);
  EXPECT_EQ(decayed.value(0), 2.0 * (1 - 0.1 * 0.5));
  EXPECT_EQ(plain.value(0), 2.0);
  EXPECT_EQ(opt.state().count("frozen"), 0u);
  EXPECT_EQ(opt.state().count("plain"), 1u);

  decayed.grad(0) = 1.0;
  opt.zero_grad();
  EXPECT_EQ(decayed.grad(0), 0.0);
}

TEST(AdamW, BadConfigsAndShapesAreTyped) {
  Parameter<double> p = scalar("w", 1.0), q = scalar("w", 1.0);
  ParameterList<double> list;
  add_parameter(list, "", p);
  EXPECT_THROW(AdamW<double>(list, {.lr = -1}), ConfigError);
  EXPECT_THROW(AdamW<double>(list, {.beta1 = 1.0}), ConfigError);
  EXPECT_THROW(AdamW<double>(list, {.beta2 = -0.1}), ConfigError);
  EXPECT_THROW(AdamW<double>(list, {.eps = -1e-8}), ConfigError);
  EXPECT_THROW(AdamW<double>(list, {.weight_decay = std::numeric_limits<double>::quiet_NaN()}), ConfigError);
  AdamW<double> opt(list);
  EXPECT_THROW(opt.step(-0.1), ConfigError);

  ParameterList<double> twice = list;
  add_parameter(twice, "", q);
  try {
    AdamW<double> dup(twice);
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("duplicate parameter name \"w\""), std::string::npos) << e.what();
  }

  p.grad = zeros<double>({2});
  EXPECT_THROW(opt.step(), ShapeError);
}

// ---- gradient clipping and accumulation ------------------------------------------------------------

TEST(GradClip, NormClipAndScale) {
  Parameter<double> a("a", zeros<double>({2}), true), b("b", zeros<double>({1}), true),
      frozen("f", zeros<double>({1}), false);
  ParameterList<double> list;
  for (auto* p : {&a, &b, &frozen}) add_parameter(list, "", *p);
  a.grad(0) = 3.0;
  a.grad(1) = 0.0;
  b.grad(0) = 4.0;
  EXPECT_DOUBLE_EQ(grad_norm(list), 5.0);

  EXPECT_DOUBLE_EQ(clip_grad_norm(list, 10.0), 5.0);  // below the limit: unchanged
  EXPECT_EQ(a.grad(0), 3.0);

  EXPECT_DOUBLE_EQ(clip_grad_norm(list, 1.0), 5.0);  // returns the norm before clipping
  EXPECT_NEAR(grad_norm(list), 1.0, 1e-6);
  EXPECT_DOUBLE_EQ(a.grad(0), 3.0 / (5.0 + 1e-6));

  // Accumulating two micro-batches and averaging equals the gradient of the mean.
  a.grad.fill(0.0);
  b.grad.fill(0.0);
  for (double g : {1.0, 3.0}) b.grad(0) += g;
  scale_grads(list, 1.0 / 2);
  EXPECT_EQ(b.grad(0), 2.0);
  EXPECT_THROW(clip_grad_norm(list, 0.0), ConfigError);
}

TEST(GradClip, NonFiniteGradientNamesTheParameter) {
  Parameter<float> a("a", zeros<float>({3}), true), b("b", zeros<float>({3}), true), c("c", zeros<float>({1}), true);
  ParameterList<float> list;
  for (auto* p : {&a, &b, &c}) add_parameter(list, "block", *p);
  b.grad(1) = std::numeric_limits<float>::quiet_NaN();
  c.grad(0) = std::numeric_limits<float>::infinity();
  try {
    clip_grad_norm(list, 1.0);
    FAIL() << "expected NumericError";
  } catch (const NumericError& e) {
    EXPECT_NE(std::string(e.what()).find("\"block.b\" is NaN"), std::string::npos) << e.what();
  }
  b.grad(1) = 0.0f;
  try {
    grad_norm(list);
    FAIL() << "expected NumericError";
  } catch (const NumericError& e) {
    EXPECT_NE(std::string(e.what()).find("\"block.c\" is Inf"), std::string::npos) << e.what();
  }
}
