#include <gtest/gtest.h>

#include <cmath>

#include "mixpeft/core/init.hpp"
#include "mixpeft/core/parameter.hpp"
#include "mixpeft/core/rng.hpp"
#include "mixpeft/core/tensor.hpp"

using namespace mixpeft;

TEST(Rng, SameSeedSameStream) {
  Rng a(42), b(42), c(43);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(a.next_u64(), b.next_u64());
  EXPECT_NE(Rng(42).next_u64(), c.next_u64());
}

TEST(Rng, NormalHasUnitMoments) {
  Rng rng(7);
  double sum = 0, sq = 0;
  const int n = 200000;
  for (int i = 0; i < n; ++i) {
    const double v = rng.normal();
    sum += v;
    sq += v * v;
  }
  EXPECT_NEAR(sum / n, 0.0, 0.01);
  EXPECT_NEAR(sq / n, 1.0, 0.01);
}

TEST(Tensor, RowsColsAndMatrixView) {
  Tensor<float> t = zeros<float>({2, 3, 4});
  EXPECT_EQ(rows(t), 6u);
  EXPECT_EQ(cols(t), 4u);
  matrix_view(t)(5, 3) = 1.5f;
  EXPECT_EQ(t(1, 2, 3), 1.5f);
}

TEST(Tensor, ShapeErrorNamesTensorAndShapes) {
  Tensor<float> x = zeros<float>({4, 3});
  try {
    expect_shape("linear_forward", "x", x, {any_extent, 5});
    FAIL() << "expected ShapeError";
  } catch (const ShapeError& e) {
    EXPECT_STREQ(e.what(), "linear_forward: x has shape [4, 3], expected [*, 5]");
  }
  EXPECT_THROW(expect_width("op", "y", x, 4), ShapeError);
  EXPECT_NO_THROW(expect_width("op", "y", x, 3));
}

TEST(Init, KaimingUniformBoundMatchesPyTorch) {
  Rng rng(1);
  Tensor<double> w = empty<double>({64, 100});
  init::kaiming_uniform(w, rng);  // a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  const double bound = 1.0 / std::sqrt(100.0);
  double max_abs = 0;
  for (double v : w) max_abs = std::max(max_abs, std::abs(v));
  EXPECT_LE(max_abs, bound);
  EXPECT_GT(max_abs, 0.95 * bound);
}

TEST(Init, XavierUniformBound) {
  Rng rng(2);
  Tensor<double> w = empty<double>({8, 4096});
  init::xavier_uniform(w, rng);
  const double bound = std::sqrt(6.0 / (8 + 4096));
  double max_abs = 0;
  for (double v : w) max_abs = std::max(max_abs, std::abs(v));
  EXPECT_LE(max_abs, bound);
  EXPECT_GT(max_abs, 0.95 * bound);
}

TEST(Init, SameSeedSameWeights) {
  Tensor<float> a = empty<float>({3, 5}), b = empty<float>({3, 5});
  Rng r1(9), r2(9);
  init::normal(a, r1, 0.0, 0.02);
  init::normal(b, r2, 0.0, 0.02);
  EXPECT_EQ(a, b);
}

TEST(Parameter, FrozenHasNoGradient) {
  Parameter<float> p("weight", zeros<float>({3, 4}), /*trainable=*/false);
  EXPECT_EQ(p.grad.size(), 0u);
  p.set_trainable(true);
  EXPECT_EQ(p.grad.size(), 12u);
  p.grad.fill(1.0f);
  p.zero_grad();
  EXPECT_EQ(p.grad(2, 3), 0.0f);
}

TEST(Parameter, ListNamesAndCounts) {
  Parameter<float> w("weight", zeros<float>({3, 4}), true), b("bias", zeros<float>({3}), false, false);
  ParameterList<float> list;
  add_parameter(list, "layers.0.proj", w);
  add_parameter(list, "layers.0.proj", b);
  EXPECT_EQ(list[0].name, "layers.0.proj.weight");
  EXPECT_EQ(list[1].name, "layers.0.proj.bias");
  EXPECT_EQ(count_parameters(list, false), 15u);
  EXPECT_EQ(count_parameters(list, true), 12u);
}
