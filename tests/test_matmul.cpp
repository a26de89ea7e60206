#include <gtest/gtest.h>

#include "mixpeft/ops/matmul.hpp"
#include "mixpeft/testing/gradcheck.hpp"

using namespace mixpeft;
using namespace mixpeft::testing;

TEST(Linear, ForwardHandComputed) {
  Tensor<double> x = {{1, 2}, {3, 4}};
  Tensor<double> W = {{1, 0}, {0, 1}, {1, 1}};
  Tensor<double> b = {0.5, -0.5, 1};
  Tensor<double> y;
  linear_forward(x, W, &b, y);
  Tensor<double> expected = {{1.5, 1.5, 4}, {3.5, 3.5, 8}};
  EXPECT_EQ(y, expected);
}

TEST(Linear, LeadingAxesAreRows) {
  Rng rng(3);
  Tensor<double> x = random_tensor<double>({2, 3, 5}, rng), W = random_tensor<double>({4, 5}, rng), y;
  linear_forward(x, W, nullptr, y);
  ASSERT_EQ(shape_of(y), (Shape{2, 3, 4}));
  double ref = 0;
  for (int k = 0; k < 5; ++k) ref += x(1, 2, k) * W(3, k);
  EXPECT_NEAR(y(1, 2, 3), ref, 1e-12);
}

TEST(Linear, GradientCheck) {
  Rng rng(4);
  Tensor<double> x = random_tensor<double>({6, 5}, rng), W = random_tensor<double>({4, 5}, rng),
                 b = random_tensor<double>({4}, rng), R = random_tensor<double>({6, 4}, rng);
  auto loss = [&] {
    Tensor<double> y;
    linear_forward(x, W, &b, y);
    return dot(y, R);
  };
  Tensor<double> dx, dW = zeros<double>({4, 5}), db = zeros<double>({4});
  linear_backward(x, W, R, &dx, &dW, &db);
  EXPECT_LT(gradient_error(loss, x, dx), 1e-6);
  EXPECT_LT(gradient_error(loss, W, dW), 1e-6);
  EXPECT_LT(gradient_error(loss, b, db), 1e-6);
}

// A null gradient pointer (a frozen parameter) is skipped; the given ones accumulate.
TEST(Linear, NullGradientsAreSkippedAndTheOthersAccumulate) {
  Rng rng(5);
  Tensor<double> x = random_tensor<double>({3, 2}, rng), W = random_tensor<double>({2, 2}, rng),
                 dy = random_tensor<double>({3, 2}, rng);
  Tensor<double> db = zeros<double>({2});
  linear_backward(x, W, dy, nullptr, nullptr, &db);
  for (std::size_t j = 0; j < 2; ++j) EXPECT_NEAR(db(j), dy(0, j) + dy(1, j) + dy(2, j), 1e-12);
  const Tensor<double> once = db;
  Tensor<double> dW = zeros<double>({2, 2});
  linear_backward(x, W, dy, nullptr, &dW, &db);
  for (std::size_t j = 0; j < 2; ++j) EXPECT_NEAR(db(j), 2 * once(j), 1e-12);
  for (std::size_t o = 0; o < 2; ++o)
    for (std::size_t i = 0; i < 2; ++i)
      EXPECT_NEAR(dW(o, i), dy(0, o) * x(0, i) + dy(1, o) * x(1, i) + dy(2, o) * x(2, i), 1e-12);
}

TEST(Linear, ShapeMismatchIsTyped) {
  Tensor<float> x = zeros<float>({4, 3}), W = zeros<float>({2, 5}), y;
  try {
    linear_forward(x, W, nullptr, y);
    FAIL();
  } catch (const ShapeError& e) {
    EXPECT_STREQ(e.what(), "linear_forward: x has shape [4, 3], expected [..., 5]");
  }
}

TEST(Gemm, AllTransposeCombinations) {
  Rng rng(6);
  Tensor<double> A = random_tensor<double>({3, 4}, rng), B = random_tensor<double>({4, 5}, rng);
  Tensor<double> At = xt::transpose(A), Bt = xt::transpose(B);
  Tensor<double> ref = zeros<double>({3, 5});
  gemm(Trans::No, Trans::No, 3, 5, 4, 1.0, A.data(), B.data(), 0.0, ref.data());
  for (auto [ta, tb] : {std::pair{Trans::Yes, Trans::No}, {Trans::No, Trans::Yes}, {Trans::Yes, Trans::Yes}}) {
    Tensor<double> c = zeros<double>({3, 5});
    gemm(ta, tb, 3, 5, 4, 1.0, ta == Trans::Yes ? At.data() : A.data(), tb == Trans::Yes ? Bt.data() : B.data(),
         0.0, c.data());
    EXPECT_LT(max_abs_diff(c, ref), 1e-12);
  }
  Tensor<double> c = ref;
  gemm(Trans::No, Trans::No, 3, 5, 4, 2.0, A.data(), B.data(), 1.0, c.data());  // c = ref + 2 ref
  EXPECT_LT(max_abs_diff(c, Tensor<double>(3.0 * ref)), 1e-12);
}

// The tensor form (the CUDA gemm's signature) forwards to the pointer form; it only checks element counts, so a
// [2, 3, 4] activation serves as the [6, 4] matrix.
TEST(Gemm, TensorFormMatchesPointerFormAndChecksCounts) {
  Rng rng(11);
  Tensor<double> A = random_tensor<double>({2, 3, 4}, rng), B = random_tensor<double>({5, 4}, rng);
  Tensor<double> c0 = random_tensor<double>({6, 5}, rng);
  Tensor<double> ref = c0, c = c0;
  gemm(Trans::No, Trans::Yes, 6, 5, 4, 0.5, A.data(), B.data(), 2.0, ref.data());
  gemm(Trans::No, Trans::Yes, 6, 5, 4, 0.5, A, B, 2.0, c);
  EXPECT_EQ(c, ref);
  Tensor<float> Af = zeros<float>({6, 4}), Bf = zeros<float>({5, 4}), cf = zeros<float>({6, 5});
  gemm(Trans::No, Trans::Yes, 6, 5, 4, 1, Af, Bf, 0, cf);  // int literals convert: alpha is not deduced
  try {
    gemm(Trans::No, Trans::Yes, 6, 5, 3, 1.0, A, B, 0.0, c);
    FAIL();
  } catch (const ShapeError& e) {
    EXPECT_STREQ(e.what(), "gemm: A has shape [2, 3, 4], expected 18 elements (M = 6, K = 3)");
  }
  EXPECT_THROW(gemm(Trans::No, Trans::Yes, 6, 4, 4, 1.0, A, B, 0.0, c), ShapeError);  // B holds 20, not 16
  Tensor<double> small = zeros<double>({5, 5});
  EXPECT_THROW(gemm(Trans::No, Trans::Yes, 6, 5, 4, 1.0, A, B, 0.0, small), ShapeError);
}
