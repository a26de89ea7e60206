// The grouped (block-diagonal) projection of ops/grouped_projection.hpp: forward against the dense block-diagonal
// product (one shared weight and one weight per sequence), alpha / beta, gradient checks of every input in double,
// frozen (null) gradients, and typed errors.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "mixpeft/ops/grouped_projection.hpp"
#include "mixpeft/ops/matmul.hpp"
#include "mixpeft/testing/gradcheck.hpp"

using namespace mixpeft;
using namespace mixpeft::testing;

namespace {

// W [d, h/g] expanded into the dense block-diagonal [d, h].
Tensor<double> dense(const Tensor<double>& W, std::size_t groups) {
  const std::size_t d = W.shape()[0], hg = W.shape()[1], dg = d / groups;
  Tensor<double> out = zeros<double>({d, hg * groups});
  for (std::size_t i = 0; i < d; ++i)
    for (std::size_t c = 0; c < hg; ++c) out(i, (i / dg) * hg + c) = W(i, c);
  return out;
}

// Entry s of a per-sequence [S, ...] tensor.
Tensor<double> entry(const Tensor<double>& t, std::size_t s) {
  Shape shape(t.shape().begin() + 1, t.shape().end());
  Tensor<double> out = empty<double>(shape);
  std::copy(t.data() + s * out.size(), t.data() + (s + 1) * out.size(), out.data());
  return out;
}

// y = beta * y0 + alpha * (u dense(W)^T + b) with W shared ([d, h/g]) or per sequence ([S, d, h/g]).
Tensor<double> reference(const Tensor<double>& u, const Tensor<double>& W, const Tensor<double>* b, std::size_t g,
                         double alpha, double beta, const Tensor<double>& y0) {
  const bool per_seq = W.dimension() == 3;
  const std::size_t S = per_seq ? W.shape()[0] : 1, h = cols(u), n = rows(u), nt = n / S;
  const std::size_t d = W.shape()[W.dimension() - 2];
  Tensor<double> y = beta * y0;
  for (std::size_t s = 0; s < S; ++s) {
    Tensor<double> u_s = empty<double>({nt, h});
    std::copy(u.data() + s * nt * h, u.data() + (s + 1) * nt * h, u_s.data());
    const Tensor<double> Wd = dense(per_seq ? entry(W, s) : W, g);
    Tensor<double> bias;
    if (b) bias = per_seq ? entry(*b, s) : *b;
    Tensor<double> p;
    linear_forward(u_s, Wd, b ? &bias : nullptr, p);
    for (std::size_t i = 0; i < nt * d; ++i) y.data()[s * nt * d + i] += alpha * p.data()[i];
  }
  return y;
}

struct Case {
  Shape u_shape;
  Shape W_shape;
  std::size_t groups;
  bool bias;
  double alpha, beta;
};

void check_forward(const Case& c) {
  Rng rng(1);
  const Tensor<double> u = random_tensor<double>(c.u_shape, rng), W = random_tensor<double>(c.W_shape, rng);
  const std::size_t d = c.W_shape[c.W_shape.size() - 2];
  Shape b_shape = c.W_shape.size() == 3 ? Shape{c.W_shape[0], d} : Shape{d};
  const Tensor<double> b = random_tensor<double>(b_shape, rng);
  Tensor<double> y0 = random_tensor<double>(with_last(c.u_shape, d), rng);
  Tensor<double> y = y0;
  if (c.beta == 0) y.fill(std::numeric_limits<double>::quiet_NaN());  // beta = 0 never reads y
  grouped_projection_forward(u, W, c.bias ? &b : nullptr, c.groups, c.alpha, c.beta, y);
  const Tensor<double> want = reference(u, W, c.bias ? &b : nullptr, c.groups, c.alpha, c.beta, y0);
  ASSERT_EQ(shape_of(y), shape_of(want));
  EXPECT_LT(max_abs_diff(y, want), 1e-12);
}

void check_gradients(const Case& c) {
  Rng rng(2);
  Tensor<double> u = random_tensor<double>(c.u_shape, rng), W = random_tensor<double>(c.W_shape, rng);
  const std::size_t d = c.W_shape[c.W_shape.size() - 2];
  Shape b_shape = c.W_shape.size() == 3 ? Shape{c.W_shape[0], d} : Shape{d};
  Tensor<double> b = random_tensor<double>(b_shape, rng);
  const Tensor<double> y0 = random_tensor<double>(with_last(c.u_shape, d), rng);
  const Tensor<double> R = random_tensor<double>(shape_of(y0), rng);
  auto loss = [&] {
    Tensor<double> y = y0;
    grouped_projection_forward(u, W, c.bias ? &b : nullptr, c.groups, c.alpha, c.beta, y);
    return dot(y, R);
  };
  // Parameter gradients accumulate: start from non-zero values and check the increment.
  const Tensor<double> dW0 = random_tensor<double>(shape_of(W), rng), db0 = random_tensor<double>(shape_of(b), rng);
  Tensor<double> du, dW = dW0, db = db0;
  grouped_projection_backward(R, u, W, c.groups, c.alpha, &du, &dW, c.bias ? &db : nullptr);
  ASSERT_EQ(shape_of(du), shape_of(u));
  EXPECT_LT(gradient_error(loss, u, du), 1e-6);
  EXPECT_LT(gradient_error(loss, W, Tensor<double>(dW - dW0)), 1e-6);
  if (c.bias) EXPECT_LT(gradient_error(loss, b, Tensor<double>(db - db0)), 1e-6);
  else EXPECT_EQ(db, db0);
}

const Case cases[] = {
    {{5, 8}, {6, 4}, 2, true, 1.0, 0.0},         // shared W, 2 groups
    {{2, 3, 6}, {6, 3}, 2, true, 0.7, 1.0},      // leading axes, accumulate into y
    {{4, 6}, {9, 6}, 1, false, -1.3, 0.5},       // one group (dense), no bias, scaled y
    {{3, 12}, {8, 3}, 4, true, 0.9, 0.0},        // 4 groups
    {{2, 3, 8}, {2, 6, 4}, 2, true, 1.0, 1.0},   // one weight per sequence
    {{12, 6}, {3, 9, 2}, 3, true, 0.6, 0.25},    // per sequence, rows split into 3 sequences of 4
    {{1, 5, 4}, {1, 4, 4}, 1, false, 2.0, 0.0},  // one sequence, one group
};

}  // namespace

TEST(GroupedProjection, ForwardMatchesDenseBlockDiagonal) {
  for (const Case& c : cases) check_forward(c);
}

TEST(GroupedProjection, HandComputed) {
  // u = [1, 2, 3, 4] in 2 groups of 2; W [2, 2]: output 0 = [1, 1] . u[0:2], output 1 = [1, -1] . u[2:4].
  const Tensor<double> u = {{1.0, 2.0, 3.0, 4.0}}, W = {{1.0, 1.0}, {1.0, -1.0}}, b = {10.0, 20.0};
  Tensor<double> y;
  grouped_projection_forward(u, W, &b, 2, 2.0, 0.0, y);
  EXPECT_EQ(y, (Tensor<double>{{26.0, 38.0}}));  // 2 * (3 + 10), 2 * (-1 + 20)
}

TEST(GroupedProjection, GradientChecks) {
  for (const Case& c : cases) check_gradients(c);
}

TEST(GroupedProjection, NullGradientsAreSkippedAndUIsReadOnlyForDW) {
  Rng rng(3);
  const Tensor<double> W = random_tensor<double>({2, 6, 4}, rng), dy = random_tensor<double>({2, 3, 6}, rng);
  const Tensor<double> u = random_tensor<double>({2, 3, 8}, rng);
  Tensor<double> du_all, dW = zeros<double>({2, 6, 4}), db = zeros<double>({2, 6});
  grouped_projection_backward(dy, u, W, 2, 1.0, &du_all, &dW, &db);
  // du alone: u is not read (an empty tensor will do).
  Tensor<double> du;
  grouped_projection_backward(dy, zeros<double>({0}), W, 2, 1.0, &du, nullptr, nullptr);
  EXPECT_EQ(du, du_all);
  // db alone.
  Tensor<double> db_only = zeros<double>({2, 6});
  grouped_projection_backward(dy, zeros<double>({0}), W, 2, 1.0, nullptr, nullptr, &db_only);
  EXPECT_EQ(db_only, db);
  // Per-sequence db is the row sum of each sequence.
  for (std::size_t s = 0; s < 2; ++s)
    for (std::size_t i = 0; i < 6; ++i) {
      double sum = 0;
      for (std::size_t t = 0; t < 3; ++t) sum += dy(s, t, i);
      EXPECT_NEAR(db(s, i), sum, 1e-12);
    }
}

TEST(GroupedProjection, ErrorsAreTyped) {
  const Tensor<double> u = zeros<double>({4, 8}), W = zeros<double>({6, 4}), b = zeros<double>({6});
  Tensor<double> y;
  EXPECT_THROW(grouped_projection_forward(u, W, &b, 0, 1.0, 0.0, y), ConfigError);
  EXPECT_THROW(grouped_projection_forward(u, W, &b, 4, 1.0, 0.0, y), ShapeError);  // 4 groups do not divide d = 6
  EXPECT_THROW(grouped_projection_forward(u, zeros<double>({7, 2}), nullptr, 4, 1.0, 0.0, y), ShapeError);  // nor 7
  EXPECT_THROW(grouped_projection_forward(u, zeros<double>({6}), nullptr, 2, 1.0, 0.0, y), ShapeError);
  EXPECT_THROW(grouped_projection_forward(u, W, &u, 2, 1.0, 0.0, y), ShapeError);  // bias shape
  // 4 rows do not split into 3 sequences
  EXPECT_THROW(grouped_projection_forward(u, zeros<double>({3, 6, 4}), nullptr, 2, 1.0, 0.0, y), ShapeError);
  EXPECT_THROW(grouped_projection_forward(u, zeros<double>({2, 6, 4}), &b, 2, 1.0, 0.0, y), ShapeError);  // b [2, 6]
  Tensor<double> wrong = zeros<double>({4, 5});
  EXPECT_THROW(grouped_projection_forward(u, W, &b, 2, 1.0, 1.0, wrong), ShapeError);  // beta != 0 needs [4, 6]
  Tensor<double> alias = zeros<double>({4, 8});
  EXPECT_THROW(grouped_projection_forward(alias, W, nullptr, 2, 1.0, 0.0, alias), ConfigError);
  try {
    grouped_projection_forward(zeros<double>({4, 7}), W, nullptr, 2, 1.0, 0.0, y);
    FAIL();
  } catch (const ShapeError& e) {
    EXPECT_STREQ(e.what(), "grouped_projection_forward: u has shape [4, 7], expected [..., 8]");
  }
  Tensor<double> du, dW = zeros<double>({6, 4}), db = zeros<double>({6});
  const Tensor<double> dy = zeros<double>({4, 6});
  EXPECT_THROW(grouped_projection_backward(zeros<double>({4, 5}), u, W, 2, 1.0, &du, &dW, &db), ShapeError);
  EXPECT_THROW(grouped_projection_backward(dy, zeros<double>({3, 8}), W, 2, 1.0, &du, &dW, &db), ShapeError);
  Tensor<double> dW_bad = zeros<double>({6, 3});
  EXPECT_THROW(grouped_projection_backward(dy, u, W, 2, 1.0, &du, &dW_bad, &db), ShapeError);
  Tensor<double> db_bad = zeros<double>({5});
  EXPECT_THROW(grouped_projection_backward(dy, u, W, 2, 1.0, &du, &dW, &db_bad), ShapeError);
}
