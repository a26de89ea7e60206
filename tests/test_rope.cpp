#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include <xtensor/xview.hpp>

#include "mixpeft/ops/rope.hpp"
#include "mixpeft/testing/gradcheck.hpp"

using namespace mixpeft;
using namespace mixpeft::testing;

namespace {

// Hugging Face's formula evaluated directly: y = q * cos + rotate_half(q) * sin on each head, with
// inv_freq = 1 / base^(arange(0, dh, 2) / dh), emb = cat(freqs, freqs), rotate_half(q) = cat(-q2, q1).
Tensor<double> hf_rope(const Tensor<double>& x, std::size_t heads, double base, const std::vector<std::int64_t>& pos) {
  const std::size_t batch = x.shape()[0], tokens = x.shape()[1], dh = x.shape()[2] / heads, half = dh / 2;
  Tensor<double> y = empty<double>(shape_of(x));
  for (std::size_t b = 0; b < batch; ++b)
    for (std::size_t t = 0; t < tokens; ++t)
      for (std::size_t h = 0; h < heads; ++h) {
        std::vector<double> q(dh), rot(dh), cos(dh), sin(dh);
        for (std::size_t j = 0; j < dh; ++j) {
          q[j] = x(b, t, h * dh + j);
          const double inv_freq = 1.0 / std::pow(base, double(2 * (j % half)) / double(dh));
          cos[j] = std::cos(double(pos[t]) * inv_freq);
          sin[j] = std::sin(double(pos[t]) * inv_freq);
        }
        for (std::size_t j = 0; j < half; ++j) {
          rot[j] = -q[j + half];
          rot[j + half] = q[j];
        }
        for (std::size_t j = 0; j < dh; ++j) y(b, t, h * dh + j) = q[j] * cos[j] + rot[j] * sin[j];
      }
  return y;
}

std::vector<std::int64_t> iota_positions(std::size_t tokens, std::int64_t start) {
  std::vector<std::int64_t> p(tokens);
  for (std::size_t t = 0; t < tokens; ++t) p[t] = start + std::int64_t(t);
  return p;
}

}  // namespace

TEST(RopeTable, HoldsCosAndSinOfEveryAngle) {
  const RopeTable<double> table(4, 3, 100.0);  // inv_freq = [1, 1/10]
  ASSERT_EQ(shape_of(table.cos), (Shape{3, 2}));
  EXPECT_EQ(table.cos(0, 1), 1.0);
  EXPECT_EQ(table.sin(0, 0), 0.0);
  EXPECT_NEAR(table.cos(2, 0), std::cos(2.0), 1e-15);
  EXPECT_NEAR(table.sin(2, 1), std::sin(0.2), 1e-15);
}

TEST(Rope, PositionZeroIsIdentity) {
  Rng rng(1);
  const RopeTable<double> table(8, 16);
  Tensor<double> x = random_tensor<double>({2, 1, 24}, rng), y;
  rope_forward(x, 3, table, 0, y);
  EXPECT_EQ(y, x);
}

TEST(Rope, MatchesHuggingFaceFormulaWithOffset) {
  Rng rng(2);
  const RopeTable<double> table(8, 64, 10000.0);
  Tensor<double> x = random_tensor<double>({2, 5, 16}, rng), y;
  rope_forward(x, 2, table, 37, y);
  EXPECT_LT(max_abs_diff(y, hf_rope(x, 2, 10000.0, iota_positions(5, 37))), 1e-13);
}

TEST(Rope, ExplicitPositionsMatchHuggingFaceFormula) {
  Rng rng(3);
  const RopeTable<double> table(6, 32, 500000.0);
  const std::vector<std::int64_t> pos = {9, 0, 31, 4};
  Tensor<double> x = random_tensor<double>({3, 4, 18}, rng), y;
  rope_forward(x, 3, table, pos, y);
  EXPECT_LT(max_abs_diff(y, hf_rope(x, 3, 500000.0, pos)), 1e-13);
  Tensor<double> y_offset, y_list;  // an offset is the list offset, offset + 1, ...
  rope_forward(x, 3, table, 7, y_offset);
  rope_forward(x, 3, table, iota_positions(4, 7), y_list);
  EXPECT_EQ(y_offset, y_list);
}

TEST(Rope, KvCacheStepEqualsFullSequenceRow) {
  // Decoding token t alone at offset t rotates it exactly as prefilling the whole sequence does.
  Rng rng(4);
  const RopeTable<double> table(8, 16);
  Tensor<double> x = random_tensor<double>({1, 6, 16}, rng), full, step;
  rope_forward(x, 2, table, 0, full);
  Tensor<double> last = xt::view(x, xt::all(), xt::range(5, 6), xt::all());
  rope_forward(last, 2, table, 5, step);
  for (std::size_t j = 0; j < 16; ++j) EXPECT_EQ(step(0, 0, j), full(0, 5, j));
}

TEST(Rope, DotProductDependsOnlyOnRelativePosition) {
  Rng rng(5);
  const RopeTable<double> table(8, 64);
  Tensor<double> q = random_tensor<double>({1, 1, 8}, rng), k = random_tensor<double>({1, 1, 8}, rng);
  auto score = [&](std::size_t m, std::size_t n) {
    Tensor<double> qr, kr;
    rope_forward(q, 1, table, m, qr);
    rope_forward(k, 1, table, n, kr);
    return dot(qr, kr);
  };
  EXPECT_NEAR(score(10, 7), score(45, 42), 1e-12);
  EXPECT_NEAR(score(3, 3), dot(q, k), 1e-12);
}

TEST(Rope, GradientCheckAndInverse) {
  Rng rng(6);
  const RopeTable<double> table(4, 32);
  const std::vector<std::int64_t> pos = {3, 17, 8};
  Tensor<double> x = random_tensor<double>({2, 3, 12}, rng), R = random_tensor<double>({2, 3, 12}, rng), dx;
  auto loss = [&] {
    Tensor<double> y;
    rope_forward(x, 3, table, pos, y);
    return dot(y, R);
  };
  rope_backward(R, 3, table, pos, dx);
  EXPECT_LT(gradient_error(loss, x, dx), 1e-6);

  auto loss_offset = [&] {
    Tensor<double> y;
    rope_forward(x, 3, table, 11, y);
    return dot(y, R);
  };
  rope_backward(R, 3, table, 11, dx);
  EXPECT_LT(gradient_error(loss_offset, x, dx), 1e-6);

  Tensor<double> y, back;  // a rotation: backward undoes forward
  rope_forward(x, 3, table, 11, y);
  rope_backward(y, 3, table, 11, back);
  EXPECT_LT(max_abs_diff(back, x), 1e-14);
}

TEST(Rope, InPlaceEqualsOutOfPlace) {
  Rng rng(7);
  const RopeTable<double> table(8, 16);
  Tensor<double> x = random_tensor<double>({2, 4, 16}, rng), y;
  rope_forward(x, 2, table, 3, y);
  rope_forward(x, 2, table, 3, x);
  EXPECT_EQ(x, y);
}

TEST(Rope, LargeFloatMatchesDoubleAcrossThreads) {
  Rng rng(8);
  const RopeTable<double> td(64, 512);
  const RopeTable<float> tf(64, 512);
  const Tensor<double> xd = random_tensor<double>({2, 128, 256}, rng);
  const Tensor<float> xf = xt::cast<float>(xd);
  Tensor<double> yd, dxd;
  Tensor<float> yf, dxf;
  rope_forward(xd, 4, td, 300, yd);
  rope_forward(xf, 4, tf, 300, yf);
  EXPECT_LT(max_abs_diff(yd, xt::cast<double>(yf)), 1e-5);
  rope_backward(xd, 4, td, 300, dxd);
  rope_backward(xf, 4, tf, 300, dxf);
  EXPECT_LT(max_abs_diff(dxd, xt::cast<double>(dxf)), 1e-5);
}

TEST(Rope, BadConfigsAndShapesAreTyped) {
  EXPECT_THROW(RopeTable<double>(7, 16), ConfigError);
  EXPECT_THROW(RopeTable<double>(8, 0), ConfigError);
  EXPECT_THROW(RopeTable<double>(8, 16, -1.0), ConfigError);
  const RopeTable<double> table(8, 16);
  Tensor<double> x = zeros<double>({1, 4, 16}), y;
  try {
    rope_forward(x, 3, table, 0, y);
    FAIL();
  } catch (const ShapeError& e) {
    EXPECT_STREQ(e.what(), "rope_forward: x has shape [1, 4, 16], expected [..., 24]");
  }
  EXPECT_THROW(rope_forward(x, 0, table, 0, y), ConfigError);
  EXPECT_THROW(rope_forward(Tensor<double>(zeros<double>({16})), 2, table, 0, y), ShapeError);
  try {
    rope_forward(x, 2, table, 13, y);
    FAIL();
  } catch (const IndexError& e) {
    EXPECT_STREQ(e.what(), "rope_forward: positions [13, 17) exceed the table's max_positions 16");
  }
  EXPECT_THROW(rope_forward(x, 2, table, std::vector<std::int64_t>{0, 1, 2}, y), ShapeError);
  EXPECT_THROW(rope_forward(x, 2, table, std::vector<std::int64_t>{0, 1, -2, 3}, y), IndexError);
  EXPECT_THROW(rope_backward(x, 2, table, std::vector<std::int64_t>{0, 1, 2, 16}, y), IndexError);
}
