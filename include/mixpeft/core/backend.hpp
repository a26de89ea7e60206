// mixpeft/core/backend.hpp — backend tags.
//
// A layer is `template <class T, class Backend = Cpu>`; the backend decides the tensor type that
// stores its parameters and activations (`typename Backend::template tensor<T>`). Layers never touch
// tensor elements themselves: every computation is an op call made unqualified, so overload
// resolution picks the CPU op (found by ordinary lookup) or the CUDA op (found by argument-dependent
// lookup on the device tensor type in namespace mixpeft::cuda). A backend is thus a set of op overloads.
#pragma once

#include "mixpeft/core/tensor.hpp"

namespace mixpeft {

// The CPU backend: xtensor storage, Eigen GEMMs, OpenMP threads.
struct Cpu {
  template <class T>
  using tensor = Tensor<T>;
  static constexpr const char* name = "cpu";
};

}  // namespace mixpeft
