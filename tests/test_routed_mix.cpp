// Per-sequence mixtures by routing weights (ops/routed_mix.hpp): forward by hand and against an element loop,
// gradient checks of w and every source in double, frozen (null) gradients, and typed errors.
#include <gtest/gtest.h>

#include <array>

#include "mixpeft/ops/routed_mix.hpp"
#include "mixpeft/testing/gradcheck.hpp"

using namespace mixpeft;
using namespace mixpeft::testing;

namespace {

template <std::size_t K>
struct Sources {
  std::array<Tensor<double>, K> W, c;
  std::array<const Tensor<double>*, K> W_ptr() const {
    std::array<const Tensor<double>*, K> p{};
    for (std::size_t k = 0; k < K; ++k) p[k] = &W[k];
    return p;
  }
  std::array<const Tensor<double>*, K> c_ptr() const {
    std::array<const Tensor<double>*, K> p{};
    for (std::size_t k = 0; k < K; ++k) p[k] = &c[k];
    return p;
  }
};

template <std::size_t K>
Sources<K> random_sources(const Shape& w_shape, const Shape& c_shape, Rng& rng) {
  Sources<K> s;
  for (std::size_t k = 0; k < K; ++k) {
    s.W[k] = random_tensor<double>(w_shape, rng);
    s.c[k] = random_tensor<double>(c_shape, rng);
  }
  return s;
}

template <std::size_t K>
void gradient_check(std::size_t B, const Shape& w_shape, const Shape& c_shape, double scale) {
  Rng rng(10 + K);
  Tensor<double> w = random_tensor<double>({B, K}, rng);
  Sources<K> src = random_sources<K>(w_shape, c_shape, rng);
  Tensor<double> E, e;
  routed_mix_forward(w, scale, src.W_ptr(), src.c_ptr(), E, e);
  const Tensor<double> G = random_tensor<double>(shape_of(E), rng), r = random_tensor<double>(shape_of(e), rng);
  auto loss = [&] {
    Tensor<double> E2, e2;
    routed_mix_forward(w, scale, src.W_ptr(), src.c_ptr(), E2, e2);
    return dot(E2, G) + dot(e2, r);
  };
  std::array<Tensor<double>, K> dW0, dc0, dW, dc;
  std::array<Tensor<double>*, K> dW_ptr{}, dc_ptr{};
  for (std::size_t k = 0; k < K; ++k) {
    dW0[k] = random_tensor<double>(w_shape, rng);
    dc0[k] = random_tensor<double>(c_shape, rng);
    dW[k] = dW0[k];
    dc[k] = dc0[k];
    dW_ptr[k] = &dW[k];
    dc_ptr[k] = &dc[k];
  }
  Tensor<double> dw;
  routed_mix_backward(w, scale, src.W_ptr(), src.c_ptr(), G, r, dw, dW_ptr, dc_ptr);
  ASSERT_EQ(shape_of(dw), shape_of(w));
  EXPECT_LT(gradient_error(loss, w, dw), 1e-6);
  for (std::size_t k = 0; k < K; ++k) {
    EXPECT_LT(gradient_error(loss, src.W[k], Tensor<double>(dW[k] - dW0[k])), 1e-6) << "W_" << k;
    EXPECT_LT(gradient_error(loss, src.c[k], Tensor<double>(dc[k] - dc0[k])), 1e-6) << "c_" << k;
  }
}

}  // namespace

TEST(RoutedMix, ForwardHandComputed) {
  const Tensor<double> w = {{0.25, 0.75}, {1.0, 0.0}};
  const Tensor<double> B = {{1.0, 2.0}}, D = {{4.0, 8.0}}, b = {1.0}, d = {3.0};
  Tensor<double> E, e;
  routed_mix_forward(w, 2.0, std::array<const Tensor<double>*, 2>{&B, &D}, std::array<const Tensor<double>*, 2>{&b, &d},
                     E, e);
  EXPECT_EQ(shape_of(E), (Shape{2, 1, 2}));
  EXPECT_EQ(shape_of(e), (Shape{2, 1}));
  EXPECT_EQ(E, (Tensor<double>{{{6.5, 13.0}}, {{2.0, 4.0}}}));  // 2 (B / 4 + 3 D / 4), 2 B
  EXPECT_EQ(e(0, 0), 5.0);
  EXPECT_EQ(e(1, 0), 2.0);
}

TEST(RoutedMix, ForwardMatchesElementLoopAndAcceptsRankOneWeights) {
  Rng rng(1);
  const Tensor<double> w = random_tensor<double>({4, 3}, rng);
  Sources<3> src = random_sources<3>({5, 2}, {5}, rng);
  Tensor<double> E, e;
  routed_mix_forward(w, 0.8, src.W_ptr(), src.c_ptr(), E, e);
  ASSERT_EQ(shape_of(E), (Shape{4, 5, 2}));
  for (std::size_t b = 0; b < 4; ++b)
    for (std::size_t i = 0; i < 10; ++i) {
      double want = 0;
      for (std::size_t k = 0; k < 3; ++k) want += 0.8 * w(b, k) * src.W[k].data()[i];
      EXPECT_NEAR(E.data()[b * 10 + i], want, 1e-12);
    }
  // One routing row given as [K]: B = 1.
  const Tensor<double> w1 = {w(2, 0), w(2, 1), w(2, 2)};
  Tensor<double> E1, e1;
  routed_mix_forward(w1, 0.8, src.W_ptr(), src.c_ptr(), E1, e1);
  ASSERT_EQ(shape_of(E1), (Shape{1, 5, 2}));
  for (std::size_t i = 0; i < 10; ++i) EXPECT_EQ(E1.data()[i], E.data()[20 + i]);
  for (std::size_t i = 0; i < 5; ++i) EXPECT_EQ(e1.data()[i], e.data()[10 + i]);
}

TEST(RoutedMix, GradientChecks) {
  gradient_check<2>(3, {6, 2}, {6}, 0.8);
  gradient_check<1>(2, {4, 3}, {4}, 1.5);
  gradient_check<3>(1, {5}, {2}, -0.6);
}

TEST(RoutedMix, NullGradientsAreSkipped) {
  Rng rng(2);
  const Tensor<double> w = random_tensor<double>({2, 2}, rng);
  Sources<2> src = random_sources<2>({3, 2}, {3}, rng);
  const Tensor<double> G = random_tensor<double>({2, 3, 2}, rng), r = random_tensor<double>({2, 3}, rng);
  Tensor<double> dw_all, dw;
  std::array<Tensor<double>, 2> dW = {zeros<double>({3, 2}), zeros<double>({3, 2})};
  std::array<Tensor<double>, 2> dc = {zeros<double>({3}), zeros<double>({3})};
  routed_mix_backward(w, 1.0, src.W_ptr(), src.c_ptr(), G, r, dw_all, {&dW[0], &dW[1]}, {&dc[0], &dc[1]});
  Tensor<double> dD = zeros<double>({3, 2});
  routed_mix_backward(w, 1.0, src.W_ptr(), src.c_ptr(), G, r, dw, {nullptr, &dD}, {nullptr, nullptr});
  EXPECT_EQ(dw, dw_all);  // dw does not depend on which sources train
  EXPECT_EQ(dD, dW[1]);
}

TEST(RoutedMix, ErrorsAreTyped) {
  const Tensor<double> B = zeros<double>({3, 2}), D = zeros<double>({3, 2}), b = zeros<double>({3}),
                       d = zeros<double>({3});
  const std::array<const Tensor<double>*, 2> W{&B, &D}, c{&b, &d};
  Tensor<double> E, e;
  try {
    routed_mix_forward(zeros<double>({2, 3}), 1.0, W, c, E, e);
    FAIL();
  } catch (const ShapeError& err) {
    EXPECT_STREQ(err.what(), "routed_mix_forward: w has shape [2, 3], expected [B, 2] or [2]");
  }
  const Tensor<double> D_bad = zeros<double>({2, 3});
  EXPECT_THROW(routed_mix_forward(zeros<double>({2, 2}), 1.0, {&B, &D_bad}, c, E, e), ShapeError);
  EXPECT_THROW(routed_mix_forward(zeros<double>({2, 2}), 1.0, {&B, nullptr}, c, E, e), ConfigError);
  const Tensor<double> w = zeros<double>({2, 2});
  Tensor<double> dw;
  Tensor<double> dB = zeros<double>({3, 2}), dB_bad = zeros<double>({2, 3});
  EXPECT_THROW(routed_mix_backward(w, 1.0, W, c, zeros<double>({2, 3, 3}), zeros<double>({2, 3}), dw, {&dB, nullptr},
                                   {nullptr, nullptr}),
               ShapeError);
  EXPECT_THROW(routed_mix_backward(w, 1.0, W, c, zeros<double>({2, 3, 2}), zeros<double>({1, 3}), dw, {&dB, nullptr},
                                   {nullptr, nullptr}),
               ShapeError);
  EXPECT_THROW(routed_mix_backward(w, 1.0, W, c, zeros<double>({2, 3, 2}), zeros<double>({2, 3}), dw,
                                   {&dB_bad, nullptr}, {nullptr, nullptr}),
               ShapeError);
}
