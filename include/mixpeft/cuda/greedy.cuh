// mixpeft/cuda/greedy.cuh — ops/greedy.hpp on the device: argmax_last_token copies the last position's V logits
// to the host (one small copy, which synchronises the current stream) and picks the token there, exactly as the
// CPU op does (the first of equal maxima).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "mixpeft/core/error.hpp"
#include "mixpeft/cuda/device_tensor.cuh"
#include "mixpeft/cuda/error.cuh"
#include "mixpeft/cuda/kernel_utils.cuh"
#include "mixpeft/cuda/memory.cuh"
#include "mixpeft/ops/greedy.hpp"

namespace mixpeft::cuda {

template <class T>
std::int64_t argmax_last_token(const DeviceTensor<T>& logits) {
  expect_shape("argmax_last_token", "logits", logits, {1, any_extent, any_extent});
  const std::size_t t = logits.shape()[1], vocab = logits.shape()[2];
  require<ShapeError>(t > 0 && vocab > 0, "argmax_last_token: logits has shape ", shape_string(logits.shape()));
  std::vector<T> row(vocab);
  MIXPEFT_CUDA_CHECK(cudaMemcpyAsync(row.data(), logits.data() + (t - 1) * vocab, vocab * sizeof(T),
                                     cudaMemcpyDeviceToHost, current_stream()));
  synchronize();
  std::vector<acc_t<T>> wide(vocab);
  for (std::size_t v = 0; v < vocab; ++v) wide[v] = widen(row[v]);
  return mixpeft::argmax_row(wide.data(), vocab);
}

}  // namespace mixpeft::cuda
