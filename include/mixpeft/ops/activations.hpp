// mixpeft/ops/activations.hpp — element-wise activations.
//
//   SiLU:       y = x * sigmoid(x)                  dy/dx = s (1 + x (1 - s)),  s = sigmoid(x)
//   SwiGLU:     z = SiLU(g) * u                     dg = dz * u * SiLU'(g),    du = dz * SiLU(g)
//   QuickGELU:  y = x * sigmoid(1.702 x)            dy/dx = s + 1.702 x s (1 - s),  s = sigmoid(1.702 x)
// Backward passes recompute from the forward inputs (nothing else is cached) and write their outputs.
// Bodies run on Eigen array expressions (vectorised exp) over row blocks spread across threads.
#pragma once

#include <string_view>

#include "mixpeft/core/tensor.hpp"
#include "mixpeft/ops/elementwise.hpp"

namespace mixpeft {


template <class T>
void silu_forward(const Tensor<T>& x, Tensor<T>& y) {
  resize_to(y, shape_of(x));
  detail::for_blocks(x.size(), [&](std::size_t o, std::size_t len) {
    const detail::ConstArrayView<T> X(x.data() + o, Eigen::Index(len));
    detail::ArrayView<T>(y.data() + o, Eigen::Index(len)) = X / (T(1) + (-X).exp());
  });
}

template <class T>
void silu_backward(const Tensor<T>& x, const Tensor<T>& dy, Tensor<T>& dx) {
  expect_same_shape("silu_backward", "dy", dy, "x", x);
  resize_to(dx, shape_of(x));
  detail::for_blocks(x.size(), [&](std::size_t o, std::size_t len) {
    const detail::ConstArrayView<T> X(x.data() + o, Eigen::Index(len)), dY(dy.data() + o, Eigen::Index(len));
    const Eigen::Array<T, Eigen::Dynamic, 1> s = (T(1) + (-X).exp()).inverse();
    detail::ArrayView<T>(dx.data() + o, Eigen::Index(len)) = dY * s * (T(1) + X * (T(1) - s));
  });
}

template <class T>
void swiglu_forward(const Tensor<T>& g, const Tensor<T>& u, Tensor<T>& z) {
  expect_same_shape("swiglu_forward", "u", u, "g", g);
  resize_to(z, shape_of(g));
  detail::for_blocks(g.size(), [&](std::size_t o, std::size_t len) {
    const detail::ConstArrayView<T> G(g.data() + o, Eigen::Index(len)), U(u.data() + o, Eigen::Index(len));
    detail::ArrayView<T>(z.data() + o, Eigen::Index(len)) = G / (T(1) + (-G).exp()) * U;
  });
}

template <class T>
void swiglu_backward(const Tensor<T>& g, const Tensor<T>& u, const Tensor<T>& dz, Tensor<T>& dg, Tensor<T>& du) {
  expect_same_shape("swiglu_backward", "u", u, "g", g);
  expect_same_shape("swiglu_backward", "dz", dz, "g", g);
  resize_to(dg, shape_of(g));
  resize_to(du, shape_of(g));
  detail::for_blocks(g.size(), [&](std::size_t o, std::size_t len) {
    const auto n = Eigen::Index(len);
    const detail::ConstArrayView<T> G(g.data() + o, n), U(u.data() + o, n), dZ(dz.data() + o, n);
    const Eigen::Array<T, Eigen::Dynamic, 1> s = (T(1) + (-G).exp()).inverse();
    detail::ArrayView<T>(du.data() + o, n) = dZ * G * s;
    detail::ArrayView<T>(dg.data() + o, n) = dZ * U * s * (T(1) + G * (T(1) - s));
  });
}

inline constexpr double quick_gelu_alpha = 1.702;

template <class T>
void quick_gelu_forward(const Tensor<T>& x, Tensor<T>& y) {
  resize_to(y, shape_of(x));
  detail::for_blocks(x.size(), [&](std::size_t o, std::size_t len) {
    const detail::ConstArrayView<T> X(x.data() + o, Eigen::Index(len));
    detail::ArrayView<T>(y.data() + o, Eigen::Index(len)) = X / (T(1) + (T(-quick_gelu_alpha) * X).exp());
  });
}

template <class T>
void quick_gelu_backward(const Tensor<T>& x, const Tensor<T>& dy, Tensor<T>& dx) {
  expect_same_shape("quick_gelu_backward", "dy", dy, "x", x);
  resize_to(dx, shape_of(x));
  const T a = T(quick_gelu_alpha);
  detail::for_blocks(x.size(), [&](std::size_t o, std::size_t len) {
    const auto n = Eigen::Index(len);
    const detail::ConstArrayView<T> X(x.data() + o, n), dY(dy.data() + o, n);
    const Eigen::Array<T, Eigen::Dynamic, 1> s = (T(1) + (-a * X).exp()).inverse();
    detail::ArrayView<T>(dx.data() + o, n) = dY * (s + a * X * s * (T(1) - s));
  });
}

}  // namespace mixpeft
