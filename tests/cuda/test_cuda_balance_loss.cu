// The device tally ops (cuda/balance_loss.cuh) against the CPU ops of layers/balance_loss.hpp on the same inputs:
// valid and assignment counts exactly, probability sums, z sums and gradients within tolerance; repeatable sums;
// the first bad group or expert id reported with the CPU's message, before the tally changes. Skips without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <numeric>
#include <span>
#include <string>
#include <tuple>
#include <vector>

#include "mixpeft/cuda/backend.cuh"
#include "mixpeft/cuda/balance_loss.cuh"
#include "mixpeft/layers/balance_loss.hpp"
#include "cuda_test_support.cuh"

namespace mixpeft::cuda_test {
namespace {

template <class T>
class CudaBalanceTest : public CudaTest {};
using BalanceTypes = ::testing::Types<float, double, __nv_bfloat16>;
TYPED_TEST_SUITE(CudaBalanceTest, BalanceTypes);

Tensor<std::int32_t> ids_below(const Shape& shape, Rng& rng, std::size_t bound) {
  Tensor<std::int32_t> t = empty<std::int32_t>(shape);
  for (auto& v : t) v = std::int32_t(rng.below(bound));
  return t;
}

// 1 for kept tokens, 0 for about a quarter of them.
Tensor<double> drop_mask(std::size_t n, Rng& rng) {
  Tensor<double> m = empty<double>({n});
  for (auto& v : m) v = rng.uniform() < 0.25 ? 0.0 : 1.0;
  return m;
}

// Positive values, as probabilities are.
template <class T>
OnDevice<T> positive_on_device(const Shape& shape, Rng& rng) {
  Tensor<double> v = testing::random_tensor<double>(shape, rng);
  for (auto& x : v) x = std::abs(x);
  return put<T>(v);
}

// A tally sized for G groups of K experts, prefilled so that "adds" is checked too.
ExpertTally prefilled(std::size_t G, std::size_t K) {
  ExpertTally t{K, std::vector<double>(G, 3.0), std::vector<double>(G * K, 0.5), std::vector<double>(G * K, 2.0)};
  return t;
}

::testing::AssertionResult exactly(const std::vector<double>& got, const std::vector<double>& want) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << "size " << got.size() << " vs " << want.size();
  for (std::size_t i = 0; i < got.size(); ++i)
    if (got[i] != want[i]) return ::testing::AssertionFailure() << "entry " << i << ": " << got[i] << " vs " << want[i];
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult near(const std::vector<double>& got, const std::vector<double>& want, double tol) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << "size " << got.size() << " vs " << want.size();
  double diff = 0, sum = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    diff += (got[i] - want[i]) * (got[i] - want[i]);
    sum += (got[i] + want[i]) * (got[i] + want[i]);
  }
  const double err = sum > 0 ? std::sqrt(diff / sum) : std::sqrt(diff);
  if (err < tol) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "relative error " << err << " >= " << tol;
}

// The error message a call throws as E ("" when it throws nothing).
template <class E, class F>
std::string message_of(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  }
  return "";
}

// ---- tally_experts --------------------------------------------------------------------------------------------

TYPED_TEST(CudaBalanceTest, TallyMatchesCpu) {
  using T = TypeParam;
  Rng rng(300);
  // (N, K, G): N below, at and past the 256-token tile; many tiles per block; a wide K; K = 1.
  for (auto [n, K, G] : {std::tuple<std::size_t, std::size_t, std::size_t>{1000, 8, 5}, {257, 3, 1}, {1, 4, 2},
                         {256, 6, 3}, {70001, 8, 4}, {3001, 64, 7}, {300, 1, 2}}) {
    const std::size_t k = std::min<std::size_t>(2, K);
    auto probs = positive_on_device<T>({n, K}, rng);
    const Tensor<std::int32_t> experts = ids_below({n, k}, rng, K);
    const auto experts_dev = cuda::upload(experts);
    auto mask = put<T>(drop_mask(n, rng));
    // Contiguous samples (the batch layout) with the last group left empty, or random groups.
    Tensor<std::int32_t> contiguous = empty<std::int32_t>({n});
    const std::size_t used = G > 1 ? G - 1 : 1;
    for (std::size_t i = 0; i < n; ++i) contiguous(i) = std::int32_t(i * used / n);
    const Tensor<std::int32_t> random_groups = ids_below({n}, rng, G);
    const Tensor<double> no_mask = empty<double>({0});
    const Tensor<std::int32_t> no_ids = empty<std::int32_t>({0});
    const DeviceTensor<T> no_mask_dev;
    const DeviceTensor<std::int32_t> no_ids_dev;
    for (int variant = 0; variant < 4; ++variant) {
      const bool masked = variant % 2 == 1;
      const Tensor<std::int32_t>* ids = variant < 2 ? &contiguous : &random_groups;
      const auto ids_dev = cuda::upload(*ids);
      for (std::size_t slots = 1; slots <= k; ++slots) {
        for (bool grouped : {true, false}) {
          const std::size_t groups = grouped ? G : 1;
          ExpertTally cpu = prefilled(groups, K), dev = prefilled(groups, K);
          tally_experts("tally", probs.host, experts, slots, masked ? mask.host : no_mask, grouped ? *ids : no_ids,
                        cpu);
          tally_experts("tally", probs.dev, experts_dev, slots, masked ? mask.dev : no_mask_dev,
                        grouped ? ids_dev : no_ids_dev, dev);
          const auto where = ::testing::Message() << "N " << n << " K " << K << " G " << groups << " slots " << slots
                                                  << " masked " << masked << " variant " << variant;
          EXPECT_EQ(dev.experts, K);
          EXPECT_TRUE(exactly(dev.valid, cpu.valid)) << "valid, " << where;
          EXPECT_TRUE(exactly(dev.count, cpu.count)) << "count, " << where;
          // Both sum the very same values in double; only the association differs.
          EXPECT_TRUE(near(dev.prob_sum, cpu.prob_sum, tolerance<double>)) << "prob_sum, " << where;
        }
      }
    }
  }
}

TYPED_TEST(CudaBalanceTest, TallyIsRepeatable) {
  using T = TypeParam;
  Rng rng(301);
  const std::size_t n = 50000, K = 16, k = 2, G = 9;
  auto probs = positive_on_device<T>({n, K}, rng);
  const auto experts = cuda::upload(ids_below({n, k}, rng, K));
  const auto ids = cuda::upload(ids_below({n}, rng, G));
  auto mask = put<T>(drop_mask(n, rng));
  ExpertTally a = prefilled(G, K), b = prefilled(G, K);
  tally_experts("tally", probs.dev, experts, k, mask.dev, ids, a);
  tally_experts("tally", probs.dev, experts, k, mask.dev, ids, b);
  EXPECT_TRUE(exactly(a.prob_sum, b.prob_sum));
  EXPECT_TRUE(exactly(a.count, b.count));
  EXPECT_TRUE(exactly(a.valid, b.valid));
}

TEST_F(CudaTest, TallyOfNoTokensAddsNothing) {
  const std::size_t K = 4, G = 3;
  const DeviceTensor<float> probs(Shape{0, K}), mask(Shape{0});
  const DeviceTensor<std::int32_t> experts(Shape{0, 2}), ids(Shape{0});
  ExpertTally t = prefilled(G, K);
  const ExpertTally before = t;
  tally_experts("tally", probs, experts, 2, mask, ids, t);
  tally_experts("tally", probs, experts, 1, DeviceTensor<float>{}, DeviceTensor<std::int32_t>{}, t);
  EXPECT_TRUE(exactly(t.valid, before.valid));
  EXPECT_TRUE(exactly(t.prob_sum, before.prob_sum));
  EXPECT_TRUE(exactly(t.count, before.count));

  // Every token masked out: nothing added either, and no kernel reads an id.
  Rng rng(302);
  auto p = positive_on_device<float>({300, K}, rng);
  Tensor<std::int32_t> bad = empty<std::int32_t>({300, 2});
  bad.fill(-5);
  const auto bad_dev = cuda::upload(bad);
  Tensor<double> zero = zeros<double>({300});
  auto none = put<float>(zero);
  EXPECT_NO_THROW(tally_experts("tally", p.dev, bad_dev, 2, none.dev, DeviceTensor<std::int32_t>{}, t));
  EXPECT_TRUE(exactly(t.valid, before.valid));
  EXPECT_TRUE(exactly(t.prob_sum, before.prob_sum));
}

TEST_F(CudaTest, TallyRejectsBadIdsLikeTheCpu) {
  Rng rng(303);
  const std::size_t n = 700, K = 5, k = 2, G = 4;
  auto probs = positive_on_device<double>({n, K}, rng);
  Tensor<double> m = empty<double>({n});
  m.fill(1.0);
  m(10) = 0;
  m(600) = 0;
  auto mask = put<double>(m);
  const Tensor<std::int32_t> good_e = ids_below({n, k}, rng, K), good_g = ids_below({n}, rng, G);

  struct Case {
    const char* what;
    std::vector<std::tuple<std::size_t, std::size_t, std::int32_t>> experts;  // (token, slot, id)
    std::vector<std::pair<std::size_t, std::int32_t>> groups;                 // (token, id)
    std::size_t slots;
    bool throws;
  };
  const std::vector<Case> cases = {
      {"bad group id", {}, {{400, 4}}, 2, true},
      {"negative group id", {}, {{299, -1}}, 2, true},
      {"bad expert id", {{500, 1, 5}}, {}, 2, true},
      {"negative expert id", {{3, 0, -2}}, {}, 1, true},
      {"the lower token wins (expert)", {{100, 1, 9}}, {{200, 7}}, 2, true},
      {"the lower token wins (group)", {{300, 0, 9}}, {{200, 7}}, 2, true},
      {"the group before the experts of one token", {{250, 0, 9}}, {{250, 7}}, 2, true},
      {"a masked-out token is not checked", {{10, 0, 99}}, {{600, -3}}, 2, false},
      {"an uncounted slot is not checked", {{20, 1, 99}}, {}, 1, false},
  };
  for (const Case& c : cases) {
    Tensor<std::int32_t> e = good_e, g = good_g;
    for (auto [i, s, id] : c.experts) e(i, s) = id;
    for (auto [i, id] : c.groups) g(i) = id;
    const auto e_dev = cuda::upload(e), g_dev = cuda::upload(g);
    ExpertTally cpu = prefilled(G, K), dev = prefilled(G, K);
    const ExpertTally before = dev;
    const std::string want = message_of<ConfigError>(
        [&] { tally_experts("mole_balance", probs.host, e, c.slots, mask.host, g, cpu); });
    const std::string got = message_of<ConfigError>(
        [&] { tally_experts("mole_balance", probs.dev, e_dev, c.slots, mask.dev, g_dev, dev); });
    EXPECT_EQ(!want.empty(), c.throws) << c.what << " (the CPU)";
    EXPECT_EQ(got, want) << c.what;
    if (c.throws) {
      EXPECT_TRUE(exactly(dev.valid, before.valid)) << c.what << ": nothing is added";
      EXPECT_TRUE(exactly(dev.prob_sum, before.prob_sum)) << c.what;
      EXPECT_TRUE(exactly(dev.count, before.count)) << c.what;
    } else {
      EXPECT_TRUE(exactly(dev.count, cpu.count)) << c.what;
    }
  }
  // Without group ids, every valid token is in group 0: a tally of no groups rejects it.
  ExpertTally empty_tally = prefilled(0, K);
  const auto e_dev = cuda::upload(good_e);
  EXPECT_THROW(tally_experts("t", probs.dev, e_dev, 1, DeviceTensor<double>{}, DeviceTensor<std::int32_t>{},
                             empty_tally),
               ConfigError);
}

TEST_F(CudaTest, TallyChecksShapesAndLimits) {
  const std::size_t n = 6, K = 4, G = 2;
  const DeviceTensor<float> probs(Shape{n, K}), wide(Shape{n, K + 1}), rank3(Shape{1, n, K}), mask(Shape{n}),
      short_mask(Shape{n - 1});
  const DeviceTensor<std::int32_t> experts(Shape{n, 2}), short_experts(Shape{n - 1, 2}), ids(Shape{n}),
      short_ids(Shape{n + 1});
  DeviceTensor<float> none;
  DeviceTensor<std::int32_t> no_ids;
  ExpertTally t = prefilled(G, K);
  EXPECT_THROW(tally_experts("tally", wide, experts, 1, mask, ids, t), ShapeError);
  EXPECT_THROW(tally_experts("tally", rank3, experts, 1, mask, ids, t), ShapeError);
  EXPECT_THROW(tally_experts("tally", probs, short_experts, 1, mask, ids, t), ShapeError);
  EXPECT_THROW(tally_experts("tally", probs, experts, 3, mask, ids, t), ShapeError);
  EXPECT_THROW(tally_experts("tally", probs, experts, 1, short_mask, ids, t), ShapeError);
  EXPECT_THROW(tally_experts("tally", probs, experts, 1, mask, short_ids, t), ShapeError);
  ExpertTally missized = prefilled(G, K);
  missized.count.pop_back();
  EXPECT_THROW(tally_experts("tally", probs, experts, 1, mask, ids, missized), ShapeError);
  const std::string message = message_of<ShapeError>([&] { tally_experts("my_op", wide, experts, 1, none, no_ids, t); });
  EXPECT_EQ(message.rfind("my_op: ", 0), 0u) << message;
  // G (2K + 1) beyond the shared-memory tally.
  const std::size_t bigK = 64;
  const DeviceTensor<float> big(Shape{n, bigK});
  ExpertTally too_wide = prefilled(100, bigK);
  EXPECT_THROW(tally_experts("tally", big, experts, 1, none, no_ids, too_wide), ConfigError);
}

// ---- add_group_coefficients ---------------------------------------------------------------------------------

TYPED_TEST(CudaBalanceTest, AddGroupCoefficientsMatchesCpu) {
  using T = TypeParam;
  Rng rng(304);
  for (auto [n, K, G] : {std::tuple<std::size_t, std::size_t, std::size_t>{1001, 8, 5}, {333, 3, 1}, {1, 64, 2},
                         {4097, 17, 3}}) {
    auto mask = put<T>(drop_mask(n, rng));
    Tensor<std::int32_t> ids = ids_below({n}, rng, G);
    ids(n / 2) = std::int32_t(G);  // out of range: skipped by both
    if (n > 3) ids(1) = -1;
    const auto ids_dev = cuda::upload(ids);
    const Tensor<double> c = testing::random_tensor<double>({G * K}, rng);
    const std::vector<double> coef(c.begin(), c.end());
    const std::span<const double> all(coef), first_group(coef.data(), K);
    for (int variant = 0; variant < 3; ++variant) {
      auto d = random_on_device<T>({n, K}, rng);
      Tensor<double> d_cpu = d.host;
      const Tensor<double> no_mask = empty<double>({0});
      const Tensor<std::int32_t> no_ids = empty<std::int32_t>({0});
      if (variant == 0) {  // masked, grouped
        add_group_coefficients(mask.host, ids, all, d_cpu);
        add_group_coefficients(mask.dev, ids_dev, all, d.dev);
      } else if (variant == 1) {  // grouped, no mask
        add_group_coefficients(no_mask, ids, all, d_cpu);
        add_group_coefficients(DeviceTensor<T>{}, ids_dev, all, d.dev);
      } else {  // one group, masked
        add_group_coefficients(mask.host, no_ids, first_group, d_cpu);
        add_group_coefficients(mask.dev, DeviceTensor<std::int32_t>{}, first_group, d.dev);
      }
      EXPECT_TRUE(agrees(get(d.dev), d_cpu, tolerance<T>)) << "N " << n << " K " << K << " variant " << variant;
    }
  }
  // N = 0, and the shape checks.
  DeviceTensor<T> empty_d(Shape{0, 4});
  const std::vector<double> coef(8, 1.0);
  EXPECT_NO_THROW(add_group_coefficients(DeviceTensor<T>{}, DeviceTensor<std::int32_t>{},
                                         std::span<const double>(coef), empty_d));
  DeviceTensor<T> d(Shape{5, 4}), rank1(Shape{20}), short_mask(Shape{4});
  DeviceTensor<std::int32_t> short_ids(Shape{6});
  EXPECT_THROW(add_group_coefficients(DeviceTensor<T>{}, DeviceTensor<std::int32_t>{}, std::span<const double>(coef),
                                      rank1),
               ShapeError);
  EXPECT_THROW(add_group_coefficients(short_mask, DeviceTensor<std::int32_t>{}, std::span<const double>(coef), d),
               ShapeError);
  EXPECT_THROW(add_group_coefficients(DeviceTensor<T>{}, short_ids, std::span<const double>(coef), d), ShapeError);
}

// ---- router z-loss ------------------------------------------------------------------------------------------

TYPED_TEST(CudaBalanceTest, RouterZSumsMatchCpuAndRepeat) {
  using T = TypeParam;
  Rng rng(305);
  // N not a multiple of the 8 rows of a block; K = 1, K < 32, K > 32, K > 64.
  for (auto [n, K] : {std::pair<std::size_t, std::size_t>{1001, 8}, {37, 1}, {300, 33}, {5000, 100}, {1, 5}}) {
    auto logits = random_on_device<T>({n, K}, rng, 3.0);
    auto mask = put<T>(drop_mask(n, rng));
    for (bool masked : {true, false}) {
      const Tensor<double> no_mask = empty<double>({0});
      double s_cpu = 1.5, v_cpu = 2, s_dev = 1.5, v_dev = 2, s_again = 0, v_again = 0;
      router_z_sums(logits.host, masked ? mask.host : no_mask, s_cpu, v_cpu);
      const DeviceTensor<T> none;
      router_z_sums(logits.dev, masked ? mask.dev : none, s_dev, v_dev);
      router_z_sums(logits.dev, masked ? mask.dev : none, s_again, v_again);
      EXPECT_EQ(v_dev, v_cpu) << "N " << n << " K " << K << " masked " << masked;
      EXPECT_NEAR(s_dev, s_cpu, tolerance<T> * std::abs(s_cpu)) << "N " << n << " K " << K << " masked " << masked;
      EXPECT_EQ(s_again + 1.5, s_dev) << "repeatable";
      EXPECT_EQ(v_again + 2, v_dev);
    }
  }
  // No rows: nothing added.
  double s = 4, v = 5;
  router_z_sums(DeviceTensor<T>(Shape{0, 3}), DeviceTensor<T>{}, s, v);
  EXPECT_EQ(s, 4);
  EXPECT_EQ(v, 5);
  DeviceTensor<T> rank1(Shape{6}), logits(Shape{4, 3}), short_mask(Shape{3});
  EXPECT_THROW(router_z_sums(rank1, DeviceTensor<T>{}, s, v), ShapeError);
  EXPECT_THROW(router_z_sums(logits, short_mask, s, v), ShapeError);
}

TYPED_TEST(CudaBalanceTest, RouterZBackwardMatchesCpu) {
  using T = TypeParam;
  Rng rng(306);
  const double coef = 0.37;
  for (auto [n, K] : {std::pair<std::size_t, std::size_t>{1001, 8}, {37, 1}, {300, 33}, {513, 100}}) {
    auto logits = random_on_device<T>({n, K}, rng, 3.0);
    auto mask = put<T>(drop_mask(n, rng));
    for (bool masked : {true, false}) {
      auto d = random_on_device<T>({n, K}, rng, 0.1);
      Tensor<double> d_cpu = d.host;
      const Tensor<double> no_mask = empty<double>({0});
      router_z_backward_add(logits.host, masked ? mask.host : no_mask, coef, d_cpu);
      const DeviceTensor<T> none;
      router_z_backward_add(logits.dev, masked ? mask.dev : none, coef, d.dev);
      EXPECT_TRUE(agrees(get(d.dev), d_cpu, tolerance<T>)) << "N " << n << " K " << K << " masked " << masked;
      if (masked) {  // masked-out rows are untouched
        const Tensor<double> got = get(d.dev);
        for (std::size_t i = 0; i < n; ++i)
          if (mask.host(i) == 0)
            for (std::size_t j = 0; j < K; ++j) ASSERT_EQ(got(i, j), d.host(i, j)) << i << ", " << j;
      }
    }
  }
  DeviceTensor<T> empty_logits(Shape{0, 3}), empty_d(Shape{0, 3});
  EXPECT_NO_THROW(router_z_backward_add(empty_logits, DeviceTensor<T>{}, coef, empty_d));
  DeviceTensor<T> logits(Shape{4, 3}), wrong(Shape{4, 2}), short_mask(Shape{3}), d(Shape{4, 3});
  EXPECT_THROW(router_z_backward_add(logits, DeviceTensor<T>{}, coef, wrong), ShapeError);
  EXPECT_THROW(router_z_backward_add(logits, short_mask, coef, d), ShapeError);
}

}  // namespace
}  // namespace mixpeft::cuda_test
