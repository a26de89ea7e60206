#include <gtest/gtest.h>

#include <cmath>

#include "mixpeft/ops/layernorm.hpp"
#include "mixpeft/ops/rmsnorm.hpp"
#include "mixpeft/testing/gradcheck.hpp"

using namespace mixpeft;
using namespace mixpeft::testing;

namespace {
Tensor<double> ones(const Shape& shape) {
  Tensor<double> t = empty<double>(shape);
  t.fill(1.0);
  return t;
}
}  // namespace

// ---- RMSNorm ----------------------------------------------------------------------------------

TEST(RmsNorm, ConstantRowNormalisesToSign) {
  Tensor<double> x = {{2.5, 2.5, 2.5, 2.5}, {-3.0, -3.0, -3.0, -3.0}}, w = ones({4}), y, rstd;
  rmsnorm_forward(x, w, 0.0, y, rstd);
  EXPECT_NEAR(rstd(0), 1.0 / 2.5, 1e-15);
  EXPECT_NEAR(rstd(1), 1.0 / 3.0, 1e-15);
  for (std::size_t j = 0; j < 4; ++j) {
    EXPECT_NEAR(y(0, j), 1.0, 1e-15);
    EXPECT_NEAR(y(1, j), -1.0, 1e-15);
  }
}

TEST(RmsNorm, ForwardHandComputedWithEpsAndWeight) {
  Tensor<double> x = {3.0, 4.0}, w = {1.0, 2.0}, y, rstd;
  rmsnorm_forward(x, w, 0.5, y, rstd);  // mean(x^2) = 12.5, + eps = 13
  ASSERT_EQ(shape_of(rstd), (Shape{1}));
  EXPECT_NEAR(rstd(0), 1.0 / std::sqrt(13.0), 1e-15);
  EXPECT_NEAR(y(0), 3.0 / std::sqrt(13.0), 1e-15);
  EXPECT_NEAR(y(1), 8.0 / std::sqrt(13.0), 1e-15);
}

TEST(RmsNorm, GradientCheck) {
  Rng rng(1);
  Tensor<double> x = random_tensor<double>({2, 3, 6}, rng), w = random_tensor<double>({6}, rng),
                 R = random_tensor<double>({2, 3, 6}, rng);
  auto loss = [&] {
    Tensor<double> y, rstd;
    rmsnorm_forward(x, w, 1e-5, y, rstd);
    return dot(y, R);
  };
  Tensor<double> y, rstd, dx = random_tensor<double>({2, 3, 6}, rng), dw = zeros<double>({6});
  rmsnorm_forward(x, w, 1e-5, y, rstd);
  rmsnorm_backward(x, w, rstd, R, dx, &dw);  // dx is overwritten, whatever it held
  EXPECT_LT(gradient_error(loss, x, dx), 1e-6);
  EXPECT_LT(gradient_error(loss, w, dw), 1e-6);
}

TEST(RmsNorm, WeightGradientAccumulatesAndFrozenWeightIsSkipped) {
  Rng rng(2);
  Tensor<double> x = random_tensor<double>({5, 4}, rng), w = random_tensor<double>({4}, rng),
                 dy = random_tensor<double>({5, 4}, rng), y, rstd, dx, dx_frozen;
  rmsnorm_forward(x, w, 1e-6, y, rstd);
  Tensor<double> dw = zeros<double>({4});
  rmsnorm_backward(x, w, rstd, dy, dx, &dw);
  const Tensor<double> once = dw;
  rmsnorm_backward(x, w, rstd, dy, dx, &dw);
  EXPECT_LT(max_abs_diff(dw, Tensor<double>(2.0 * once)), 1e-14);
  rmsnorm_backward(x, w, rstd, dy, dx_frozen, nullptr);
  EXPECT_EQ(dx_frozen, dx);
}

TEST(RmsNorm, LargeFloatMatchesDoubleAcrossThreads) {
  Rng rng(3);
  const Tensor<double> xd = random_tensor<double>({256, 384}, rng), wd = random_tensor<double>({384}, rng),
                       dyd = random_tensor<double>({256, 384}, rng);
  const Tensor<float> xf = xt::cast<float>(xd), wf = xt::cast<float>(wd), dyf = xt::cast<float>(dyd);
  Tensor<double> y, rstd, dx, dw = zeros<double>({384});
  Tensor<float> yf, rstdf, dxf, dwf = zeros<float>({384});
  rmsnorm_forward(xd, wd, 1e-6, y, rstd);
  rmsnorm_backward(xd, wd, rstd, dyd, dx, &dw);
  rmsnorm_forward(xf, wf, 1e-6, yf, rstdf);
  rmsnorm_backward(xf, wf, rstdf, dyf, dxf, &dwf);
  EXPECT_LT(max_abs_diff(y, xt::cast<double>(yf)), 1e-5);
  EXPECT_LT(max_abs_diff(dx, xt::cast<double>(dxf)), 1e-5);
  EXPECT_LT(relative_error(dw, xt::cast<double>(dwf)), 1e-5);
  double ref = 0;  // one column of dw by the definition
  for (std::size_t i = 0; i < 256; ++i) ref += dyd(i, 7) * xd(i, 7) * rstd(i);
  EXPECT_NEAR(dw(7), ref, 1e-10);
}

TEST(RmsNorm, BadShapesAndEpsAreTyped) {
  Tensor<double> x = zeros<double>({4, 3}), w = ones({5}), y, rstd;
  try {
    rmsnorm_forward(x, w, 1e-6, y, rstd);
    FAIL();
  } catch (const ShapeError& e) {
    EXPECT_STREQ(e.what(), "rmsnorm_forward: x has shape [4, 3], expected [..., 5]");
  }
  Tensor<double> w3 = ones({3});
  EXPECT_THROW(rmsnorm_forward(x, w3, -1.0, y, rstd), ConfigError);
  EXPECT_THROW(rmsnorm_forward(x, Tensor<double>(zeros<double>({0})), 1e-6, y, rstd), ShapeError);
  rmsnorm_forward(x, w3, 1e-6, y, rstd);
  Tensor<double> dx, bad_rstd = zeros<double>({3}), dw_bad = zeros<double>({4});
  EXPECT_THROW(rmsnorm_backward(x, w3, bad_rstd, x, dx, nullptr), ShapeError);
  EXPECT_THROW(rmsnorm_backward(x, w3, rstd, Tensor<double>(zeros<double>({3, 4})), dx, nullptr), ShapeError);
  EXPECT_THROW(rmsnorm_backward(x, w3, rstd, x, dx, &dw_bad), ShapeError);
}

// ---- LayerNorm --------------------------------------------------------------------------------

TEST(LayerNorm, ForwardOfOneTwoThree) {
  Tensor<double> x = {{1.0, 2.0, 3.0}}, w = {2.0, 2.0, 2.0}, b = {1.0, 0.0, -1.0}, y, mean, rstd;
  layernorm_forward(x, w, b, 0.0, y, mean, rstd);  // mean 2, biased variance 2/3
  const double s = std::sqrt(1.5);
  EXPECT_NEAR(mean(0), 2.0, 1e-15);
  EXPECT_NEAR(rstd(0), s, 1e-15);
  EXPECT_NEAR(y(0, 0), -2.0 * s + 1.0, 1e-14);
  EXPECT_NEAR(y(0, 1), 0.0, 1e-14);
  EXPECT_NEAR(y(0, 2), 2.0 * s - 1.0, 1e-14);
}

TEST(LayerNorm, UnitWeightGivesZeroMeanUnitVarianceRows) {
  Rng rng(4);
  Tensor<double> x = random_tensor<double>({3, 2, 16}, rng, 5.0), w = ones({16}), b = zeros<double>({16}), y, mean,
                 rstd;
  x += 100.0;  // a large offset: the two-pass variance does not cancel
  layernorm_forward(x, w, b, 0.0, y, mean, rstd);
  ASSERT_EQ(shape_of(mean), (Shape{6}));
  for (std::size_t i = 0; i < 6; ++i) {
    double m = 0, v = 0;
    for (std::size_t j = 0; j < 16; ++j) m += y.data()[i * 16 + j];
    for (std::size_t j = 0; j < 16; ++j) v += y.data()[i * 16 + j] * y.data()[i * 16 + j];
    EXPECT_NEAR(m / 16, 0.0, 1e-12);
    EXPECT_NEAR(v / 16, 1.0, 1e-12);
  }
}

TEST(LayerNorm, GradientCheck) {
  Rng rng(5);
  Tensor<double> x = random_tensor<double>({4, 3, 7}, rng), w = random_tensor<double>({7}, rng),
                 b = random_tensor<double>({7}, rng), R = random_tensor<double>({4, 3, 7}, rng);
  auto loss = [&] {
    Tensor<double> y, mean, rstd;
    layernorm_forward(x, w, b, 1e-5, y, mean, rstd);
    return dot(y, R);
  };
  Tensor<double> y, mean, rstd, dx = random_tensor<double>({4, 3, 7}, rng), dw = zeros<double>({7}),
                                db = zeros<double>({7});
  layernorm_forward(x, w, b, 1e-5, y, mean, rstd);
  layernorm_backward(x, w, mean, rstd, R, dx, &dw, &db);
  EXPECT_LT(gradient_error(loss, x, dx), 1e-6);
  EXPECT_LT(gradient_error(loss, w, dw), 1e-6);
  EXPECT_LT(gradient_error(loss, b, db), 1e-6);
}

TEST(LayerNorm, ParameterGradientsAccumulateAndFrozenOnesAreSkipped) {
  Rng rng(6);
  Tensor<double> x = random_tensor<double>({5, 4}, rng), w = random_tensor<double>({4}, rng),
                 b = random_tensor<double>({4}, rng), dy = random_tensor<double>({5, 4}, rng), y, mean, rstd, dx,
                 dx_frozen;
  layernorm_forward(x, w, b, 1e-5, y, mean, rstd);
  Tensor<double> dw = zeros<double>({4}), db = zeros<double>({4});
  layernorm_backward(x, w, mean, rstd, dy, dx, &dw, &db);
  const Tensor<double> dw1 = dw, db1 = db;
  layernorm_backward(x, w, mean, rstd, dy, dx, &dw, &db);
  EXPECT_LT(max_abs_diff(dw, Tensor<double>(2.0 * dw1)), 1e-14);
  EXPECT_LT(max_abs_diff(db, Tensor<double>(2.0 * db1)), 1e-14);
  Tensor<double> db_only = zeros<double>({4});
  layernorm_backward(x, w, mean, rstd, dy, dx_frozen, nullptr, &db_only);
  EXPECT_EQ(dx_frozen, dx);
  EXPECT_LT(max_abs_diff(db_only, db1), 1e-15);
}

TEST(LayerNorm, LargeFloatMatchesDoubleAcrossThreads) {
  Rng rng(7);
  const Tensor<double> xd = random_tensor<double>({256, 384}, rng), wd = random_tensor<double>({384}, rng),
                       bd = random_tensor<double>({384}, rng), dyd = random_tensor<double>({256, 384}, rng);
  const Tensor<float> xf = xt::cast<float>(xd), wf = xt::cast<float>(wd), bf = xt::cast<float>(bd),
                      dyf = xt::cast<float>(dyd);
  Tensor<double> y, mean, rstd, dx, dw = zeros<double>({384}), db = zeros<double>({384});
  Tensor<float> yf, meanf, rstdf, dxf, dwf = zeros<float>({384}), dbf = zeros<float>({384});
  layernorm_forward(xd, wd, bd, 1e-5, y, mean, rstd);
  layernorm_backward(xd, wd, mean, rstd, dyd, dx, &dw, &db);
  layernorm_forward(xf, wf, bf, 1e-5, yf, meanf, rstdf);
  layernorm_backward(xf, wf, meanf, rstdf, dyf, dxf, &dwf, &dbf);
  EXPECT_LT(max_abs_diff(y, xt::cast<double>(yf)), 1e-5);
  EXPECT_LT(max_abs_diff(dx, xt::cast<double>(dxf)), 1e-5);
  EXPECT_LT(relative_error(dw, xt::cast<double>(dwf)), 1e-5);
  EXPECT_LT(relative_error(db, xt::cast<double>(dbf)), 1e-5);
}

TEST(LayerNorm, BadShapesAndEpsAreTyped) {
  Tensor<double> x = zeros<double>({4, 3}), w = ones({3}), b4 = zeros<double>({4}), y, mean, rstd;
  try {
    layernorm_forward(x, w, b4, 1e-5, y, mean, rstd);
    FAIL();
  } catch (const ShapeError& e) {
    EXPECT_STREQ(e.what(), "layernorm_forward: b has shape [4] but w has shape [3]");
  }
  Tensor<double> b = zeros<double>({3});
  EXPECT_THROW(layernorm_forward(x, w, b, std::nan(""), y, mean, rstd), ConfigError);
  layernorm_forward(x, w, b, 1e-5, y, mean, rstd);
  Tensor<double> dx, db_bad = zeros<double>({2});
  EXPECT_THROW(layernorm_backward(x, w, rstd, Tensor<double>(zeros<double>({2})), x, dx, nullptr, nullptr),
               ShapeError);
  EXPECT_THROW(layernorm_backward(x, w, mean, rstd, x, dx, nullptr, &db_bad), ShapeError);
}
