// mixpeft/cuda/activations.cuh — element-wise activations on the device (ops/activations.hpp).
//
//   SiLU:       y = x * sigmoid(x)                  dy/dx = s (1 + x (1 - s)),  s = sigmoid(x)
//   SwiGLU:     z = SiLU(g) * u                     dg = dz * u * SiLU'(g),    du = dz * SiLU(g)
//   QuickGELU:  y = x * sigmoid(1.702 x)            dy/dx = s + 1.702 x s (1 - s),  s = sigmoid(1.702 x)
// Backward passes recompute from the forward inputs (nothing else is cached) and write their outputs.
// Each op is one vectorised element-wise kernel (cuda/elementwise.cuh) computing in acc_t<T>; outputs may
// alias inputs. Shapes: any; every tensor of one call has the same shape.
#pragma once

#include <cstddef>

#include "mixpeft/cuda/device_tensor.cuh"
#include "mixpeft/cuda/elementwise.cuh"
#include "mixpeft/cuda/kernel_utils.cuh"
#include "mixpeft/ops/activations.hpp"

namespace mixpeft::cuda {
namespace detail {

struct SiluForward {
  template <class A>
  __device__ void operator()(std::size_t, const A (&x)[1], A (&y)[1]) const {
    y[0] = x[0] * sigmoid(x[0]);
  }
};
struct SiluBackward {  // x, dy -> dx
  template <class A>
  __device__ void operator()(std::size_t, const A (&in)[2], A (&out)[1]) const {
    const A s = sigmoid(in[0]);
    out[0] = in[1] * s * (A(1) + in[0] * (A(1) - s));
  }
};
struct SwigluForward {  // g, u -> z
  template <class A>
  __device__ void operator()(std::size_t, const A (&in)[2], A (&out)[1]) const {
    out[0] = in[0] * sigmoid(in[0]) * in[1];
  }
};
struct SwigluBackward {  // g, u, dz -> dg, du
  template <class A>
  __device__ void operator()(std::size_t, const A (&in)[3], A (&out)[2]) const {
    const A g = in[0], u = in[1], dz = in[2], s = sigmoid(g);
    out[0] = dz * u * s * (A(1) + g * (A(1) - s));
    out[1] = dz * g * s;
  }
};
struct QuickGeluForward {
  template <class A>
  __device__ void operator()(std::size_t, const A (&x)[1], A (&y)[1]) const {
    y[0] = x[0] * sigmoid(A(quick_gelu_alpha) * x[0]);
  }
};
struct QuickGeluBackward {  // x, dy -> dx
  template <class A>
  __device__ void operator()(std::size_t, const A (&in)[2], A (&out)[1]) const {
    const A a = A(quick_gelu_alpha), s = sigmoid(a * in[0]);
    out[0] = in[1] * (s + a * in[0] * s * (A(1) - s));
  }
};

}  // namespace detail

template <class T>
void silu_forward(const DeviceTensor<T>& x, DeviceTensor<T>& y) {
  resize_to(y, shape_of(x));
  detail::map_elements<T, 1, 1>("silu_forward", x.size(), detail::SiluForward{}, {x.data()}, {y.data()});
}

template <class T>
void silu_backward(const DeviceTensor<T>& x, const DeviceTensor<T>& dy, DeviceTensor<T>& dx) {
  expect_same_shape("silu_backward", "dy", dy, "x", x);
  resize_to(dx, shape_of(x));
  detail::map_elements<T, 2, 1>("silu_backward", x.size(), detail::SiluBackward{}, {x.data(), dy.data()},
                                {dx.data()});
}

template <class T>
void swiglu_forward(const DeviceTensor<T>& g, const DeviceTensor<T>& u, DeviceTensor<T>& z) {
  expect_same_shape("swiglu_forward", "u", u, "g", g);
  resize_to(z, shape_of(g));
  detail::map_elements<T, 2, 1>("swiglu_forward", g.size(), detail::SwigluForward{}, {g.data(), u.data()},
                                {z.data()});
}

template <class T>
void swiglu_backward(const DeviceTensor<T>& g, const DeviceTensor<T>& u, const DeviceTensor<T>& dz,
                     DeviceTensor<T>& dg, DeviceTensor<T>& du) {
  expect_same_shape("swiglu_backward", "u", u, "g", g);
  expect_same_shape("swiglu_backward", "dz", dz, "g", g);
  resize_to(dg, shape_of(g));
  resize_to(du, shape_of(g));
  detail::map_elements<T, 3, 2>("swiglu_backward", g.size(), detail::SwigluBackward{},
                                {g.data(), u.data(), dz.data()}, {dg.data(), du.data()});
}

template <class T>
void quick_gelu_forward(const DeviceTensor<T>& x, DeviceTensor<T>& y) {
  resize_to(y, shape_of(x));
  detail::map_elements<T, 1, 1>("quick_gelu_forward", x.size(), detail::QuickGeluForward{}, {x.data()},
                                {y.data()});
}

template <class T>
void quick_gelu_backward(const DeviceTensor<T>& x, const DeviceTensor<T>& dy, DeviceTensor<T>& dx) {
  expect_same_shape("quick_gelu_backward", "dy", dy, "x", x);
  resize_to(dx, shape_of(x));
  detail::map_elements<T, 2, 1>("quick_gelu_backward", x.size(), detail::QuickGeluBackward{},
                                {x.data(), dy.data()}, {dx.data()});
}

}  // namespace mixpeft::cuda
