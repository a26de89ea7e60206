#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <numbers>

#include "mixpeft/train/lr_schedule.hpp"

using namespace mixpeft;

TEST(WarmupCosineLr, LinearWarmupFromZero) {
  const WarmupCosineLr lr(1e-2, 100, 1000);
  EXPECT_EQ(lr(0), 0.0);
  EXPECT_DOUBLE_EQ(lr(1), 1e-4);
  EXPECT_DOUBLE_EQ(lr(50), 5e-3);
  EXPECT_DOUBLE_EQ(lr(99), 9.9e-3);
  EXPECT_EQ(lr(100), 1e-2);  // the peak is reached exactly at the end of warm-up
}

TEST(WarmupCosineLr, HalfCosineToTheMinimum) {
  const WarmupCosineLr lr(1e-2, 100, 1100, 1e-4);
  EXPECT_EQ(lr(100), 1e-2);
  EXPECT_DOUBLE_EQ(lr(600), (1e-2 + 1e-4) / 2);  // half way through the decay
  EXPECT_DOUBLE_EQ(lr(350), 1e-4 + (1e-2 - 1e-4) * (1 + std::cos(std::numbers::pi / 4)) / 2);
  EXPECT_NEAR(lr(1099), 1e-4 + 0.25 * (1e-2 - 1e-4) * std::pow(std::numbers::pi / 1000, 2), 1e-11);
  EXPECT_EQ(lr(1100), 1e-4);
  EXPECT_EQ(lr(5000), 1e-4);
  for (std::int64_t s = 100; s < 1100; ++s) EXPECT_LE(lr(s + 1), lr(s)) << s;  // monotone decay
}

TEST(WarmupCosineLr, LavinRecipe) {
  // LaVIN: base lr 9e-3 * 32 / 256, 20 epochs, 2 warm-up epochs, cosine to 0; 50 steps per epoch here.
  const std::int64_t per_epoch = 50;
  const double base = 9e-3 * 32 / 256;
  const WarmupCosineLr lr(base, 2 * per_epoch, 20 * per_epoch);
  EXPECT_DOUBLE_EQ(lr(per_epoch), base / 2);  // one epoch into warm-up
  EXPECT_EQ(lr(2 * per_epoch), base);
  EXPECT_DOUBLE_EQ(lr(11 * per_epoch), base / 2);  // epoch 11 is half way through the 18 decay epochs
  EXPECT_EQ(lr(20 * per_epoch), 0.0);
}

TEST(WarmupCosineLr, NoWarmupAndAllWarmup) {
  const WarmupCosineLr cosine(1.0, 0, 10);
  EXPECT_EQ(cosine(0), 1.0);
  EXPECT_DOUBLE_EQ(cosine(5), 0.5);
  const WarmupCosineLr ramp(1.0, 10, 10);
  EXPECT_DOUBLE_EQ(ramp(5), 0.5);
  EXPECT_EQ(ramp(10), 0.0);  // after the last step the minimum holds
}

TEST(ConstantLr, SameEveryStep) {
  const std::function<double(std::int64_t)> lr = ConstantLr(3e-4);
  EXPECT_EQ(lr(0), 3e-4);
  EXPECT_EQ(lr(123456), 3e-4);
}

TEST(LrSchedule, BadSettingsAreConfigErrors) {
  EXPECT_THROW(WarmupCosineLr(-1.0, 0, 10), ConfigError);
  EXPECT_THROW(WarmupCosineLr(1.0, 0, 0), ConfigError);
  EXPECT_THROW(WarmupCosineLr(1.0, 11, 10), ConfigError);
  EXPECT_THROW(WarmupCosineLr(1.0, -1, 10), ConfigError);
  EXPECT_THROW(WarmupCosineLr(1.0, 0, 10, 2.0), ConfigError);  // min above base
  EXPECT_THROW(WarmupCosineLr(1.0, 0, 10)(-1), ConfigError);
  EXPECT_THROW(ConstantLr(std::nan("")), ConfigError);
}
