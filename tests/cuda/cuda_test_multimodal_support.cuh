// Shared by the CUDA tests of the two multimodal models: samples with host images, and one training step on a
// CPU model and its device twin compared gradient by gradient.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "mixpeft/cuda/backend.cuh"
#include "cuda_test_support.cuh"

namespace mixpeft::cuda_test {

// The samples of a tiny multimodal batch: two with an image of shape image_shape, one text-only.
template <class Sample>
std::vector<Sample> mixed_samples(const Shape& image_shape, Rng& rng) {
  const auto image = [&] { return mixpeft::testing::random_tensor<float>(image_shape, rng); };
  std::vector<Sample> s(3);
  s[0].prefix = {3}, s[0].prompt = {5, 6}, s[0].answer = {7}, s[0].image = image();
  s[1].prefix = {9}, s[1].prompt = {10, 11}, s[1].answer = {2, 4};
  s[2].prefix = {}, s[2].prompt = {4, 8}, s[2].answer = {6, 1}, s[2].image = image();
  return s;
}

// One loss_and_backward with d_images on both models; the loss, d_images and every trainable gradient agree.
// Returns the two reports (CPU, GPU) for model-specific checks.
template <class CpuModel, class GpuModel>
auto expect_same_training_step(CpuModel& cpu, GpuModel& gpu, const std::vector<typename CpuModel::Sample>& cpu_samples,
                               const std::vector<typename GpuModel::Sample>& gpu_samples) {
  Tensor<float> d_images;
  DeviceTensor<float> d_images_dev;
  const auto want = cpu.loss_and_backward(cpu.make_batch(cpu_samples), &d_images);
  const auto got = gpu.loss_and_backward(gpu.make_batch(gpu_samples), &d_images_dev);
  EXPECT_NEAR(got.loss, want.loss, 1e-4 * (1 + std::abs(want.loss)));
  EXPECT_EQ(got.tokens, want.tokens);
  EXPECT_EQ(got.targets, want.targets);
  EXPECT_TRUE(close(d_images_dev, d_images, 1e-4)) << "d_images";
  auto cp = parameters_of<float, Cpu>(cpu);
  auto gp = parameters_of<float, Cuda>(gpu);
  EXPECT_EQ(cp.size(), gp.size());
  std::size_t checked = 0;
  for (std::size_t i = 0; i < cp.size() && i < gp.size(); ++i) {
    if (!cp[i].param->trainable) continue;
    EXPECT_TRUE(close(gp[i].param->grad, cp[i].param->grad, 1e-4)) << cp[i].name;
    ++checked;
  }
  EXPECT_GT(checked, 0u);
  return std::pair{want, got};
}

}  // namespace mixpeft::cuda_test
