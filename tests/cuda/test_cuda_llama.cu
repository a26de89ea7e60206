// The LLaMA decoder on the CUDA backend against the same model on the CPU: Llama<float, Cuda> built from the
// seed of a Llama<float, Cpu> holds the same weights; with every PEFT module on (LoRA on q and v with dropout, a
// MoLE FFN of three experts with its balance loss, MM-Adapters before attention and the FFN) both backends agree
// on the logits, the routing, the balance loss and every trainable gradient of a training step (causal mask with
// padding and LaVIN's blocked first key), and greedy generation with the KV cache picks the same tokens. Every
// test skips when no CUDA device is present.
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "mixpeft/cuda/backend.cuh"
#include "mixpeft/layers/balance_loss.hpp"
#include "mixpeft/models/llama.hpp"
#include "cuda_test_support.cuh"

namespace mixpeft::cuda_test {
namespace {

using CpuModel = Llama<float, Cpu>;
using GpuModel = Llama<float, Cuda>;

template <class Model>
Model build(bool peft_on, std::uint64_t seed) {
  // Fields are set one by one: nvcc can lose the designators of a braced list assigned to a dependent type.
  typename Model::Config config;
  config.vocab = 50, config.dim = 32, config.n_layers = 2, config.n_heads = 4, config.ffn_dim = 48;
  config.max_seq = 40;
  typename Model::Peft peft;
  if (peft_on) {
    peft.lora_targets = LoRATargets{.q = true, .v = true};
    peft.lora.rank = 4, peft.lora.alpha = 8.0, peft.lora.dropout = 0.1;
    peft.ffn = LoRAExpertsConfig{.experts = 3, .rank = 2, .alpha = 4.0, .dropout = 0.05};
    typename Model::Adapter::Config a;
    a.hidden = 4, a.groups = 2, a.dropout = 0.1;
    peft.mm_adapter = a;
    peft.mm_adapter_ffn = true;
  }
  Rng rng(seed);
  return Model(config, peft, rng);
}

// Random values for every parameter of the CPU model (fresh PEFT modules add nothing, which would hide their
// paths), sharper MoLE routers (so float rounding cannot flip a token's expert), copied to the GPU model.
void randomise(CpuModel& cpu, GpuModel& gpu, std::uint64_t seed) {
  Rng rng(seed);
  for (auto& ref : parameters_of<float, Cpu>(cpu)) {
    const bool router = ref.name.find("mlp.router.weight") != std::string::npos;
    if (ref.name.find("lora_B") != std::string::npos || ref.name.find("adapter") != std::string::npos || router)
      ref.param->value =
          mixpeft::testing::random_tensor<float>(mixpeft::shape_of(ref.param->value), rng, router ? 2.0 : 0.2);
  }
  mirror_parameters(parameters_of<float, Cpu>(cpu), parameters_of<float, Cuda>(gpu));
}

Tensor<std::int64_t> random_ids(std::size_t batch, std::size_t tokens, Rng& rng) {
  Tensor<std::int64_t> ids = empty<std::int64_t>({batch, tokens});
  for (auto& v : ids) v = std::int64_t(rng.uniform(0.0, 50.0)) % 50;
  return ids;
}

TEST_F(CudaTest, LlamaBuiltFromOneSeedHoldsTheSameWeights) {
  CpuModel cpu = build<CpuModel>(true, 1);
  GpuModel gpu = build<GpuModel>(true, 1);
  expect_same_parameters(parameters_of<float, Cpu>(cpu), parameters_of<float, Cuda>(gpu));
}

TEST_F(CudaTest, LlamaTrainingStepMatchesCpuWithEveryPeftModule) {
  CpuModel cpu = build<CpuModel>(true, 2);
  GpuModel gpu = build<GpuModel>(true, 2);
  randomise(cpu, gpu, 3);
  Rng rng(4);
  const Tensor<std::int64_t> ids = random_ids(3, 11, rng);
  const AttentionMask mask{.causal = true, .block_first_key = true, .key_lengths = {11, 7, 9}};
  CpuModel::Cache cc;
  GpuModel::Cache gc;
  const Tensor<float> logits = cpu.forward_ids(ids, mask, cc);
  const DeviceTensor<float> logits_dev = gpu.forward_ids(ids, mask, gc);
  EXPECT_TRUE(close(logits_dev, logits, 1e-4)) << "logits";

  // The MoLE balance loss of every layer, and its router gradients.
  const BalanceLoss<float, Cpu> cpu_loss({});
  const BalanceLoss<float, Cuda> gpu_loss({});
  const auto cr = cpu.routing(cc);
  const auto gr = gpu.routing(gc);
  ASSERT_EQ(cr.size(), 2u);
  for (std::size_t l = 0; l < cr.size(); ++l)
    EXPECT_TRUE(same_ids(gr[l]->experts, cr[l]->experts)) << "layer " << l;
  BalanceTokens<float, Cpu> ct;
  BalanceTokens<float, Cuda> gt;
  EXPECT_NEAR(gpu_loss.forward(gr, gt), cpu_loss.forward(cr, ct), 1e-5);
  std::vector<RouterGrad<float, Cpu>> cg(2);
  std::vector<RouterGrad<float, Cuda>> gg(2);
  std::vector<RouterGrad<float, Cpu>*> cgp{&cg[0], &cg[1]};
  std::vector<RouterGrad<float, Cuda>*> ggp{&gg[0], &gg[1]};
  cpu_loss.backward(cr, ct, cgp);
  gpu_loss.backward(gr, gt, ggp);

  const Tensor<float> d_logits = mixpeft::testing::random_tensor<float>(mixpeft::shape_of(logits), rng);
  cpu.backward_ids(cc, d_logits, cg);
  gpu.backward_ids(gc, cuda::upload(d_logits), gg);
  auto cp = parameters_of<float, Cpu>(cpu);
  auto gp = parameters_of<float, Cuda>(gpu);
  std::size_t checked = 0;
  for (std::size_t i = 0; i < cp.size(); ++i) {
    if (!cp[i].param->trainable) continue;
    EXPECT_TRUE(close(gp[i].param->grad, cp[i].param->grad, 1e-4)) << cp[i].name;
    ++checked;
  }
  EXPECT_GT(checked, 20u);
}

TEST_F(CudaTest, LlamaPlainModelGradientsMatchCpu) {
  CpuModel cpu = build<CpuModel>(false, 5);
  GpuModel gpu = build<GpuModel>(false, 5);
  Rng rng(6);
  const Tensor<std::int64_t> ids = random_ids(2, 9, rng);
  CpuModel::Cache cc;
  GpuModel::Cache gc;
  const Tensor<float> logits = cpu.forward_ids(ids, AttentionMask{}, cc);
  EXPECT_TRUE(close(gpu.forward_ids(ids, AttentionMask{}, gc), logits, 1e-4));
  const Tensor<float> d_logits = mixpeft::testing::random_tensor<float>(mixpeft::shape_of(logits), rng);
  cpu.backward_ids(cc, d_logits);
  gpu.backward_ids(gc, cuda::upload(d_logits));
  auto cp = parameters_of<float, Cpu>(cpu);
  auto gp = parameters_of<float, Cuda>(gpu);
  for (std::size_t i = 0; i < cp.size(); ++i)
    EXPECT_TRUE(close(gp[i].param->grad, cp[i].param->grad, 1e-4)) << cp[i].name;  // the token table included
}

TEST_F(CudaTest, LlamaGreedyGenerationWithKvCacheMatchesCpu) {
  CpuModel cpu = build<CpuModel>(true, 7);
  GpuModel gpu = build<GpuModel>(true, 7);
  randomise(cpu, gpu, 8);
  const std::vector<std::int64_t> prompt = {3, 14, 15, 9, 26};
  const auto want = cpu.generate(prompt, 12);
  const auto got = gpu.generate(prompt, 12);
  EXPECT_EQ(got, want);
  EXPECT_TRUE(gpu.training());  // the mode comes back
}

}  // namespace
}  // namespace mixpeft::cuda_test
