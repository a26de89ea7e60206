// The CLIP ViT on the CUDA backend against the CPU: the ViT's new ops (patchify / unpatchify, copy_token_row /
// add_token_row, class_token_forward / _backward) against the CPU ops in float, double and bf16, and
// ClipVit<float, Cuda> against ClipVit<float, Cpu> built from the same seed: the same weights; forward (hidden and
// the taken [cls] tokens, with norm_taken on and off, MM-Adapters on, LoRA on q, v and fc1) and backward
// (from d_hidden and d_cls, d_images requested, every trainable gradient), the plain model (every weight
// trainable, the embeddings' gradients included) and a backward from d_cls alone. Every test skips when no CUDA
// device is present.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>

#include "mixpeft/cuda/backend.cuh"
#include "mixpeft/models/vit.hpp"
#include "mixpeft/ops/class_token.hpp"
#include "mixpeft/ops/patchify.hpp"
#include "mixpeft/ops/token_rows.hpp"
#include "cuda_test_support.cuh"

namespace mixpeft::cuda_test {
namespace {

// ---- the ops --------------------------------------------------------------------------------------------------

template <class T>
class CudaVitOpsTest : public CudaTest {};
using VitOpTypes = ::testing::Types<float, double, __nv_bfloat16>;
TYPED_TEST_SUITE(CudaVitOpsTest, VitOpTypes);

TYPED_TEST(CudaVitOpsTest, PatchifyAndUnpatchifyMatchCpuExactly) {
  using T = TypeParam;
  Rng rng(1);
  for (std::size_t p : {1, 2, 3}) {
    const auto images = random_on_device<T>({2, 3, 6, 12}, rng);
    const DeviceTensor<T> patches = patchify(images.dev, p);
    EXPECT_EQ(get(patches), patchify(images.host, p)) << "p = " << p;
    const auto r = random_on_device<T>(shape_of(patches), rng);
    const DeviceTensor<T> back = unpatchify(r.dev, Shape{2, 3, 6, 12}, p);
    EXPECT_EQ(get(back), unpatchify(r.host, Shape{2, 3, 6, 12}, p)) << "p = " << p;
  }
}

TYPED_TEST(CudaVitOpsTest, TokenRowsMatchCpu) {
  using T = TypeParam;
  Rng rng(2);
  const auto src = random_on_device<T>({3, 5, 40}, rng);
  auto dst = random_on_device<T>({3, 4, 40}, rng);
  copy_token_row(src.dev, 3, dst.dev, 1);
  Tensor<double> want = dst.host;
  copy_token_row(src.host, 3, want, 1);
  EXPECT_EQ(get(dst.dev), want);

  auto acc = random_on_device<T>({3, 5, 40}, rng);
  add_token_row(dst.dev, 2, acc.dev, 0);
  add_token_row(dst.dev, 1, acc.dev, 4);
  Tensor<double> want_acc = acc.host;
  add_token_row(dst.host, 2, want_acc, 0);
  add_token_row(want, 1, want_acc, 4);
  EXPECT_TRUE(agrees(get(acc.dev), want_acc, tolerance<T>));
}

TYPED_TEST(CudaVitOpsTest, TokenBlocksMatchCpu) {
  using T = TypeParam;
  Rng rng(4);
  const auto src = random_on_device<T>({2, 6, 40}, rng);
  auto dst = random_on_device<T>({3, 9, 40}, rng);
  Tensor<double> want = dst.host;
  copy_token_block(src.dev, 1, 2, dst.dev, 2, 4, 3);
  copy_token_block(src.host, 1, 2, want, 2, 4, 3);
  zero_token_block(dst.dev, 0, 5, 4);
  zero_token_block(want, 0, 5, 4);
  EXPECT_EQ(get(dst.dev), want);
  EXPECT_THROW(copy_token_block(src.dev, 0, 4, dst.dev, 0, 0, 3), ShapeError);
  EXPECT_THROW(zero_token_block(dst.dev, 3, 0, 1), ShapeError);
}

TYPED_TEST(CudaVitOpsTest, ClassTokenMatchesCpu) {
  using T = TypeParam;
  Rng rng(3);
  const std::size_t b = 5, m = 16, d = 48;
  const auto cls = random_on_device<T>({d}, rng), e = random_on_device<T>({b, m, d}, rng),
             pos = random_on_device<T>({m + 1, d}, rng), d_emb = random_on_device<T>({b, m + 1, d}, rng);
  DeviceTensor<T> emb;
  class_token_forward(cls.dev, e.dev, pos.dev, emb);
  Tensor<double> want;
  class_token_forward(cls.host, e.host, pos.host, want);
  EXPECT_TRUE(agrees(get(emb), want, tolerance<T>)) << "emb";

  auto d_cls = random_on_device<T>({d}, rng), d_pos = random_on_device<T>({m + 1, d}, rng);
  DeviceTensor<T> d_e;
  Tensor<double> want_cls = d_cls.host, want_pos = d_pos.host, want_e;
  class_token_backward(d_emb.dev, &d_cls.dev, &d_pos.dev, &d_e);
  class_token_backward(d_emb.host, &want_cls, &want_pos, &want_e);
  EXPECT_TRUE(agrees(get(d_cls.dev), want_cls, tolerance<T>)) << "d_cls";
  EXPECT_TRUE(agrees(get(d_pos.dev), want_pos, tolerance<T>)) << "d_pos";
  EXPECT_EQ(get(d_e), want_e) << "d_e";
  // Null gradients are skipped.
  DeviceTensor<T> only_e;
  class_token_backward<T>(d_emb.dev, nullptr, nullptr, &only_e);
  EXPECT_EQ(get(only_e), want_e);
}

TEST_F(CudaTest, VitOpsThrowTypedErrors) {
  const DeviceTensor<float> images(Shape{2, 3, 6, 4}), src(Shape{2, 5, 8}), e(Shape{2, 4, 8}), cls(Shape{8});
  EXPECT_THROW(patchify(images, 0), ConfigError);
  EXPECT_THROW(patchify(images, 3), ShapeError);
  EXPECT_THROW(unpatchify(DeviceTensor<float>(Shape{2, 6, 11}), Shape{2, 3, 6, 4}, 2), ShapeError);
  DeviceTensor<float> dst(Shape{2, 3, 8}), narrow_dst(Shape{2, 3, 7}), wide(Shape{2, 5, 8});
  EXPECT_THROW(copy_token_row(src, 5, dst, 0), ShapeError);
  EXPECT_THROW(copy_token_row(src, 0, narrow_dst, 0), ShapeError);
  EXPECT_THROW(add_token_row(dst, 3, wide, 0), ShapeError);
  DeviceTensor<float> emb, bad_cls(Shape{7});
  EXPECT_THROW(class_token_forward(cls, e, DeviceTensor<float>(Shape{4, 8}), emb), ShapeError);
  EXPECT_THROW(class_token_backward<float>(src, &bad_cls, nullptr, nullptr), ShapeError);
}

// ---- ClipVit<float, Cuda> against ClipVit<float, Cpu> ---------------------------------------------------------

using CpuVit = ClipVit<float, Cpu>;
using GpuVit = ClipVit<float, Cuda>;

ClipVitConfig vit_config(bool norm_taken) {
  return {.image_size = 8, .patch = 2, .channels = 3, .dim = 32, .n_layers = 4, .n_heads = 4, .mlp_dim = 48,
          .layer_norm_eps = 1e-5, .take_every = 2, .norm_taken = norm_taken};
}

// Peft is nested per type (it holds the layers' configs): one helper builds either model.
template <class Model>
Model build(bool peft_on, bool norm_taken, std::uint64_t seed) {
  typename Model::Peft peft;
  if (peft_on) {
    peft.mm_adapter = typename Model::Adapter::Config{.hidden = 4, .groups = 2, .scale = 0.9, .dropout = 0.1,
                                                      .temperature = 3.0};
    // Named types, not bare braced lists: nvcc can lose the designators of a list assigned to a dependent member.
    peft.lora_targets = VitLoRATargets{.q = true, .v = true, .fc1 = true};
    peft.lora.rank = 4, peft.lora.alpha = 8.0, peft.lora.dropout = 0.1;
  }
  Rng rng(seed);
  return Model(vit_config(norm_taken), peft, rng);
}

// Random values for the CPU model's fresh PEFT modules (lora_B and the adapters start at zero, which would hide
// their paths), copied to the GPU model.
void randomise(CpuVit& cpu, GpuVit& gpu, std::uint64_t seed) {
  Rng rng(seed);
  auto cp = parameters_of<float, Cpu>(cpu);
  auto gp = parameters_of<float, Cuda>(gpu);
  ASSERT_EQ(cp.size(), gp.size());
  for (std::size_t i = 0; i < cp.size(); ++i) {
    ASSERT_EQ(cp[i].name, gp[i].name);
    if (cp[i].name.find("lora_B") != std::string::npos || cp[i].name.find("adapter") != std::string::npos)
      cp[i].param->value = mixpeft::testing::random_tensor<float>(mixpeft::shape_of(cp[i].param->value), rng, 0.2);
    gp[i].param->value = cuda::upload(cp[i].param->value);
  }
}

struct Step {
  bool hidden = true, cls = true;  // which gradients start the backward
};

// One forward and backward on both models; checks hidden, cls, d_images and every trainable gradient.
void step_and_compare(CpuVit& cpu, GpuVit& gpu, const Step& step, std::uint64_t seed, std::size_t min_checked) {
  Rng rng(seed);
  const Tensor<float> images = mixpeft::testing::random_tensor<float>({3, 3, 8, 8}, rng);
  CpuVit::Cache cc;
  GpuVit::Cache gc;
  const CpuVit::Output out = cpu.forward(images, cc);
  const GpuVit::Output out_dev = gpu.forward(cuda::upload(images), gc);
  EXPECT_TRUE(close(out_dev.hidden, out.hidden, 1e-4)) << "hidden";
  EXPECT_TRUE(close(out_dev.cls, out.cls, 1e-4)) << "cls";

  const Tensor<float> d_hidden =
      step.hidden ? mixpeft::testing::random_tensor<float>(mixpeft::shape_of(out.hidden), rng) : empty<float>({0});
  const Tensor<float> d_cls =
      step.cls ? mixpeft::testing::random_tensor<float>(mixpeft::shape_of(out.cls), rng) : empty<float>({0});
  const Tensor<float> d_images = cpu.backward(cc, d_hidden, d_cls, /*images_grad=*/true);
  const DeviceTensor<float> d_images_dev =
      gpu.backward(gc, step.hidden ? cuda::upload(d_hidden) : DeviceTensor<float>{},
                   step.cls ? cuda::upload(d_cls) : DeviceTensor<float>{}, /*images_grad=*/true);
  EXPECT_TRUE(close(d_images_dev, d_images, 1e-4)) << "d_images";
  auto cp = parameters_of<float, Cpu>(cpu);
  auto gp = parameters_of<float, Cuda>(gpu);
  ASSERT_EQ(cp.size(), gp.size());
  std::size_t checked = 0;
  for (std::size_t i = 0; i < cp.size(); ++i) {
    EXPECT_EQ(cp[i].param->trainable, gp[i].param->trainable) << cp[i].name;
    if (!cp[i].param->trainable) continue;
    EXPECT_TRUE(close(gp[i].param->grad, cp[i].param->grad, 1e-4)) << cp[i].name;
    ++checked;
  }
  EXPECT_GE(checked, min_checked);
}

TEST_F(CudaTest, VitBuiltFromOneSeedHoldsTheSameWeights) {
  CpuVit cpu = build<CpuVit>(true, true, 1);
  GpuVit gpu = build<GpuVit>(true, true, 1);
  expect_same_parameters(parameters_of<float, Cpu>(cpu), parameters_of<float, Cuda>(gpu));
}

// MM-Adapters and LoRA on q, v and fc1 (frozen base, dropout on), the taken tokens through post_layernorm.
TEST_F(CudaTest, VitPeftTrainingStepMatchesCpuWithNormedTokens) {
  CpuVit cpu = build<CpuVit>(true, true, 2);
  GpuVit gpu = build<GpuVit>(true, true, 2);
  randomise(cpu, gpu, 3);
  step_and_compare(cpu, gpu, {}, 4, 4 * (2 + 6));  // per block: the adapter's and 3 LoRA pairs at least
}

TEST_F(CudaTest, VitPeftTrainingStepMatchesCpuWithRawTokens) {
  CpuVit cpu = build<CpuVit>(true, false, 5);
  GpuVit gpu = build<GpuVit>(true, false, 5);
  randomise(cpu, gpu, 6);
  step_and_compare(cpu, gpu, {}, 7, 4 * (2 + 6));
}

TEST_F(CudaTest, VitPeftEvalForwardMatchesCpu) {
  CpuVit cpu = build<CpuVit>(true, true, 8);
  GpuVit gpu = build<GpuVit>(true, true, 8);
  randomise(cpu, gpu, 9);
  cpu.set_training(false);
  gpu.set_training(false);
  step_and_compare(cpu, gpu, {}, 10, 4 * (2 + 6));
}

// Every weight trainable: the embeddings' gradients (class, positions, patch, pre-LN) and post_layernorm included.
TEST_F(CudaTest, VitPlainModelGradientsMatchCpu) {
  CpuVit cpu = build<CpuVit>(false, true, 11);
  GpuVit gpu = build<GpuVit>(false, true, 11);
  step_and_compare(cpu, gpu, {}, 12, 5 + 4 * 12 + 2);
}

// d_cls alone: the backward starts at the highest taken block from a zero d_hidden.
TEST_F(CudaTest, VitBackwardFromClsAloneMatchesCpu) {
  CpuVit cpu = build<CpuVit>(false, false, 13);
  GpuVit gpu = build<GpuVit>(false, false, 13);
  step_and_compare(cpu, gpu, {.hidden = false, .cls = true}, 14, 5 + 4 * 12 + 2);
  CpuVit cpu2 = build<CpuVit>(true, true, 15);
  GpuVit gpu2 = build<GpuVit>(true, true, 15);
  randomise(cpu2, gpu2, 16);
  step_and_compare(cpu2, gpu2, {.hidden = true, .cls = false}, 17, 4 * (2 + 6));
}

}  // namespace
}  // namespace mixpeft::cuda_test
