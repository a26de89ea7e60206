// The grouped LoRA ops of ops/grouped_lora.hpp: each op against naive per-row loops on uneven expert blocks (one
// expert empty, blocks cut by the threads' row slices), 2-D weights as one expert, gradient checks in double of
// the composed LoRA (x -> shrink -> expand with gates) for x, A, B and the gates, and typed errors.
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "mixpeft/ops/grouped_lora.hpp"
#include "mixpeft/ops/matmul.hpp"
#include "mixpeft/testing/gradcheck.hpp"

using namespace mixpeft;
using namespace mixpeft::testing;

namespace {

constexpr std::size_t K = 4, R = 5, IN = 40, OUT = 56, M = 97;

// The expert owning row j.
std::size_t expert_of(const Tensor<std::int32_t>& offsets, std::size_t j) {
  std::size_t e = 0;
  while (std::size_t(offsets(e + 1)) <= j) ++e;
  return e;
}

struct Data {
  Rng rng{17};
  Tensor<std::int32_t> offsets = {0, 30, 30, 81, 97};  // expert 1 has no rows
  Tensor<double> x = random_tensor<double>({M, IN}, rng), A = random_tensor<double>({K, R, IN}, rng),
                 B = random_tensor<double>({K, OUT, R}, rng), t = random_tensor<double>({M, R}, rng),
                 dy = random_tensor<double>({M, OUT}, rng), gates = random_tensor<double>({M, 1}, rng);
};

TEST(GroupedLoRA, RowOpsMatchPerRowLoops) {
  Data d;
  Tensor<double> t, y, dt, dgates = zeros<double>({M, 1}), dx;
  grouped_lora_shrink(d.x, d.A, d.offsets, t);
  Tensor<double> y0 = random_tensor<double>({M, OUT}, d.rng);
  y = y0;
  grouped_lora_expand(d.t, d.B, d.offsets, 0.5, &d.gates, true, y);
  grouped_lora_expand_backward(d.dy, d.B, d.offsets, 0.5, &d.gates, dt, &d.t, &dgates);
  grouped_lora_shrink_backward(d.t, d.A, d.offsets, false, dx);
  for (std::size_t j = 0; j < M; ++j) {
    const std::size_t e = expert_of(d.offsets, j);
    for (std::size_t q = 0; q < R; ++q) {
      double ref = 0;
      for (std::size_t i = 0; i < IN; ++i) ref += d.x(j, i) * d.A(e, q, i);
      EXPECT_NEAR(t(j, q), ref, 1e-12);
    }
    double gate_dot = 0;
    for (std::size_t q = 0; q < R; ++q) {
      double u = 0;
      for (std::size_t o = 0; o < OUT; ++o) u += 0.5 * d.dy(j, o) * d.B(e, o, q);
      EXPECT_NEAR(dt(j, q), d.gates(j, 0) * u, 1e-12);
      gate_dot += u * d.t(j, q);
    }
    EXPECT_NEAR(dgates(j, 0), gate_dot, 1e-12);
    for (std::size_t o = 0; o < OUT; ++o) {
      double ref = 0;
      for (std::size_t q = 0; q < R; ++q) ref += d.t(j, q) * d.B(e, o, q);
      EXPECT_NEAR(y(j, o), y0(j, o) + 0.5 * d.gates(j, 0) * ref, 1e-12);
    }
    for (std::size_t i = 0; i < IN; ++i) {
      double ref = 0;
      for (std::size_t q = 0; q < R; ++q) ref += d.t(j, q) * d.A(e, q, i);
      EXPECT_NEAR(dx(j, i), ref, 1e-12);
    }
  }
}

TEST(GroupedLoRA, WeightGradsMatchPerExpertSumsAndSkipEmptyExperts) {
  Data d;
  Tensor<double> dA = random_tensor<double>({K, R, IN}, d.rng), dB = random_tensor<double>({K, OUT, R}, d.rng);
  const Tensor<double> dA0 = dA, dB0 = dB;
  grouped_lora_grad_B(d.dy, d.t, d.offsets, 0.5, &d.gates, dB);
  grouped_lora_grad_A(d.t, d.x, d.offsets, dA);  // t plays dt here
  for (std::size_t e = 0; e < K; ++e) {
    const std::size_t b = std::size_t(d.offsets(e)), end = std::size_t(d.offsets(e + 1));
    for (std::size_t o = 0; o < OUT; ++o)
      for (std::size_t q = 0; q < R; ++q) {
        double ref = 0;
        for (std::size_t j = b; j < end; ++j) ref += 0.5 * d.gates(j, 0) * d.dy(j, o) * d.t(j, q);
        EXPECT_NEAR(dB(e, o, q), dB0(e, o, q) + ref, 1e-12);
      }
    for (std::size_t q = 0; q < R; ++q)
      for (std::size_t i = 0; i < IN; ++i) {
        double ref = 0;
        for (std::size_t j = b; j < end; ++j) ref += d.t(j, q) * d.x(j, i);
        EXPECT_NEAR(dA(e, q, i), dA0(e, q, i) + ref, 1e-12);
      }
  }
}

TEST(GroupedLoRA, TwoDimensionalWeightsAreOneExpert) {
  Rng rng(3);
  const Tensor<double> x = random_tensor<double>({7, 6}, rng), A = random_tensor<double>({2, 6}, rng),
                       B = random_tensor<double>({5, 2}, rng);
  Tensor<std::int32_t> offsets;
  one_block_offsets(7, offsets);
  EXPECT_EQ(offsets(0), 0);
  EXPECT_EQ(offsets(1), 7);
  Tensor<double> t, y;
  grouped_lora_shrink(x, A, offsets, t);
  grouped_lora_expand(t, B, offsets, 2.0, nullptr, false, y);
  Tensor<double> xa, ref;
  linear_forward(x, A, nullptr, xa);
  linear_forward(xa, B, nullptr, ref);
  EXPECT_LT(max_abs_diff(y, 2.0 * ref), 1e-12);
}

// L = <expand(shrink(x), gates), R>: every gradient against finite differences.
TEST(GroupedLoRA, ComposedGradientsCheckInDouble) {
  Rng rng(5);
  const std::size_t m = 11, in = 6, out = 7, r = 3, k = 3;
  Tensor<std::int32_t> offsets = {0, 4, 4, 11};
  Tensor<double> x = random_tensor<double>({m, in}, rng), A = random_tensor<double>({k, r, in}, rng),
                 B = random_tensor<double>({k, out, r}, rng), gates = random_tensor<double>({m}, rng),
                 Rw = random_tensor<double>({m, out}, rng);
  const double s = 0.75;
  const auto loss = [&] {
    Tensor<double> t, y;
    grouped_lora_shrink(x, A, offsets, t);
    grouped_lora_expand(t, B, offsets, s, &gates, false, y);
    return dot(y, Rw);
  };
  Tensor<double> t, dt, dx, dgates = zeros<double>({m}), dA = zeros<double>({k, r, in}), dB = zeros<double>({k, out, r});
  grouped_lora_shrink(x, A, offsets, t);
  grouped_lora_expand_backward(Rw, B, offsets, s, &gates, dt, &t, &dgates);
  grouped_lora_grad_B(Rw, t, offsets, s, &gates, dB);
  grouped_lora_grad_A(dt, x, offsets, dA);
  grouped_lora_shrink_backward(dt, A, offsets, false, dx);
  EXPECT_LT(gradient_error(loss, x, dx), 1e-6);
  EXPECT_LT(gradient_error(loss, A, dA), 1e-6);
  EXPECT_LT(gradient_error(loss, B, dB), 1e-6);
  EXPECT_LT(gradient_error(loss, gates, dgates), 1e-6);
}

TEST(GroupedLoRA, TypedErrors) {
  Data d;
  Tensor<double> t, y;
  Tensor<std::int32_t> falling = {0, 40, 30, 81, 97}, short_end = {0, 30, 30, 81, 96}, three = {0, 30, 97};
  EXPECT_THROW(grouped_lora_shrink(d.x, d.A, falling, t), ShapeError);
  EXPECT_THROW(grouped_lora_shrink(d.x, d.A, short_end, t), ShapeError);
  EXPECT_THROW(grouped_lora_shrink(d.x, d.A, three, t), ShapeError);
  EXPECT_THROW(grouped_lora_shrink(d.x, random_tensor<double>({K, R, IN + 1}, d.rng), d.offsets, t), ShapeError);
  EXPECT_THROW(grouped_lora_shrink(d.x, random_tensor<double>({R}, d.rng), d.offsets, t), ShapeError);
  Tensor<double> bad_gates = zeros<double>({M, 2});
  EXPECT_THROW(grouped_lora_expand(d.t, d.B, d.offsets, 1.0, &bad_gates, false, y), ShapeError);
  y = zeros<double>({M - 1, OUT});
  EXPECT_THROW(grouped_lora_expand(d.t, d.B, d.offsets, 1.0, nullptr, true, y), ShapeError);
  Tensor<double> dt, dg = zeros<double>({M});
  EXPECT_THROW(grouped_lora_expand_backward(d.dy, d.B, d.offsets, 1.0, &d.gates, dt, nullptr, &dg), ShapeError);
  try {
    grouped_lora_shrink(d.x, d.A, falling, t);
  } catch (const ShapeError& e) {
    EXPECT_STREQ(e.what(), "grouped_lora_shrink: offsets must rise from 0 to the 97 rows");
  }
}

}  // namespace
