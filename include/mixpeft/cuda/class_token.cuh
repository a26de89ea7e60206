// mixpeft/cuda/class_token.cuh — ops/class_token.hpp on the device: the ViT's [cls] token and positions.
//   forward:   emb[b, 0, :] = cls + pos[0, :],  emb[b, 1 + m, :] = e[b, m, :] + pos[1 + m, :]
//              one grid-stride kernel over the B (M + 1) D outputs
//   backward:  d_cls += sum_b d_emb[b, 0, :],  d_pos += sum_b d_emb[b]     (accumulated, each skipped when null)
//              deterministic column sums (reduce.cuh's column_sum_accumulate over the B rows of d_emb seen as
//              [B, (M + 1) D], resp. its first D columns)
//              d_e = d_emb[:, 1:, :]                                         one strided copy (written; skipped
//                                                                            when null)
// Shapes and errors as on the CPU: cls [D], e [B, M, D], pos [M + 1, D], emb [B, M + 1, D].
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "mixpeft/core/error.hpp"
#include "mixpeft/cuda/device_tensor.cuh"
#include "mixpeft/cuda/error.cuh"
#include "mixpeft/cuda/kernel_utils.cuh"
#include "mixpeft/cuda/memory.cuh"
#include "mixpeft/cuda/reduce.cuh"
#include "mixpeft/ops/class_token.hpp"

namespace mixpeft::cuda {
namespace detail {

template <class T>
__global__ void class_token_forward_kernel(const T* __restrict__ cls, const T* __restrict__ e,
                                           const T* __restrict__ pos, T* __restrict__ emb, std::size_t batch,
                                           std::size_t tokens, std::size_t width) {
  const std::size_t per = tokens * width;  // one image's outputs
  for (std::size_t o = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; o < batch * per;
       o += std::size_t(gridDim.x) * blockDim.x) {
    const std::size_t b = o / per, k = o % per;  // k = n D + j
    const acc_t<T> v = k < width ? widen(cls[k]) : widen(e[b * (per - width) + (k - width)]);
    emb[o] = narrow<T>(v + widen(pos[k]));
  }
}

// term(r, c) = d_emb[r * stride + c]: row r (an image) of d_emb seen as [B, stride].
template <class T>
struct BatchRowTerm {
  const T* d;
  std::size_t stride;
  __device__ acc_t<T> operator()(std::size_t r, std::size_t c) const { return widen(d[r * stride + c]); }
};

}  // namespace detail

// emb [B, M + 1, D] = [cls; e] + pos.
template <class T>
void class_token_forward(const DeviceTensor<T>& cls, const DeviceTensor<T>& e, const DeviceTensor<T>& pos,
                         DeviceTensor<T>& emb) {
  mixpeft::detail::check_class_token_forward("class_token_forward", cls, e, pos);
  const std::size_t b = e.shape()[0], n = e.shape()[1] + 1, d = e.shape()[2];
  resize_to(emb, Shape{b, n, d});
  if (emb.size() == 0) return;
  constexpr unsigned block = 256;
  detail::class_token_forward_kernel<<<grid_size(emb.size(), block), block, 0, current_stream()>>>(
      cls.data(), e.data(), pos.data(), emb.data(), b, n, d);
  check_launch("class_token_forward");
}

// The gradients of class_token_forward from d_emb [B, M + 1, D] (any of them may be null).
template <class T>
void class_token_backward(const DeviceTensor<T>& d_emb, DeviceTensor<T>* d_cls, DeviceTensor<T>* d_pos,
                          DeviceTensor<T>* d_e) {
  constexpr const char* op = "class_token_backward";
  mixpeft::detail::check_class_token_backward(op, d_emb, d_cls, d_pos);
  const std::size_t b = d_emb.shape()[0], n = d_emb.shape()[1], d = d_emb.shape()[2];
  const detail::BatchRowTerm<T> term{d_emb.data(), n * d};
  if (d_pos) column_sum_accumulate(op, b, n * d, term, d_pos->data());
  if (d_cls) column_sum_accumulate(op, b, d, term, d_cls->data());
  if (d_e) {
    resize_to(*d_e, Shape{b, n - 1, d});
    if (d_e->size() > 0)
      MIXPEFT_CUDA_CHECK(cudaMemcpy2DAsync(d_e->data(), (n - 1) * d * sizeof(T), d_emb.data() + d, n * d * sizeof(T),
                                           (n - 1) * d * sizeof(T), b, cudaMemcpyDeviceToDevice, current_stream()));
  }
}

}  // namespace mixpeft::cuda
