// LLaVA-MoLE on the CUDA backend against the CPU: LlavaMole<float, Cuda> built from the seed of a
// LlavaMole<float, Cpu> holds the same weights; on a batch of image+text and text-only samples from two domains
// one training step agrees on the loss (cross-entropy plus the MoLE balance loss), this step's expert counts,
// the router statistics per domain, d_images and every trainable gradient (attention LoRA, the stacked expert
// factors, the routers, the projector); the Trainer takes the same steps on both; greedy generation picks the
// same tokens. Skips without a CUDA device.
#include <gtest/gtest.h>

#include "mixpeft/cuda/backend.cuh"
#include "mixpeft/models/llava_mole.hpp"
#include "mixpeft/train/trainer.hpp"
#include "cuda_test_multimodal_support.cuh"

namespace mixpeft::cuda_test {
namespace {

using CpuModel = LlavaMole<float, Cpu>;
using GpuModel = LlavaMole<float, Cuda>;

template <class Model>
Model build(std::uint64_t seed) {
  // Fields are set one by one: nvcc can lose the designators of a braced list assigned to a dependent type.
  typename Model::Config c;
  c.llm.vocab = 13, c.llm.dim = 16, c.llm.n_layers = 2, c.llm.n_heads = 2, c.llm.ffn_dim = 24, c.llm.max_seq = 32;
  c.vit.image_size = 4, c.vit.patch = 2, c.vit.channels = 2, c.vit.dim = 12, c.vit.n_layers = 3, c.vit.n_heads = 2;
  c.vit.mlp_dim = 20;
  c.lora.rank = 2, c.lora.alpha = 4.0, c.lora.dropout = 0.1;
  c.experts.experts = 3, c.experts.rank = 2, c.experts.alpha = 4.0, c.experts.dropout = 0.05;
  c.balance.kind = BalanceKind::MoLE, c.balance.weight = 0.5;
  c.domains = 2;
  Rng rng(seed);
  return Model(c, rng);
}

// Random values everywhere (fresh LoRA factors are zero), sharper routers, mirrored to the device model.
void randomise(CpuModel& cpu, GpuModel& gpu, std::uint64_t seed) {
  Rng rng(seed);
  for (auto& ref : parameters_of<float, Cpu>(cpu)) {
    const bool router = ref.name.find(".mlp.router.") != std::string::npos;
    ref.param->value = mixpeft::testing::random_tensor<float>(mixpeft::shape_of(ref.param->value), rng, router ? 2.0 : 0.4);
  }
  mirror_parameters(parameters_of<float, Cpu>(cpu), parameters_of<float, Cuda>(gpu));
}

template <class Model>
std::vector<typename Model::Sample> samples(std::uint64_t seed) {
  Rng rng(seed);
  auto s = mixed_samples<typename Model::Sample>({2, 4, 4}, rng);
  s[1].domain = 1;
  return s;
}

TEST_F(CudaTest, LlavaMoleBuiltFromOneSeedHoldsTheSameWeights) {
  CpuModel cpu = build<CpuModel>(1);
  GpuModel gpu = build<GpuModel>(1);
  expect_same_parameters(parameters_of<float, Cpu>(cpu), parameters_of<float, Cuda>(gpu));
}

TEST_F(CudaTest, LlavaMoleTrainingStepMatchesCpu) {
  CpuModel cpu = build<CpuModel>(2);
  GpuModel gpu = build<GpuModel>(2);
  randomise(cpu, gpu, 3);
  const auto [want, got] = expect_same_training_step(cpu, gpu, samples<CpuModel>(4), samples<GpuModel>(4));
  EXPECT_NEAR(got.ce, want.ce, 1e-4 * (1 + want.ce));
  EXPECT_NEAR(got.balance, want.balance, 1e-5);
  EXPECT_EQ(got.expert_counts, want.expert_counts);
  const auto* cs = cpu.router_stats();
  const auto* gs = gpu.router_stats();
  ASSERT_TRUE(cs && gs);
  for (std::size_t l = 0; l < 2; ++l)
    for (std::size_t d = 0; d < 2; ++d) EXPECT_EQ(gs->usage(l, d), cs->usage(l, d)) << l << " " << d;
}

// Trainer<float, Cuda> (cuda::AdamW, the device gradient norm and clipping, two micro-batches) against the
// Trainer<float, Cpu> over three steps: the same losses, gradient norms and parameters.
TEST_F(CudaTest, LlavaMoleTrainerStepsMatchCpu) {
  CpuModel cpu = build<CpuModel>(8);
  GpuModel gpu = build<GpuModel>(8);
  randomise(cpu, gpu, 9);
  TrainerConfig config;
  config.adamw.lr = 1e-2;
  config.clip_norm = 0.5;
  Trainer<float, Cpu> cpu_trainer(parameters_of<float, Cpu>(cpu), config);
  Trainer<float, Cuda> gpu_trainer(parameters_of<float, Cuda>(gpu), config);
  for (std::uint64_t t = 0; t < 3; ++t) {
    const std::vector<CpuModel::Batch> cb{cpu.make_batch(samples<CpuModel>(10 + t)),
                                          cpu.make_batch(samples<CpuModel>(20 + t))};
    std::vector<GpuModel::Batch> gb;
    gb.push_back(gpu.make_batch(samples<GpuModel>(10 + t)));
    gb.push_back(gpu.make_batch(samples<GpuModel>(20 + t)));
    const TrainStep want = cpu_trainer.step<CpuModel::Batch>(cpu, std::span<const CpuModel::Batch>(cb));
    const TrainStep got = gpu_trainer.step<GpuModel::Batch>(gpu, std::span<const GpuModel::Batch>(gb));
    EXPECT_NEAR(got.loss, want.loss, 1e-4 * (1 + want.loss)) << "step " << t;
    EXPECT_NEAR(got.grad_norm, want.grad_norm, 1e-4 * want.grad_norm) << "step " << t;
    EXPECT_EQ(got.tokens, want.tokens);
  }
  auto cp = parameters_of<float, Cpu>(cpu);
  auto gp = parameters_of<float, Cuda>(gpu);
  for (std::size_t i = 0; i < cp.size(); ++i)
    if (cp[i].param->trainable) EXPECT_TRUE(close(gp[i].param->value, cp[i].param->value, 1e-4)) << cp[i].name;
}

TEST_F(CudaTest, LlavaMoleGreedyGenerationMatchesCpu) {
  CpuModel cpu = build<CpuModel>(5);
  GpuModel gpu = build<GpuModel>(5);
  randomise(cpu, gpu, 6);
  EXPECT_EQ(gpu.generate(samples<GpuModel>(7)[0], 6), cpu.generate(samples<CpuModel>(7)[0], 6));
  EXPECT_EQ(gpu.generate(samples<GpuModel>(7)[1], 6), cpu.generate(samples<CpuModel>(7)[1], 6));
}

}  // namespace
}  // namespace mixpeft::cuda_test
