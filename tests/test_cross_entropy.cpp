#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "mixpeft/ops/cross_entropy.hpp"
#include "mixpeft/testing/gradcheck.hpp"

using namespace mixpeft;
using namespace mixpeft::testing;

TEST(CrossEntropy, UniformLogitsGiveLogV) {
  Tensor<double> logits = zeros<double>({3, 7});
  logits.fill(2.5);
  CrossEntropyCache<double> cache;
  const double loss = cross_entropy_forward(logits, Tensor<std::int64_t>{0, 6, 3}, cache);
  EXPECT_NEAR(loss, std::log(7.0), 1e-15);
  EXPECT_EQ(cache.valid, 3u);
}

TEST(CrossEntropy, HandComputedAndStableAtLargeLogits) {
  Tensor<double> logits = {{0.0, std::log(3.0)}, {1000.0, 1000.0}, {-1000.0, 0.0}};
  CrossEntropyCache<double> cache;
  const double loss = cross_entropy_forward(logits, Tensor<std::int64_t>{1, 0, 1}, cache);
  // rows: -log(3/4), log 2 (no overflow), log(1 + e^-1000) = 0 (no underflow to -inf)
  EXPECT_NEAR(loss, (-std::log(0.75) + std::log(2.0) + 0.0) / 3.0, 1e-13);  // ulp(1000) ~ 1e-13
}

TEST(CrossEntropy, IgnoredRowsLeaveTheMeanAndGetZeroGradient) {
  Tensor<double> logits = {{0.0, std::log(3.0)}, {5.0, -2.0}, {0.0, 0.0}};
  Tensor<std::int64_t> targets = {1, -100, 0};
  CrossEntropyCache<double> cache;
  const double loss = cross_entropy_forward(logits, targets, cache);
  EXPECT_EQ(cache.valid, 2u);
  EXPECT_NEAR(loss, (-std::log(0.75) + std::log(2.0)) / 2.0, 1e-15);
  Tensor<double> dlogits;
  cross_entropy_backward(logits, targets, cache, 1.0, dlogits);
  EXPECT_EQ(dlogits(1, 0), 0.0);
  EXPECT_EQ(dlogits(1, 1), 0.0);
  EXPECT_NEAR(dlogits(0, 0), 0.25 / 2.0, 1e-15);         // (softmax - onehot) / n_valid
  EXPECT_NEAR(dlogits(0, 1), (0.75 - 1.0) / 2.0, 1e-15);
  // a custom ignore label; -100 is then an ordinary (out of range) target
  const double loss7 = cross_entropy_forward(logits, Tensor<std::int64_t>{7, 0, 7}, cache, 7);
  EXPECT_EQ(cache.valid, 1u);
  EXPECT_NEAR(loss7, std::log(1.0 + std::exp(-7.0)), 1e-15);
  EXPECT_THROW(cross_entropy_forward(logits, targets, cache, 7), IndexError);
}

TEST(CrossEntropy, AllRowsIgnoredGiveZeroLossAndZeroGradient) {
  Tensor<double> logits = {{1.0, 2.0}, {3.0, 4.0}}, dlogits;
  Tensor<std::int64_t> targets = {-100, -100};
  CrossEntropyCache<double> cache;
  EXPECT_EQ(cross_entropy_forward(logits, targets, cache), 0.0);
  EXPECT_EQ(cache.valid, 0u);
  cross_entropy_backward(logits, targets, cache, 1.0, dlogits);
  EXPECT_EQ(dlogits, Tensor<double>(zeros<double>({2, 2})));
}

TEST(CrossEntropy, GradientCheckWithIgnoredRowsAndBatchShape) {
  Rng rng(1);
  Tensor<double> logits = random_tensor<double>({2, 3, 5}, rng, 3.0);
  Tensor<std::int64_t> targets = {{4, -100, 0}, {2, 2, -100}};
  const double dloss = 1.7;
  auto loss = [&] {
    CrossEntropyCache<double> c;
    return dloss * cross_entropy_forward(logits, targets, c);
  };
  CrossEntropyCache<double> cache;
  cross_entropy_forward(logits, targets, cache);
  Tensor<double> dlogits = random_tensor<double>({2, 3, 5}, rng);  // overwritten
  cross_entropy_backward(logits, targets, cache, dloss, dlogits);
  EXPECT_LT(gradient_error(loss, logits, dlogits), 1e-6);
  for (std::size_t n = 0; n < 6; ++n) {  // each row of softmax - onehot sums to zero
    double s = 0;
    for (std::size_t v = 0; v < 5; ++v) s += dlogits.data()[n * 5 + v];
    EXPECT_NEAR(s, 0.0, 1e-15);
  }
}

TEST(CrossEntropy, LargeFloatMatchesDoubleAcrossThreads) {
  Rng rng(2);
  const std::size_t n = 96, v = 1000;
  const Tensor<double> ld = random_tensor<double>({n, v}, rng, 4.0);
  const Tensor<float> lf = xt::cast<float>(ld);
  Tensor<std::int64_t> targets = empty<std::int64_t>({n});
  for (std::size_t i = 0; i < n; ++i) targets(i) = i % 5 == 0 ? -100 : std::int64_t(rng.below(v));
  CrossEntropyCache<double> cd;
  CrossEntropyCache<float> cf;
  const double loss_d = cross_entropy_forward(ld, targets, cd);
  const float loss_f = cross_entropy_forward(lf, targets, cf);
  EXPECT_NEAR(loss_d, double(loss_f), 1e-5 * loss_d);
  Tensor<double> dd;
  Tensor<float> df;
  cross_entropy_backward(ld, targets, cd, 1.0, dd);
  cross_entropy_backward(lf, targets, cf, 1.0, df);
  EXPECT_LT(max_abs_diff(dd, xt::cast<double>(df)), 1e-7);
}

TEST(CrossEntropy, NonFiniteLossIsNumericError) {
  CrossEntropyCache<float> cache;
  Tensor<float> with_nan = {{0.0f, 1.0f}, {std::numeric_limits<float>::quiet_NaN(), 1.0f}};
  try {
    cross_entropy_forward(with_nan, Tensor<std::int64_t>{0, 1}, cache);
    FAIL();
  } catch (const NumericError& e) {
    EXPECT_EQ(std::string(e.what()).rfind("cross_entropy: loss is NaN at row 1 (target 1", 0), 0u) << e.what();
  }
  Tensor<float> with_minus_inf = {{-std::numeric_limits<float>::infinity(), 1.0f}};
  try {
    cross_entropy_forward(with_minus_inf, Tensor<std::int64_t>{0}, cache);
    FAIL();
  } catch (const NumericError& e) {
    EXPECT_EQ(std::string(e.what()).rfind("cross_entropy: loss is Inf at row 0", 0), 0u) << e.what();
  }
  // a NaN on an ignored row does not count
  EXPECT_NO_THROW(cross_entropy_forward(with_nan, Tensor<std::int64_t>{0, -100}, cache));
}

TEST(CrossEntropy, BadTargetsAndShapesAreTyped) {
  Tensor<double> logits = zeros<double>({2, 3});
  CrossEntropyCache<double> cache;
  try {
    cross_entropy_forward(logits, Tensor<std::int64_t>{0, 3}, cache);
    FAIL();
  } catch (const IndexError& e) {
    EXPECT_STREQ(e.what(),
                 "cross_entropy_forward: target 3 of row 1 is out of range for V = 3 classes (ignore_index is -100)");
  }
  EXPECT_THROW(cross_entropy_forward(logits, Tensor<std::int64_t>{0, -1}, cache), IndexError);
  try {
    cross_entropy_forward(logits, Tensor<std::int64_t>{0, 1, 2}, cache);
    FAIL();
  } catch (const ShapeError& e) {
    EXPECT_STREQ(e.what(), "cross_entropy_forward: targets has shape [3] but logits has shape [2, 3], expected "
                           "targets [2]");
  }
  EXPECT_THROW(cross_entropy_forward(Tensor<double>(zeros<double>({2, 0})), Tensor<std::int64_t>{0, 0}, cache),
               ShapeError);
  Tensor<std::int64_t> targets = {0, 1};
  cross_entropy_forward(logits, targets, cache);
  Tensor<double> dlogits;
  EXPECT_THROW(cross_entropy_backward(logits, Tensor<std::int64_t>{0, -100}, cache, 1.0, dlogits), ConfigError);
  EXPECT_THROW(cross_entropy_backward(Tensor<double>(zeros<double>({3, 3})), Tensor<std::int64_t>{0, 1, 2}, cache,
                                      1.0, dlogits),
               ShapeError);
}
