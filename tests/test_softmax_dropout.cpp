#include <gtest/gtest.h>
#include <omp.h>

#include <xtensor/xview.hpp>

#include <algorithm>
#include <cmath>
#include <vector>

#include "mixpeft/ops/dropout.hpp"
#include "mixpeft/ops/softmax.hpp"
#include "mixpeft/testing/gradcheck.hpp"

using namespace mixpeft;
using namespace mixpeft::testing;

TEST(Softmax, ForwardHandComputedAndStable) {
  Tensor<double> x = {{0.0, std::log(3.0)}, {1000.0, 1000.0}}, y;
  softmax_forward(x, y);
  EXPECT_NEAR(y(0, 0), 0.25, 1e-15);
  EXPECT_NEAR(y(0, 1), 0.75, 1e-15);
  EXPECT_NEAR(y(1, 0), 0.5, 1e-15);  // no overflow at large logits
}

TEST(Softmax, GradientCheck) {
  Rng rng(1);
  Tensor<double> x = random_tensor<double>({3, 4, 6}, rng, 2.0), R = random_tensor<double>({3, 4, 6}, rng), y, dx;
  auto loss = [&] {
    Tensor<double> out;
    softmax_forward(x, out);
    return dot(out, R);
  };
  softmax_forward(x, y);
  softmax_backward(y, R, dx);
  EXPECT_LT(gradient_error(loss, x, dx), 1e-6);
}

TEST(Dropout, EvalIsIdentityWithEmptyMask) {
  Rng rng(2);
  Tensor<double> x = random_tensor<double>({4, 5}, rng), y, mask;
  dropout_forward(x, 0.5, /*training=*/false, rng, y, mask);
  EXPECT_EQ(y, x);
  EXPECT_EQ(mask.size(), 0u);
  Tensor<double> dx;
  dropout_backward(x, mask, dx);
  EXPECT_EQ(dx, x);
}

TEST(Dropout, KeepsExpectationAndRate) {
  Rng rng(3);
  Tensor<double> x = zeros<double>({200, 500}), y, mask;
  x.fill(1.0);
  dropout_forward(x, 0.1, true, rng, y, mask);
  double mean = 0, dropped = 0;
  for (double v : y) {
    mean += v;
    dropped += v == 0.0;
  }
  EXPECT_NEAR(mean / double(y.size()), 1.0, 0.01);
  EXPECT_NEAR(dropped / double(y.size()), 0.1, 0.005);
}

TEST(Dropout, SameSeedSameMask) {
  Tensor<float> x = zeros<float>({8, 8}), y1, y2, m1, m2;
  x.fill(1.0f);
  Rng a(5), b(5);
  dropout_forward(x, 0.3, true, a, y1, m1);
  dropout_forward(x, 0.3, true, b, y2, m2);
  EXPECT_EQ(m1, m2);
}

TEST(Dropout, MaskDependsOnTheSeedNotOnTheThreadCount) {
  // Large enough to span many blocks and run threaded.
  Tensor<float> x = zeros<float>({64, 4096}), y, serial, threaded, next;
  x.fill(1.0f);
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  Rng a(11);
  dropout_forward(x, 0.25, true, a, y, serial);
  omp_set_num_threads(std::max(2, threads));
  Rng b(11);
  dropout_forward(x, 0.25, true, b, y, threaded);
  omp_set_num_threads(threads);
  EXPECT_EQ(serial, threaded);
  dropout_forward(x, 0.25, true, b, y, next);  // the stream moved on: a new mask
  EXPECT_NE(serial, next);
  // Elements draw distinct bits: the first two 4096-element rows differ.
  EXPECT_NE(Tensor<float>(xt::view(serial, 0, xt::all())), Tensor<float>(xt::view(serial, 1, xt::all())));
}

TEST(Dropout, MaskIsTheDocumentedCounterHash) {
  Tensor<double> x = zeros<double>({3, 7}), y, mask;
  x.fill(2.0);
  const double p = 0.4;
  Rng rng(21), key_rng(21);
  dropout_forward(x, p, true, rng, y, mask);
  const std::uint64_t key = key_rng.next_u64();
  const auto threshold = std::uint64_t(std::nearbyint(p * 4294967296.0));
  for (std::size_t i = 0; i < x.size(); ++i) {
    const bool keep = detail::dropout_bits(key, i) >= threshold;
    EXPECT_EQ(mask.data()[i], keep ? 1.0 / (1.0 - p) : 0.0) << i;
    EXPECT_EQ(y.data()[i], keep ? 2.0 / (1.0 - p) : 0.0) << i;
  }
  // The high half of the index enters the hash (elements 2^32 apart differ), and the mixer is a bijection on a
  // sample of inputs.
  EXPECT_NE(detail::dropout_bits(key, 5), detail::dropout_bits(key, 5 + (std::uint64_t(1) << 32)));
  std::vector<std::uint32_t> mixed;
  for (std::uint32_t v = 0; v < 100000; ++v) mixed.push_back(detail::dropout_mix(v));
  std::sort(mixed.begin(), mixed.end());
  EXPECT_EQ(std::adjacent_find(mixed.begin(), mixed.end()), mixed.end());
}

TEST(Dropout, GradientCheckWithFixedMask) {
  Tensor<double> x, R, mask, dx;
  Rng init(6);
  x = random_tensor<double>({5, 7}, init);
  R = random_tensor<double>({5, 7}, init);
  auto loss = [&] {
    Rng rng(7);  // the same mask every evaluation
    Tensor<double> y, m;
    dropout_forward(x, 0.4, true, rng, y, m);
    return dot(y, R);
  };
  Rng rng(7);
  Tensor<double> y;
  dropout_forward(x, 0.4, true, rng, y, mask);
  dropout_backward(R, mask, dx);
  EXPECT_LT(gradient_error(loss, x, dx), 1e-6);
}

TEST(Dropout, BadProbabilityIsConfigError) {
  Rng rng(8);
  Tensor<double> x = zeros<double>({2}), y, m;
  EXPECT_THROW(dropout_forward(x, 1.0, true, rng, y, m), ConfigError);
  EXPECT_THROW(dropout_forward(x, -0.1, true, rng, y, m), ConfigError);
}
