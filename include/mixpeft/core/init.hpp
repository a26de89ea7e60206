// mixpeft/core/init.hpp — seeded initialisers (PyTorch / PEFT conventions).
//
// For a weight of shape [out, in]: fan_in = in, fan_out = out.
//   xavier_uniform:   U(-b, b), b = gain * sqrt(6 / (fan_in + fan_out))
//   kaiming_uniform:  U(-b, b), b = sqrt(6 / ((1 + a^2) * fan_in)); a = sqrt(5) gives b = 1 / sqrt(fan_in),
//                     the default for nn.Linear weights and for PEFT's lora_A
//   linear_bias:      U(-1/sqrt(fan_in), 1/sqrt(fan_in)), nn.Linear's bias
//   normal:           N(mean, std^2)
#pragma once

#include <cmath>
#include <cstddef>
#include <utility>

#include "mixpeft/core/error.hpp"
#include "mixpeft/core/rng.hpp"
#include "mixpeft/core/tensor.hpp"

namespace mixpeft::init {

template <class T>
void zeros(Tensor<T>& t) {
  t.fill(T(0));
}

template <class T>
void constant(Tensor<T>& t, T value) {
  t.fill(value);
}

template <class T>
void uniform(Tensor<T>& t, Rng& rng, double lo, double hi) {
  for (auto& v : t) v = static_cast<T>(rng.uniform(lo, hi));
}

template <class T>
void normal(Tensor<T>& t, Rng& rng, double mean = 0.0, double stddev = 1.0) {
  for (auto& v : t) v = static_cast<T>(rng.normal(mean, stddev));
}

// fan_in / fan_out of a weight [out, in, ...receptive field] as torch.nn.init computes them.
template <class T>
std::pair<std::size_t, std::size_t> fans(const Tensor<T>& w) {
  require<ShapeError>(w.dimension() >= 2, "init: fan-based initialisers need a weight of rank >= 2, got ",
                      shape_string(w.shape()));
  std::size_t receptive = 1;
  for (std::size_t i = 2; i < w.dimension(); ++i) receptive *= w.shape()[i];
  return {w.shape()[1] * receptive, w.shape()[0] * receptive};
}

template <class T>
void xavier_uniform(Tensor<T>& w, Rng& rng, double gain = 1.0) {
  const auto [fan_in, fan_out] = fans(w);
  const double bound = gain * std::sqrt(6.0 / double(fan_in + fan_out));
  uniform(w, rng, -bound, bound);
}

template <class T>
void kaiming_uniform(Tensor<T>& w, Rng& rng, double a = std::sqrt(5.0)) {
  const auto fan_in = fans(w).first;
  const double bound = std::sqrt(6.0 / ((1.0 + a * a) * double(fan_in)));
  uniform(w, rng, -bound, bound);
}

template <class T>
void linear_bias(Tensor<T>& b, Rng& rng, std::size_t fan_in) {
  const double bound = fan_in > 0 ? 1.0 / std::sqrt(double(fan_in)) : 0.0;
  uniform(b, rng, -bound, bound);
}

}  // namespace mixpeft::init
