// Element-wise helpers of ops/elementwise.hpp: add_to and add_transposed.
#include <gtest/gtest.h>

#include "mixpeft/ops/elementwise.hpp"
#include "mixpeft/testing/gradcheck.hpp"

using namespace mixpeft;
using namespace mixpeft::testing;

TEST(AddTo, AddsAcrossLeadingAxes) {
  Rng rng(1);
  Tensor<double> dst = random_tensor<double>({2, 3, 4}, rng), src = random_tensor<double>({6, 4}, rng);
  Tensor<double> want = dst;
  for (std::size_t i = 0; i < want.size(); ++i) want.data()[i] += src.data()[i];
  add_to(dst, src);
  EXPECT_EQ(dst, want);
}

TEST(AddTransposed, HandComputed) {
  Tensor<double> src = {{1, 2, 3}, {4, 5, 6}};  // [2, 3]
  Tensor<double> dst = {{10, 20}, {30, 40}, {50, 60}};  // [3, 2]
  add_transposed(src, 1.0, dst);
  EXPECT_EQ(dst, (Tensor<double>{{11, 24}, {32, 45}, {53, 66}}));
  add_transposed(src, -2.0, dst);
  EXPECT_EQ(dst, (Tensor<double>{{9, 16}, {28, 35}, {47, 54}}));
}

// Shapes that are not multiples of any tile or vector width, in both precisions.
TEST(AddTransposed, MatchesElementLoop) {
  Rng rng(2);
  for (auto [r, c] : {std::pair<std::size_t, std::size_t>{37, 5}, {5, 37}, {64, 16}, {1, 1}, {1, 9}}) {
    const Tensor<double> src = random_tensor<double>({c, r}, rng), dst0 = random_tensor<double>({r, c}, rng);
    Tensor<double> dst = dst0, want = dst0;
    for (std::size_t i = 0; i < r; ++i)
      for (std::size_t j = 0; j < c; ++j) want(i, j) += 0.25 * src(j, i);
    add_transposed(src, 0.25, dst);
    EXPECT_LT(max_abs_diff(dst, want), 1e-15) << r << " x " << c;

    Tensor<float> srcf = xt::cast<float>(src), dstf = xt::cast<float>(dst0);
    add_transposed(srcf, 1, dstf);
    for (std::size_t i = 0; i < r; ++i)
      for (std::size_t j = 0; j < c; ++j) EXPECT_EQ(dstf(i, j), float(dst0(i, j)) + float(src(j, i)));
  }
}

TEST(AddTransposed, EmptyIsANoOp) {
  Tensor<double> src = zeros<double>({0, 3}), dst = zeros<double>({3, 0});
  add_transposed(src, 1.0, dst);
  EXPECT_EQ(dst.size(), 0u);
}

TEST(AddTransposed, ShapeAndAliasErrorsAreTyped) {
  Tensor<double> dst = zeros<double>({3, 2}), src = zeros<double>({3, 2});
  try {
    add_transposed(src, 1.0, dst);
    FAIL();
  } catch (const ShapeError& e) {
    EXPECT_STREQ(e.what(), "add_transposed: src has shape [3, 2], expected [2, 3]");
  }
  Tensor<double> flat = zeros<double>({6});
  EXPECT_THROW(add_transposed(src, 1.0, flat), ShapeError);
  Tensor<double> square = zeros<double>({4, 4});
  try {
    add_transposed(square, 1.0, square);
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_STREQ(e.what(), "add_transposed: dst must not alias src");
  }
}
