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
// A layer draws its weights on the host in accumulator_t<T> (T itself for float and double; float for the CUDA
// backend's 16-bit types, which specialise `accumulator`), so from_host may also round them once to T.
#pragma once

#include "mixpeft/core/tensor.hpp"

namespace mixpeft {

// The arithmetic type of a storage type T.
template <class T>
struct accumulator {
  using type = T;
};
template <class T>
using accumulator_t = typename accumulator<T>::type;

template <class T>
struct AttentionCache;  // ops/attention.hpp
template <class T>
struct CrossEntropyCache;  // ops/cross_entropy.hpp
template <class T>
struct RopeTable;  // ops/rope.hpp
template <class T>
class AdamW;  // train/adamw.hpp

// The CPU backend: xtensor storage, Eigen GEMMs, OpenMP threads. The op-specific host types a layer names
// through its backend (the CUDA backend maps them to device versions):
//   attention_cache<T>, cross_entropy_cache<T>, rope_table<T>, and the optimizer optimizer<T> (AdamW).
struct Cpu {
  template <class T>
  using tensor = Tensor<T>;
  template <class T>
  using attention_cache = AttentionCache<T>;
  template <class T>
  using cross_entropy_cache = CrossEntropyCache<T>;
  template <class T>
  using rope_table = RopeTable<T>;
  template <class T>
  using optimizer = AdamW<T>;
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
