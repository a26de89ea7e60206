// mixpeft/train/grad_clip.hpp — global gradient norm, clipping, and scaling for accumulation.
//
//   grad_norm:       n = sqrt(sum over trainable p of sum_i g_i^2)        (accumulated in double)
//   clip_grad_norm:  if n > max_norm: g <- g * max_norm / (n + 1e-6)     (torch.nn.utils.clip_grad_norm_)
//                    returns n, the norm before clipping
//   scale_grads:     g <- g * factor
// A NaN or Inf in any gradient throws NumericError naming the first parameter (in list order) where it
// appears, before anything is modified. Frozen parameters have no gradient and are skipped.
//
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

template <class T>
double grad_norm(const ParameterList<T>& list) {
  double total = 0.0;
  for (const auto& ref : list) {
    const Parameter<T>& p = *ref.param;
    if (!p.trainable) continue;
    double sum = 0.0;
    for (std::size_t i = 0; i < p.grad.size(); ++i) {
      const double g = double(p.grad.data()[i]);
      sum += g * g;
    }
    require<NumericError>(std::isfinite(sum), "grad_norm: gradient of \"", ref.name, "\" is ",
                          std::isnan(sum) ? "NaN" : "Inf", " (sum of squares ", sum, ")");
    total += sum;
  }
  require<NumericError>(std::isfinite(total), "grad_norm: global gradient norm overflows");
  return std::sqrt(total);
}

template <class T>
void scale_grads(const ParameterList<T>& list, double factor) {
  require<ConfigError>(std::isfinite(factor), "scale_grads: factor must be finite (got ", factor, ")");
  const T f = T(factor);
  for (const auto& ref : list)
    if (ref.param->trainable)
      for (auto& g : ref.param->grad) g *= f;
}

template <class T>
double clip_grad_norm(const ParameterList<T>& list, double max_norm) {
  require<ConfigError>(max_norm > 0 && std::isfinite(max_norm), "clip_grad_norm: max_norm must be finite and > 0 (got ",
                       max_norm, ")");
  const double norm = grad_norm(list);
  if (norm > max_norm) scale_grads(list, max_norm / (norm + 1e-6));
  return norm;
}

}  // namespace mixpeft
