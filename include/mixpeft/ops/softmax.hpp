// mixpeft/ops/softmax.hpp — softmax over the last axis.
//
//   forward:   y[..., C] = exp(x - max x) / sum exp(x - max x)       (row-wise, numerically stable)
//   backward:  dx = y * (dy - sum_c dy_c y_c)                        (dx written)
// Backward needs only the output y. A temperature tau is applied by the caller (x / tau).
#pragma once

#include <cmath>
#include <string_view>

#include "mixpeft/core/parallel.hpp"
#include "mixpeft/core/tensor.hpp"

namespace mixpeft {

// One row, in place allowed (y may equal x).
template <class T>
void softmax_row(const T* x, T* y, std::size_t c) {
  T m = x[0];
  for (std::size_t j = 1; j < c; ++j) m = x[j] > m ? x[j] : m;
  T s = 0;
  for (std::size_t j = 0; j < c; ++j) {
    y[j] = std::exp(x[j] - m);
    s += y[j];
  }
  const T inv = T(1) / s;
  for (std::size_t j = 0; j < c; ++j) y[j] *= inv;
}

template <class T>
void softmax_forward(const Tensor<T>& x, Tensor<T>& y) {
  require<ShapeError>(x.dimension() >= 1 && cols(x) > 0, "softmax_forward: x has shape ", shape_string(x.shape()),
                      ", expected a non-empty last axis");
  resize_to(y, shape_of(x));
  const std::size_t n = rows(x), c = cols(x);
  parallel_rows(n, 4 * c, [&](std::size_t i) { softmax_row(x.data() + i * c, y.data() + i * c, c); });
}

template <class T>
void softmax_backward(const Tensor<T>& y, const Tensor<T>& dy, Tensor<T>& dx) {
  expect_same_shape("softmax_backward", "dy", dy, "y", y);
  resize_to(dx, shape_of(y));
  const std::size_t n = rows(y), c = cols(y);
  parallel_rows(n, 3 * c, [&](std::size_t i) {
    const T* yr = y.data() + i * c;
    const T* dyr = dy.data() + i * c;
    T* dxr = dx.data() + i * c;
    T s = 0;
    for (std::size_t j = 0; j < c; ++j) s += dyr[j] * yr[j];
    for (std::size_t j = 0; j < c; ++j) dxr[j] = yr[j] * (dyr[j] - s);
  });
}

}  // namespace mixpeft
