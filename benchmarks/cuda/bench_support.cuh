// benchmarks/cuda/bench_support.cuh — what the GPU benchmarks share: device data without a host round trip and
// a CUDA-event timer on the current stream.
//   random_device<T>(shape, seed, scale)   scale * uniform[-1, 1) per element from the dropout counter hash
//   EventTimer                             start() / stop() -> seconds between two events on the current stream
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "mixpeft/cuda/device_tensor.cuh"
#include "mixpeft/cuda/dropout.cuh"
#include "mixpeft/cuda/error.cuh"
#include "mixpeft/cuda/kernel_utils.cuh"

namespace mixpeft::cuda_bench {

template <class T>
__global__ void fill_kernel(T* data, std::size_t n, std::uint64_t seed, float scale) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
       i += std::size_t(gridDim.x) * blockDim.x)
    data[i] = cuda::narrow<T>(scale * (float(mixpeft::detail::dropout_bits(seed, i) >> 8) * 0x1.0p-23f - 1.0f));
}

template <class T>
cuda::DeviceTensor<T> random_device(const Shape& shape, std::uint64_t seed, float scale = 1.0f) {
  cuda::DeviceTensor<T> t(shape);
  if (t.size() == 0) return t;
  fill_kernel<<<cuda::grid_size(t.size(), 256), 256, 0, cuda::current_stream()>>>(t.data(), t.size(), seed, scale);
  cuda::check_launch("fill");
  return t;
}

class EventTimer {
 public:
  EventTimer() {
    MIXPEFT_CUDA_CHECK(cudaEventCreate(&start_));
    MIXPEFT_CUDA_CHECK(cudaEventCreate(&stop_));
  }
  ~EventTimer() {
    (void)cudaEventDestroy(start_);
    (void)cudaEventDestroy(stop_);
  }
  EventTimer(const EventTimer&) = delete;
  EventTimer& operator=(const EventTimer&) = delete;

  void start() { MIXPEFT_CUDA_CHECK(cudaEventRecord(start_, cuda::current_stream())); }
  // Seconds since start(), after the work enqueued in between has finished.
  double stop() {
    MIXPEFT_CUDA_CHECK(cudaEventRecord(stop_, cuda::current_stream()));
    MIXPEFT_CUDA_CHECK(cudaEventSynchronize(stop_));
    float ms = 0;
    MIXPEFT_CUDA_CHECK(cudaEventElapsedTime(&ms, start_, stop_));
    return double(ms) * 1e-3;
  }

 private:
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

}  // namespace mixpeft::cuda_bench
