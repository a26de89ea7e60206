// Masked multi-head attention on the device against the CPU op in double, forward (output and probabilities)
// and backward, for every mask the models use: causal self-attention, cross-attention, KV-cache decoding,
// right padding (including an empty sequence) and LaVIN's hidden first key. Skips without a CUDA device.
#include <gtest/gtest.h>

#include <cstddef>
#include <string>
#include <vector>

#include "mixpeft/cuda/backend.cuh"
#include "mixpeft/ops/attention.hpp"
#include "cuda_test_support.cuh"

namespace mixpeft::cuda_test {
namespace {

template <class T>
class CudaAttentionTest : public CudaTest {};
using AttentionTypes = ::testing::Types<float, double, __nv_bfloat16>;
TYPED_TEST_SUITE(CudaAttentionTest, AttentionTypes);

// bf16 probabilities and score gradients are rounded before the second GEMM of each pass.
template <class T>
constexpr double attention_tolerance = tolerance<T>;
template <>
constexpr double attention_tolerance<__nv_bfloat16> = 3e-2;

struct Case {
  std::string name;
  std::size_t batch, tq, tk, heads, dh;
  AttentionMask mask;
};

std::vector<Case> cases() {
  return {
      {"causal self-attention", 2, 7, 7, 2, 8, {.causal = true}},
      {"cross-attention", 2, 5, 9, 2, 8, {.causal = false}},
      {"decoding one query", 2, 1, 6, 4, 4, {.causal = true}},
      {"causal with a cache offset", 1, 3, 8, 2, 16, {.causal = true}},
      {"right padding and an empty sequence", 2, 4, 9, 2, 8, {.causal = false, .key_lengths = {9, 0}}},
      {"hidden first key with padding", 2, 6, 6, 3, 8,
       {.causal = true, .block_first_key = true, .key_lengths = {6, 4}}},
  };
}

TYPED_TEST(CudaAttentionTest, ForwardAndBackwardMatchCpu) {
  using T = TypeParam;
  Rng rng(40);
  for (const Case& c : cases()) {
    const std::size_t d = c.heads * c.dh;
    auto q = random_on_device<T>({c.batch, c.tq, d}, rng);
    auto k = random_on_device<T>({c.batch, c.tk, d}, rng);
    auto v = random_on_device<T>({c.batch, c.tk, d}, rng);
    auto d_o = random_on_device<T>({c.batch, c.tq, d}, rng);

    Tensor<double> o_cpu, dq_cpu, dk_cpu, dv_cpu;
    AttentionCache<double> cache_cpu;
    attention_forward(q.host, k.host, v.host, c.heads, c.mask, o_cpu, cache_cpu);
    attention_backward(q.host, k.host, v.host, cache_cpu, d_o.host, dq_cpu, dk_cpu, dv_cpu);

    DeviceTensor<T> o, dq, dk, dv;
    cuda::AttentionCache<T> cache;
    attention_forward(q.dev, k.dev, v.dev, c.heads, c.mask, o, cache);
    attention_backward(q.dev, k.dev, v.dev, cache, d_o.dev, dq, dk, dv);

    const double tol = attention_tolerance<T>;
    EXPECT_TRUE(agrees(get(o), o_cpu, tol)) << c.name;
    EXPECT_TRUE(agrees(get(cache.probs), cache_cpu.probs, tol)) << c.name;
    EXPECT_TRUE(agrees(get(dq), dq_cpu, tol)) << c.name;
    EXPECT_TRUE(agrees(get(dk), dk_cpu, tol)) << c.name;
    EXPECT_TRUE(agrees(get(dv), dv_cpu, tol)) << c.name;
    EXPECT_EQ(cache.mask.key_lengths, c.mask.key_lengths) << c.name;
  }
}

TEST_F(CudaTest, AttentionMaskedEntriesAreExactlyZero) {
  Rng rng(41);
  const AttentionMask mask{.causal = true, .block_first_key = true, .key_lengths = {5, 3}};
  auto q = random_on_device<float>({2, 5, 8}, rng);
  DeviceTensor<float> o;
  cuda::AttentionCache<float> cache;
  attention_forward(q.dev, q.dev, q.dev, 2, mask, o, cache);
  const Tensor<double> p = get(cache.probs);  // [2, 2, 5, 5]
  for (std::size_t b = 0; b < 2; ++b)
    for (std::size_t h = 0; h < 2; ++h)
      for (std::size_t i = 0; i < 5; ++i) {
        double row_sum = 0;
        for (std::size_t j = 0; j < 5; ++j) {
          const bool allowed = j <= i && j < mask.key_lengths[b] && (j != 0 || i == 0);
          if (!allowed) EXPECT_EQ(p(b, h, i, j), 0.0) << b << h << i << j;
          row_sum += p(b, h, i, j);
        }
        EXPECT_NEAR(row_sum, 1.0, 1e-6) << b << h << i;  // every row here has an allowed key
      }
}

TEST_F(CudaTest, AttentionRejectsBadShapesAndMasks) {
  DeviceTensor<float> q(Shape{2, 4, 8}), k(Shape{2, 6, 8}), v(Shape{2, 6, 8}), o;
  cuda::AttentionCache<float> cache;
  EXPECT_THROW(attention_forward(q, k, v, 3, AttentionMask{}, o, cache), ConfigError);
  DeviceTensor<float> k_wrong(Shape{1, 6, 8});
  EXPECT_THROW(attention_forward(q, k_wrong, v, 2, AttentionMask{}, o, cache), ShapeError);
  DeviceTensor<float> q_long(Shape{2, 7, 8});
  try {
    attention_forward(q_long, k, v, 2, AttentionMask{.causal = true}, o, cache);
    FAIL() << "expected ShapeError";
  } catch (const ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("needs Tq <= Tk"), std::string::npos) << e.what();
  }
  EXPECT_THROW(attention_forward(q, k, v, 2, AttentionMask{.key_lengths = {6}}, o, cache), ConfigError);
  EXPECT_THROW(attention_forward(q, k, v, 2, AttentionMask{.key_lengths = {6, 7}}, o, cache), ConfigError);

  Rng rng(42);
  auto qq = random_on_device<float>({2, 4, 8}, rng);
  auto kk = random_on_device<float>({2, 6, 8}, rng);
  attention_forward(qq.dev, kk.dev, kk.dev, 2, AttentionMask{}, o, cache);
  DeviceTensor<float> d_o_wrong(Shape{2, 4, 4}), dq, dk, dv;
  EXPECT_THROW(attention_backward(qq.dev, kk.dev, kk.dev, cache, d_o_wrong, dq, dk, dv), ShapeError);
}

}  // namespace
}  // namespace mixpeft::cuda_test
