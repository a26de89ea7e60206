// The device-generic layers on the CUDA backend against the same layers on the CPU: LoRALinear<float, Cuda> and
// Linear<float, Cuda> built from the same seed as their Cpu twins hold exactly the same weights (initialised on the
// host, then uploaded), draw the same dropout masks, and agree in forward (training and eval), backward (dx and
// every parameter gradient), merge / unmerge, rsLoRA and a second named adapter, within float tolerance. Every
// test skips when no CUDA device is present.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>

#include "mixpeft/cuda/backend.cuh"
#include "mixpeft/layers/linear.hpp"
#include "mixpeft/layers/lora_linear.hpp"
#include "cuda_test_support.cuh"

namespace mixpeft::cuda_test {
namespace {

using CpuLoRA = LoRALinear<float, Cpu>;
using GpuLoRA = LoRALinear<float, Cuda>;
using CpuLinear = Linear<float, Cpu>;
using GpuLinear = Linear<float, Cuda>;

struct Spec {
  std::size_t in = 96, out = 80;
  bool bias = true;
  std::size_t rank = 8;
  double alpha = 16.0;
  double dropout = 0.1;
  bool rslora = false;
};

template <class Layer>
Layer build(const Spec& s, std::uint64_t seed) {
  Rng rng(seed);
  return Layer({.in = s.in,
                .out = s.out,
                .bias = s.bias,
                .lora = {.rank = s.rank, .alpha = s.alpha, .dropout = s.dropout, .use_rslora = s.rslora}},
               rng);
}

// The same non-zero B on both layers (a fresh B is zero, which would hide the adapter's paths).
void set_b(CpuLoRA& cpu, GpuLoRA& gpu, const std::string& name, std::uint64_t seed) {
  Rng rng(seed);
  const Tensor<float> B = mixpeft::testing::random_tensor<float>(mixpeft::shape_of(cpu.lora_B(name).value), rng, 0.2);
  cpu.lora_B(name).value = B;
  gpu.lora_B(name).value = cuda::upload(B);
}

struct Inputs {
  Tensor<float> x, dy;
  DeviceTensor<float> x_dev, dy_dev;
};

Inputs inputs(const Shape& x_shape, std::size_t out, std::uint64_t seed) {
  Rng rng(seed);
  Inputs in;
  in.x = mixpeft::testing::random_tensor<float>(x_shape, rng);
  in.dy = mixpeft::testing::random_tensor<float>(with_last(x_shape, out), rng);
  in.x_dev = cuda::upload(in.x);
  in.dy_dev = cuda::upload(in.dy);
  return in;
}

// One forward and backward on both layers; checks y, the dropout mask (exactly), dx, dA and dB.
void step_and_compare(CpuLoRA& cpu, GpuLoRA& gpu, const Inputs& in, const std::string& what) {
  CpuLoRA::Cache cc;
  GpuLoRA::Cache gc;
  const Tensor<float> y = cpu.forward(in.x, cc);
  const DeviceTensor<float> y_dev = gpu.forward(in.x_dev, gc);
  EXPECT_TRUE(same(gc.mask, cc.mask)) << what << ": dropout mask";
  EXPECT_TRUE(close(y_dev, y)) << what << ": y";
  const Tensor<float> dx = cpu.backward(cc, in.dy);
  const DeviceTensor<float> dx_dev = gpu.backward(gc, in.dy_dev);
  EXPECT_TRUE(close(dx_dev, dx)) << what << ": dx";
  if (cpu.lora_A().trainable) EXPECT_TRUE(close(gpu.lora_A().grad, cpu.lora_A().grad)) << what << ": dA";
  if (cpu.lora_B().trainable) EXPECT_TRUE(close(gpu.lora_B().grad, cpu.lora_B().grad)) << what << ": dB";
  if (cpu.weight().trainable) EXPECT_TRUE(close(gpu.weight().grad, cpu.weight().grad)) << what << ": dW";
  if (cpu.config().bias && cpu.bias().trainable)
    EXPECT_TRUE(close(gpu.bias().grad, cpu.bias().grad)) << what << ": db";
}

// ---- add_transposed -------------------------------------------------------------------------------------------

template <class T>
class CudaAddTransposedTest : public CudaTest {};
using AddTransposedTypes = ::testing::Types<float, double, __nv_bfloat16>;
TYPED_TEST_SUITE(CudaAddTransposedTest, AddTransposedTypes);

// Shapes that are not multiples of the 32 x 32 tile, one spanning many tiles, and degenerate ones.
TYPED_TEST(CudaAddTransposedTest, MatchesCpu) {
  using T = TypeParam;
  Rng rng(30);
  for (auto [r, c] : {std::pair<std::size_t, std::size_t>{80, 8}, {8, 80}, {37, 33}, {1, 1}, {1, 70}, {300, 129}}) {
    auto src = random_on_device<T>({c, r}, rng);
    auto dst = random_on_device<T>({r, c}, rng);
    Tensor<double> want = dst.host;
    add_transposed(src.host, -0.75, want);
    add_transposed(src.dev, T(-0.75), dst.dev);
    EXPECT_TRUE(agrees(get(dst.dev), want, tolerance<T>)) << r << " x " << c;
  }
}

TEST_F(CudaTest, AddTransposedIsExactInFloatAndChecksShapes) {
  Rng rng(31);
  const Tensor<float> src = mixpeft::testing::random_tensor<float>({16, 80}, rng);
  Tensor<float> dst = mixpeft::testing::random_tensor<float>({80, 16}, rng);
  DeviceTensor<float> src_dev = cuda::upload(src), dst_dev = cuda::upload(dst);
  add_transposed(src, 1, dst);
  add_transposed(src_dev, 1, dst_dev);
  EXPECT_TRUE(same(dst_dev, dst));  // one rounded addition per element on both sides
  DeviceTensor<float> wrong(Shape{80, 16});
  EXPECT_THROW(add_transposed(wrong, 1, dst_dev), ShapeError);
  DeviceTensor<float> square(Shape{8, 8});
  EXPECT_THROW(add_transposed(square, 1, square), ConfigError);
  DeviceTensor<float> empty_src(Shape{0, 4}), empty_dst(Shape{4, 0});
  add_transposed(empty_src, 1, empty_dst);
}

// ---- the backend hooks ----------------------------------------------------------------------------------------

TEST_F(CudaTest, BackendFromHostAndZeros) {
  Rng rng(32);
  const Tensor<float> host = mixpeft::testing::random_tensor<float>({3, 5}, rng);
  EXPECT_TRUE(same(Cuda::from_host<float>(host), host));
  EXPECT_EQ(Cpu::from_host<float>(Tensor<float>(host)), host);
  EXPECT_TRUE(same(Cuda::zeros<float>({4, 2}), zeros<float>({4, 2})));
  // A trainable device parameter gets a zeroed gradient of its shape; a frozen one an empty gradient.
  Parameter<float, Cuda> p("w", Cuda::from_host<float>(host), true);
  EXPECT_TRUE(same(p.grad, zeros<float>({3, 5})));
  p.set_trainable(false);
  EXPECT_EQ(p.grad.size(), 0u);
}

// ---- LoRALinear -----------------------------------------------------------------------------------------------

TEST_F(CudaTest, LoRALinearHasTheCpuWeightsForTheSameSeed) {
  const Spec spec{};
  auto cpu = build<CpuLoRA>(spec, 5);
  auto gpu = build<GpuLoRA>(spec, 5);
  EXPECT_TRUE(same(gpu.weight().value, cpu.weight().value));
  EXPECT_TRUE(same(gpu.bias().value, cpu.bias().value));
  EXPECT_TRUE(same(gpu.lora_A().value, cpu.lora_A().value));
  EXPECT_TRUE(same(gpu.lora_B().value, cpu.lora_B().value));  // zeros
  EXPECT_TRUE(same(gpu.lora_A().grad, cpu.lora_A().grad));    // zeros, trainable
  EXPECT_TRUE(same(gpu.lora_B().grad, cpu.lora_B().grad));
  EXPECT_EQ(gpu.weight().grad.size(), 0u);  // frozen base
  EXPECT_EQ(gpu.bias().grad.size(), 0u);
  ParameterList<float, Cuda> gpu_params;
  ParameterList<float, Cpu> cpu_params;
  gpu.collect_parameters(gpu_params, "q_proj");
  cpu.collect_parameters(cpu_params, "q_proj");
  ASSERT_EQ(gpu_params.size(), cpu_params.size());
  for (std::size_t i = 0; i < gpu_params.size(); ++i) EXPECT_EQ(gpu_params[i].name, cpu_params[i].name);
  EXPECT_EQ(count_parameters(gpu_params, true), count_parameters(cpu_params, true));
}

TEST_F(CudaTest, LoRALinearTrainingWithDropoutMatchesCpu) {
  const Spec spec{};
  auto cpu = build<CpuLoRA>(spec, 6);
  auto gpu = build<GpuLoRA>(spec, 6);
  set_b(cpu, gpu, "default", 60);
  const Inputs in = inputs({2, 9, spec.in}, spec.out, 61);
  step_and_compare(cpu, gpu, in, "step 1");
  // A second step draws a fresh mask on both and accumulates into dA and dB.
  step_and_compare(cpu, gpu, in, "step 2 (accumulated)");
}

TEST_F(CudaTest, LoRALinearEvalMatchesCpu) {
  const Spec spec{};
  auto cpu = build<CpuLoRA>(spec, 7);
  auto gpu = build<GpuLoRA>(spec, 7);
  set_b(cpu, gpu, "default", 70);
  cpu.set_training(false);
  gpu.set_training(false);
  const Inputs in = inputs({18, spec.in}, spec.out, 71);
  step_and_compare(cpu, gpu, in, "eval");
  GpuLoRA::Cache gc;
  gpu.forward(in.x_dev, gc);
  EXPECT_EQ(gc.mask.size(), 0u);
}

TEST_F(CudaTest, LoRALinearNoDropoutRsLoRAAndNoBiasMatchCpu) {
  const Spec spec{.in = 72, .out = 40, .bias = false, .rank = 16, .alpha = 8, .dropout = 0.0, .rslora = true};
  auto cpu = build<CpuLoRA>(spec, 8);
  auto gpu = build<GpuLoRA>(spec, 8);
  EXPECT_DOUBLE_EQ(gpu.scale(), 2.0);  // 8 / sqrt(16)
  set_b(cpu, gpu, "default", 80);
  const Inputs in = inputs({3, 5, spec.in}, spec.out, 81);
  step_and_compare(cpu, gpu, in, "no dropout, rsLoRA");
}

TEST_F(CudaTest, LoRALinearFrozenAdapterAndTrainableBaseMatchCpu) {
  const Spec spec{};
  auto cpu = build<CpuLoRA>(spec, 9);
  auto gpu = build<GpuLoRA>(spec, 9);
  set_b(cpu, gpu, "default", 90);
  cpu.lora_A().set_trainable(false);
  gpu.lora_A().set_trainable(false);
  cpu.weight().set_trainable(true);
  gpu.weight().set_trainable(true);
  cpu.bias().set_trainable(true);
  gpu.bias().set_trainable(true);
  const Inputs in = inputs({12, spec.in}, spec.out, 91);
  step_and_compare(cpu, gpu, in, "frozen A, trainable base");
}

TEST_F(CudaTest, LoRALinearMergeAndUnmergeMatchCpu) {
  const Spec spec{};
  auto cpu = build<CpuLoRA>(spec, 10);
  auto gpu = build<GpuLoRA>(spec, 10);
  set_b(cpu, gpu, "default", 100);
  cpu.set_training(false);
  gpu.set_training(false);
  const Inputs in = inputs({18, spec.in}, spec.out, 101);
  const Tensor<float> W0 = cpu.weight().value;
  GpuLoRA::Cache gc;
  const Tensor<float> y_unmerged = cuda::download(gpu.forward(in.x_dev, gc));
  cpu.merge();
  gpu.merge();
  EXPECT_TRUE(close(gpu.weight().value, cpu.weight().value)) << "merged W";
  EXPECT_TRUE(close(gpu.forward(in.x_dev, gc), y_unmerged, 1e-5)) << "merged forward vs unmerged";
  CpuLoRA::Cache cc;
  EXPECT_TRUE(close(gpu.forward(in.x_dev, gc), cpu.forward(in.x, cc))) << "merged forward vs CPU";
  EXPECT_THROW(gpu.backward(gc, in.dy_dev), Error);
  gpu.unmerge();
  EXPECT_TRUE(close(gpu.weight().value, W0, 1e-6)) << "unmerge restores W";
  EXPECT_TRUE(close(gpu.forward(in.x_dev, gc), y_unmerged, 1e-5)) << "unmerged forward";
}

TEST_F(CudaTest, LoRALinearSecondAdapterMatchesCpu) {
  const Spec spec{};
  Rng rc(11), rg(11);
  CpuLoRA cpu({.in = spec.in, .out = spec.out, .lora = {.rank = 8, .alpha = 16, .dropout = 0.1}}, rc);
  GpuLoRA gpu({.in = spec.in, .out = spec.out, .lora = {.rank = 8, .alpha = 16, .dropout = 0.1}}, rg);
  cpu.add_adapter("doc", {.rank = 4, .alpha = 6, .dropout = 0.2, .use_rslora = true}, rc);
  gpu.add_adapter("doc", {.rank = 4, .alpha = 6, .dropout = 0.2, .use_rslora = true}, rg);
  EXPECT_TRUE(same(gpu.lora_A("doc").value, cpu.lora_A("doc").value));
  set_b(cpu, gpu, "default", 110);
  set_b(cpu, gpu, "doc", 111);
  cpu.set_active_adapter("doc");
  gpu.set_active_adapter("doc");
  EXPECT_DOUBLE_EQ(gpu.scale(), 3.0);  // 6 / sqrt(4)
  const Inputs in = inputs({2, 7, spec.in}, spec.out, 112);
  step_and_compare(cpu, gpu, in, "adapter doc");
  // Only the active adapter gets gradients.
  EXPECT_TRUE(same(gpu.lora_A("default").grad, zeros<float>({8, spec.in})));
  EXPECT_TRUE(same(gpu.lora_B("default").grad, zeros<float>({spec.out, 8})));
  cpu.set_active_adapter("default");
  gpu.set_active_adapter("default");
  step_and_compare(cpu, gpu, in, "adapter default after doc");
  cpu.set_active_adapter("doc");
  gpu.set_active_adapter("doc");
  cpu.set_training(false);
  gpu.set_training(false);
  cpu.merge();
  gpu.merge();
  EXPECT_TRUE(close(gpu.weight().value, cpu.weight().value)) << "merged doc W";
}

TEST_F(CudaTest, LoRALinearShapeErrorsAreTyped) {
  auto gpu = build<GpuLoRA>(Spec{}, 12);
  GpuLoRA::Cache gc;
  DeviceTensor<float> bad(Shape{4, 95});
  EXPECT_THROW(gpu.forward(bad, gc), ShapeError);
  DeviceTensor<float> x(Shape{4, 96});
  set_zero(x);
  gpu.forward(x, gc);
  DeviceTensor<float> dy(Shape{5, 80});
  EXPECT_THROW(gpu.backward(gc, dy), ShapeError);
}

// ---- Linear ---------------------------------------------------------------------------------------------------

template <class Layer>
Layer build_linear(bool bias, bool train_w, bool train_b, std::uint64_t seed) {
  Rng rng(seed);
  return Layer({.in = 96, .out = 80, .bias = bias, .trainable_weight = train_w, .trainable_bias = train_b}, rng);
}

void linear_compare(bool bias, bool train_w, bool train_b, const std::string& what) {
  auto cpu = build_linear<CpuLinear>(bias, train_w, train_b, 13);
  auto gpu = build_linear<GpuLinear>(bias, train_w, train_b, 13);
  EXPECT_TRUE(same(gpu.weight().value, cpu.weight().value)) << what;
  if (bias) EXPECT_TRUE(same(gpu.bias().value, cpu.bias().value)) << what;
  const Inputs in = inputs({2, 9, 96}, 80, 131);
  for (int step = 0; step < 2; ++step) {  // the second step accumulates into the gradients
    CpuLinear::Cache cc;
    GpuLinear::Cache gc;
    EXPECT_TRUE(close(gpu.forward(in.x_dev, gc), cpu.forward(in.x, cc))) << what << ": y";
    const bool cached = train_w || (bias && train_b);  // a frozen layer keeps no input
    EXPECT_EQ(gc.x.size(), cached ? in.x.size() : 0u) << what << ": cache";
    EXPECT_TRUE(close(gpu.backward(gc, in.dy_dev), cpu.backward(cc, in.dy))) << what << ": dx";
    if (train_w) EXPECT_TRUE(close(gpu.weight().grad, cpu.weight().grad)) << what << ": dW";
    if (bias && train_b) EXPECT_TRUE(close(gpu.bias().grad, cpu.bias().grad)) << what << ": db";
  }
}

TEST_F(CudaTest, LinearMatchesCpu) {
  linear_compare(true, true, true, "trainable");
  linear_compare(false, true, true, "no bias");
  linear_compare(true, false, true, "frozen weight, trainable bias");
  linear_compare(true, false, false, "frozen");
}

}  // namespace
}  // namespace mixpeft::cuda_test
