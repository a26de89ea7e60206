// mixpeft/layers/linear.hpp — a fully connected layer (torch.nn.Linear).
//
//   forward:   y[..., out] = x[..., in] W^T + b                 W: [out, in], b: [out] (optional)
//   backward:  dx = dy W                                          (written, always)
//              dW += dy^T x                                       (accumulated; only while W is trainable)
//              db += sum_rows dy                                  (accumulated; only while b is trainable)
// Cache: x, kept only while a parameter is trainable; a frozen layer's backward needs dy and W alone,
// so it costs exactly the GEMM dx = dy W.
// Init (nn.Linear): W kaiming_uniform(a = sqrt(5)), b linear_bias (U(-1/sqrt(in), 1/sqrt(in))).
// Parameter names (Hugging Face): "weight", "bias"; the bias is excluded from weight decay.
// Shapes: leading axes of x are rows (N = B * T for x [B, T, in]).
// Backends: device-generic. Every computation is an unqualified op call (linear_forward / linear_backward, the
// tensor-level gemm, assign, resize_to), so Linear<T, Cuda> runs on cuda::DeviceTensor unchanged; W and b are
// initialised on the host with the CPU layer's Rng draws and moved over with Backend::from_host.
#pragma once

#include <cmath>
#include <cstddef>
#include <string>

#include "mixpeft/core/backend.hpp"
#include "mixpeft/core/error.hpp"
#include "mixpeft/core/init.hpp"
#include "mixpeft/core/parameter.hpp"
#include "mixpeft/core/rng.hpp"
#include "mixpeft/ops/matmul.hpp"

namespace mixpeft {

template <class T, class Backend = Cpu>
class Linear {
 public:
  using Tensor = typename Backend::template tensor<T>;
  using HostTensor = ::mixpeft::Tensor<T>;

  struct Config {
    std::size_t in = 0;
    std::size_t out = 0;
    bool bias = true;
    bool trainable_weight = true;
    bool trainable_bias = true;
  };

  struct Cache {
    Tensor x;  // [..., in], only while the weight or the bias is trainable
  };

  Linear(const Config& config, Rng& rng) : config_(config) {
    require<ConfigError>(config.in > 0 && config.out > 0, "Linear: in and out must be > 0 (got in = ", config.in,
                         ", out = ", config.out, ")");
    HostTensor w = empty<T>({config.out, config.in});
    init::kaiming_uniform(w, rng);
    weight_ = Parameter<T, Backend>("weight", Backend::template from_host<T>(std::move(w)), config.trainable_weight);
    if (config.bias) {
      HostTensor b = empty<T>({config.out});
      init::linear_bias(b, rng, config.in);
      bias_ = Parameter<T, Backend>("bias", Backend::template from_host<T>(std::move(b)), config.trainable_bias,
                                    /*decay=*/false);
    }
  }

  Tensor forward(const Tensor& x, Cache& cache) const {
    expect_width("Linear", "x", x, config_.in);
    Tensor y;
    linear_forward(x, weight_.value, config_.bias ? &bias_.value : nullptr, y);
    if (needs_input()) assign(cache.x, x);
    return y;
  }

  Tensor backward(Cache& cache, const Tensor& dy) {
    expect_width("Linear", "dy", dy, config_.out);
    Tensor dx;
    if (needs_input()) {
      linear_backward(cache.x, weight_.value, dy, &dx, weight_.trainable ? &weight_.grad : nullptr,
                      config_.bias && bias_.trainable ? &bias_.grad : nullptr);
    } else {
      resize_to(dx, with_last(shape_of(dy), config_.in));
      gemm(Trans::No, Trans::No, rows(dy), config_.in, config_.out, T(1), dy, weight_.value, T(0), dx);
    }
    return dx;
  }

  void collect_parameters(ParameterList<T, Backend>& list, const std::string& prefix) {
    add_parameter(list, prefix, weight_);
    if (config_.bias) add_parameter(list, prefix, bias_);
  }

  // Linear has no dropout or noise; present so every layer can be switched alike.
  void set_training(bool) {}

  const Config& config() const { return config_; }
  bool has_bias() const { return config_.bias; }
  Parameter<T, Backend>& weight() { return weight_; }
  const Parameter<T, Backend>& weight() const { return weight_; }
  // Only meaningful when has_bias().
  Parameter<T, Backend>& bias() { return bias_; }
  const Parameter<T, Backend>& bias() const { return bias_; }

 private:
  bool needs_input() const { return weight_.trainable || (config_.bias && bias_.trainable); }

  Config config_;
  Parameter<T, Backend> weight_;
  Parameter<T, Backend> bias_;
};

}  // namespace mixpeft
