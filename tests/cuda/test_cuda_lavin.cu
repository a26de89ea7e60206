// LaVIN on the CUDA backend against the CPU: Lavin<float, Cuda> built from the seed of a Lavin<float, Cpu> holds
// the same weights; on a batch of image+text and text-only samples one training step agrees on the loss, the
// routing weights of every LLM adapter, d_images and every trainable gradient (LLM and ViT adapters with their
// routers, the neck, the modality embedding), with and without adapters before the FFN; greedy generation picks
// the same tokens. Skips without a CUDA device.
#include <gtest/gtest.h>

#include "mixpeft/cuda/backend.cuh"
#include "mixpeft/models/lavin.hpp"
#include "cuda_test_multimodal_support.cuh"

namespace mixpeft::cuda_test {
namespace {

using CpuModel = Lavin<float, Cpu>;
using GpuModel = Lavin<float, Cuda>;

template <class Model>
Model build(bool before_ffn, std::uint64_t seed) {
  // Fields are set one by one: nvcc can lose the designators of a braced list assigned to a dependent type.
  typename Model::Config c;
  c.llm.vocab = 13, c.llm.dim = 16, c.llm.n_layers = 2, c.llm.n_heads = 2, c.llm.ffn_dim = 24, c.llm.max_seq = 32;
  c.vit.image_size = 4, c.vit.patch = 2, c.vit.channels = 2, c.vit.dim = 12, c.vit.n_layers = 2, c.vit.n_heads = 2;
  c.vit.mlp_dim = 20, c.vit.take_every = 1;
  typename Model::Adapter::Config a;
  a.hidden = 4, a.groups = 2, a.scale = 1.0, a.dropout = 0.1, a.temperature = 3.0;
  c.llm_adapter = a;
  c.vit_adapter = a;
  c.adapter_before_ffn = before_ffn;
  c.neck_hidden = 6;
  Rng rng(seed);
  return Model(c, rng);
}

void randomise(CpuModel& cpu, GpuModel& gpu, std::uint64_t seed) {
  Rng rng(seed);
  for (auto& ref : parameters_of<float, Cpu>(cpu))
    ref.param->value = mixpeft::testing::random_tensor<float>(mixpeft::shape_of(ref.param->value), rng, 0.4);
  mirror_parameters(parameters_of<float, Cpu>(cpu), parameters_of<float, Cuda>(gpu));
}

template <class Model>
std::vector<typename Model::Sample> samples(std::uint64_t seed) {
  Rng rng(seed);
  return mixed_samples<typename Model::Sample>({2, 4, 4}, rng);
}

TEST_F(CudaTest, LavinBuiltFromOneSeedHoldsTheSameWeights) {
  CpuModel cpu = build<CpuModel>(true, 1);
  GpuModel gpu = build<GpuModel>(true, 1);
  expect_same_parameters(parameters_of<float, Cpu>(cpu), parameters_of<float, Cuda>(gpu));
}

TEST_F(CudaTest, LavinTrainingStepMatchesCpu) {
  for (bool before_ffn : {false, true}) {
    CpuModel cpu = build<CpuModel>(before_ffn, 2);
    GpuModel gpu = build<GpuModel>(before_ffn, 2);
    randomise(cpu, gpu, 3);
    expect_same_training_step(cpu, gpu, samples<CpuModel>(4), samples<GpuModel>(4));
    CpuModel::Cache cc;
    GpuModel::Cache gc;
    cpu.forward(cpu.make_batch(samples<CpuModel>(5)), cc);
    gpu.forward(gpu.make_batch(samples<GpuModel>(5)), gc);
    const auto want = cpu.routing_weights(cc);
    const auto got = gpu.routing_weights(gc);
    ASSERT_EQ(got.size(), want.size());
    for (std::size_t l = 0; l < want.size(); ++l) EXPECT_TRUE(close(got[l], want[l])) << "layer " << l;
  }
}

TEST_F(CudaTest, LavinGreedyGenerationMatchesCpu) {
  CpuModel cpu = build<CpuModel>(false, 6);
  GpuModel gpu = build<GpuModel>(false, 6);
  randomise(cpu, gpu, 7);
  EXPECT_EQ(gpu.generate(samples<GpuModel>(8)[0], 6), cpu.generate(samples<CpuModel>(8)[0], 6));
  EXPECT_EQ(gpu.generate(samples<GpuModel>(8)[1], 6), cpu.generate(samples<CpuModel>(8)[1], 6));
}

}  // namespace
}  // namespace mixpeft::cuda_test
