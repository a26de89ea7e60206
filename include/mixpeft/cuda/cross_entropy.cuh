// mixpeft/cuda/cross_entropy.cuh — mean token cross-entropy with an ignore label on the device
// (ops/cross_entropy.hpp, PyTorch semantics).
//
//   lse_n = log sum_v exp(logits[n, v])                       (max-shifted: stable for any finite logits)
//   loss  = (1 / n_valid) sum_{n : t_n != ignore} (lse_n - logits[n, t_n])
//   backward:  dlogits[n, :] = (softmax(logits[n, :]) - onehot(t_n)) * dloss / n_valid   (written)
//              dlogits[n, :] = 0 on ignored rows
// When every row is ignored the loss is 0 with an all-zero gradient. The targets stay a host Tensor<int64_t>:
// they are range-checked and counted on the host (IndexError for a target outside [0, V)) and uploaded.
// Forward: one block per row writes lse_n and the row's loss (in double); one block then sums the row losses
// in a fixed order and finds the first non-finite one; the sum comes back to the host with that row's index
// in one copy — the only synchronisation (NumericError names the row when the loss is NaN or Inf).
// The cache keeps lse in acc_t<T> (float for bf16 / fp16 logits, so backward's softmax stays accurate) and,
// unlike the CPU cache, is cuda::CrossEntropyCache. Backward recomputes the softmax from the logits.
// Shapes: logits, dlogits [..., V] seen as N rows; targets [...] (the leading shape of logits);
//         cache.logsumexp [N].
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <type_traits>

#include "mixpeft/core/error.hpp"
#include "mixpeft/core/tensor.hpp"
#include "mixpeft/cuda/device_tensor.cuh"
#include "mixpeft/cuda/error.cuh"
#include "mixpeft/cuda/kernel_utils.cuh"
#include "mixpeft/ops/cross_entropy.hpp"

namespace mixpeft::cuda {

template <class T>
struct CrossEntropyCache {
  DeviceTensor<acc_t<T>> logsumexp;                  // [N], 0 on ignored rows
  std::size_t valid = 0;                             // n_valid: rows that count towards the mean
  std::int64_t ignore_index = default_ignore_index;  // the label forward skipped
};

namespace detail {

template <class T>
__global__ void cross_entropy_rows_kernel(const T* __restrict__ logits, const std::int64_t* __restrict__ targets,
                                          std::size_t v, std::int64_t ignore_index, acc_t<T>* __restrict__ lse,
                                          double* __restrict__ row_loss) {
  using A = acc_t<T>;
  const std::size_t row = blockIdx.x;
  const std::int64_t target = targets[row];
  if (target == ignore_index) {  // uniform across the block: no thread reaches a reduction
    if (threadIdx.x == 0) {
      lse[row] = A(0);
      row_loss[row] = 0.0;
    }
    return;
  }
  const T* x = logits + row * v;
  A m = -std::numeric_limits<A>::infinity();
  for (std::size_t j = threadIdx.x; j < v; j += blockDim.x) m = MaxOp{}(m, widen(x[j]));
  m = block_max(m);
  A s = 0;
  for (std::size_t j = threadIdx.x; j < v; j += blockDim.x) s += dev_exp(widen(x[j]) - m);
  s = block_sum(s);
  if (threadIdx.x == 0) {
    const A l = m + dev_log(s);
    lse[row] = l;
    row_loss[row] = double(l) - double(widen(x[target]));
  }
}

// result = [sum of row losses, first row with a non-finite loss (-1: none), its loss, its lse]; one block.
template <class A>
__global__ void cross_entropy_total_kernel(const double* __restrict__ row_loss, const A* __restrict__ lse,
                                           std::size_t n, double* __restrict__ result) {
  double s = 0;
  long long bad = -1;
  for (std::size_t i = threadIdx.x; i < n; i += blockDim.x) {
    s += row_loss[i];
    if (bad < 0 && !isfinite(row_loss[i])) bad = (long long)i;
  }
  s = block_sum(s);
  // The first bad row: min over threads of their first bad row, with "none" mapped above every index.
  double first = bad < 0 ? double(n) : double(bad);
  first = block_reduce(first, MinOp{}, double(n));
  if (threadIdx.x == 0) {
    const bool any = first < double(n);
    const auto i = std::size_t(first);
    result[0] = s;
    result[1] = any ? first : -1.0;
    result[2] = any ? row_loss[i] : 0.0;
    result[3] = any ? double(lse[i]) : 0.0;
  }
}

template <class T>
__global__ void cross_entropy_backward_kernel(const T* __restrict__ logits, const std::int64_t* __restrict__ targets,
                                              const acc_t<T>* __restrict__ lse, std::size_t v,
                                              std::int64_t ignore_index, acc_t<T> scale, T* __restrict__ dlogits) {
  using A = acc_t<T>;
  const std::size_t row = blockIdx.x;
  const std::int64_t target = targets[row];
  const T* x = logits + row * v;
  T* dx = dlogits + row * v;
  const bool ignored = target == ignore_index;
  const A l = ignored ? A(0) : lse[row];
  for (std::size_t j = threadIdx.x; j < v; j += blockDim.x) {
    A g = A(0);
    if (!ignored) g = dev_exp(widen(x[j]) - l) * scale - (std::int64_t(j) == target ? scale : A(0));
    dx[j] = narrow<T>(g);
  }
}

// Checks logits [..., V] against targets [...] and returns V.
template <class T>
std::size_t check_cross_entropy_shapes(std::string_view op, const DeviceTensor<T>& logits,
                                       const Tensor<std::int64_t>& targets) {
  require<ShapeError>(logits.dimension() >= 1 && logits.shape().back() > 0, op, ": logits has shape ",
                      shape_string(logits.shape()), ", expected a non-empty class axis [..., V]");
  const Shape lead(logits.shape().begin(), logits.shape().end() - 1);
  require<ShapeError>(mixpeft::shape_of(targets) == lead, op, ": targets has shape ", shape_string(targets.shape()),
                      " but logits has shape ", shape_string(logits.shape()), ", expected targets ",
                      shape_string(lead));
  return logits.shape().back();
}

}  // namespace detail

// Returns the mean loss over the non-ignored rows; cache.valid holds their count. Synchronises the stream.
template <class T>
T cross_entropy_forward(const DeviceTensor<T>& logits, const Tensor<std::int64_t>& targets,
                        CrossEntropyCache<T>& cache, std::int64_t ignore_index = default_ignore_index) {
  constexpr std::string_view op = "cross_entropy_forward";
  using A = acc_t<T>;
  const std::size_t v = detail::check_cross_entropy_shapes(op, logits, targets);
  const std::size_t n = targets.size();
  cache.valid = mixpeft::detail::count_valid_targets(op, targets, v, ignore_index);
  cache.ignore_index = ignore_index;
  resize_to(cache.logsumexp, Shape{n});
  if (n == 0) return T(0);
  const DeviceTensor<std::int64_t> device_targets =
      upload(std::span<const std::int64_t>(targets.data(), targets.size()));
  DeviceTensor<double> row_loss(Shape{n}), result(Shape{4});
  const cudaStream_t stream = current_stream();
  detail::cross_entropy_rows_kernel<<<unsigned(n), row_block_size(v), 0, stream>>>(
      logits.data(), device_targets.data(), v, ignore_index, cache.logsumexp.data(), row_loss.data());
  check_launch("cross_entropy_forward");
  detail::cross_entropy_total_kernel<<<1, 1024, 0, stream>>>(row_loss.data(), cache.logsumexp.data(), n,
                                                             result.data());
  check_launch("cross_entropy_forward");
  double host[4];
  MIXPEFT_CUDA_CHECK(cudaMemcpyAsync(host, result.data(), sizeof(host), cudaMemcpyDeviceToHost, stream));
  synchronize(stream);
  if (host[1] >= 0) {
    const auto row = std::size_t(host[1]);
    throw NumericError(mixpeft::detail::concat("cross_entropy: loss is ", std::isnan(host[2]) ? "NaN" : "Inf",
                                               " at row ", row, " (target ", targets.data()[row], ", logsumexp ",
                                               host[3], ")"));
  }
  const T loss = cache.valid > 0 ? narrow<T>(A(host[0] / double(cache.valid))) : narrow<T>(A(0));
  require<NumericError>(std::isfinite(double(widen(loss))), "cross_entropy: loss is Inf after the mean over ",
                        cache.valid, " rows (overflows the scalar type)");
  return loss;
}

template <class T>
void cross_entropy_backward(const DeviceTensor<T>& logits, const Tensor<std::int64_t>& targets,
                            const CrossEntropyCache<T>& cache, std::type_identity_t<T> dloss,
                            DeviceTensor<T>& dlogits) {
  constexpr std::string_view op = "cross_entropy_backward";
  using A = acc_t<T>;
  const std::size_t v = detail::check_cross_entropy_shapes(op, logits, targets);
  const std::size_t n = targets.size();
  expect_shape(op, "cache.logsumexp", cache.logsumexp, {n});
  require<ConfigError>(mixpeft::detail::count_valid_targets(op, targets, v, cache.ignore_index) == cache.valid, op,
                       ": targets have changed since forward (cache.valid = ", cache.valid, ")");
  resize_to(dlogits, shape_of(logits));
  if (n == 0) return;
  const A scale = cache.valid > 0 ? A(widen(dloss)) / A(cache.valid) : A(0);
  const DeviceTensor<std::int64_t> device_targets =
      upload(std::span<const std::int64_t>(targets.data(), targets.size()));
  detail::cross_entropy_backward_kernel<<<unsigned(n), row_block_size(v), 0, current_stream()>>>(
      logits.data(), device_targets.data(), cache.logsumexp.data(), v, cache.ignore_index, scale, dlogits.data());
  check_launch("cross_entropy_backward");
}

}  // namespace mixpeft::cuda
