// Device AdamW (cuda/adamw.cuh) against the CPU AdamW (train/adamw.hpp) over several steps with a changing learning
// rate, decay on and off, a frozen parameter and a size that leaves a tail; the bf16 mixed-precision variant against
// the CPU in float; the unaligned path against the vectorised one; typed errors. Skips without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <utility>
#include <string>
#include <vector>

#include "mixpeft/cuda/adamw.cuh"
#include "mixpeft/cuda/backend.cuh"
#include "mixpeft/train/adamw.hpp"
#include "cuda_test_support.cuh"

namespace mixpeft::cuda_test {
namespace {

template <class T>
Tensor<double> as_double(const Tensor<T>& t) {
  Tensor<double> d = empty<double>(t.shape());
  for (std::size_t i = 0; i < t.size(); ++i) d.data()[i] = double(t.data()[i]);
  return d;
}

template <class T>
Tensor<T> from_double(const Tensor<double>& t) {
  Tensor<T> d = empty<T>(t.shape());
  for (std::size_t i = 0; i < t.size(); ++i) d.data()[i] = T(t.data()[i]);
  return d;
}

struct Spec {
  std::string name;
  Shape shape;
  bool trainable, decay;
};

const std::vector<Spec>& specs() {
  static const std::vector<Spec> s = {
      {"proj.weight", {1003}, true, true},    // not a multiple of the pack width: the tail path
      {"proj.lora_A", {64, 33}, true, true},
      {"proj.bias", {7}, true, false},        // no decay
      {"frozen.weight", {5, 5}, false, true},  // never read or written
  };
  return s;
}

AdamWConfig test_config() {
  AdamWConfig c;
  c.lr = 1e-2;
  c.beta1 = 0.9;
  c.beta2 = 0.95;
  c.eps = 1e-8;
  c.weight_decay = 0.1;
  return c;
}

template <class T>
class CudaAdamWTest : public CudaTest {};
using AdamWTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(CudaAdamWTest, AdamWTypes);

TYPED_TEST(CudaAdamWTest, MatchesCpuOverSeveralSteps) {
  using T = TypeParam;
  Rng rng(200);
  std::vector<Parameter<T>> cpu;
  std::vector<Parameter<T, Cuda>> dev;
  cpu.reserve(specs().size());
  dev.reserve(specs().size());
  for (const Spec& s : specs()) {
    const Tensor<T> v = testing::random_tensor<T>(s.shape, rng);
    cpu.emplace_back(s.name, v, s.trainable, s.decay);
    dev.emplace_back(s.name, cuda::upload(v), s.trainable, s.decay);
  }
  ParameterList<T> cpu_list;
  ParameterList<T, Cuda> dev_list;
  for (std::size_t i = 0; i < cpu.size(); ++i) {
    cpu_list.push_back({"layer." + cpu[i].name, &cpu[i]});
    dev_list.push_back({"layer." + dev[i].name, &dev[i]});
  }
  mixpeft::AdamW<T> cpu_opt(cpu_list, test_config());
  cuda::AdamW<T> dev_opt(dev_list, test_config());
  const Tensor<T> frozen_before = cpu[3].value;

  for (int step = 1; step <= 6; ++step) {
    for (std::size_t i = 0; i < cpu.size(); ++i) {
      if (!cpu[i].trainable) continue;
      const Tensor<T> g = testing::random_tensor<T>(specs()[i].shape, rng);
      cpu[i].grad = g;
      cuda::assign(dev[i].grad, cuda::upload(g));
    }
    const double lr = 1e-2 * (1.0 - 0.1 * step);
    cpu_opt.step(lr);
    dev_opt.step(lr);
  }
  for (std::size_t i = 0; i < cpu.size(); ++i) {
    const std::string name = "layer." + cpu[i].name;
    EXPECT_TRUE(agrees(as_double(cuda::download(dev[i].value)), as_double(cpu[i].value), tolerance<T>)) << name;
    if (!cpu[i].trainable) {
      EXPECT_EQ(dev_opt.state().count(name), 0u) << name;
      continue;
    }
    const auto& ds = dev_opt.state().at(name);
    const auto& cs = cpu_opt.state().at(name);
    EXPECT_EQ(ds.step, cs.step);
    EXPECT_TRUE(agrees(as_double(cuda::download(ds.m)), as_double(cs.m), tolerance<T>)) << name << ".m";
    EXPECT_TRUE(agrees(as_double(cuda::download(ds.v)), as_double(cs.v), tolerance<T>)) << name << ".v";
    EXPECT_EQ(ds.master.size(), 0u);
  }
  EXPECT_EQ(cuda::download(dev[3].value), frozen_before);

  // zero_grad clears the trainable gradients.
  dev_opt.zero_grad();
  EXPECT_EQ(cuda::download(dev[0].grad), zeros<T>(specs()[0].shape));
}

TEST_F(CudaTest, AdamWBf16MixedPrecisionMatchesCpuInFloat) {
  Rng rng(201);
  std::vector<Parameter<float>> cpu;
  std::vector<Parameter<__nv_bfloat16, Cuda>> dev;
  cpu.reserve(specs().size());
  dev.reserve(specs().size());
  for (const Spec& s : specs()) {
    auto v = random_on_device<__nv_bfloat16>(s.shape, rng);  // the CPU starts from the very bf16 values
    cpu.emplace_back(s.name, from_double<float>(v.host), s.trainable, s.decay);
    dev.emplace_back(s.name, std::move(v.dev), s.trainable, s.decay);
  }
  ParameterList<float> cpu_list;
  ParameterList<__nv_bfloat16, Cuda> dev_list;
  for (std::size_t i = 0; i < cpu.size(); ++i) {
    cpu_list.push_back({cpu[i].name, &cpu[i]});
    dev_list.push_back({dev[i].name, &dev[i]});
  }
  mixpeft::AdamW<float> cpu_opt(cpu_list, test_config());
  cuda::AdamW<__nv_bfloat16> dev_opt(dev_list, test_config());

  for (int step = 1; step <= 5; ++step) {
    for (std::size_t i = 0; i < cpu.size(); ++i) {
      if (!cpu[i].trainable) continue;
      auto g = random_on_device<__nv_bfloat16>(specs()[i].shape, rng);  // bf16 gradients; the CPU gets their values
      cpu[i].grad = from_double<float>(g.host);
      cuda::assign(dev[i].grad, g.dev);
    }
    cpu_opt.step(2e-2 / step);
    dev_opt.step(2e-2 / step);
  }
  for (std::size_t i = 0; i < cpu.size(); ++i) {
    const std::string& name = cpu[i].name;
    const Tensor<double> weights = get(dev[i].value);
    EXPECT_TRUE(agrees(weights, as_double(cpu[i].value), tolerance<__nv_bfloat16>)) << name;
    if (!cpu[i].trainable) continue;
    const auto& ds = dev_opt.state().at(name);
    const Tensor<float> master = cuda::download(ds.master);
    EXPECT_TRUE(agrees(as_double(master), as_double(cpu[i].value), tolerance<float>)) << name << " master";
    EXPECT_TRUE(agrees(as_double(cuda::download(ds.m)), as_double(cpu_opt.state().at(name).m), tolerance<float>))
        << name << ".m";
    EXPECT_TRUE(agrees(as_double(cuda::download(ds.v)), as_double(cpu_opt.state().at(name).v), tolerance<float>))
        << name << ".v";
    for (std::size_t j = 0; j < master.size(); ++j)  // the bf16 copy is the rounded master, element for element
      ASSERT_EQ(weights.data()[j], double(__bfloat162float(__float2bfloat16_rn(master.data()[j])))) << name << " " << j;
  }
}

TEST_F(CudaTest, AdamWFreeFunctionsTakeTheUnalignedPathWithTheSameResults) {
  Rng rng(202);
  const std::size_t n = 1001;
  const auto s = cuda::adamw_scalars<float>(test_config(), 3, true);
  const Tensor<float> w0 = testing::random_tensor<float>({n}, rng), g0 = testing::random_tensor<float>({n}, rng);
  Tensor<float> m0 = testing::random_tensor<float>({n}, rng), v0 = testing::random_tensor<float>({n}, rng);
  for (auto& x : v0) x = x * x;  // a second moment is >= 0

  // Vectorised (whole tensors), then the same numbers one element past each base (scalar loads).
  DeviceTensor<float> w = cuda::upload(w0), g = cuda::upload(g0), m = cuda::upload(m0), v = cuda::upload(v0);
  cuda::adamw_update(w, g, m, v, s);
  DeviceTensor<float> wu(Shape{n + 1}), gu(Shape{n + 1}), mu(Shape{n + 1}), vu(Shape{n + 1});
  using Copy = std::pair<DeviceTensor<float>*, const Tensor<float>*>;
  for (auto [dst, src] : std::vector<Copy>{{&wu, &w0}, {&gu, &g0}, {&mu, &m0}, {&vu, &v0}})
    MIXPEFT_CUDA_CHECK(cudaMemcpy(dst->data() + 1, src->data(), n * sizeof(float), cudaMemcpyHostToDevice));
  cuda::detail::adamw::launch<float, float, false>("test", n, wu.data() + 1, mu.data() + 1, vu.data() + 1,
                                                   gu.data() + 1, nullptr, s);
  const Tensor<float> wa = cuda::download(w), wb = cuda::download(wu);
  for (std::size_t i = 0; i < n; ++i) ASSERT_EQ(wa.data()[i], wb.data()[i + 1]) << i;

  // Mixed precision, aligned and not.
  DeviceTensor<float> w2 = cuda::upload(w0), m2 = cuda::upload(m0), v2 = cuda::upload(v0);
  DeviceTensor<__nv_bfloat16> g2 = cuda::upload_as<__nv_bfloat16>(g0), copy;
  cuda::adamw_update(w2, g2, m2, v2, s, copy);
  DeviceTensor<float> w3(Shape{n + 1}), m3(Shape{n + 1}), v3(Shape{n + 1});
  DeviceTensor<__nv_bfloat16> g3(Shape{n + 1}), copy3(Shape{n + 1});
  for (auto [dst, src] : std::vector<Copy>{{&w3, &w0}, {&m3, &m0}, {&v3, &v0}})
    MIXPEFT_CUDA_CHECK(cudaMemcpy(dst->data() + 1, src->data(), n * sizeof(float), cudaMemcpyHostToDevice));
  MIXPEFT_CUDA_CHECK(cudaMemcpy(g3.data() + 1, g2.data(), n * sizeof(__nv_bfloat16), cudaMemcpyDeviceToDevice));
  cuda::detail::adamw::launch<float, __nv_bfloat16, true>("test", n, w3.data() + 1, m3.data() + 1, v3.data() + 1,
                                                          g3.data() + 1, copy3.data() + 1, s);
  const Tensor<float> w2h = cuda::download(w2), w3h = cuda::download(w3);
  const Tensor<float> c2 = cuda::download_as<float>(copy), c3 = cuda::download_as<float>(copy3);
  for (std::size_t i = 0; i < n; ++i) {
    ASSERT_EQ(w2h.data()[i], w3h.data()[i + 1]) << i;
    ASSERT_EQ(c2.data()[i], c3.data()[i + 1]) << i;
    ASSERT_EQ(c2.data()[i], __bfloat162float(__float2bfloat16_rn(w2h.data()[i]))) << i;
  }
  EXPECT_EQ(copy.shape(), w2.shape());

  // One step by hand, in the CPU's float expression.
  for (std::size_t i = 0; i < n; i += 97) {
    const float gi = g0.data()[i];
    const float mi = s.b1 * m0.data()[i] + s.c1 * gi;
    const float vi = s.b2 * v0.data()[i] + s.c2 * gi * gi;
    const float wi = w0.data()[i] * s.decay - s.step_size * mi / (std::sqrt(vi) / s.bias2_sqrt + s.eps);
    EXPECT_NEAR(wa.data()[i], wi, 1e-6f * (1.0f + std::abs(wi))) << i;
  }
}

TEST_F(CudaTest, AdamWErrors) {
  const auto s = cuda::adamw_scalars<float>(test_config(), 1, true);
  DeviceTensor<float> w(Shape{4}), g(Shape{4}), m(Shape{4}), v(Shape{5});
  DeviceTensor<__nv_bfloat16> gb(Shape{3}), out_bf16;
  EXPECT_THROW(cuda::adamw_update(w, g, m, v, s), ShapeError);
  EXPECT_THROW(cuda::adamw_update(w, gb, m, m, s, out_bf16), ShapeError);
  EXPECT_THROW(cuda::adamw_scalars<float>(test_config(), 0, true), ConfigError);

  Parameter<float, Cuda> a("w", DeviceTensor<float>(Shape{2}), true), b("w", DeviceTensor<float>(Shape{2}), true);
  EXPECT_THROW(cuda::AdamW<float>(ParameterList<float, Cuda>{{"w", &a}, {"w", &b}}), ConfigError);
  AdamWConfig bad = test_config();
  bad.beta2 = 1.0;
  EXPECT_THROW(cuda::AdamW<float>(ParameterList<float, Cuda>{{"a", &a}}, bad), ConfigError);
  cuda::AdamW<float> opt(ParameterList<float, Cuda>{{"a", &a}}, test_config());
  EXPECT_THROW(opt.set_lr(-1.0), ConfigError);
  a.grad = DeviceTensor<float>(Shape{3});
  EXPECT_THROW(opt.step(), ShapeError);
}

}  // namespace
}  // namespace mixpeft::cuda_test
