// mixpeft/core/backend.hpp — backend tags.
//
// A layer is `template <class T, class Backend = Cpu>`; the backend decides the tensor type that
// stores its parameters and activations (`typename Backend::template tensor<T>`). Layers never touch
// tensor elements themselves: every computation is an op call made unqualified, so overload
// resolution picks the CPU op (found by ordinary lookup) or the CUDA op (found by argument-dependent
// lookup on the device tensor type in namespace mixpeft::cuda). A backend is thus a set of op overloads.
//
// Parameters are created on the host and then handed to the backend, so a layer draws the same Rng values on
// every backend and `Layer<T, Cuda>` built from Rng(s) holds exactly the weights of `Layer<T, Cpu>` built from
// Rng(s):
//   Backend::template from_host<T>(Tensor<T> host)   the backend's tensor with host's shape and values
//                                                    (Cpu: host itself, moved; Cuda: an upload)
//   Backend::template zeros<T>(shape)                a zero tensor of the backend's type
#pragma once

#include "mixpeft/core/tensor.hpp"

namespace mixpeft {

// The CPU backend: xtensor storage, Eigen GEMMs, OpenMP threads.
struct Cpu {
  template <class T>
  using tensor = Tensor<T>;
  static constexpr const char* name = "cpu";

  template <class T>
  static Tensor<T> from_host(Tensor<T> host) {
    return host;  // moved out: no copy
  }
  template <class T>
  static Tensor<T> zeros(const Shape& shape) {
    return mixpeft::zeros<T>(shape);
  }
};

}  // namespace mixpeft
