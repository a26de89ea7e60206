#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "mixpeft/ops/attention.hpp"
#include "mixpeft/testing/gradcheck.hpp"

using namespace mixpeft;
using namespace mixpeft::testing;

namespace {

// Straightforward loops over (b, h, i, j) with an explicit mask predicate; fully masked rows give 0.
Tensor<double> naive_attention(const Tensor<double>& q, const Tensor<double>& k, const Tensor<double>& v,
                               std::size_t heads, const AttentionMask& mask) {
  const std::size_t B = q.shape()[0], Tq = q.shape()[1], Tk = k.shape()[1], D = q.shape()[2], dh = D / heads;
  const double scale = 1.0 / std::sqrt(double(dh));
  Tensor<double> o = zeros<double>({B, Tq, D});
  for (std::size_t b = 0; b < B; ++b)
    for (std::size_t h = 0; h < heads; ++h)
      for (std::size_t i = 0; i < Tq; ++i) {
        const long pos = long(Tk) - long(Tq) + long(i);
        std::vector<double> s(Tk, -std::numeric_limits<double>::infinity());
        double m = -std::numeric_limits<double>::infinity();
        for (std::size_t j = 0; j < Tk; ++j) {
          const bool allowed = (!mask.causal || long(j) <= pos) &&
                               (mask.key_lengths.empty() || j < mask.key_lengths[b]) &&
                               !(mask.block_first_key && j == 0 && pos >= 1);
          if (!allowed) continue;
          s[j] = 0;
          for (std::size_t c = 0; c < dh; ++c) s[j] += q(b, i, h * dh + c) * k(b, j, h * dh + c);
          s[j] *= scale;
          m = std::max(m, s[j]);
        }
        if (m == -std::numeric_limits<double>::infinity()) continue;
        double z = 0;
        for (std::size_t j = 0; j < Tk; ++j) z += std::exp(s[j] - m);
        for (std::size_t j = 0; j < Tk; ++j) {
          const double p = std::exp(s[j] - m) / z;
          for (std::size_t c = 0; c < dh; ++c) o(b, i, h * dh + c) += p * v(b, j, h * dh + c);
        }
      }
  return o;
}

Tensor<double> forward(const Tensor<double>& q, const Tensor<double>& k, const Tensor<double>& v, std::size_t heads,
                       const AttentionMask& mask) {
  Tensor<double> o;
  AttentionCache<double> cache;
  attention_forward(q, k, v, heads, mask, o, cache);
  return o;
}

// Gradient checks of q, k and v for one configuration: q [B, Tq, H*dh], k and v [B, Tk, H*dh].
void check_gradients(std::size_t B, std::size_t Tq, std::size_t Tk, std::size_t H, std::size_t dh,
                     const AttentionMask& mask, std::uint64_t seed) {
  Rng rng(seed);
  const std::size_t D = H * dh;
  Tensor<double> q = random_tensor<double>({B, Tq, D}, rng), k = random_tensor<double>({B, Tk, D}, rng),
                 v = random_tensor<double>({B, Tk, D}, rng), R = random_tensor<double>({B, Tq, D}, rng);
  Tensor<double> o, dq, dk, dv;
  AttentionCache<double> cache;
  attention_forward(q, k, v, H, mask, o, cache);
  attention_backward(q, k, v, cache, R, dq, dk, dv);
  auto loss = [&] { return dot(forward(q, k, v, H, mask), R); };
  EXPECT_LT(gradient_error(loss, q, dq), 1e-6);
  EXPECT_LT(gradient_error(loss, k, dk), 1e-6);
  EXPECT_LT(gradient_error(loss, v, dv), 1e-6);
}

// Copies rows [t0, t0 + n) of a [B, T, D] tensor.
Tensor<double> rows_of(const Tensor<double>& x, std::size_t t0, std::size_t n) {
  Tensor<double> out = empty<double>({x.shape()[0], n, x.shape()[2]});
  for (std::size_t b = 0; b < x.shape()[0]; ++b)
    for (std::size_t t = 0; t < n; ++t)
      for (std::size_t c = 0; c < x.shape()[2]; ++c) out(b, t, c) = x(b, t0 + t, c);
  return out;
}

// The [1, T, dh] slice of head h in sequence b of a [B, T, H*dh] tensor.
Tensor<double> head_of(const Tensor<double>& x, std::size_t b, std::size_t h, std::size_t dh) {
  Tensor<double> out = empty<double>({1, x.shape()[1], dh});
  for (std::size_t t = 0; t < x.shape()[1]; ++t)
    for (std::size_t c = 0; c < dh; ++c) out(0, t, c) = x(b, t, h * dh + c);
  return out;
}

}  // namespace

TEST(Attention, HandComputedTwoTokens) {
  // One head, dh = 1 (scale 1): row 1 scores keys 0 and ln 3, so P = [1/4, 3/4].
  Tensor<double> q = zeros<double>({1, 2, 1}), k = zeros<double>({1, 2, 1}), v = zeros<double>({1, 2, 1}), o;
  q(0, 0, 0) = q(0, 1, 0) = 1.0;
  k(0, 1, 0) = std::log(3.0);
  v(0, 0, 0) = 4.0;
  v(0, 1, 0) = 8.0;
  AttentionCache<double> cache;
  attention_forward(q, k, v, 1, {}, o, cache);
  EXPECT_NEAR(cache.probs(0, 0, 0, 0), 1.0, 1e-15);
  EXPECT_EQ(cache.probs(0, 0, 0, 1), 0.0);
  EXPECT_NEAR(cache.probs(0, 0, 1, 0), 0.25, 1e-15);
  EXPECT_NEAR(cache.probs(0, 0, 1, 1), 0.75, 1e-15);
  EXPECT_NEAR(o(0, 0, 0), 4.0, 1e-14);
  EXPECT_NEAR(o(0, 1, 0), 0.25 * 4.0 + 0.75 * 8.0, 1e-14);

  attention_forward(q, k, v, 1, {.causal = false}, o, cache);
  EXPECT_NEAR(o(0, 0, 0), 7.0, 1e-14);
  EXPECT_NEAR(o(0, 1, 0), 7.0, 1e-14);

  attention_forward(q, k, v, 1, {.block_first_key = true}, o, cache);  // row 1 may only see itself
  EXPECT_NEAR(o(0, 0, 0), 4.0, 1e-14);
  EXPECT_NEAR(o(0, 1, 0), 8.0, 1e-14);
}

TEST(Attention, HandComputedScaleAndHeads) {
  // Two heads of width 4 (scale 1/2): head 0 of row 1 scores keys 0 and 2 ln 3 / 2 = ln 3; head 1 sees equal keys.
  const double l = 2 * std::log(3.0);
  Tensor<double> q = zeros<double>({1, 2, 8}), k = zeros<double>({1, 2, 8}), v = zeros<double>({1, 2, 8});
  q(0, 1, 0) = 1.0;
  k(0, 1, 0) = l;
  v(0, 0, 1) = 4.0;
  v(0, 1, 1) = 8.0;
  v(0, 0, 5) = 2.0;
  v(0, 1, 5) = 6.0;
  const Tensor<double> o = forward(q, k, v, 2, {});
  EXPECT_NEAR(o(0, 1, 1), 7.0, 1e-14);
  EXPECT_NEAR(o(0, 1, 5), 4.0, 1e-14);
  EXPECT_NEAR(o(0, 0, 5), 2.0, 1e-14);
}

TEST(Attention, ForwardMatchesNaiveLoops) {
  Rng rng(1);
  struct Case {
    std::size_t B, Tq, Tk, H, dh;
    AttentionMask mask;
  };
  const std::vector<Case> cases = {
      {2, 5, 5, 3, 4, {}},
      {2, 5, 5, 3, 4, {.causal = false}},
      {2, 4, 6, 2, 3, {.causal = false}},  // cross-attention shape
      {2, 6, 6, 2, 3, {.block_first_key = true}},
      {2, 6, 6, 2, 3, {.causal = false, .block_first_key = true}},
      {3, 6, 6, 2, 3, {.key_lengths = {6, 4, 1}}},
      {3, 6, 6, 2, 3, {.causal = false, .block_first_key = true, .key_lengths = {2, 6, 1}}},
      {2, 3, 7, 2, 3, {.block_first_key = true, .key_lengths = {7, 5}}},  // decode offset
      {2, 150, 150, 2, 8, {.block_first_key = true, .key_lengths = {150, 97}}},  // several row blocks, threads
      {1, 70, 140, 3, 5, {.causal = false}},
  };
  for (const auto& c : cases) {
    const std::size_t D = c.H * c.dh;
    Tensor<double> q = random_tensor<double>({c.B, c.Tq, D}, rng), k = random_tensor<double>({c.B, c.Tk, D}, rng),
                   v = random_tensor<double>({c.B, c.Tk, D}, rng);
    EXPECT_LT(max_abs_diff(forward(q, k, v, c.H, c.mask), naive_attention(q, k, v, c.H, c.mask)), 1e-12)
        << "B=" << c.B << " Tq=" << c.Tq << " Tk=" << c.Tk << " causal=" << c.mask.causal
        << " block_first_key=" << c.mask.block_first_key;
  }
}

TEST(Attention, GradientCheckCausal) { check_gradients(2, 5, 5, 2, 3, {}, 2); }

TEST(Attention, GradientCheckNonCausal) { check_gradients(2, 4, 6, 2, 3, {.causal = false}, 3); }

TEST(Attention, GradientCheckBlockFirstKey) { check_gradients(2, 5, 5, 2, 3, {.block_first_key = true}, 4); }

TEST(Attention, GradientCheckKeyLengths) { check_gradients(3, 5, 5, 2, 3, {.key_lengths = {5, 3, 1}}, 5); }

TEST(Attention, GradientCheckDecodeOffset) {
  check_gradients(2, 3, 6, 2, 3, {.block_first_key = true, .key_lengths = {6, 4}}, 6);
}

TEST(Attention, GradientCheckAcrossRowBlocks) { check_gradients(1, 70, 70, 1, 2, {.block_first_key = true}, 7); }

TEST(Attention, ThreadedHeadsEqualOneHeadCalls) {
  // B * H = 4 pairs with enough work for parallel_rows to use threads; each (b, h) alone runs serially.
  Rng rng(14);
  const std::size_t B = 2, T = 150, H = 2, dh = 8, D = H * dh;
  const AttentionMask mask{.block_first_key = true, .key_lengths = {150, 97}};
  Tensor<double> q = random_tensor<double>({B, T, D}, rng), k = random_tensor<double>({B, T, D}, rng),
                 v = random_tensor<double>({B, T, D}, rng), R = random_tensor<double>({B, T, D}, rng);
  Tensor<double> o, dq, dk, dv;
  AttentionCache<double> cache;
  attention_forward(q, k, v, H, mask, o, cache);
  attention_backward(q, k, v, cache, R, dq, dk, dv);
  for (std::size_t b = 0; b < B; ++b)
    for (std::size_t h = 0; h < H; ++h) {
      const AttentionMask one{.block_first_key = true, .key_lengths = {mask.key_lengths[b]}};
      Tensor<double> o1, dq1, dk1, dv1;
      AttentionCache<double> cache1;
      attention_forward(head_of(q, b, h, dh), head_of(k, b, h, dh), head_of(v, b, h, dh), 1, one, o1, cache1);
      attention_backward(head_of(q, b, h, dh), head_of(k, b, h, dh), head_of(v, b, h, dh), cache1,
                         head_of(R, b, h, dh), dq1, dk1, dv1);
      EXPECT_LT(max_abs_diff(head_of(o, b, h, dh), o1), 1e-13);
      EXPECT_LT(max_abs_diff(head_of(dq, b, h, dh), dq1), 1e-13);
      EXPECT_LT(max_abs_diff(head_of(dk, b, h, dh), dk1), 1e-13);
      EXPECT_LT(max_abs_diff(head_of(dv, b, h, dh), dv1), 1e-13);
    }
}

TEST(Attention, FullyMaskedRowsGiveZeroOutputAndGradients) {
  // Sequence 1 has no valid key; in sequence 0 (one valid key, key 0 blocked) only row 0 sees anything.
  Rng rng(8);
  const AttentionMask mask{.block_first_key = true, .key_lengths = {1, 0}};
  Tensor<double> q = random_tensor<double>({2, 4, 6}, rng), k = random_tensor<double>({2, 4, 6}, rng),
                 v = random_tensor<double>({2, 4, 6}, rng), R = random_tensor<double>({2, 4, 6}, rng);
  Tensor<double> o, dq, dk, dv;
  AttentionCache<double> cache;
  attention_forward(q, k, v, 2, mask, o, cache);
  attention_backward(q, k, v, cache, R, dq, dk, dv);
  for (double x : o) EXPECT_TRUE(std::isfinite(x));
  for (std::size_t c = 0; c < 6; ++c) EXPECT_NEAR(o(0, 0, c), v(0, 0, c), 1e-14);
  for (std::size_t b = 0; b < 2; ++b)
    for (std::size_t t = 0; t < 4; ++t)
      for (std::size_t c = 0; c < 6; ++c) {
        if (b == 0 && t == 0) continue;
        EXPECT_EQ(o(b, t, c), 0.0);
        EXPECT_EQ(dq(b, t, c), 0.0);
        EXPECT_EQ(dk(b, t, c), 0.0);
        EXPECT_EQ(dv(b, t, c), 0.0);
      }
  for (std::size_t c = 0; c < 6; ++c) EXPECT_EQ(dq(0, 0, c), 0.0);  // a single allowed key: P is constant 1
  auto loss = [&] { return dot(forward(q, k, v, 2, mask), R); };
  EXPECT_LT(gradient_error(loss, v, dv), 1e-6);
}

TEST(Attention, BlockFirstKeyHidesPositionZeroFromLaterRows) {
  Rng rng(9);
  for (bool causal : {true, false}) {
    const AttentionMask mask{.causal = causal, .block_first_key = true};
    Tensor<double> q = random_tensor<double>({2, 5, 6}, rng), k = random_tensor<double>({2, 5, 6}, rng),
                   v = random_tensor<double>({2, 5, 6}, rng);
    const Tensor<double> before = forward(q, k, v, 3, mask);
    for (std::size_t b = 0; b < 2; ++b)
      for (std::size_t c = 0; c < 6; ++c) {
        k(b, 0, c) += 1.5;
        v(b, 0, c) -= 2.0;
      }
    const Tensor<double> after = forward(q, k, v, 3, mask);
    EXPECT_EQ(rows_of(after, 1, 4), rows_of(before, 1, 4));
    EXPECT_GT(max_abs_diff(rows_of(after, 0, 1), rows_of(before, 0, 1)), 0.1);
  }
}

TEST(Attention, CausalLaterTokensNeverChangeEarlierOutputs) {
  Rng rng(10);
  const std::size_t T = 6;
  Tensor<double> q = random_tensor<double>({2, T, 4}, rng), k = random_tensor<double>({2, T, 4}, rng),
                 v = random_tensor<double>({2, T, 4}, rng);
  const Tensor<double> base = forward(q, k, v, 2, {});
  for (std::size_t t = 1; t < T; ++t) {
    Tensor<double> q2 = q, k2 = k, v2 = v;
    for (std::size_t b = 0; b < 2; ++b)
      for (std::size_t c = 0; c < 4; ++c) {
        q2(b, t, c) += 1.0;
        k2(b, t, c) -= 1.0;
        v2(b, t, c) += 3.0;
      }
    const Tensor<double> changed = forward(q2, k2, v2, 2, {});
    EXPECT_EQ(rows_of(changed, 0, t), rows_of(base, 0, t)) << "token " << t;
    EXPECT_GT(max_abs_diff(rows_of(changed, t, 1), rows_of(base, t, 1)), 0.1) << "token " << t;
  }
}

TEST(Attention, DecodingLastQueryEqualsLastRowOfFullPass) {
  Rng rng(11);
  const std::size_t T = 7;
  for (bool block_first_key : {false, true}) {
    const AttentionMask mask{.block_first_key = block_first_key};
    Tensor<double> q = random_tensor<double>({2, T, 6}, rng), k = random_tensor<double>({2, T, 6}, rng),
                   v = random_tensor<double>({2, T, 6}, rng);
    const Tensor<double> full = forward(q, k, v, 2, mask);
    const Tensor<double> last = forward(rows_of(q, T - 1, 1), k, v, 2, mask);
    EXPECT_LT(max_abs_diff(last, rows_of(full, T - 1, 1)), 1e-14);
    const Tensor<double> tail = forward(rows_of(q, T - 3, 3), k, v, 2, mask);
    EXPECT_LT(max_abs_diff(tail, rows_of(full, T - 3, 3)), 1e-14);
  }
}

TEST(Attention, FloatAgreesWithDouble) {
  Rng rng(12);
  Tensor<double> q = random_tensor<double>({2, 9, 8}, rng), k = random_tensor<double>({2, 9, 8}, rng),
                 v = random_tensor<double>({2, 9, 8}, rng), dO = random_tensor<double>({2, 9, 8}, rng);
  const AttentionMask mask{.block_first_key = true, .key_lengths = {9, 5}};
  Tensor<double> o, dq, dk, dv;
  AttentionCache<double> cache;
  attention_forward(q, k, v, 2, mask, o, cache);
  attention_backward(q, k, v, cache, dO, dq, dk, dv);
  Tensor<float> qf = xt::cast<float>(q), kf = xt::cast<float>(k), vf = xt::cast<float>(v), dOf = xt::cast<float>(dO);
  Tensor<float> of, dqf, dkf, dvf;
  AttentionCache<float> cachef;
  attention_forward(qf, kf, vf, 2, mask, of, cachef);
  attention_backward(qf, kf, vf, cachef, dOf, dqf, dkf, dvf);
  EXPECT_LT(max_abs_diff(Tensor<double>(xt::cast<double>(of)), o), 1e-5);
  EXPECT_LT(max_abs_diff(Tensor<double>(xt::cast<double>(dqf)), dq), 1e-5);
  EXPECT_LT(max_abs_diff(Tensor<double>(xt::cast<double>(dkf)), dk), 1e-5);
  EXPECT_LT(max_abs_diff(Tensor<double>(xt::cast<double>(dvf)), dv), 1e-5);
}

TEST(Attention, BuffersAreReusedAcrossCalls) {
  Rng rng(13);
  Tensor<double> q = random_tensor<double>({1, 4, 4}, rng), k = random_tensor<double>({1, 4, 4}, rng),
                 v = random_tensor<double>({1, 4, 4}, rng), R = random_tensor<double>({1, 4, 4}, rng);
  Tensor<double> o, dq, dk, dv;
  AttentionCache<double> cache;
  attention_forward(q, k, v, 2, {}, o, cache);
  attention_backward(q, k, v, cache, R, dq, dk, dv);
  const Tensor<double> dk_once = dk, dv_once = dv;
  attention_backward(q, k, v, cache, R, dq, dk, dv);  // written, not accumulated
  EXPECT_EQ(dk, dk_once);
  EXPECT_EQ(dv, dv_once);
}

TEST(Attention, BadShapesAndOptionsThrow) {
  Tensor<double> q = zeros<double>({2, 3, 8}), k = zeros<double>({2, 5, 8}), v = zeros<double>({2, 5, 8}), o;
  AttentionCache<double> cache;
  try {
    Tensor<double> k_bad = zeros<double>({2, 5, 6});
    attention_forward(q, k_bad, v, 2, {}, o, cache);
    FAIL();
  } catch (const ShapeError& e) {
    EXPECT_STREQ(e.what(), "attention_forward: k has shape [2, 5, 6], expected [2, *, 8]");
  }
  try {
    Tensor<double> v_bad = zeros<double>({2, 4, 8});
    attention_forward(q, k, v_bad, 2, {}, o, cache);
    FAIL();
  } catch (const ShapeError& e) {
    EXPECT_STREQ(e.what(), "attention_forward: v has shape [2, 4, 8], expected [2, 5, 8]");
  }
  EXPECT_THROW(attention_forward(Tensor<double>(zeros<double>({6, 8})), k, v, 2, {}, o, cache), ShapeError);
  try {
    attention_forward(q, k, v, 3, {}, o, cache);
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_STREQ(e.what(), "attention_forward: heads (3) must divide the width of q (8)");
  }
  EXPECT_THROW(attention_forward(q, k, v, 0, {}, o, cache), ConfigError);
  try {
    attention_forward(q, k, v, 2, {.key_lengths = {5}}, o, cache);
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_STREQ(e.what(), "attention_forward: key_lengths has 1 entries, expected one per sequence (B = 2)");
  }
  try {
    attention_forward(q, k, v, 2, {.key_lengths = {5, 6}}, o, cache);
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_STREQ(e.what(), "attention_forward: key_lengths[1] = 6 exceeds the number of keys Tk = 5");
  }
  EXPECT_THROW(attention_forward(k, q, q, 2, {}, o, cache), ShapeError);  // causal needs Tq <= Tk
  EXPECT_NO_THROW(attention_forward(k, q, q, 2, {.causal = false}, o, cache));

  attention_forward(q, k, v, 2, {}, o, cache);
  Tensor<double> dq, dk, dv;
  try {
    attention_backward(q, k, v, cache, Tensor<double>(zeros<double>({2, 3, 4})), dq, dk, dv);
    FAIL();
  } catch (const ShapeError& e) {
    EXPECT_STREQ(e.what(), "attention_backward: d_o has shape [2, 3, 4] but q has shape [2, 3, 8]");
  }
  Tensor<double> q_long = zeros<double>({2, 4, 8});
  EXPECT_THROW(attention_backward(q_long, k, v, cache, q_long, dq, dk, dv), ShapeError);  // cache from Tq = 3
}

TEST(Attention, AppendTokensGrowsEachSequence) {
  Rng rng(40);
  const Tensor<double> a = random_tensor<double>({2, 3, 4}, rng), b = random_tensor<double>({2, 2, 4}, rng);
  Tensor<double> kv;
  append_tokens(kv, a);  // empty cache: a copy
  EXPECT_EQ(kv, a);
  append_tokens(kv, b);
  ASSERT_EQ(shape_of(kv), (Shape{2, 5, 4}));
  for (std::size_t s = 0; s < 2; ++s)
    for (std::size_t j = 0; j < 4; ++j) {
      for (std::size_t t = 0; t < 3; ++t) EXPECT_EQ(kv(s, t, j), a(s, t, j));
      for (std::size_t t = 0; t < 2; ++t) EXPECT_EQ(kv(s, 3 + t, j), b(s, t, j));
    }
  EXPECT_THROW(append_tokens(kv, random_tensor<double>({3, 1, 4}, rng)), ShapeError);
  EXPECT_THROW(append_tokens(kv, random_tensor<double>({2, 1, 5}, rng)), ShapeError);
}
