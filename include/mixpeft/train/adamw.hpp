// mixpeft/train/adamw.hpp — AdamW with decoupled weight decay, as torch.optim.AdamW (amsgrad off).
//
// For every trainable parameter p with gradient g, at its step t = 1, 2, ...:
//   p <- p * (1 - lr * wd)                 only when p.weight_decay is set (off for biases, norms, ...)
//   m <- beta1 * m + (1 - beta1) * g
//   v <- beta2 * v + (1 - beta2) * g^2
//   p <- p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// Scalars (bias corrections, step size) are computed in double, element updates in T.
// State (m, v, t) exists only for trainable parameters, is created at their first step and is keyed
// by parameter name; frozen parameters are never read or written. The learning rate can change every
// step (step(lr), for schedules); gradients are left as they are (zero them with zero_grad()).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <utility>

#include "mixpeft/core/error.hpp"
#include "mixpeft/core/parallel.hpp"
#include "mixpeft/core/parameter.hpp"
#include "mixpeft/core/tensor.hpp"

namespace mixpeft {

struct AdamWConfig {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;  // torch's default; LaVIN uses 0.02

  void validate() const {
    require<ConfigError>(std::isfinite(lr) && lr >= 0, "AdamW: lr must be finite and >= 0 (got ", lr, ")");
    require<ConfigError>(beta1 >= 0 && beta1 < 1, "AdamW: beta1 must be in [0, 1) (got ", beta1, ")");
    require<ConfigError>(beta2 >= 0 && beta2 < 1, "AdamW: beta2 must be in [0, 1) (got ", beta2, ")");
    require<ConfigError>(std::isfinite(eps) && eps >= 0, "AdamW: eps must be finite and >= 0 (got ", eps, ")");
    require<ConfigError>(std::isfinite(weight_decay) && weight_decay >= 0,
                         "AdamW: weight_decay must be finite and >= 0 (got ", weight_decay, ")");
  }
};

template <class T>
class AdamW {
 public:
  struct State {
    Tensor<T> m;             // first moment, shape of the parameter
    Tensor<T> v;             // second moment
    std::int64_t step = 0;   // steps taken by this parameter
  };

  explicit AdamW(ParameterList<T> params, AdamWConfig config = {}) : params_(std::move(params)) {
    set_config(config);
    std::set<std::string> seen;
    for (const auto& ref : params_)
      require<ConfigError>(seen.insert(ref.name).second, "AdamW: duplicate parameter name \"", ref.name, "\"");
  }

  const AdamWConfig& config() const { return config_; }
  void set_config(const AdamWConfig& config) {
    config.validate();
    config_ = config;
  }
  void set_lr(double lr) {
    AdamWConfig c = config_;
    c.lr = lr;
    set_config(c);
  }

  const ParameterList<T>& parameters() const { return params_; }
  std::map<std::string, State>& state() { return state_; }
  const std::map<std::string, State>& state() const { return state_; }

  void zero_grad() { zero_grads(params_); }

  void step(double lr) {
    set_lr(lr);
    step();
  }

  void step() {
    for (const auto& ref : params_) {
      Parameter<T>& p = *ref.param;
      if (!p.trainable) continue;
      expect_same_shape("AdamW", ref.name + ".grad", p.grad, ref.name, p.value);
      State& s = state_for(ref.name, p);
      update(p, s);
    }
  }

 private:
  State& state_for(const std::string& name, const Parameter<T>& p) {
    auto [it, created] = state_.try_emplace(name);
    State& s = it->second;
    if (created) {
      s.m = zeros<T>(shape_of(p.value));
      s.v = zeros<T>(shape_of(p.value));
    }
    expect_same_shape("AdamW", "state of " + name, s.m, name, p.value);
    expect_same_shape("AdamW", "state of " + name, s.v, name, p.value);
    return s;
  }

  void update(Parameter<T>& p, State& s) {
    ++s.step;
    const double bias1 = 1.0 - std::pow(config_.beta1, double(s.step));
    const double bias2 = 1.0 - std::pow(config_.beta2, double(s.step));
    const T decay = p.weight_decay ? T(1.0 - config_.lr * config_.weight_decay) : T(1);
    const T step_size = T(config_.lr / bias1), bias2_sqrt = T(std::sqrt(bias2)), eps = T(config_.eps);
    const T b1 = T(config_.beta1), b2 = T(config_.beta2), c1 = T(1.0 - config_.beta1), c2 = T(1.0 - config_.beta2);
    T* w = p.value.data();
    T* m = s.m.data();
    T* v = s.v.data();
    const T* g = p.grad.data();
    parallel_ranges(p.value.size(), 8, [&](std::size_t begin, std::size_t end) {
      for (std::size_t i = begin; i < end; ++i) {
        m[i] = b1 * m[i] + c1 * g[i];
        v[i] = b2 * v[i] + c2 * g[i] * g[i];
        w[i] = w[i] * decay - step_size * m[i] / (std::sqrt(v[i]) / bias2_sqrt + eps);
      }
    });
  }

  ParameterList<T> params_;
  AdamWConfig config_;
  std::map<std::string, State> state_;
};

}  // namespace mixpeft
