// mixpeft/core/parameter.hpp — named parameters with gradients and a trainable flag.
//
// A Parameter owns its value and, while trainable, a gradient of the same shape. Frozen parameters
// have an empty gradient and layers skip all gradient work for them (with a frozen backbone, backward
// through a frozen layer computes only the input gradient). Backward passes accumulate (+=) into
// `grad`; the trainer zeroes gradients between optimizer steps.
//
// Layers expose their parameters with collect_parameters(list, prefix), which appends
// ParameterRefs whose names are dotted paths ("layers.0.mlp.gate_proj.lora_A.weight").
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "mixpeft/core/backend.hpp"
#include "mixpeft/core/tensor.hpp"

namespace mixpeft {

template <class T>
void set_zero(Tensor<T>& t) {
  t.fill(T(0));
}

template <class T, class Backend = Cpu>
struct Parameter {
  using tensor_type = typename Backend::template tensor<T>;

  std::string name;          // local name within its layer ("weight", "lora_A.weight", ...)
  tensor_type value;
  tensor_type grad;          // same shape as value when trainable, empty when frozen
  bool trainable = false;
  bool weight_decay = true;  // AdamW applies decay only where this is set (models turn it off for biases, norms and the token, position and class embeddings)

  Parameter() = default;
  Parameter(std::string n, tensor_type v, bool train, bool decay = true)
      : name(std::move(n)), value(std::move(v)), weight_decay(decay) {
    set_trainable(train);
  }

  void set_trainable(bool on) {
    trainable = on;
    if (on) {
      resize_to(grad, shape_of(value));
      set_zero(grad);
    } else {
      grad = tensor_type();
      resize_to(grad, Shape{0});  // a default tensor is a rank-0 scalar of size 1; frozen means size 0
    }
  }
  void zero_grad() {
    if (trainable) set_zero(grad);
  }
  std::size_t numel() const { return value.size(); }
};

template <class T, class Backend = Cpu>
struct ParameterRef {
  std::string name;  // full dotted path
  Parameter<T, Backend>* param;
};

template <class T, class Backend = Cpu>
using ParameterList = std::vector<ParameterRef<T, Backend>>;

inline std::string join_name(const std::string& prefix, const std::string& name) {
  return prefix.empty() ? name : prefix + "." + name;
}

template <class T, class Backend>
void add_parameter(ParameterList<T, Backend>& list, const std::string& prefix, Parameter<T, Backend>& p) {
  list.push_back({join_name(prefix, p.name), &p});
}

template <class T, class Backend>
std::size_t count_parameters(const ParameterList<T, Backend>& list, bool trainable_only) {
  std::size_t n = 0;
  for (const auto& ref : list)
    if (!trainable_only || ref.param->trainable) n += ref.param->numel();
  return n;
}

template <class T, class Backend>
void zero_grads(const ParameterList<T, Backend>& list) {
  for (const auto& ref : list) ref.param->zero_grad();
}

// Collects the parameters of anything with collect_parameters(list, prefix).
template <class T, class Backend = Cpu, class Module>
ParameterList<T, Backend> parameters_of(Module& owner, const std::string& prefix = "") {
  ParameterList<T, Backend> list;
  owner.collect_parameters(list, prefix);
  return list;
}

}  // namespace mixpeft
