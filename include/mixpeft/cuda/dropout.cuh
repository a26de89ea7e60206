// mixpeft/cuda/dropout.cuh — inverted dropout on the device (ops/dropout.hpp), counter-based RNG.
//
//   training, p > 0:  y = x * m,  m_i = 1/(1-p) with probability 1-p, else 0   (mask m cached)
//   eval or p == 0:   y = x, and the mask is left empty (size 0): backward is the identity
//   backward:         dx = dy * m                                               (dx written)
// Random numbers: the CPU op's counter hash (mixpeft::detail::dropout_bits, ops/dropout.hpp): one 64-bit key per
// call from the caller's Rng, element i kept when its 32 random bits are >= round(p 2^32). The draw
// depends only on (key, i), so any launch geometry gives the same mask, and the same seed gives the CPU op's mask.
// Shapes: any; x, y, mask, dy, dx share one shape.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "mixpeft/core/error.hpp"
#include "mixpeft/core/rng.hpp"
#include "mixpeft/cuda/device_tensor.cuh"
#include "mixpeft/cuda/elementwise.cuh"
#include "mixpeft/ops/dropout.hpp"

namespace mixpeft::cuda {
namespace detail {

struct DropoutForward {  // x -> y, mask
  std::uint64_t seed;
  std::uint32_t threshold;  // keep when the draw is >= threshold
  double keep_scale;
  template <class A>
  __device__ void operator()(std::size_t i, const A (&x)[1], A (&y)[2]) const {
    const std::uint32_t draw = mixpeft::detail::dropout_bits(seed, i);
    const A m = draw >= threshold ? A(keep_scale) : A(0);
    y[0] = x[0] * m;
    y[1] = m;
  }
};

struct Multiply {  // a, b -> a * b
  template <class A>
  __device__ void operator()(std::size_t, const A (&x)[2], A (&y)[1]) const {
    y[0] = x[0] * x[1];
  }
};

}  // namespace detail

template <class T>
void dropout_forward(const DeviceTensor<T>& x, double p, bool training, Rng& rng, DeviceTensor<T>& y,
                     DeviceTensor<T>& mask) {
  require<ConfigError>(p >= 0.0 && p < 1.0, "dropout: probability p must be in [0, 1), got ", p);
  resize_to(y, shape_of(x));
  if (!training || p == 0.0) {
    resize_to(mask, Shape{0});
    if (y.data() != x.data() && x.size() > 0)
      MIXPEFT_CUDA_CHECK(cudaMemcpyAsync(y.data(), x.data(), x.size() * sizeof(T), cudaMemcpyDeviceToDevice,
                                         current_stream()));
    return;
  }
  resize_to(mask, shape_of(x));
  const detail::DropoutForward f{rng.next_u64(), mixpeft::detail::dropout_threshold(p), 1.0 / (1.0 - p)};
  detail::map_elements<T, 1, 2>("dropout_forward", x.size(), f, {x.data()}, {y.data(), mask.data()});
}

template <class T>
void dropout_backward(const DeviceTensor<T>& dy, const DeviceTensor<T>& mask, DeviceTensor<T>& dx) {
  resize_to(dx, shape_of(dy));
  if (mask.size() == 0) {
    if (dx.data() != dy.data() && dy.size() > 0)
      MIXPEFT_CUDA_CHECK(cudaMemcpyAsync(dx.data(), dy.data(), dy.size() * sizeof(T), cudaMemcpyDeviceToDevice,
                                         current_stream()));
    return;
  }
  expect_same_shape("dropout_backward", "mask", mask, "dy", dy);
  detail::map_elements<T, 2, 1>("dropout_backward", dy.size(), detail::Multiply{}, {dy.data(), mask.data()},
                                {dx.data()});
}

}  // namespace mixpeft::cuda
