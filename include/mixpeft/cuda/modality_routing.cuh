// mixpeft/cuda/modality_routing.cuh — models/modality_routing.hpp on the device: the routing token of an MM-Adapter.
//   first_token:          t = x[:, 0, :]            one strided device copy (cudaMemcpy2DAsync)
//   add_to_first_token:   dx[:, 0, :] += dt         one element-wise kernel over the B x D entries
// Shapes: x, dx [B, T, D]; t, dt [B, D].
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "mixpeft/core/error.hpp"
#include "mixpeft/cuda/device_tensor.cuh"
#include "mixpeft/cuda/error.cuh"
#include "mixpeft/cuda/kernel_utils.cuh"
#include "mixpeft/cuda/memory.cuh"

namespace mixpeft::cuda {
namespace detail {

template <class T>
__global__ void add_to_first_token_kernel(T* __restrict__ dx, const T* __restrict__ dt, std::size_t batch,
                                          std::size_t tokens, std::size_t width) {
  for (std::size_t e = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; e < batch * width;
       e += std::size_t(gridDim.x) * blockDim.x) {
    const std::size_t b = e / width, j = e % width;
    T& d = dx[b * tokens * width + j];
    d = narrow<T>(widen(d) + widen(dt[e]));
  }
}

}  // namespace detail

template <class T>
DeviceTensor<T> first_token(const DeviceTensor<T>& x) {
  expect_shape("first_token", "x", x, {any_extent, any_extent, any_extent});
  const std::size_t b = x.shape()[0], t = x.shape()[1], d = x.shape()[2];
  require<ShapeError>(t > 0, "first_token: x has shape ", shape_string(x.shape()), " (no tokens)");
  DeviceTensor<T> out(Shape{b, d});
  if (out.size() > 0)
    MIXPEFT_CUDA_CHECK(cudaMemcpy2DAsync(out.data(), d * sizeof(T), x.data(), t * d * sizeof(T), d * sizeof(T), b,
                                         cudaMemcpyDeviceToDevice, current_stream()));
  return out;
}

template <class T>
void add_to_first_token(DeviceTensor<T>& dx, const DeviceTensor<T>& d_first) {
  expect_shape("add_to_first_token", "dx", dx, {any_extent, any_extent, any_extent});
  expect_shape("add_to_first_token", "d_first", d_first, {dx.shape()[0], dx.shape()[2]});
  if (d_first.size() == 0) return;
  constexpr unsigned block = 256;
  detail::add_to_first_token_kernel<<<grid_size(d_first.size(), block), block, 0, current_stream()>>>(
      dx.data(), d_first.data(), dx.shape()[0], dx.shape()[1], dx.shape()[2]);
  check_launch("add_to_first_token");
}

}  // namespace mixpeft::cuda
