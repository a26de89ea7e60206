// mixpeft/train/grad_clip.hpp — global gradient norm, clipping, and scaling for accumulation.
//
//   grad_norm:       n = sqrt(sum over trainable p of sum_i g_i^2)        (accumulated in double)
//   clip_grad_norm:  if n > max_norm: g <- g * max_norm / (n + 1e-6)     (torch.nn.utils.clip_grad_norm_)
//                    returns n, the norm before clipping
//   scale_grads:     g <- g * factor
// A NaN or Inf in any gradient throws NumericError naming the first parameter (in list order) where it
// appears, before anything is modified. Frozen parameters have no gradient and are skipped.
//
// Any backend: the sums of squares and the scaling are the ops sum_of_squares and scale_in_place (on the CUDA
// backend a deterministic device reduction whose one double per parameter is copied back, and a kernel).
// Gradient accumulation over k micro-batches: backward passes accumulate (+=) into Parameter::grad, so
// the trainer runs k backwards, then scale_grads(list, 1.0 / k) (unless its loss is already divided
// by k), then clips, steps and zeroes the gradients.
#pragma once

#include <cmath>
#include <cstddef>

#include "mixpeft/core/error.hpp"
#include "mixpeft/core/parameter.hpp"
#include "mixpeft/core/tensor.hpp"

namespace mixpeft {

// The per-tensor ops the functions below are made of (cuda/grad_clip.cuh has both for device tensors).
template <class T>
double sum_of_squares(const Tensor<T>& g) {
  double sum = 0.0;
  for (std::size_t i = 0; i < g.size(); ++i) {
    const double v = double(g.data()[i]);
    sum += v * v;
  }
  return sum;
}

template <class T>
void scale_in_place(Tensor<T>& g, double factor) {
  const T f = T(factor);
  for (auto& v : g) v *= f;
}

template <class T, class Backend>
double grad_norm(const ParameterList<T, Backend>& list) {
  double total = 0.0;
  for (const auto& ref : list) {
    const Parameter<T, Backend>& p = *ref.param;
    if (!p.trainable) continue;
    const double sum = sum_of_squares(p.grad);
    require<NumericError>(std::isfinite(sum), "grad_norm: gradient of \"", ref.name, "\" is ",
                          std::isnan(sum) ? "NaN" : "Inf", " (sum of squares ", sum, ")");
    total += sum;
  }
  require<NumericError>(std::isfinite(total), "grad_norm: global gradient norm overflows");
  return std::sqrt(total);
}

template <class T, class Backend>
void scale_grads(const ParameterList<T, Backend>& list, double factor) {
  require<ConfigError>(std::isfinite(factor), "scale_grads: factor must be finite (got ", factor, ")");
  for (const auto& ref : list)
    if (ref.param->trainable) scale_in_place(ref.param->grad, factor);
}

template <class T, class Backend>
double clip_grad_norm(const ParameterList<T, Backend>& list, double max_norm) {
  require<ConfigError>(max_norm > 0 && std::isfinite(max_norm), "clip_grad_norm: max_norm must be finite and > 0 (got ",
                       max_norm, ")");
  const double norm = grad_norm(list);
  if (norm > max_norm) scale_grads(list, max_norm / (norm + 1e-6));
  return norm;
}

}  // namespace mixpeft
