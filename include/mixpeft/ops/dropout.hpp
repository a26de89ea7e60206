// mixpeft/ops/dropout.hpp — inverted dropout, seeded.
//
//   training, p > 0:  y = x * m,  m_i = 1/(1-p) with probability 1-p, else 0   (mask m cached)
//   eval or p == 0:   y = x, and the mask is left empty (size 0): backward is the identity
//   backward:         dx = dy * m                                               (dx written)
// The mask is drawn from the caller's Rng, so a seeded run repeats its masks exactly.
#pragma once

#include "mixpeft/core/error.hpp"
#include "mixpeft/core/rng.hpp"
#include "mixpeft/core/tensor.hpp"

namespace mixpeft {

template <class T>
void dropout_forward(const Tensor<T>& x, double p, bool training, Rng& rng, Tensor<T>& y, Tensor<T>& mask) {
  require<ConfigError>(p >= 0.0 && p < 1.0, "dropout: probability p must be in [0, 1), got ", p);
  resize_to(y, shape_of(x));
  if (!training || p == 0.0) {
    resize_to(mask, Shape{0});
    std::copy(x.begin(), x.end(), y.begin());
    return;
  }
  resize_to(mask, shape_of(x));
  const T keep_scale = T(1.0 / (1.0 - p));
  for (std::size_t i = 0; i < x.size(); ++i) {
    const T m = rng.uniform() >= p ? keep_scale : T(0);
    mask.data()[i] = m;
    y.data()[i] = x.data()[i] * m;
  }
}

template <class T>
void dropout_backward(const Tensor<T>& dy, const Tensor<T>& mask, Tensor<T>& dx) {
  resize_to(dx, shape_of(dy));
  if (mask.size() == 0) {
    std::copy(dy.begin(), dy.end(), dx.begin());
    return;
  }
  expect_same_shape("dropout_backward", "mask", mask, "dy", dy);
  for (std::size_t i = 0; i < dy.size(); ++i) dx.data()[i] = dy.data()[i] * mask.data()[i];
}

}  // namespace mixpeft
