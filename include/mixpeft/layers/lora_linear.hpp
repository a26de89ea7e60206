// mixpeft/layers/lora_linear.hpp — a frozen linear layer with LoRA adapters (PEFT semantics).
//
//   forward:   x_d = dropout(x)                                   (identity in eval or when p = 0)
//              t   = x_d A^T                                      // [N, r]
//              y   = x W^T + b + s * t B^T                        s = alpha / r  (rsLoRA: alpha / sqrt(r))
//   backward:  g   = dy B                                         // [N, r]
//              dB += s * dy^T t = (s t^T dy)^T                    (accumulated; only while B is trainable)
//              dA += s * g^T x_d                                  (accumulated; only while A is trainable)
//              dx  = dropout_backward(s * g A) + dy W             (written)
// Every product touching the adapter goes through the rank-r intermediates t and g, so the adapter adds
// O(N r (in + out)) work to the base layer's O(N in out). The base W [out, in] and b [out] are frozen and get
// no gradient work (if a caller makes them trainable, dW += dy^T x and db += sum_rows dy are accumulated).
// Cache: t, and x_d with its dropout mask (or x itself when dropout is off and A is trainable).
//
// Adapters: several named adapters may live on one layer (std::map by name); forward and backward use the
// active one. Init: A [r, in] kaiming_uniform(a = sqrt(5)), B [out, r] zeros, so a fresh adapter adds nothing.
// Merging: merge() folds the active adapter into the base (W += s B A) and the forward then skips the branch;
// unmerge() subtracts it again. A merged layer is for inference only: forward in training mode and backward
// throw mixpeft::Error.
// Parameter names: the base keeps the Hugging Face names "weight" and "bias" (so the pretrained checkpoint
// loads unchanged); the adapter named "default" uses PEFT's saved names "lora_A.weight" and "lora_B.weight";
// any other adapter n uses PEFT's in-model names "lora_A.n.weight" and "lora_B.n.weight".
// Shapes: x [..., in] (leading axes are rows, N in total), y [..., out], r the adapter rank.
// Backends: device-generic. Every computation is an unqualified op call (linear_forward / linear_backward, the
// tensor-level gemm, dropout_forward / dropout_backward, add_transposed, assign, resize_to), so
// LoRALinear<T, Cuda> runs on cuda::DeviceTensor unchanged. W, b and every A are initialised on the host with the
// CPU layer's Rng draws and moved over with Backend::from_host, B starts as Backend::zeros, and the dropout Rng
// stays on the host (the CUDA dropout draws the CPU op's masks for the same seed), so LoRALinear<T, Cuda> and
// LoRALinear<T, Cpu> built from Rng(s) hold the same weights and drop the same inputs.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>

#include "mixpeft/core/backend.hpp"
#include "mixpeft/core/error.hpp"
#include "mixpeft/core/init.hpp"
#include "mixpeft/core/parameter.hpp"
#include "mixpeft/core/rng.hpp"
#include "mixpeft/ops/dropout.hpp"
#include "mixpeft/ops/elementwise.hpp"
#include "mixpeft/ops/matmul.hpp"

namespace mixpeft {

template <class T, class Backend = Cpu>
class LoRALinear {
 public:
  using Tensor = typename Backend::template tensor<T>;
  using HostTensor = ::mixpeft::Tensor<T>;

  struct AdapterConfig {
    std::size_t rank = 8;
    double alpha = 8.0;
    double dropout = 0.05;
    bool use_rslora = false;  // s = alpha / sqrt(r) instead of alpha / r
  };

  struct Config {
    std::size_t in = 0;
    std::size_t out = 0;
    bool bias = true;
    AdapterConfig lora{};
    std::string adapter = "default";  // name of the adapter created with the layer (it becomes active)
  };

  struct Cache {
    Tensor x;     // [..., in]  the input, when backward needs it and dropout is off
    Tensor x_d;   // [..., in]  dropout(x), when dropout is on
    Tensor mask;  // [..., in]  dropout mask; empty when dropout is off
    Tensor t;     // [..., r]   x_d A^T
    Tensor g;     // [N, r]     backward workspace: dy B
    Tensor dx_d;  // [..., in]  backward workspace: s g A before the dropout mask
    Tensor dbt;   // [r, out]   backward workspace: dB^T
  };

  LoRALinear(const Config& config, Rng& rng) : config_(config) {
    require<ConfigError>(config.in > 0 && config.out > 0, "LoRALinear: in and out must be > 0 (got in = ",
                         config.in, ", out = ", config.out, ")");
    HostTensor w = empty<T>({config.out, config.in});
    init::kaiming_uniform(w, rng);
    weight_ = Parameter<T, Backend>("weight", Backend::template from_host<T>(std::move(w)), false);
    if (config.bias) {
      HostTensor b = empty<T>({config.out});
      init::linear_bias(b, rng, config.in);
      bias_ = Parameter<T, Backend>("bias", Backend::template from_host<T>(std::move(b)), false, /*decay=*/false);
    }
    add_adapter(config.adapter, config.lora, rng);
    active_ = config.adapter;
    dropout_rng_ = rng.split();
  }

  // Adds a trainable adapter with freshly initialised A and zero B; the active adapter is unchanged.
  void add_adapter(const std::string& name, const AdapterConfig& ac, Rng& rng) {
    require<ConfigError>(!name.empty(), "LoRALinear: adapter name must not be empty");
    require<ConfigError>(!adapters_.contains(name), "LoRALinear: adapter '", name, "' already exists");
    require<ConfigError>(ac.rank > 0, "LoRALinear: rank r must be > 0 (got ", ac.rank, ")");
    require<ConfigError>(std::isfinite(ac.alpha) && ac.alpha > 0, "LoRALinear: alpha must be > 0 (got ", ac.alpha,
                         ")");
    require<ConfigError>(ac.dropout >= 0 && ac.dropout < 1, "LoRALinear: dropout must be in [0, 1) (got ",
                         ac.dropout, ")");
    const std::string infix = name == "default" ? "" : name + ".";
    HostTensor a = empty<T>({ac.rank, config_.in});
    init::kaiming_uniform(a, rng);
    Lora lora{ac,
              ac.use_rslora ? ac.alpha / std::sqrt(double(ac.rank)) : ac.alpha / double(ac.rank),
              Parameter<T, Backend>("lora_A." + infix + "weight", Backend::template from_host<T>(std::move(a)), true),
              Parameter<T, Backend>("lora_B." + infix + "weight",
                                    Backend::template zeros<T>(Shape{config_.out, ac.rank}), true)};
    adapters_.emplace(name, std::move(lora));
  }

  void set_active_adapter(const std::string& name) {
    require<ConfigError>(adapters_.contains(name), "LoRALinear: no adapter named '", name, "'");
    require<Error>(!merged_, "LoRALinear: cannot switch adapters while '", active_, "' is merged; unmerge() first");
    active_ = name;
  }
  const std::string& active_adapter() const { return active_; }

  // W += s B A for the active adapter.
  void merge() {
    require<Error>(!merged_, "LoRALinear: adapter '", active_, "' is already merged");
    fold(T(1));
    merged_ = true;
  }
  // W -= s B A: restores the base weight (up to rounding).
  void unmerge() {
    require<Error>(merged_, "LoRALinear: unmerge() called but no adapter is merged");
    fold(T(-1));
    merged_ = false;
  }
  bool merged() const { return merged_; }

  Tensor forward(const Tensor& x, Cache& cache) {
    expect_width("LoRALinear", "x", x, config_.in);
    require<Error>(!(merged_ && training_), "LoRALinear: adapter '", active_,
                   "' is merged, which is for inference only; call set_training(false) or unmerge()");
    Tensor y;
    linear_forward(x, weight_.value, config_.bias ? &bias_.value : nullptr, y);
    if (merged_) return y;

    Lora& lora = active();
    const bool drop = training_ && lora.config.dropout > 0;
    if (drop) {
      dropout_forward(x, lora.config.dropout, true, dropout_rng_, cache.x_d, cache.mask);
    } else {
      resize_to(cache.mask, Shape{0});
    }
    if ((!drop && lora.A.trainable) || base_trainable()) assign(cache.x, x);
    const Tensor& x_d = drop ? cache.x_d : x;
    linear_forward(x_d, lora.A.value, nullptr, cache.t);
    gemm(Trans::No, Trans::Yes, rows(x), config_.out, lora.config.rank, T(lora.scale), cache.t, lora.B.value, T(1),
         y);
    return y;
  }

  Tensor backward(Cache& cache, const Tensor& dy) {
    require<Error>(!merged_, "LoRALinear: cannot train while adapter '", active_, "' is merged; unmerge() first");
    expect_width("LoRALinear", "dy", dy, config_.out);
    Lora& lora = active();
    const std::size_t n = rows(dy), r = lora.config.rank, in = config_.in, out = config_.out;
    require<ShapeError>(cache.t.dimension() >= 1 && rows(cache.t) == n && cols(cache.t) == r,
                        "LoRALinear: dy has shape ", shape_string(dy.shape()),
                        " but the cached forward has shape ", shape_string(cache.t.shape()), " (rank ", r, ")");
    const T s = T(lora.scale);
    const bool drop = cache.mask.size() > 0;

    resize_to(cache.g, Shape{n, r});
    gemm(Trans::No, Trans::No, n, r, out, T(1), dy, lora.B.value, T(0), cache.g);
    if (lora.B.trainable) {
      // dB^T = s t^T dy first: a reduction over rows with both operands read row-major, about twice as fast as
      // dy^T t straight into dB [out, r]; add_transposed then folds it into dB.
      resize_to(cache.dbt, Shape{r, out});
      gemm(Trans::Yes, Trans::No, r, out, n, s, cache.t, dy, T(0), cache.dbt);
      add_transposed(cache.dbt, T(1), lora.B.grad);
    }
    if (lora.A.trainable)
      gemm(Trans::Yes, Trans::No, r, in, n, s, cache.g, drop ? cache.x_d : cache.x, T(1), lora.A.grad);

    Tensor dx;
    resize_to(dx, with_last(shape_of(dy), in));
    if (drop) {
      resize_to(cache.dx_d, shape_of(dx));
      gemm(Trans::No, Trans::No, n, in, r, s, cache.g, lora.A.value, T(0), cache.dx_d);
      dropout_backward(cache.dx_d, cache.mask, dx);
      gemm(Trans::No, Trans::No, n, in, out, T(1), dy, weight_.value, T(1), dx);
    } else {
      gemm(Trans::No, Trans::No, n, in, out, T(1), dy, weight_.value, T(0), dx);
      gemm(Trans::No, Trans::No, n, in, r, s, cache.g, lora.A.value, T(1), dx);
    }
    if (base_trainable())
      linear_backward(cache.x, weight_.value, dy, nullptr, weight_.trainable ? &weight_.grad : nullptr,
                      config_.bias && bias_.trainable ? &bias_.grad : nullptr);
    return dx;
  }

  void collect_parameters(ParameterList<T, Backend>& list, const std::string& prefix) {
    add_parameter(list, prefix, weight_);
    if (config_.bias) add_parameter(list, prefix, bias_);
    for (auto& [name, lora] : adapters_) {
      add_parameter(list, prefix, lora.A);
      add_parameter(list, prefix, lora.B);
    }
  }
  void collect_rngs(NamedRngs& list, const std::string& prefix) {
    list.emplace_back(join_name(prefix, "dropout_rng"), &dropout_rng_);
  }

  void set_training(bool on) { training_ = on; }
  bool training() const { return training_; }

  const Config& config() const { return config_; }
  double scale() const { return adapters_.at(active_).scale; }
  Parameter<T, Backend>& weight() { return weight_; }
  Parameter<T, Backend>& bias() { return bias_; }  // only meaningful when config().bias
  Parameter<T, Backend>& lora_A() { return active().A; }
  Parameter<T, Backend>& lora_B() { return active().B; }
  Parameter<T, Backend>& lora_A(const std::string& name) { return adapter(name).A; }
  Parameter<T, Backend>& lora_B(const std::string& name) { return adapter(name).B; }

 private:
  struct Lora {
    AdapterConfig config;
    double scale;
    Parameter<T, Backend> A;  // [r, in]
    Parameter<T, Backend> B;  // [out, r]
  };

  Lora& active() { return adapters_.at(active_); }
  Lora& adapter(const std::string& name) {
    auto it = adapters_.find(name);
    require<ConfigError>(it != adapters_.end(), "LoRALinear: no adapter named '", name, "'");
    return it->second;
  }
  bool base_trainable() const { return weight_.trainable || (config_.bias && bias_.trainable); }

  // W += sign * s * B A
  void fold(T sign) {
    Lora& lora = active();
    gemm(Trans::No, Trans::No, config_.out, config_.in, lora.config.rank, sign * T(lora.scale), lora.B.value,
         lora.A.value, T(1), weight_.value);
  }

  Config config_;
  Parameter<T, Backend> weight_;  // [out, in], frozen
  Parameter<T, Backend> bias_;    // [out], frozen
  std::map<std::string, Lora> adapters_;
  std::string active_;
  bool merged_ = false;
  bool training_ = true;
  Rng dropout_rng_;
};

}  // namespace mixpeft
