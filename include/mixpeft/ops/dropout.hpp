// mixpeft/ops/dropout.hpp — inverted dropout, seeded.
//
//   training, p > 0:  y = x * m,  m_i = 1/(1-p) with probability 1-p, else 0   (mask m cached)
//   eval or p == 0:   y = x, and the mask is left empty (size 0): backward is the identity
//   backward:         dx = dy * m                                               (dx written)
// Each call draws one 64-bit key from the caller's Rng; element i is kept when its 32 random bits
// h(i, key) = mix(mix(i + key_lo) ^ key_hi) are >= p 2^32, mix a bijective 32-bit integer hash (lowbias32 constants),
// so the mask is a function of the caller's seed alone (not of the thread count) and blocks fill in parallel
// with vectorised loops.
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
inline std::uint32_t dropout_mix(std::uint32_t v) {
  v ^= v >> 16;
  v *= 0x7feb352dU;
  v ^= v >> 15;
  v *= 0x846ca68bU;
  v ^= v >> 16;
  return v;
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
  const auto threshold = std::uint32_t(std::min(std::ldexp(p, 32), 4294967295.0));
  const std::uint64_t key = rng.next_u64();
  const T* xs = x.data();
  T* ys = y.data();
  T* ms = mask.data();
  detail::for_blocks(x.size(), [=](std::size_t o, std::size_t len) {
    // Blocks never straddle a multiple of 2^32, so the high half of the index is constant within one.
    const auto lo = std::uint32_t(key) + std::uint32_t(o);
    const auto hi = std::uint32_t(key >> 32) ^ detail::dropout_mix(std::uint32_t(o >> 32));
    const T* __restrict xi = xs + o;
    T* __restrict yi = ys + o;
    T* __restrict mi = ms + o;
    const auto n = std::uint32_t(len);
    const T scale = keep_scale;
    const std::uint32_t cut = threshold;
    for (std::uint32_t i = 0; i < n; ++i) {
      const std::uint32_t bits = detail::dropout_mix(detail::dropout_mix(lo + i) ^ hi);
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
