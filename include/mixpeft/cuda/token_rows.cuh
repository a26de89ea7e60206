// mixpeft/cuda/token_rows.cuh — ops/token_rows.hpp on the device: one token row between sequences of tokens.
//   copy_token_row(src, token, dst, slot):   dst[:, slot, :]   = src[:, token, :]   one strided copy
//                                                                                   (cudaMemcpy2DAsync)
//   add_token_row(src, slot, dst, token):    dst[:, token, :] += src[:, slot, :]    one element-wise kernel over
//                                                                                   the B x D entries
//   copy_token_block / zero_token_block: one contiguous device copy / memset (a sequence's rows are contiguous)
// Shapes and errors as on the CPU: src, dst [B, *, D]; dst keeps its shape.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <string_view>

#include "mixpeft/core/error.hpp"
#include "mixpeft/cuda/device_tensor.cuh"
#include "mixpeft/cuda/error.cuh"
#include "mixpeft/cuda/kernel_utils.cuh"
#include "mixpeft/cuda/memory.cuh"
#include "mixpeft/ops/token_rows.hpp"

namespace mixpeft::cuda {
namespace detail {

template <class T>
__global__ void add_token_row_kernel(const T* __restrict__ src, std::size_t src_stride, T* __restrict__ dst,
                                     std::size_t dst_stride, std::size_t batch, std::size_t width) {
  for (std::size_t e = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; e < batch * width;
       e += std::size_t(gridDim.x) * blockDim.x) {
    const std::size_t b = e / width, j = e % width;
    T& d = dst[b * dst_stride + j];
    d = narrow<T>(widen(d) + widen(src[b * src_stride + j]));
  }
}

}  // namespace detail

// dst[:, slot, :] = src[:, token, :].
template <class T>
void copy_token_row(const DeviceTensor<T>& src, std::size_t token, DeviceTensor<T>& dst, std::size_t slot) {
  mixpeft::detail::check_token_rows("copy_token_row", src, token, dst, slot);
  const std::size_t b = dst.shape()[0], ns = src.shape()[1], nd = dst.shape()[1], d = dst.shape()[2];
  if (b == 0 || d == 0) return;
  MIXPEFT_CUDA_CHECK(cudaMemcpy2DAsync(dst.data() + slot * d, nd * d * sizeof(T), src.data() + token * d,
                                       ns * d * sizeof(T), d * sizeof(T), b, cudaMemcpyDeviceToDevice,
                                       current_stream()));
}

// dst[:, token, :] += src[:, slot, :].
template <class T>
void add_token_row(const DeviceTensor<T>& src, std::size_t slot, DeviceTensor<T>& dst, std::size_t token) {
  mixpeft::detail::check_token_rows("add_token_row", src, slot, dst, token);
  const std::size_t b = dst.shape()[0], ns = src.shape()[1], nd = dst.shape()[1], d = dst.shape()[2];
  if (b == 0 || d == 0) return;
  constexpr unsigned block = 256;
  detail::add_token_row_kernel<<<grid_size(b * d, block), block, 0, current_stream()>>>(
      src.data() + slot * d, ns * d, dst.data() + token * d, nd * d, b, d);
  check_launch("add_token_row");
}

// dst[dst_seq, dst_start + i, :] = src[src_seq, src_start + i, :] for i < n.
template <class T>
void copy_token_block(const DeviceTensor<T>& src, std::size_t src_seq, std::size_t src_start, DeviceTensor<T>& dst,
                      std::size_t dst_seq, std::size_t dst_start, std::size_t n) {
  constexpr std::string_view op = "copy_token_block";
  mixpeft::detail::check_token_block(op, "src", src, src_seq, src_start, n);
  mixpeft::detail::check_token_block(op, "dst", dst, dst_seq, dst_start, n);
  require<ShapeError>(src.shape()[2] == dst.shape()[2], op, ": src has shape ", shape_string(src.shape()),
                      " but dst has shape ", shape_string(dst.shape()));
  const std::size_t d = dst.shape()[2];
  if (n * d == 0) return;
  MIXPEFT_CUDA_CHECK(cudaMemcpyAsync(dst.data() + (dst_seq * dst.shape()[1] + dst_start) * d,
                                     src.data() + (src_seq * src.shape()[1] + src_start) * d, n * d * sizeof(T),
                                     cudaMemcpyDeviceToDevice, current_stream()));
}

// dst[seq, start + i, :] = 0 for i < n.
template <class T>
void zero_token_block(DeviceTensor<T>& dst, std::size_t seq, std::size_t start, std::size_t n) {
  mixpeft::detail::check_token_block("zero_token_block", "dst", dst, seq, start, n);
  const std::size_t d = dst.shape()[2];
  if (n * d == 0) return;
  MIXPEFT_CUDA_CHECK(cudaMemsetAsync(dst.data() + (seq * dst.shape()[1] + start) * d, 0, n * d * sizeof(T),
                                     current_stream()));
}

}  // namespace mixpeft::cuda
