// mixpeft/models/self_attention.hpp — multi-head self-attention sub-layer shared by the LLaMA and ViT blocks.
//
//   forward:   q = x Wq^T (+ bq),  k = x Wk^T (+ bk),  v = x Wv^T (+ bv)     each projection a Linear or, when
//                                                                       targeted, a LoRALinear (W + s B A)
//              q, k = RoPE(q), RoPE(k)              (LLaMA only; positions 0 .. T-1, or L .. L+T-1 with a KV cache)
//              o = Attention(q, k, v; mask)                              (ops/attention.hpp)
//              y = o Wo^T (+ bo)
//   backward:  do = dy Wo   (o_proj backward);  dq, dk, dv = attention_backward(do)
//              dq, dk = RoPE^-1(dq), RoPE^-1(dk)
//              dx = q_proj^T(dq) + k_proj^T(dk) + v_proj^T(dv)          (written)
//   Parameter gradients accumulate inside the projections; frozen base weights get no work.
// Cache: each projection's cache, the rotated q, k, v and the attention probabilities.
// KV cache (inference): the rotated keys and values of every token seen so far; forward_cached appends the new
// tokens' keys and values (a concatenation, O(L) copies per step) and lets the new queries attend to all of them
// (no backward).
// Parameter names (Hugging Face): "<q>.weight" ... with the projection names given in the Config
// (LLaMA: q_proj, k_proj, v_proj, o_proj; CLIP: q_proj, k_proj, v_proj, out_proj).
// Shapes: x, y [B, T, D]; D = H * dh; KV cache k, v [B, L, D] (L tokens cached).
// Backends: device-generic (the projections, rope_*, attention_*, append_tokens and add_to are op calls; the rope
// table and the attention cache are the backend's types: Backend::rope_table<T>, Backend::attention_cache<T>).
#pragma once

#include <array>
#include <cstddef>
#include <memory>
#include <string>
#include <variant>
#include <vector>

#include "mixpeft/core/backend.hpp"
#include "mixpeft/core/error.hpp"
#include "mixpeft/core/parameter.hpp"
#include "mixpeft/core/rng.hpp"
#include "mixpeft/layers/linear.hpp"
#include "mixpeft/layers/lora_linear.hpp"
#include "mixpeft/ops/attention.hpp"
#include "mixpeft/ops/elementwise.hpp"
#include "mixpeft/ops/rope.hpp"

namespace mixpeft {

// Which attention projections carry a LoRA adapter.
struct LoRATargets {
  bool q = false, k = false, v = false, o = false;
  bool any() const { return q || k || v || o; }
};

// A projection that is a plain Linear or a LoRALinear, chosen at construction.
template <class T, class Backend = Cpu>
class Projection {
 public:
  using Tensor = typename Backend::template tensor<T>;
  using Plain = Linear<T, Backend>;
  using LoRA = LoRALinear<T, Backend>;

  struct Cache {
    typename Plain::Cache plain;
    typename LoRA::Cache lora;
  };

  // lora == nullptr: a Linear. trainable_base: whether W (and b) get gradients.
  Projection(std::size_t in, std::size_t out, bool bias, const typename LoRA::AdapterConfig* lora,
             bool trainable_base, Rng& rng)
      : layer_(make(in, out, bias, lora, trainable_base, rng)) {}

  Tensor forward(const Tensor& x, Cache& cache) {
    if (auto* p = std::get_if<Plain>(&layer_)) return p->forward(x, cache.plain);
    return std::get<LoRA>(layer_).forward(x, cache.lora);
  }
  Tensor backward(Cache& cache, const Tensor& dy) {
    if (auto* p = std::get_if<Plain>(&layer_)) return p->backward(cache.plain, dy);
    return std::get<LoRA>(layer_).backward(cache.lora, dy);
  }

  void collect_parameters(ParameterList<T, Backend>& list, const std::string& prefix) {
    std::visit([&](auto& layer) { layer.collect_parameters(list, prefix); }, layer_);
  }
  void collect_rngs(NamedRngs& list, const std::string& prefix) {
    if (auto* l = std::get_if<LoRA>(&layer_)) l->collect_rngs(list, prefix);
  }
  // The pretrained weight and bias only (what a Hugging Face checkpoint holds).
  void collect_base_parameters(ParameterList<T, Backend>& list, const std::string& prefix) {
    std::visit(
        [&](auto& layer) {
          add_parameter(list, prefix, layer.weight());
          if (layer.config().bias) add_parameter(list, prefix, layer.bias());
        },
        layer_);
  }
  void set_training(bool on) {
    std::visit([&](auto& layer) { layer.set_training(on); }, layer_);
  }

  bool has_lora() const { return std::holds_alternative<LoRA>(layer_); }
  LoRA& lora() { return std::get<LoRA>(layer_); }  // only when has_lora()
  Parameter<T, Backend>& weight() {
    return std::visit([](auto& layer) -> Parameter<T, Backend>& { return layer.weight(); }, layer_);
  }

 private:
  static std::variant<Plain, LoRA> make(std::size_t in, std::size_t out, bool bias,
                                        const typename LoRA::AdapterConfig* lora, bool trainable_base, Rng& rng) {
    if (!lora)
      return Plain({.in = in, .out = out, .bias = bias, .trainable_weight = trainable_base,
                    .trainable_bias = trainable_base},
                   rng);
    LoRA layer({.in = in, .out = out, .bias = bias, .lora = *lora}, rng);
    layer.weight().set_trainable(trainable_base);
    if (bias) layer.bias().set_trainable(trainable_base);
    return layer;
  }

  std::variant<Plain, LoRA> layer_;
};

template <class T, class Backend = Cpu>
class SelfAttention {
 public:
  using Tensor = typename Backend::template tensor<T>;
  using AdapterConfig = typename LoRALinear<T, Backend>::AdapterConfig;
  using Rope = typename Backend::template rope_table<T>;

  struct Config {
    std::size_t dim = 0;
    std::size_t heads = 0;
    bool bias = false;
    std::array<const char*, 4> names{"q_proj", "k_proj", "v_proj", "o_proj"};
    LoRATargets lora_targets{};
    AdapterConfig lora{};
    bool trainable_base = false;
  };

  struct Cache {
    std::array<typename Projection<T, Backend>::Cache, 4> proj;  // q, k, v, o
    Tensor q, k, v, o;                                             // [B, T, D] (q, k rotated)
    typename Backend::template attention_cache<T> attention;
    Tensor dq, dk, dv;                                             // backward workspace
  };

  struct KVCache {
    Tensor k, v;  // [B, L, D], keys rotated
    std::size_t length() const { return k.dimension() == 3 ? k.shape()[1] : 0; }
  };

  // rope: the rotary table (LLaMA), or null for none (ViT).
  SelfAttention(const Config& config, std::shared_ptr<const Rope> rope, Rng& rng)
      : config_(validated(config)), rope_(std::move(rope)) {
    require<ConfigError>(!rope_ || rope_->head_dim == config.dim / config.heads, "SelfAttention: the rope table's ",
                         "head_dim ", rope_ ? rope_->head_dim : 0, " differs from dim / heads = ",
                         config.dim / config.heads);
    const bool targeted[4] = {config.lora_targets.q, config.lora_targets.k, config.lora_targets.v,
                              config.lora_targets.o};
    proj_.reserve(4);
    for (std::size_t i = 0; i < 4; ++i)
      proj_.emplace_back(config.dim, config.dim, config.bias, targeted[i] ? &config.lora : nullptr,
                       config.trainable_base, rng);
  }

  Tensor forward(const Tensor& x, const AttentionMask& mask, Cache& cache) {
    expect_shape("SelfAttention", "x", x, {any_extent, any_extent, config_.dim});
    cache.q = proj(0).forward(x, cache.proj[0]);
    cache.k = proj(1).forward(x, cache.proj[1]);
    cache.v = proj(2).forward(x, cache.proj[2]);
    if (rope_) {
      rope_forward(cache.q, config_.heads, *rope_, 0, cache.q);
      rope_forward(cache.k, config_.heads, *rope_, 0, cache.k);
    }
    attention_forward(cache.q, cache.k, cache.v, config_.heads, mask, cache.o, cache.attention);
    return proj(3).forward(cache.o, cache.proj[3]);
  }

  Tensor backward(Cache& cache, const Tensor& dy) {
    expect_same_shape("SelfAttention::backward", "dy", dy, "the forward output", cache.q);
    const Tensor d_o = proj(3).backward(cache.proj[3], dy);
    attention_backward(cache.q, cache.k, cache.v, cache.attention, d_o, cache.dq, cache.dk, cache.dv);
    if (rope_) {
      rope_backward(cache.dq, config_.heads, *rope_, 0, cache.dq);
      rope_backward(cache.dk, config_.heads, *rope_, 0, cache.dk);
    }
    Tensor dx = proj(0).backward(cache.proj[0], cache.dq);
    add_to(dx, proj(1).backward(cache.proj[1], cache.dk));
    add_to(dx, proj(2).backward(cache.proj[2], cache.dv));
    return dx;
  }

  // Inference with a KV cache: x [B, t, D] holds the tokens at positions L .. L + t - 1 (L = kv.length()).
  Tensor forward_cached(const Tensor& x, const AttentionMask& mask, KVCache& kv) {
    expect_shape("SelfAttention::forward_cached", "x", x, {any_extent, any_extent, config_.dim});
    require<ShapeError>(kv.length() == 0 || kv.k.shape()[0] == x.shape()[0], "SelfAttention::forward_cached: x has ",
                        "shape ", shape_string(x.shape()), " but the KV cache holds ", shape_string(kv.k.shape()));
    Cache scratch;
    const std::size_t offset = kv.length();
    Tensor q = proj(0).forward(x, scratch.proj[0]);
    Tensor k = proj(1).forward(x, scratch.proj[1]);
    Tensor v = proj(2).forward(x, scratch.proj[2]);
    if (rope_) {
      rope_forward(q, config_.heads, *rope_, offset, q);
      rope_forward(k, config_.heads, *rope_, offset, k);
    }
    if (offset == 0) {
      kv.k = std::move(k);
      kv.v = std::move(v);
    } else {
      append_tokens(kv.k, k);
      append_tokens(kv.v, v);
    }
    attention_forward(q, kv.k, kv.v, config_.heads, mask, scratch.o, scratch.attention);
    return proj(3).forward(scratch.o, scratch.proj[3]);
  }

  void collect_parameters(ParameterList<T, Backend>& list, const std::string& prefix) {
    for (std::size_t i = 0; i < 4; ++i) proj(i).collect_parameters(list, join_name(prefix, config_.names[i]));
  }
  void collect_rngs(NamedRngs& list, const std::string& prefix) {
    for (std::size_t i = 0; i < 4; ++i) proj(i).collect_rngs(list, join_name(prefix, config_.names[i]));
  }
  void collect_base_parameters(ParameterList<T, Backend>& list, const std::string& prefix) {
    for (std::size_t i = 0; i < 4; ++i) proj(i).collect_base_parameters(list, join_name(prefix, config_.names[i]));
  }
  void set_training(bool on) {
    for (std::size_t i = 0; i < 4; ++i) proj(i).set_training(on);
  }

  const Config& config() const { return config_; }
  // 0: q, 1: k, 2: v, 3: o.
  Projection<T, Backend>& projection(std::size_t i) { return proj(i); }

 private:
  static const Config& validated(const Config& c) {
    require<ConfigError>(c.dim > 0 && c.heads > 0 && c.dim % c.heads == 0, "SelfAttention: heads (", c.heads,
                         ") must be > 0 and divide dim (", c.dim, ")");
    return c;
  }
  Projection<T, Backend>& proj(std::size_t i) { return proj_[i]; }

  Config config_;
  std::shared_ptr<const Rope> rope_;
  std::vector<Projection<T, Backend>> proj_;  // q, k, v, o
};

}  // namespace mixpeft
