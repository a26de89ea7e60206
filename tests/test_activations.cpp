#include <gtest/gtest.h>

#include <cmath>

#include "mixpeft/ops/activations.hpp"
#include "mixpeft/testing/gradcheck.hpp"

using namespace mixpeft;
using namespace mixpeft::testing;

namespace {
double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
}  // namespace

TEST(Silu, ForwardHandComputed) {
  Tensor<double> x = {-2.0, 0.0, 1.0, 3.0}, y;
  silu_forward(x, y);
  for (std::size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(y(i), x(i) * sigmoid(x(i)), 1e-15);
  EXPECT_EQ(y(1), 0.0);
}

TEST(Silu, GradientCheck) {
  Rng rng(1);
  Tensor<double> x = random_tensor<double>({7, 5}, rng, 2.0), R = random_tensor<double>({7, 5}, rng), dx;
  auto loss = [&] {
    Tensor<double> y;
    silu_forward(x, y);
    return dot(y, R);
  };
  silu_backward(x, R, dx);
  EXPECT_LT(gradient_error(loss, x, dx), 1e-6);
}

TEST(SwiGlu, ForwardHandComputed) {
  Tensor<double> g = {{1.0, -1.0}}, u = {{2.0, 3.0}}, z;
  swiglu_forward(g, u, z);
  EXPECT_NEAR(z(0, 0), 1.0 * sigmoid(1.0) * 2.0, 1e-15);
  EXPECT_NEAR(z(0, 1), -1.0 * sigmoid(-1.0) * 3.0, 1e-15);
}

TEST(SwiGlu, GradientCheck) {
  Rng rng(2);
  Tensor<double> g = random_tensor<double>({6, 9}, rng, 2.0), u = random_tensor<double>({6, 9}, rng),
                 R = random_tensor<double>({6, 9}, rng), dg, du;
  auto loss = [&] {
    Tensor<double> z;
    swiglu_forward(g, u, z);
    return dot(z, R);
  };
  swiglu_backward(g, u, R, dg, du);
  EXPECT_LT(gradient_error(loss, g, dg), 1e-6);
  EXPECT_LT(gradient_error(loss, u, du), 1e-6);
}

TEST(SwiGlu, LargeTensorMatchesScalarFormulaAcrossThreadBlocks) {
  Rng rng(3);
  Tensor<float> g = random_tensor<float>({64, 2752}, rng), u = random_tensor<float>({64, 2752}, rng), z;
  swiglu_forward(g, u, z);
  for (std::size_t i = 0; i < g.size(); i += 997)
    EXPECT_NEAR(z.data()[i], g.data()[i] * sigmoid(g.data()[i]) * u.data()[i], 1e-5);
}

TEST(QuickGelu, ForwardHandComputed) {
  Tensor<double> x = {-1.0, 0.5}, y;
  quick_gelu_forward(x, y);
  EXPECT_NEAR(y(0), -1.0 * sigmoid(-1.702), 1e-15);
  EXPECT_NEAR(y(1), 0.5 * sigmoid(0.851), 1e-15);
}

TEST(QuickGelu, GradientCheck) {
  Rng rng(4);
  Tensor<double> x = random_tensor<double>({4, 11}, rng, 2.0), R = random_tensor<double>({4, 11}, rng), dx;
  auto loss = [&] {
    Tensor<double> y;
    quick_gelu_forward(x, y);
    return dot(y, R);
  };
  quick_gelu_backward(x, R, dx);
  EXPECT_LT(gradient_error(loss, x, dx), 1e-6);
}

TEST(Activations, MismatchedShapesAreTyped) {
  Tensor<double> g = zeros<double>({2, 3}), u = zeros<double>({3, 2}), z;
  EXPECT_THROW(swiglu_forward(g, u, z), ShapeError);
}
