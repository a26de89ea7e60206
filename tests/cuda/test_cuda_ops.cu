// Element-wise and row-wise CUDA ops against the CPU ops in double, forward and backward: activations,
// softmax, dropout (by statistics and exact mask identities), RMSNorm, LayerNorm, RoPE, embedding and
// cross-entropy, with their typed errors. Every test skips when no CUDA device is present.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "mixpeft/cuda/backend.cuh"
#include "mixpeft/cuda/elementwise.cuh"
#include "mixpeft/ops/activations.hpp"
#include "mixpeft/ops/cross_entropy.hpp"
#include "mixpeft/ops/dropout.hpp"
#include "mixpeft/ops/embedding.hpp"
#include "mixpeft/ops/layernorm.hpp"
#include "mixpeft/ops/rmsnorm.hpp"
#include "mixpeft/ops/rope.hpp"
#include "mixpeft/ops/softmax.hpp"
#include "cuda_test_support.cuh"

namespace mixpeft::cuda_test {
namespace {

template <class T>
class CudaOpsTest : public CudaTest {};
using OpTypes = ::testing::Types<float, double, __nv_bfloat16>;
TYPED_TEST_SUITE(CudaOpsTest, OpTypes);

// Backward passes that read values the forward rounded to T (bf16 statistics, probabilities) get twice the
// forward's tolerance.
template <class T>
constexpr double backward_tolerance = 2 * tolerance<T>;

Tensor<std::int64_t> id_tensor(const Shape& shape, const std::vector<std::int64_t>& values) {
  Tensor<std::int64_t> t = empty<std::int64_t>(shape);
  std::copy(values.begin(), values.end(), t.begin());
  return t;
}

// ---- activations and softmax ------------------------------------------------------------------------------

TYPED_TEST(CudaOpsTest, ActivationsMatchCpu) {
  using T = TypeParam;
  Rng rng(20);
  const Shape shape{3, 7, 33};  // 693 elements: not a multiple of any pack width, so the tail path runs too
  auto x = random_on_device<T>(shape, rng, 2.0);
  auto u = random_on_device<T>(shape, rng);
  auto dy = random_on_device<T>(shape, rng);
  Tensor<double> want, want2;
  DeviceTensor<T> got, got2;

  silu_forward(x.host, want);
  silu_forward(x.dev, got);
  EXPECT_TRUE(agrees(get(got), want, tolerance<T>)) << "silu_forward";
  silu_backward(x.host, dy.host, want);
  silu_backward(x.dev, dy.dev, got);
  EXPECT_TRUE(agrees(get(got), want, tolerance<T>)) << "silu_backward";

  swiglu_forward(x.host, u.host, want);
  swiglu_forward(x.dev, u.dev, got);
  EXPECT_TRUE(agrees(get(got), want, tolerance<T>)) << "swiglu_forward";
  swiglu_backward(x.host, u.host, dy.host, want, want2);
  swiglu_backward(x.dev, u.dev, dy.dev, got, got2);
  EXPECT_TRUE(agrees(get(got), want, tolerance<T>)) << "swiglu_backward dg";
  EXPECT_TRUE(agrees(get(got2), want2, tolerance<T>)) << "swiglu_backward du";

  quick_gelu_forward(x.host, want);
  quick_gelu_forward(x.dev, got);
  EXPECT_TRUE(agrees(get(got), want, tolerance<T>)) << "quick_gelu_forward";
  quick_gelu_backward(x.host, dy.host, want);
  quick_gelu_backward(x.dev, dy.dev, got);
  EXPECT_TRUE(agrees(get(got), want, tolerance<T>)) << "quick_gelu_backward";

  silu_forward(x.host, want);
  silu_forward(x.dev, x.dev);  // in place
  EXPECT_TRUE(agrees(get(x.dev), want, tolerance<T>)) << "silu_forward in place";

  DeviceTensor<T> wrong(Shape{3, 7, 32});
  EXPECT_THROW(silu_backward(x.dev, wrong, got), ShapeError);
  EXPECT_THROW(swiglu_forward(x.dev, wrong, got), ShapeError);
  EXPECT_THROW(swiglu_backward(x.dev, u.dev, wrong, got, got2), ShapeError);
  EXPECT_THROW(quick_gelu_backward(x.dev, wrong, got), ShapeError);
}

struct Negate {
  template <class A>
  __device__ void operator()(std::size_t, const A (&x)[1], A (&y)[1]) const {
    y[0] = -x[0];
  }
};

TEST_F(CudaTest, ElementwiseKernelsHandleUnalignedPointers) {
  Rng rng(21);
  auto x = random_on_device<float>({101}, rng);
  DeviceTensor<float> y(Shape{101});
  set_zero(y);
  // One element past a 16-byte boundary: the launcher falls back to scalar loads.
  cuda::detail::map_elements<float, 1, 1>("negate", 100, Negate{}, {x.dev.data() + 1}, {y.data() + 1});
  const Tensor<double> got = get(y);
  EXPECT_EQ(got(0), 0.0);
  for (std::size_t i = 1; i < 101; ++i) EXPECT_EQ(got(i), -x.host(i)) << i;
}

TYPED_TEST(CudaOpsTest, SoftmaxMatchesCpu) {
  using T = TypeParam;
  Rng rng(22);
  for (const Shape& shape : {Shape{4, 5, 37}, Shape{3, 5000}, Shape{6, 1}}) {
    auto x = random_on_device<T>(shape, rng, 3.0);
    auto dy = random_on_device<T>(shape, rng);
    Tensor<double> y_cpu, dx_cpu;
    softmax_forward(x.host, y_cpu);
    DeviceTensor<T> y, dx;
    softmax_forward(x.dev, y);
    EXPECT_TRUE(agrees(get(y), y_cpu, tolerance<T>)) << shape_string(shape);
    // Backward from the device's own y, as a layer would call it.
    const Tensor<double> y_dev = get(y);
    softmax_backward(y_dev, dy.host, dx_cpu);
    softmax_backward(y, dy.dev, dx);
    EXPECT_TRUE(agrees(get(dx), dx_cpu, tolerance<T>)) << shape_string(shape);
  }
  DeviceTensor<T> empty_axis(Shape{3, 0}), y;
  EXPECT_THROW(softmax_forward(empty_axis, y), ShapeError);
  DeviceTensor<T> a(Shape{2, 3}), b(Shape{3, 2});
  EXPECT_THROW(softmax_backward(a, b, y), ShapeError);
}

// ---- dropout ------------------------------------------------------------------------------------------------

TEST_F(CudaTest, DropoutKeepsOneMinusPAndBackwardIsMaskTimesDy) {
  Rng data(23);
  const std::size_t n = std::size_t(1) << 20;
  const double p = 0.3;
  const Tensor<float> x_host = testing::random_tensor<float>({n}, data);
  const Tensor<float> dy_host = testing::random_tensor<float>({n}, data);
  const auto x = cuda::upload(x_host), dy = cuda::upload(dy_host);
  Rng rng(5);
  DeviceTensor<float> y, mask, dx;
  dropout_forward(x, p, true, rng, y, mask);
  dropout_backward(dy, mask, dx);
  const Tensor<float> y_h = cuda::download(y), m_h = cuda::download(mask), dx_h = cuda::download(dx);
  const float keep_scale = float(1.0 / (1.0 - p));
  std::size_t kept = 0, kept_pairs = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const float m = m_h(i);
    ASSERT_TRUE(m == 0.0f || m == keep_scale) << "mask[" << i << "] = " << m;
    kept += m != 0.0f;
    if (i + 1 < n) kept_pairs += m != 0.0f && m_h(i + 1) != 0.0f;
    ASSERT_EQ(y_h(i), x_host(i) * m) << i;
    ASSERT_EQ(dx_h(i), dy_host(i) * m) << i;
  }
  // Binomial counts: 5 standard deviations.
  const double q = 1 - p, fraction = double(kept) / double(n);
  EXPECT_NEAR(fraction, q, 5 * std::sqrt(p * q / double(n)));
  const double pair_fraction = double(kept_pairs) / double(n - 1);  // neighbours are independent
  EXPECT_NEAR(pair_fraction, q * q, 5 * std::sqrt(q * q * (1 - q * q) / double(n)) * 2);
}

TEST_F(CudaTest, DropoutMasksRepeatWithTheSeed) {
  Rng data(24);
  const auto x = cuda::upload(testing::random_tensor<float>({4099}, data));
  Rng a(9), b(9);
  DeviceTensor<float> y, mask_a1, mask_a2, mask_b1;
  dropout_forward(x, 0.5, true, a, y, mask_a1);
  dropout_forward(x, 0.5, true, a, y, mask_a2);
  dropout_forward(x, 0.5, true, b, y, mask_b1);
  EXPECT_EQ(cuda::download(mask_a1), cuda::download(mask_b1));
  EXPECT_NE(cuda::download(mask_a1), cuda::download(mask_a2));
}

TEST_F(CudaTest, DropoutMasksEqualTheCpuOpsForTheSameSeed) {
  Rng data(26);
  const Tensor<float> x_host = testing::random_tensor<float>({37, 1001}, data);
  Rng gpu_rng(12), cpu_rng(12);
  DeviceTensor<float> y, mask;
  dropout_forward(cuda::upload(x_host), 0.1, true, gpu_rng, y, mask);
  Tensor<float> y_cpu, mask_cpu;
  dropout_forward(x_host, 0.1, true, cpu_rng, y_cpu, mask_cpu);
  EXPECT_EQ(cuda::download(mask), mask_cpu);
  EXPECT_EQ(cuda::download(y), y_cpu);
}

TEST_F(CudaTest, DropoutInEvalModeIsTheIdentity) {
  Rng data(25), rng(1);
  const Tensor<float> x_host = testing::random_tensor<float>({3, 5}, data);
  const auto x = cuda::upload(x_host);
  DeviceTensor<float> y, mask(Shape{3, 5}), dx;
  dropout_forward(x, 0.4, false, rng, y, mask);
  EXPECT_EQ(cuda::download(y), x_host);
  EXPECT_EQ(mask.size(), 0u);
  dropout_forward(x, 0.0, true, rng, y, mask);
  EXPECT_EQ(mask.size(), 0u);
  dropout_backward(x, mask, dx);
  EXPECT_EQ(cuda::download(dx), x_host);
  EXPECT_THROW(dropout_forward(x, 1.0, true, rng, y, mask), ConfigError);
  EXPECT_THROW(dropout_forward(x, -0.1, true, rng, y, mask), ConfigError);
  DeviceTensor<float> wrong_mask(Shape{5, 3});
  EXPECT_THROW(dropout_backward(x, wrong_mask, dx), ShapeError);
}

// ---- norms --------------------------------------------------------------------------------------------------

TYPED_TEST(CudaOpsTest, RmsnormMatchesCpu) {
  using T = TypeParam;
  Rng rng(26);
  for (const std::size_t d : {std::size_t(40), std::size_t(4096)}) {
    auto x = random_on_device<T>({2, 3, d}, rng, 2.0);
    auto w = random_on_device<T>({d}, rng);
    auto dy = random_on_device<T>({2, 3, d}, rng);
    auto dw = random_on_device<T>({d}, rng);  // nonzero: the gradient accumulates
    Tensor<double> y_cpu, r_cpu, dx_cpu, dw_cpu = dw.host;
    rmsnorm_forward(x.host, w.host, 1e-5, y_cpu, r_cpu);
    DeviceTensor<T> y, r, dx;
    rmsnorm_forward(x.dev, w.dev, 1e-5, y, r);
    EXPECT_TRUE(agrees(get(y), y_cpu, tolerance<T>)) << d;
    EXPECT_TRUE(agrees(get(r), r_cpu, tolerance<T>)) << d;
    rmsnorm_backward(x.host, w.host, r_cpu, dy.host, dx_cpu, &dw_cpu);
    rmsnorm_backward(x.dev, w.dev, r, dy.dev, dx, &dw.dev);
    EXPECT_TRUE(agrees(get(dx), dx_cpu, backward_tolerance<T>)) << d;
    EXPECT_TRUE(agrees(get(dw.dev), dw_cpu, backward_tolerance<T>)) << d;
    DeviceTensor<T> dx_frozen;
    rmsnorm_backward(x.dev, w.dev, r, dy.dev, dx_frozen, nullptr);
    EXPECT_TRUE(agrees(get(dx_frozen), dx_cpu, backward_tolerance<T>)) << d;
  }
  DeviceTensor<T> x(Shape{2, 4}), w(Shape{5}), y, r;
  EXPECT_THROW(rmsnorm_forward(x, w, 1e-5, y, r), ShapeError);
  DeviceTensor<T> w4(Shape{4});
  EXPECT_THROW(rmsnorm_forward(x, w4, -1.0, y, r), ConfigError);
  DeviceTensor<T> bad_r(Shape{3}), dx;
  EXPECT_THROW(rmsnorm_backward(x, w4, bad_r, x, dx, nullptr), ShapeError);
}

TYPED_TEST(CudaOpsTest, LayernormMatchesCpu) {
  using T = TypeParam;
  Rng rng(27);
  const std::size_t d = 72;
  auto x = random_on_device<T>({5, 3, d}, rng, 2.0);
  auto w = random_on_device<T>({d}, rng);
  auto b = random_on_device<T>({d}, rng);
  auto dy = random_on_device<T>({5, 3, d}, rng);
  auto dw = random_on_device<T>({d}, rng);
  auto db = random_on_device<T>({d}, rng);
  Tensor<double> y_cpu, mean_cpu, r_cpu;
  layernorm_forward(x.host, w.host, b.host, 1e-5, y_cpu, mean_cpu, r_cpu);
  DeviceTensor<T> y, mean, r;
  layernorm_forward(x.dev, w.dev, b.dev, 1e-5, y, mean, r);
  EXPECT_TRUE(agrees(get(y), y_cpu, tolerance<T>));
  EXPECT_TRUE(agrees(get(mean), mean_cpu, tolerance<T>));
  EXPECT_TRUE(agrees(get(r), r_cpu, tolerance<T>));
  for (int grads = 0; grads < 4; ++grads) {
    const bool want_dw = grads & 1, want_db = grads & 2;
    Tensor<double> dx_cpu, dw_cpu = dw.host, db_cpu = db.host;
    layernorm_backward(x.host, w.host, mean_cpu, r_cpu, dy.host, dx_cpu, want_dw ? &dw_cpu : nullptr,
                       want_db ? &db_cpu : nullptr);
    DeviceTensor<T> dx, dw_dev = dw.dev.clone(), db_dev = db.dev.clone();
    layernorm_backward(x.dev, w.dev, mean, r, dy.dev, dx, want_dw ? &dw_dev : nullptr, want_db ? &db_dev : nullptr);
    EXPECT_TRUE(agrees(get(dx), dx_cpu, backward_tolerance<T>)) << grads;
    EXPECT_TRUE(agrees(get(dw_dev), dw_cpu, backward_tolerance<T>)) << grads;
    EXPECT_TRUE(agrees(get(db_dev), db_cpu, backward_tolerance<T>)) << grads;
  }
  DeviceTensor<T> b_wrong(Shape{d + 1});
  EXPECT_THROW(layernorm_forward(x.dev, w.dev, b_wrong, 1e-5, y, mean, r), ShapeError);
  EXPECT_THROW(layernorm_forward(x.dev, w.dev, b.dev, std::numeric_limits<double>::infinity(), y, mean, r),
               ConfigError);
}

// ---- rope ---------------------------------------------------------------------------------------------------

TYPED_TEST(CudaOpsTest, RopeMatchesCpu) {
  using T = TypeParam;
  Rng rng(28);
  const std::size_t heads = 3, dh = 8, positions = 32;
  const RopeTable<double> table_cpu(dh, positions, 10000.0);
  const cuda::DeviceRopeTable<T> table(dh, positions, 10000.0);
  auto x = random_on_device<T>({2, 5, heads * dh}, rng);
  Tensor<double> want;
  DeviceTensor<T> got;

  rope_forward(x.host, heads, table_cpu, 4, want);
  rope_forward(x.dev, heads, table, 4, got);
  EXPECT_TRUE(agrees(get(got), want, tolerance<T>)) << "offset forward";
  rope_backward(x.host, heads, table_cpu, 4, want);
  rope_backward(x.dev, heads, table, 4, got);
  EXPECT_TRUE(agrees(get(got), want, tolerance<T>)) << "offset backward";

  const std::vector<std::int64_t> ids{3, 0, 7, 7, 31};
  const std::span<const std::int64_t> span(ids);
  rope_forward(x.host, heads, table_cpu, span, want);
  rope_forward(x.dev, heads, table, span, got);
  EXPECT_TRUE(agrees(get(got), want, tolerance<T>)) << "positions forward";
  rope_backward(x.host, heads, table_cpu, span, want);
  rope_backward(x.dev, heads, table, span, got);
  EXPECT_TRUE(agrees(get(got), want, tolerance<T>)) << "positions backward";

  EXPECT_THROW(rope_forward(x.dev, heads, table, 28, got), IndexError);
  const std::vector<std::int64_t> short_ids{0, 1};
  EXPECT_THROW(rope_forward(x.dev, heads, table, std::span<const std::int64_t>(short_ids), got), ShapeError);
  const std::vector<std::int64_t> bad_ids{0, 1, 2, 32, 4};
  EXPECT_THROW(rope_backward(x.dev, heads, table, std::span<const std::int64_t>(bad_ids), got), IndexError);
  EXPECT_THROW(rope_forward(x.dev, 0, table, 0, got), ConfigError);
  EXPECT_THROW(rope_forward(x.dev, 2, table, 0, got), ShapeError);
}

// ---- embedding ------------------------------------------------------------------------------------------------

TYPED_TEST(CudaOpsTest, EmbeddingMatchesCpu) {
  using T = TypeParam;
  Rng rng(29);
  const std::size_t vocab = 11, d = 24;
  auto table = random_on_device<T>({vocab, d}, rng);
  const Tensor<std::int64_t> ids = id_tensor({2, 5}, {3, 0, 10, 3, 3, 7, 0, 1, 10, 3});
  Tensor<double> y_cpu;
  embedding_forward(ids, table.host, y_cpu);
  DeviceTensor<T> y;
  embedding_forward(ids, table.dev, y);
  EXPECT_EQ(y.shape(), (Shape{2, 5, d}));
  EXPECT_TRUE(agrees(get(y), y_cpu, tolerance<T>));

  auto dy = random_on_device<T>({2, 5, d}, rng);
  auto dtable = random_on_device<T>({vocab, d}, rng);  // nonzero: repeated ids and calls accumulate
  Tensor<double> dtable_cpu = dtable.host;
  embedding_backward(ids, dy.host, &dtable_cpu);
  embedding_backward(ids, dy.dev, &dtable.dev);
  EXPECT_TRUE(agrees(get(dtable.dev), dtable_cpu, tolerance<T>));
  EXPECT_NO_THROW(embedding_backward(ids, dy.dev, static_cast<DeviceTensor<T>*>(nullptr)));

  const Tensor<std::int64_t> no_ids = empty<std::int64_t>({0});
  embedding_forward(no_ids, table.dev, y);
  EXPECT_EQ(y.shape(), (Shape{0, d}));

  const Tensor<std::int64_t> bad = id_tensor({3}, {1, 11, 2});
  try {
    embedding_forward(bad, table.dev, y);
    FAIL() << "expected IndexError";
  } catch (const IndexError& e) {
    EXPECT_NE(std::string(e.what()).find("id 11 at flat index 1"), std::string::npos) << e.what();
  }
  DeviceTensor<T> dy_wrong(Shape{2, 5, d + 1});
  EXPECT_THROW(embedding_backward(ids, dy_wrong, &dtable.dev), ShapeError);
}

// ---- cross-entropy -----------------------------------------------------------------------------------------

TYPED_TEST(CudaOpsTest, CrossEntropyMatchesCpu) {
  using T = TypeParam;
  Rng rng(30);
  const std::size_t v = 50;
  auto logits = random_on_device<T>({3, 4, v}, rng, 3.0);
  const Tensor<std::int64_t> targets =
      id_tensor({3, 4}, {1, default_ignore_index, 49, 0, 7, 7, default_ignore_index, 20, 3, 2, 1, 0});
  CrossEntropyCache<double> cache_cpu;
  const double loss_cpu = cross_entropy_forward(logits.host, targets, cache_cpu);
  cuda::CrossEntropyCache<T> cache;
  const T loss = cross_entropy_forward(logits.dev, targets, cache);
  EXPECT_EQ(cache.valid, 10u);
  EXPECT_NEAR(double(cuda::widen(loss)), loss_cpu, tolerance<T> * std::abs(loss_cpu));

  Tensor<double> dlogits_cpu;
  cross_entropy_backward(logits.host, targets, cache_cpu, 0.75, dlogits_cpu);
  DeviceTensor<T> dlogits;
  cross_entropy_backward(logits.dev, targets, cache, T(0.75f), dlogits);
  EXPECT_TRUE(agrees(get(dlogits), dlogits_cpu, tolerance<T>));

  // A class id as the ignore label (the -100 targets become class 5).
  const Tensor<std::int64_t> targets7 = id_tensor({3, 4}, {1, 5, 49, 0, 7, 7, 5, 20, 3, 2, 1, 0});
  CrossEntropyCache<double> cache7_cpu;
  cuda::CrossEntropyCache<T> cache7;
  const double loss7_cpu = cross_entropy_forward(logits.host, targets7, cache7_cpu, 7);
  const T loss7 = cross_entropy_forward(logits.dev, targets7, cache7, 7);
  EXPECT_EQ(cache7.valid, 10u);
  EXPECT_NEAR(double(cuda::widen(loss7)), loss7_cpu, tolerance<T> * std::abs(loss7_cpu));
}

TEST_F(CudaTest, CrossEntropyEdgeCasesAndErrors) {
  Rng rng(31);
  auto logits = random_on_device<float>({4, 6}, rng);
  const Tensor<std::int64_t> ignored = id_tensor({4}, std::vector<std::int64_t>(4, default_ignore_index));
  cuda::CrossEntropyCache<float> cache;
  EXPECT_EQ(cross_entropy_forward(logits.dev, ignored, cache), 0.0f);
  EXPECT_EQ(cache.valid, 0u);
  DeviceTensor<float> dlogits;
  cross_entropy_backward(logits.dev, ignored, cache, 1.0f, dlogits);
  EXPECT_EQ(get(dlogits), zeros<double>({4, 6}));

  const Tensor<std::int64_t> out_of_range = id_tensor({4}, {0, 6, 1, 1});
  EXPECT_THROW(cross_entropy_forward(logits.dev, out_of_range, cache), IndexError);
  const Tensor<std::int64_t> wrong_shape = id_tensor({2, 2}, {0, 1, 2, 3});
  EXPECT_THROW(cross_entropy_forward(logits.dev, wrong_shape, cache), ShapeError);

  Tensor<double> with_nan = logits.host;
  with_nan(1, 3) = std::numeric_limits<double>::quiet_NaN();
  const auto nan_logits = cuda::upload_as<float>(with_nan);
  const Tensor<std::int64_t> targets = id_tensor({4}, {0, 1, 2, 3});
  try {
    cross_entropy_forward(nan_logits, targets, cache);
    FAIL() << "expected NumericError";
  } catch (const NumericError& e) {
    EXPECT_NE(std::string(e.what()).find("loss is NaN at row 1"), std::string::npos) << e.what();
  }

  cuda::CrossEntropyCache<float> fresh;
  cross_entropy_forward(logits.dev, targets, fresh);
  const Tensor<std::int64_t> changed = id_tensor({4}, {0, default_ignore_index, 2, 3});
  EXPECT_THROW(cross_entropy_backward(logits.dev, changed, fresh, 1.0f, dlogits), ConfigError);
}

}  // namespace
}  // namespace mixpeft::cuda_test
