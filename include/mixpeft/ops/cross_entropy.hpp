// mixpeft/ops/cross_entropy.hpp — mean token cross-entropy with an ignore label (PyTorch semantics).
//
//   lse_n = log sum_v exp(logits[n, v])                       (max-shifted: stable for any finite logits)
//   loss  = (1 / n_valid) sum_{n : t_n != ignore} (lse_n - logits[n, t_n])
//   backward:  dlogits[n, :] = (softmax(logits[n, :]) - onehot(t_n)) * dloss / n_valid   (written)
//              dlogits[n, :] = 0 on ignored rows
// n_valid counts the rows whose target is not `ignore_index` (default -100, as torch.nn.CrossEntropyLoss).
// When every row is ignored, n_valid = 0 and the loss is 0 with an all-zero gradient (PyTorch would return NaN).
// Backward needs the logits, the targets and the cache (lse per row, n_valid, ignore_index): the softmax is
// recomputed rather than stored, which saves an [N, V] buffer (V = 32000 for LLaMA).
// Next-token shifting (targets = ids shifted by one) is the caller's job.
// Errors: a target outside [0, V) that is not ignore_index throws IndexError; a NaN or Inf loss throws
// NumericError naming the first offending row.
// Shapes: logits, dlogits [..., V] seen as N = rows(logits) rows (N = B*T tokens); targets [...] (the leading
//         shape of logits, e.g. [N] or [B, T]); cache.logsumexp [N].
#pragma once

#include <cmath>
#include <cstdint>
#include <string_view>
#include <type_traits>

#include "mixpeft/core/error.hpp"
#include "mixpeft/core/parallel.hpp"
#include "mixpeft/core/tensor.hpp"

namespace mixpeft {

inline constexpr std::int64_t default_ignore_index = -100;

template <class T>
struct CrossEntropyCache {
  Tensor<T> logsumexp;                               // [N], 0 on ignored rows
  std::size_t valid = 0;                             // n_valid: rows that count towards the mean
  std::int64_t ignore_index = default_ignore_index;  // the label forward skipped
};

namespace detail {

// Checks logits [..., V] against targets [...] and returns V.
template <class T>
std::size_t check_cross_entropy_shapes(std::string_view op, const Tensor<T>& logits,
                                       const Tensor<std::int64_t>& targets) {
  require<ShapeError>(logits.dimension() >= 1 && logits.shape().back() > 0, op, ": logits has shape ",
                      shape_string(logits.shape()), ", expected a non-empty class axis [..., V]");
  const Shape lead(logits.shape().begin(), logits.shape().end() - 1);
  require<ShapeError>(shape_of(targets) == lead, op, ": targets has shape ", shape_string(targets.shape()),
                      " but logits has shape ", shape_string(logits.shape()), ", expected targets ",
                      shape_string(lead));
  return logits.shape().back();
}

// Checks every non-ignored target against [0, V) and returns how many rows are not ignored.
inline std::size_t count_valid_targets(std::string_view op, const Tensor<std::int64_t>& targets, std::size_t classes,
                                       std::int64_t ignore_index) {
  std::size_t valid = 0;
  for (std::size_t n = 0; n < targets.size(); ++n) {
    const std::int64_t t = targets.data()[n];
    if (t == ignore_index) continue;
    require<IndexError>(t >= 0 && std::uint64_t(t) < classes, op, ": target ", t, " of row ", n,
                         " is out of range for V = ", classes, " classes (ignore_index is ", ignore_index, ")");
    ++valid;
  }
  return valid;
}

}  // namespace detail

// Returns the mean loss over the non-ignored rows; cache.valid holds their count.
template <class T>
T cross_entropy_forward(const Tensor<T>& logits, const Tensor<std::int64_t>& targets, CrossEntropyCache<T>& cache,
                        std::int64_t ignore_index = default_ignore_index) {
  constexpr std::string_view op = "cross_entropy_forward";
  const std::size_t v = detail::check_cross_entropy_shapes(op, logits, targets);
  const std::size_t n = targets.size();
  cache.valid = detail::count_valid_targets(op, targets, v, ignore_index);
  cache.ignore_index = ignore_index;
  resize_to(cache.logsumexp, Shape{n});
  using ConstRow = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>;
  parallel_rows(n, 3 * v, [&](std::size_t i) {
    T lse = 0;
    if (targets.data()[i] != ignore_index) {
      const ConstRow X(logits.data() + i * v, Eigen::Index(v));
      const T m = X.maxCoeff();
      lse = m + std::log((X - m).exp().sum());
    }
    cache.logsumexp.data()[i] = lse;
  });
  double total = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const std::int64_t t = targets.data()[i];
    if (t == ignore_index) continue;
    const double row_loss = double(cache.logsumexp.data()[i]) - double(logits.data()[i * v + std::size_t(t)]);
    require<NumericError>(std::isfinite(row_loss), "cross_entropy: loss is ", std::isnan(row_loss) ? "NaN" : "Inf",
                          " at row ", i, " (target ", t, ", logsumexp ", cache.logsumexp.data()[i], ")");
    total += row_loss;
  }
  const T loss = cache.valid > 0 ? T(total / double(cache.valid)) : T(0);
  require<NumericError>(std::isfinite(loss), "cross_entropy: loss is Inf after the mean over ", cache.valid,
                        " rows (overflows the scalar type)");
  return loss;
}

template <class T>
void cross_entropy_backward(const Tensor<T>& logits, const Tensor<std::int64_t>& targets,
                            const CrossEntropyCache<T>& cache, std::type_identity_t<T> dloss, Tensor<T>& dlogits) {
  constexpr std::string_view op = "cross_entropy_backward";
  const std::size_t v = detail::check_cross_entropy_shapes(op, logits, targets);
  const std::size_t n = targets.size();
  expect_shape(op, "cache.logsumexp", cache.logsumexp, {n});
  require<ConfigError>(detail::count_valid_targets(op, targets, v, cache.ignore_index) == cache.valid, op,
                       ": targets have changed since forward (cache.valid = ", cache.valid, ")");
  resize_to(dlogits, shape_of(logits));
  using Row = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;
  using ConstRow = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>;
  const T scale = cache.valid > 0 ? dloss / T(cache.valid) : T(0);
  parallel_rows(n, 3 * v, [&](std::size_t i) {
    Row dX(dlogits.data() + i * v, Eigen::Index(v));
    const std::int64_t t = targets.data()[i];
    if (t == cache.ignore_index) {
      dX.setZero();
      return;
    }
    dX = (ConstRow(logits.data() + i * v, Eigen::Index(v)) - cache.logsumexp.data()[i]).exp() * scale;
    dX[Eigen::Index(t)] -= scale;
  });
}

}  // namespace mixpeft
