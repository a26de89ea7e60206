// The device routing ops (cuda/router.cuh) against the CPU ops of layers/router.hpp on the same inputs: ids,
// counts, offsets and permutations exactly, gates and gathered rows bit for bit, values within the per-type
// tolerance; the lazily checked error record for bad ids; seeded, repeatable device noise. Skips without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <tuple>
#include <vector>

#include "mixpeft/cuda/backend.cuh"
#include "mixpeft/layers/router.hpp"
#include "mixpeft/ops/softmax.hpp"
#include "cuda_test_support.cuh"

namespace mixpeft::cuda_test {
namespace {

namespace routing = cuda::detail::routing;
using cuda::acc_t;
using cuda::narrow;
using cuda::widen;

template <class T>
class CudaRouterTest : public CudaTest {};
using RouterTypes = ::testing::Types<float, double, __nv_bfloat16>;
TYPED_TEST_SUITE(CudaRouterTest, RouterTypes);

Tensor<std::int32_t> random_ids(const Shape& shape, Rng& rng, const std::vector<std::int32_t>& allowed) {
  Tensor<std::int32_t> t = empty<std::int32_t>(shape);
  for (auto& v : t) v = allowed[rng.below(allowed.size())];
  return t;
}

template <class T>
Tensor<T> filled(const Shape& shape, T value) {
  Tensor<T> t = empty<T>(shape);
  t.fill(value);
  return t;
}

std::vector<std::int32_t> iota_ids(std::size_t n) {
  std::vector<std::int32_t> v(n);
  std::iota(v.begin(), v.end(), 0);
  return v;
}

// The value a device op stores for an acc_t<T> result, seen as double.
template <class T>
double stored(acc_t<T> v) {
  return double(widen(narrow<T>(v)));
}

// ---- router_linear -----------------------------------------------------------------------------------------

TYPED_TEST(CudaRouterTest, RouterLinearMatchesCpu) {
  using T = TypeParam;
  Rng rng(100);
  const std::size_t D = 24, K = 5;
  const double inv_tau = 0.5;  // exact in every type
  auto x = random_on_device<T>({2, 37, D}, rng);
  auto W = random_on_device<T>({K, D}, rng, 0.3);
  auto b = random_on_device<T>({K}, rng);
  auto dl = random_on_device<T>({2, 37, K}, rng);
  for (bool with_bias : {true, false}) {
    Tensor<double> l_cpu;
    DeviceTensor<T> l;
    router_linear_forward(x.host, W.host, with_bias ? &b.host : nullptr, inv_tau, l_cpu);
    router_linear_forward(x.dev, W.dev, with_bias ? &b.dev : nullptr, T(inv_tau), l);
    EXPECT_TRUE(agrees(get(l), l_cpu, tolerance<T>)) << "forward, bias " << with_bias;
  }
  // Parameter gradients accumulate onto what is there.
  auto dW = random_on_device<T>({K, D}, rng);
  auto db = random_on_device<T>({K}, rng);
  Tensor<double> dx_cpu, dW_cpu = dW.host, db_cpu = db.host;
  DeviceTensor<T> dx;
  router_linear_backward(x.host, W.host, dl.host, inv_tau, dx_cpu, &dW_cpu, &db_cpu);
  router_linear_backward(x.dev, W.dev, dl.dev, T(inv_tau), dx, &dW.dev, &db.dev);
  EXPECT_TRUE(agrees(get(dx), dx_cpu, tolerance<T>)) << "dx";
  EXPECT_TRUE(agrees(get(dW.dev), dW_cpu, tolerance<T>)) << "dW";
  EXPECT_TRUE(agrees(get(db.dev), db_cpu, tolerance<T>)) << "db";
  // Frozen: only dx.
  DeviceTensor<T> dx2;
  router_linear_backward(x.dev, W.dev, dl.dev, T(inv_tau), dx2, nullptr, nullptr);
  EXPECT_TRUE(agrees(get(dx2), dx_cpu, tolerance<T>)) << "dx, frozen";

  DeviceTensor<T> wrong_W(Shape{K, D + 1}), wrong_b(Shape{K + 1}), wrong_dl(Shape{2, 36, K}), out;
  EXPECT_THROW(router_linear_forward(x.dev, wrong_W, nullptr, T(1), out), ShapeError);
  EXPECT_THROW(router_linear_forward(x.dev, W.dev, &wrong_b, T(1), out), ShapeError);
  EXPECT_THROW(router_linear_backward(x.dev, W.dev, wrong_dl, T(1), out, nullptr, nullptr), ShapeError);
  EXPECT_THROW(router_linear_backward(x.dev, W.dev, dl.dev, T(1), out, &wrong_W, nullptr), ShapeError);
}

// ---- top-k ---------------------------------------------------------------------------------------------------

TYPED_TEST(CudaRouterTest, TopKMatchesCpuIncludingTies) {
  using T = TypeParam;
  Rng rng(101);
  // (N, K, k): N not a multiple of the 8 rows a block takes; K = 1; K > 32 and K > 64 (the register cache).
  for (auto [n, K, k] : {std::tuple<std::size_t, std::size_t, std::size_t>{1001, 8, 2}, {37, 1, 1}, {300, 64, 5},
                         {129, 100, 3}, {5, 3, 3}, {70, 33, 33}}) {
    Tensor<double> p = testing::random_tensor<double>({n, K}, rng, 2.0);
    for (std::size_t i = 0; i < n; i += 7)  // ties: a constant row, and a row of repeated pairs
      for (std::size_t j = 0; j < K; ++j) p(i, j) = i % 14 == 0 ? 0.25 : double(j / 2) * (i % 3 == 0 ? -1 : 1);
    auto probs = put<T>(p);  // bf16 rounding makes more ties
    Tensor<std::int32_t> e_cpu;
    Tensor<double> g_cpu;
    top_k_forward(probs.host, k, e_cpu, g_cpu);
    DeviceTensor<std::int32_t> e;
    DeviceTensor<T> g;
    top_k_forward(probs.dev, k, e, g);
    EXPECT_TRUE(same_ids(cuda::download(e), e_cpu)) << "experts, N " << n << " K " << K << " k " << k;
    EXPECT_TRUE(exactly_equal(get(g), g_cpu)) << "gates, N " << n << " K " << K << " k " << k;

    auto dg = random_on_device<T>({n, k}, rng);
    auto dp = random_on_device<T>({n, K}, rng);
    Tensor<double> dp_cpu = dp.host;
    top_k_backward(e_cpu, dg.host, dp_cpu);
    top_k_backward(e, dg.dev, dp.dev);
    EXPECT_TRUE(agrees(get(dp.dev), dp_cpu, tolerance<T>)) << "top_k_backward, N " << n << " K " << K;
  }
  EXPECT_NO_THROW(cuda::check_routing_errors());

  DeviceTensor<T> probs(Shape{4, 3}), g, rank3(Shape{2, 2, 3});
  DeviceTensor<std::int32_t> e;
  EXPECT_THROW(top_k_forward(probs, 0, e, g), ConfigError);
  EXPECT_THROW(top_k_forward(probs, 4, e, g), ConfigError);
  EXPECT_THROW(top_k_forward(rank3, 1, e, g), ShapeError);
  DeviceTensor<std::int32_t> ids(Shape{4, 2});
  DeviceTensor<T> dg(Shape{4, 1}), dp(Shape{4, 3});
  EXPECT_THROW(top_k_backward(ids, dg, dp), ShapeError);
}

TEST_F(CudaTest, TopKBackwardSkipsAndReportsOutOfRangeIds) {
  const Tensor<std::int32_t> ids_host = [] {
    Tensor<std::int32_t> t = empty<std::int32_t>({3, 2});
    const std::int32_t v[] = {0, 1, 2, 7, -1, 1};
    std::copy(std::begin(v), std::end(v), t.begin());
    return t;
  }();
  const DeviceTensor<std::int32_t> ids = cuda::upload(ids_host);
  DeviceTensor<float> dg = cuda::upload(filled<float>({3, 2}, 1.0f)), dp(Shape{3, 3});
  set_zero(dp);
  top_k_backward(ids, dg, dp);
  const Tensor<float> got = cuda::download(dp);
  const float want[] = {1, 1, 0, 0, 0, 1, 0, 1, 0};
  for (std::size_t i = 0; i < 9; ++i) EXPECT_EQ(got.data()[i], want[i]) << i;
  EXPECT_THROW(cuda::check_routing_errors(), ConfigError);
  EXPECT_NO_THROW(cuda::check_routing_errors());  // the check cleared the record
}

// ---- group_by_expert ----------------------------------------------------------------------------------------

TEST_F(CudaTest, GroupByExpertMatchesCpuExactly) {
  Rng rng(102);
  struct Case {
    std::size_t n, k, K;
    std::vector<std::int32_t> allowed;  // ids drawn from these (leaves the other experts empty)
  };
  const std::vector<Case> cases = {
      {1, 1, 1, {0}},
      {1001, 2, 8, {0, 2, 3, 7}},  // empty experts 1, 4, 5, 6 (and the last one non-empty)
      {1001, 2, 8, {1, 4}},        // empty first and last experts
      {5000, 1, 64, iota_ids(64)},
      {3000, 2, 300, iota_ids(300)},    // K + 1 > 32: every lane keeps several cursors
      {700, 4, 5000, iota_ids(5000)},   // one warp per block (5001 cursors)
      {40000, 2, 8, iota_ids(8)},       // many tiles and blocks
      {513, 1, 3, {2}},                 // one expert owns everything; M one past a tile
  };
  for (const Case& c : cases) {
    const Tensor<std::int32_t> ids = random_ids({c.n, c.k}, rng, c.allowed);
    Tensor<std::int32_t> counts_cpu, offsets_cpu, perm_cpu;
    group_by_expert(ids, c.K, counts_cpu, offsets_cpu, perm_cpu);
    const DeviceTensor<std::int32_t> ids_dev = cuda::upload(ids);
    DeviceTensor<std::int32_t> counts, offsets, perm;
    group_by_expert(ids_dev, c.K, counts, offsets, perm);
    EXPECT_TRUE(same_ids(cuda::download(counts), counts_cpu)) << "counts, N " << c.n << " k " << c.k << " K " << c.K;
    EXPECT_TRUE(same_ids(cuda::download(offsets), offsets_cpu)) << "offsets, N " << c.n << " K " << c.K;
    EXPECT_TRUE(same_ids(cuda::download(perm), perm_cpu)) << "perm, N " << c.n << " k " << c.k << " K " << c.K;
  }
  // No tokens: zero counts and offsets, an empty permutation.
  DeviceTensor<std::int32_t> none(Shape{0, 2}), counts, offsets, perm;
  group_by_expert(none, 4, counts, offsets, perm);
  EXPECT_EQ(cuda::download(counts), zeros<std::int32_t>({4}));
  EXPECT_EQ(cuda::download(offsets), zeros<std::int32_t>({5}));
  EXPECT_EQ(perm.size(), 0u);
  EXPECT_NO_THROW(cuda::check_routing_errors());

  DeviceTensor<std::int32_t> rank1(Shape{6});
  EXPECT_THROW(group_by_expert(rank1, 4, counts, offsets, perm), ShapeError);
  DeviceTensor<std::int32_t> some(Shape{3, 1});
  EXPECT_THROW(group_by_expert(some, 20000, counts, offsets, perm), ConfigError);
}

TEST_F(CudaTest, GroupByExpertPutsOutOfRangeIdsLastAndReportsThem) {
  Rng rng(103);
  const std::size_t n = 900, k = 2, K = 6;
  Tensor<std::int32_t> ids = random_ids({n, k}, rng, {0, 1, 2, 3, 4, 5, -3, 6, 99});
  const DeviceTensor<std::int32_t> ids_dev = cuda::upload(ids);
  DeviceTensor<std::int32_t> counts, offsets, perm;
  group_by_expert(ids_dev, K, counts, offsets, perm);
  // Expected: a stable sort by expert with every bad id in one bucket after the last expert.
  std::vector<std::int32_t> want = iota_ids(n * k);
  const auto bucket = [&](std::int32_t a) {
    const std::int32_t e = ids.data()[a];
    return e >= 0 && std::size_t(e) < K ? e : std::int32_t(K);
  };
  std::stable_sort(want.begin(), want.end(), [&](std::int32_t a, std::int32_t b) { return bucket(a) < bucket(b); });
  const Tensor<std::int32_t> got = cuda::download(perm);
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t j = 0; j < want.size(); ++j) ASSERT_EQ(got.data()[j], want[j]) << j;
  const Tensor<std::int32_t> off = cuda::download(offsets), cnt = cuda::download(counts);
  std::int32_t valid = 0;
  for (std::size_t a = 0; a < n * k; ++a) valid += bucket(std::int32_t(a)) < std::int32_t(K);
  EXPECT_EQ(off(K), valid);
  EXPECT_LT(valid, std::int32_t(n * k));
  for (std::size_t e = 0; e < K; ++e) EXPECT_EQ(cnt(e), off(e + 1) - off(e));
  EXPECT_THROW(cuda::check_routing_errors(), ConfigError);
  EXPECT_NO_THROW(cuda::check_routing_errors());
}

// ---- gather / scatter ---------------------------------------------------------------------------------------

TYPED_TEST(CudaRouterTest, GatherAndScatterRowsMatchCpu) {
  using T = TypeParam;
  Rng rng(104);
  for (auto [n, c, k, K] : {std::tuple<std::size_t, std::size_t, std::size_t, std::size_t>{333, 24, 1, 4},
                            {333, 7, 2, 8}, {129, 64, 3, 5}, {1, 1, 1, 1}}) {
    const Tensor<std::int32_t> ids = random_ids({n, k}, rng, iota_ids(K));
    const DeviceTensor<std::int32_t> ids_dev = cuda::upload(ids);
    DeviceTensor<std::int32_t> counts, offsets, perm;
    group_by_expert(ids_dev, K, counts, offsets, perm);
    const Tensor<std::int32_t> perm_host = cuda::download(perm);

    auto x = random_on_device<T>({n, c}, rng);
    Tensor<double> g_cpu;
    DeviceTensor<T> g;
    gather_rows(x.host, perm_host, k, g_cpu);
    gather_rows(x.dev, perm, k, g);
    EXPECT_TRUE(exactly_equal(get(g), g_cpu)) << "gather_rows, C " << c << " k " << k;

    auto src = random_on_device<T>({n * k, c}, rng);
    auto out = random_on_device<T>({n, c}, rng);
    Tensor<double> out_cpu = out.host;
    scatter_add_rows(src.host, perm_host, k, out_cpu);
    if constexpr (std::is_same_v<T, float>) {
      // Same order of additions as the CPU op in float: bit-exact.
      Tensor<float> src_f = cuda::download(src.dev), out_f = cuda::download(out.dev);
      scatter_add_rows(src_f, perm_host, k, out_f);
      scatter_add_rows(src.dev, perm, k, out.dev);
      const Tensor<float> got = cuda::download(out.dev);
      for (std::size_t i = 0; i < got.size(); ++i) ASSERT_EQ(got.data()[i], out_f.data()[i]) << i;
    } else {
      scatter_add_rows(src.dev, perm, k, out.dev);
    }
    EXPECT_TRUE(agrees(get(out.dev), out_cpu, tolerance<T>)) << "scatter_add_rows, C " << c << " k " << k;
  }
  // A random permutation (not grouped by expert), k = 3.
  {
    const std::size_t n = 50, c = 9, k = 3;
    std::vector<std::int32_t> order = iota_ids(n * k);
    for (std::size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[rng.below(i)]);
    const auto perm = cuda::upload(std::span<const std::int32_t>(order));
    const Tensor<std::int32_t> perm_host = cuda::download(perm);
    auto src = random_on_device<T>({n * k, c}, rng);
    auto out = random_on_device<T>({n, c}, rng);
    Tensor<double> out_cpu = out.host;
    scatter_add_rows(src.host, perm_host, k, out_cpu);
    scatter_add_rows(src.dev, perm, k, out.dev);
    EXPECT_TRUE(agrees(get(out.dev), out_cpu, tolerance<T>)) << "scatter_add_rows, shuffled";
  }
  EXPECT_NO_THROW(cuda::check_routing_errors());

  DeviceTensor<T> x(Shape{4, 3}), y, src(Shape{8, 3}), bad_out(Shape{3, 3});
  DeviceTensor<std::int32_t> p8(Shape{8}), p7(Shape{7});
  EXPECT_THROW(gather_rows(x, p7, 2, y), ShapeError);
  EXPECT_THROW(gather_rows(x, p8, 0, y), ShapeError);
  EXPECT_THROW(scatter_add_rows(src, p8, 2, bad_out), ShapeError);
  EXPECT_THROW(scatter_add_rows(src, p7, 2, x), ShapeError);
}

TEST_F(CudaTest, GatherAndScatterReportBadPermEntries) {
  Rng rng(105);
  const std::size_t n = 4, c = 8, k = 2;
  auto x = random_on_device<float>({n, c}, rng);
  const std::vector<std::int32_t> bad = {0, 1, 2, 3, 4, 5, 8, -1};  // 8 and -1 are out of [0, 8)
  const auto perm = cuda::upload(std::span<const std::int32_t>(bad));
  DeviceTensor<float> g;
  gather_rows(x.dev, perm, k, g);
  const Tensor<double> got = get(g);
  for (std::size_t j = 0; j < 6; ++j)
    for (std::size_t q = 0; q < c; ++q) EXPECT_EQ(got(j, q), x.host(std::size_t(bad[j]) / k, q));
  for (std::size_t j = 6; j < 8; ++j)
    for (std::size_t q = 0; q < c; ++q) EXPECT_EQ(got(j, q), 0.0) << "a bad entry gives a zero row";
  EXPECT_THROW(cuda::check_routing_errors(), ConfigError);

  const std::vector<std::int32_t> repeated = {0, 1, 2, 3, 4, 5, 6, 6};
  const auto perm2 = cuda::upload(std::span<const std::int32_t>(repeated));
  auto src = random_on_device<float>({n * k, c}, rng);
  DeviceTensor<float> out(Shape{n, c});
  set_zero(out);
  scatter_add_rows(src.dev, perm2, k, out);
  EXPECT_THROW(cuda::check_routing_errors(), ConfigError);
  const Tensor<double> o = get(out);
  for (std::size_t q = 0; q < c; ++q) {
    EXPECT_EQ(o(0, q), stored<float>(float(src.host(0, q)) + float(src.host(1, q))));
    EXPECT_EQ(o(2, q), stored<float>(float(src.host(4, q)) + float(src.host(5, q))));
    EXPECT_EQ(o(3, q), src.host(6, q)) << "assignment 6 keeps its first source row, assignment 7 has none";
  }
  EXPECT_NO_THROW(cuda::check_routing_errors());
}

// ---- noise -----------------------------------------------------------------------------------------------------

TYPED_TEST(CudaRouterTest, InputJitterIsSeededRepeatableAndInRange) {
  using T = TypeParam;
  using A = acc_t<T>;
  Rng data(106);
  const double eps = 0.1;
  auto x = random_on_device<T>({3, 1003}, data);
  const double lo = 1.0 - eps, width = (1.0 + eps) - lo;  // as the op computes them
  Rng a(7), b(7), c(7);
  DeviceTensor<T> y1, f1, y2, f2;
  input_jitter_forward(x.dev, eps, a, y1, f1);
  input_jitter_forward(x.dev, eps, b, y2, f2);
  const Tensor<double> ya = get(y1), fa = get(f1);
  EXPECT_TRUE(exactly_equal(get(y2), ya));
  EXPECT_TRUE(exactly_equal(get(f2), fa));
  const std::uint64_t key = c.next_u64();  // the one draw a call takes
  EXPECT_EQ(a.next_u64(), c.next_u64());
  Tensor<double> f_host = empty<double>(x.host.shape());
  for (std::size_t i = 0; i < x.host.size(); ++i) {
    const double f = fa.data()[i];
    EXPECT_GE(f, stored<T>(A(1.0 - eps)) - 1e-12);
    EXPECT_LE(f, stored<T>(A(1.0 + eps)) + 1e-12);
    EXPECT_EQ(ya.data()[i], stored<T>(A(x.host.data()[i]) * A(f))) << i;
    f_host.data()[i] = stored<T>(A(lo + width * routing::noise_uniform(key, i)));
  }
  EXPECT_TRUE(agrees(fa, f_host, 1e-7)) << "the documented counter hash";

  auto dx = random_on_device<T>({3, 1003}, data);
  input_jitter_backward(f1, dx.dev);
  const Tensor<double> dxg = get(dx.dev);
  for (std::size_t i = 0; i < dxg.size(); ++i)
    EXPECT_EQ(dxg.data()[i], stored<T>(A(dx.host.data()[i]) * A(fa.data()[i]))) << i;

  DeviceTensor<T> y, f, wrong(Shape{5});
  EXPECT_THROW(input_jitter_forward(x.dev, 1.0, a, y, f), ConfigError);
  EXPECT_THROW(input_jitter_forward(x.dev, -0.1, a, y, f), ConfigError);
  EXPECT_THROW(input_jitter_backward(wrong, dx.dev), ShapeError);
}

TEST_F(CudaTest, NoiseStatistics) {
  const std::size_t n = std::size_t(1) << 20;
  const DeviceTensor<float> x = cuda::upload(filled<float>({n}, 1.0f));
  Rng rng(8);
  DeviceTensor<float> y, f;
  const double eps = 0.2;
  input_jitter_forward(x, eps, rng, y, f);
  const Tensor<float> fh = cuda::download(f);
  double mean = 0, var = 0;
  for (float v : fh) mean += v;
  mean /= double(n);
  for (float v : fh) var += (v - mean) * (v - mean);
  var /= double(n);
  EXPECT_NEAR(mean, 1.0, 5 * eps / std::sqrt(3.0 * n));
  EXPECT_NEAR(var, eps * eps / 3, 0.01 * eps * eps);

  DeviceTensor<float> l(Shape{n});
  set_zero(l);
  const double sigma = 0.5;
  logit_noise_forward(l, sigma, rng);
  const Tensor<float> lh = cuda::download(l);
  mean = 0;
  var = 0;
  for (float v : lh) mean += v;
  mean /= double(n);
  for (float v : lh) var += (v - mean) * (v - mean);
  var /= double(n);
  EXPECT_NEAR(mean, 0.0, 5 * sigma / std::sqrt(double(n)));
  EXPECT_NEAR(std::sqrt(var), sigma, 0.01 * sigma);
}

TYPED_TEST(CudaRouterTest, LogitNoiseIsSeededAndRepeatable) {
  using T = TypeParam;
  using A = acc_t<T>;
  Rng data(107);
  const double sigma = 0.3;
  auto l = random_on_device<T>({257, 8}, data);
  DeviceTensor<T> l1 = l.dev.clone(), l2 = l.dev.clone();
  Rng a(11), b(11), c(11);
  logit_noise_forward(l1, sigma, a);
  logit_noise_forward(l2, sigma, b);
  const Tensor<double> got = get(l1);
  EXPECT_TRUE(exactly_equal(get(l2), got));
  const std::uint64_t key = c.next_u64();
  EXPECT_EQ(a.next_u64(), c.next_u64());
  Tensor<double> want = empty<double>(l.host.shape());
  for (std::size_t i = 0; i < want.size(); ++i)
    want.data()[i] = stored<T>(A(l.host.data()[i]) + A(stored<T>(A(sigma * routing::noise_normal(key, i)))));
  EXPECT_TRUE(agrees(got, want, tolerance<T>)) << "the documented counter hash";
}

// ---- the whole routing step, as TopKRouter runs it -----------------------------------------------------------

TEST_F(CudaTest, RoutingPipelineMatchesCpuOnTheDevicesIntermediates) {
  Rng rng(108);
  const std::size_t D = 16, K = 6, k = 2;
  auto x = random_on_device<float>({2, 50, D}, rng);
  auto W = random_on_device<float>({K, D}, rng);
  auto b = random_on_device<float>({K}, rng);
  DeviceTensor<float> logits, probs, gates, grouped;
  DeviceTensor<std::int32_t> experts, counts, offsets, perm;
  router_linear_forward(x.dev, W.dev, &b.dev, 0.5f, logits);
  logits.reshape(Shape{100, K});
  softmax_forward(logits, probs);
  top_k_forward(probs, k, experts, gates);
  group_by_expert(experts, K, counts, offsets, perm);
  x.dev.reshape(Shape{100, D});
  gather_rows(x.dev, perm, k, grouped);

  const Tensor<double> probs_h = get(probs);
  Tensor<std::int32_t> e_cpu, c_cpu, o_cpu, p_cpu;
  Tensor<double> g_cpu, grouped_cpu;
  top_k_forward(probs_h, k, e_cpu, g_cpu);
  group_by_expert(e_cpu, K, c_cpu, o_cpu, p_cpu);
  Tensor<double> xh = x.host;
  xh.reshape(Shape{100, D});
  gather_rows(xh, p_cpu, k, grouped_cpu);
  EXPECT_TRUE(same_ids(cuda::download(experts), e_cpu));
  EXPECT_TRUE(same_ids(cuda::download(counts), c_cpu));
  EXPECT_TRUE(same_ids(cuda::download(offsets), o_cpu));
  EXPECT_TRUE(same_ids(cuda::download(perm), p_cpu));
  EXPECT_TRUE(exactly_equal(get(gates), g_cpu));
  EXPECT_TRUE(exactly_equal(get(grouped), grouped_cpu));
  EXPECT_NO_THROW(cuda::check_routing_errors());
}

}  // namespace
}  // namespace mixpeft::cuda_test
