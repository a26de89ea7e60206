// mixpeft/cuda/embedding.cuh — embedding lookup on the device (ops/embedding.hpp).
//
//   forward:   y[k, :] = table[ids[k], :]                  for every index k of ids
//   backward:  dtable[ids[k], :] += dy[k, :]               (accumulated, repeated ids add up;
//                                                         skipped when dtable is null: frozen table)
// The ids stay a host Tensor<int64_t> (they come from the data loader): they are range-checked on the host
// exactly as on the CPU (IndexError naming the id, where it sits, and V) and uploaded with the call.
// Backward is deterministic and atomic-free: the host sorts the token indices by id (a stable sort of the
// ids, which it holds anyway), and one block column per distinct id sums that id's dy rows in token order and
// adds the sum to its table row once.
// Shapes: ids [...] (any shape, e.g. [B, T]); table, dtable [V, D]; y, dy [..., D] (ids' shape + [D]).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <string_view>
#include <type_traits>
#include <vector>

#include "mixpeft/core/error.hpp"
#include "mixpeft/core/tensor.hpp"
#include "mixpeft/cuda/device_tensor.cuh"
#include "mixpeft/cuda/error.cuh"
#include "mixpeft/cuda/kernel_utils.cuh"
#include "mixpeft/ops/embedding.hpp"

namespace mixpeft::cuda {
namespace detail {

template <class T>
__global__ void embedding_gather_kernel(const std::int64_t* __restrict__ ids, const T* __restrict__ table,
                                        std::size_t d, T* __restrict__ y) {
  const std::size_t k = blockIdx.x;
  const T* src = table + std::size_t(ids[k]) * d;
  T* dst = y + k * d;
  for (std::size_t c = threadIdx.x; c < d; c += blockDim.x) dst[c] = src[c];
}

// Block (u, column tile): adds the dy rows of distinct id u (tokens order[offsets[u] .. offsets[u+1])) to its row.
template <class T>
__global__ void embedding_scatter_kernel(const std::int64_t* __restrict__ plan, std::size_t unique,
                                         const T* __restrict__ dy, std::size_t d, T* __restrict__ dtable) {
  using A = acc_t<T>;
  const std::int64_t* ids = plan;                  // [U] distinct ids, ascending
  const std::int64_t* offsets = plan + unique;     // [U + 1]
  const std::int64_t* order = offsets + unique + 1;  // [N] token indices grouped by id
  const std::size_t u = blockIdx.x, c = blockIdx.y * std::size_t(blockDim.x) + threadIdx.x;
  if (c >= d) return;
  A s = 0;
  for (std::int64_t j = offsets[u]; j < offsets[u + 1]; ++j) s += widen(dy[std::size_t(order[j]) * d + c]);
  T& dst = dtable[std::size_t(ids[u]) * d + c];
  dst = narrow<T>(widen(dst) + s);
}

// [distinct ids (U), offsets (U + 1), token order (N)] for the scatter kernel; returns U.
inline std::size_t embedding_scatter_plan(const Tensor<std::int64_t>& ids, std::vector<std::int64_t>& plan) {
  const std::size_t n = ids.size();
  std::vector<std::int64_t> order(n);
  std::iota(order.begin(), order.end(), std::int64_t(0));
  std::stable_sort(order.begin(), order.end(),
                   [&](std::int64_t a, std::int64_t b) { return ids.data()[a] < ids.data()[b]; });
  std::vector<std::int64_t> unique, offsets;
  for (std::size_t j = 0; j < n; ++j) {
    const std::int64_t id = ids.data()[order[j]];
    if (unique.empty() || unique.back() != id) {
      unique.push_back(id);
      offsets.push_back(std::int64_t(j));
    }
  }
  offsets.push_back(std::int64_t(n));
  plan.clear();
  plan.insert(plan.end(), unique.begin(), unique.end());
  plan.insert(plan.end(), offsets.begin(), offsets.end());
  plan.insert(plan.end(), order.begin(), order.end());
  return unique.size();
}

}  // namespace detail

template <class T>
void embedding_forward(const Tensor<std::int64_t>& ids, const DeviceTensor<T>& table, DeviceTensor<T>& y) {
  constexpr std::string_view op = "embedding_forward";
  expect_shape(op, "table", table, {any_extent, any_extent});
  const std::size_t vocab = table.shape()[0], d = table.shape()[1];
  mixpeft::detail::check_embedding_ids(op, ids, vocab);
  resize_to(y, mixpeft::detail::embedding_output_shape(ids, d));
  if (ids.size() == 0 || d == 0) return;
  const DeviceTensor<std::int64_t> device_ids = upload(std::span<const std::int64_t>(ids.data(), ids.size()));
  detail::embedding_gather_kernel<<<unsigned(ids.size()), row_block_size(d), 0, current_stream()>>>(
      device_ids.data(), table.data(), d, y.data());
  check_launch("embedding_forward");
}

template <class T>
void embedding_backward(const Tensor<std::int64_t>& ids, const DeviceTensor<T>& dy,
                        std::type_identity_t<DeviceTensor<T>>* dtable) {
  constexpr std::string_view op = "embedding_backward";
  if (!dtable) return;
  expect_shape(op, "dtable", *dtable, {any_extent, any_extent});
  const std::size_t vocab = dtable->shape()[0], d = dtable->shape()[1];
  const Shape expected = mixpeft::detail::embedding_output_shape(ids, d);
  require<ShapeError>(dy.shape() == expected, op, ": dy has shape ", shape_string(dy.shape()), ", expected ",
                      shape_string(expected));
  mixpeft::detail::check_embedding_ids(op, ids, vocab);
  if (ids.size() == 0 || d == 0) return;
  std::vector<std::int64_t> plan;
  const std::size_t unique = detail::embedding_scatter_plan(ids, plan);
  const DeviceTensor<std::int64_t> device_plan = upload(std::span<const std::int64_t>(plan));
  constexpr unsigned block = 128;
  const dim3 grid(unsigned(unique), unsigned((d + block - 1) / block));
  detail::embedding_scatter_kernel<<<grid, block, 0, current_stream()>>>(device_plan.data(), unique, dy.data(), d,
                                                                         dtable->data());
  check_launch("embedding_backward");
}

}  // namespace mixpeft::cuda
