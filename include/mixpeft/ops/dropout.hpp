// mixpeft/ops/dropout.hpp — inverted dropout, seeded.
//
//   training, p > 0:  y = x * m,  m_i = 1/(1-p) with probability 1-p, else 0   (mask m cached)
//   eval or p == 0:   y = x, and the mask is left empty (size 0): backward is the identity
//   backward:         dx = dy * m                                               (dx written)
// Each call draws one 64-bit key from the caller's Rng; element i (flat index) is kept when its 32 random bits
//   bits(key, i) = mix(mix(key_lo + i_lo) ^ key_hi ^ mix(i_hi)) >= round(p 2^32)
// (lo and hi the 32-bit halves, mix a bijective 32-bit integer hash with lowbias32's constants). The mask is a
// function of the key and the index alone: it does not depend on the thread count, blocks fill in parallel with
// vectorised loops (32-bit multiplies vectorise on AVX2), and the CUDA op draws exactly the same masks.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "mixpeft/core/error.hpp"
#include "mixpeft/core/rng.hpp"
#include "mixpeft/core/tensor.hpp"
#include "mixpeft/ops/elementwise.hpp"

namespace mixpeft {

namespace detail {
#if defined(__CUDACC__)
#define MIXPEFT_HOST_DEVICE __host__ __device__
#else
#define MIXPEFT_HOST_DEVICE
#endif
MIXPEFT_HOST_DEVICE inline std::uint32_t dropout_mix(std::uint32_t v) {
  v ^= v >> 16;
  v *= 0x7feb352dU;
  v ^= v >> 15;
  v *= 0x846ca68bU;
  v ^= v >> 16;
  return v;
}
// The 32 random bits of element `index` under `key` (shared with the CUDA kernel).
MIXPEFT_HOST_DEVICE inline std::uint32_t dropout_bits(std::uint64_t key, std::uint64_t index) {
  const std::uint32_t hi = std::uint32_t(key >> 32) ^ dropout_mix(std::uint32_t(index >> 32));
  return dropout_mix(dropout_mix(std::uint32_t(key) + std::uint32_t(index)) ^ hi);
}
#undef MIXPEFT_HOST_DEVICE

// round(p 2^32), kept below 2^32 (p < 1): an element is kept when its bits are >= this.
inline std::uint32_t dropout_threshold(double p) {
  const double scaled = std::nearbyint(std::ldexp(p, 32));
  return scaled >= 4294967295.0 ? 0xffffffffU : std::uint32_t(scaled);
}
}  // namespace detail

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
  const std::uint32_t threshold = detail::dropout_threshold(p);
  const std::uint64_t key = rng.next_u64();
  const T* xs = x.data();
  T* ys = y.data();
  T* ms = mask.data();
  detail::for_blocks(x.size(), [=](std::size_t o, std::size_t len) {
    const T* __restrict xi = xs + o;
    T* __restrict yi = ys + o;
    T* __restrict mi = ms + o;
    const T scale = keep_scale;
    const std::uint32_t cut = threshold;
    // dropout_bits with the high half hoisted: blocks never straddle a multiple of 2^32.
    const std::uint32_t hi = std::uint32_t(key >> 32) ^ detail::dropout_mix(std::uint32_t(std::uint64_t(o) >> 32));
    const std::uint32_t lo = std::uint32_t(key) + std::uint32_t(o);
    for (std::size_t i = 0; i < len; ++i) {
      const std::uint32_t bits = detail::dropout_mix(detail::dropout_mix(lo + std::uint32_t(i)) ^ hi);
      const T m = T(bits >= cut) * scale;
      mi[i] = m;
      yi[i] = xi[i] * m;
    }
  });
}

template <class T>
void dropout_backward(const Tensor<T>& dy, const Tensor<T>& mask, Tensor<T>& dx) {
  resize_to(dx, shape_of(dy));
  if (mask.size() == 0) {
    std::copy(dy.begin(), dy.end(), dx.begin());
    return;
  }
  expect_same_shape("dropout_backward", "mask", mask, "dy", dy);
  detail::for_blocks(dy.size(), [&](std::size_t o, std::size_t len) {
    const auto n = Eigen::Index(len);
    detail::ArrayView<T>(dx.data() + o, n) =
        detail::ConstArrayView<T>(dy.data() + o, n) * detail::ConstArrayView<T>(mask.data() + o, n);
  });
}

}  // namespace mixpeft
