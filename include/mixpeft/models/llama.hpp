// mixpeft/models/llama.hpp — the LLaMA decoder (Hugging Face LlamaForCausalLM) with PEFT insertion points.
//
//   x_0 = E[ids]                                                    token embedding (or caller's embeddings)
//   block i:  h = RMSNorm(x; w_in)               a = MMAdapter(h, route = h[:, 0])   (when enabled, else a = h)
//             x' = x + Attn(a)                    causal MHA with RoPE (HF rotate_half), mask options below
//             g = RMSNorm(x'; w_post)             b = MMAdapter_ffn(g, route = g[:, 0]) (optional, else b = g)
//             x  = x' + FFN(b)                    SwiGLU; LoRA or a mixture of LoRA experts when configured
//   hidden = RMSNorm(x_L; w_norm),  logits = hidden W_head^T                        (untied head)
// Backward is the chain rule through the same wiring: residual branches add, RMSNorm and the sub-layers write
// their input gradients, parameter gradients accumulate and frozen parameters get no work. An MM-Adapter's
// routing token is row 0 of its (normed) input, so its routing gradient is added back into row 0.
//
// PEFT (all off: the plain model, trainable unless freeze_base says otherwise):
//   lora_targets / lora   LoRA on any of q, k, v, o (LoRALinear), rank, alpha, dropout, rsLoRA
//   ffn                   LoRAExperts options (K = 1: LoRA FFN, K > 1: MoLE); nullopt or K = 0: plain SwiGLU
//   mm_adapter            LaVIN's MM-Adapter before attention in every block; mm_adapter_ffn adds one before the FFN
//   freeze_base           default: true when any PEFT module is on; frozen base weights get no gradient work
// Mask options (AttentionMask, ops/attention.hpp): causal, block_first_key (LaVIN: no token reads position 0, the
// modality token), key_lengths (right padding).
//
// MoLE balance losses: routing(cache) lists every layer's RoutingResult (null for layers without a router); the
// losses' gradients come back as one RouterGrad per layer, passed to backward_embeddings.
// KV cache (greedy generation): prefill() runs the prompt and keeps every layer's rotated keys and values (and
// the MM-Adapters' routing tokens, which belong to position 0); decode() runs new tokens against them. Its
// logits equal those of a full forward over the whole sequence.
//
// Cache: per block its input x and RMSNorm factors, x' and its factors, and the sub-layers' caches; the final
// norm's input and factors; the head's cache (its input, only while the head is trainable).
// Parameter names (Hugging Face): model.embed_tokens.weight, model.layers.{i}.self_attn.{q,k,v,o}_proj.weight,
// model.layers.{i}.mlp.{gate,up,down}_proj.weight, model.layers.{i}.{input,post_attention}_layernorm.weight,
// model.norm.weight, lm_head.weight; PEFT modules below them (…q_proj.lora_A.weight, …mlp.router.weight,
// model.layers.{i}.adapter_attn.*, model.layers.{i}.adapter_mlp.*).
// Shapes: B batch, T tokens, D width, V vocabulary, F FFN width, H heads; ids [B, T] int64.
// Backends: device-generic. Llama<T, Cuda> runs this code unchanged on device tensors (the ids stay on the host;
// weights are drawn on the host with the CPU model's Rng sequence and handed over with Backend::from_host, so
// both backends hold the same model for one seed); greedy generation reads one row of logits back per token.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "mixpeft/core/backend.hpp"
#include "mixpeft/core/error.hpp"
#include "mixpeft/core/init.hpp"
#include "mixpeft/core/parameter.hpp"
#include "mixpeft/core/rng.hpp"
#include "mixpeft/layers/linear.hpp"
#include "mixpeft/layers/lora_experts.hpp"
#include "mixpeft/layers/lora_linear.hpp"
#include "mixpeft/layers/mm_adapter.hpp"
#include "mixpeft/layers/router.hpp"
#include "mixpeft/models/feed_forward.hpp"
#include "mixpeft/models/modality_routing.hpp"
#include "mixpeft/models/self_attention.hpp"
#include "mixpeft/ops/attention.hpp"
#include "mixpeft/ops/embedding.hpp"
#include "mixpeft/ops/greedy.hpp"
#include "mixpeft/ops/rmsnorm.hpp"
#include "mixpeft/ops/rope.hpp"

namespace mixpeft {

template <class T, class Backend = Cpu>
class Llama {
 public:
  using Tensor = typename Backend::template tensor<T>;
  using IdTensor = ::mixpeft::Tensor<std::int64_t>;  // token ids stay on the host on every backend
  using Attention = SelfAttention<T, Backend>;
  using FFN = FeedForward<T, Backend>;
  using Adapter = MMAdapter<T, Backend>;
  using Experts = LoRAExperts<T, Backend>;

  struct Config {
    std::size_t vocab = 0;
    std::size_t dim = 0;
    std::size_t n_layers = 0;
    std::size_t n_heads = 0;
    std::size_t ffn_dim = 0;
    double norm_eps = 1e-6;
    double rope_theta = 10000.0;
    std::size_t max_seq = 2048;  // positions covered by the RoPE table (and by the KV cache)
  };

  struct Peft {
    LoRATargets lora_targets{};
    typename LoRALinear<T, Backend>::AdapterConfig lora{};
    std::optional<typename Experts::Config> ffn{};           // nullopt or experts = 0: plain SwiGLU; dim, hidden
                                                             // are taken from the model
    std::optional<typename Adapter::Config> mm_adapter{};    // dim is taken from the model
    bool mm_adapter_ffn = false;                             // a second MM-Adapter before the FFN
    std::optional<bool> freeze_base{};                       // default: any PEFT module on

    bool any() const { return lora_targets.any() || (ffn && ffn->experts > 0) || mm_adapter.has_value(); }
  };

  struct BlockCache {
    Tensor x, rstd_in;         // block input and its RMSNorm factors [B*T]
    typename Adapter::Cache adapter_attn;
    typename Attention::Cache attn;
    Tensor x_mid, rstd_post;   // x' = x + Attn(.) and its RMSNorm factors
    typename Adapter::Cache adapter_mlp;
    typename FFN::Cache mlp;
  };

  struct Cache {
    IdTensor ids;  // forward_ids' input (for the embedding backward)
    std::vector<BlockCache> blocks;
    Tensor x_final, rstd_final;  // final RMSNorm input and factors
    typename Linear<T, Backend>::Cache head;
  };

  struct KVCache {
    std::vector<typename Attention::KVCache> layers;
    std::vector<Tensor> route_attn, route_mlp;  // [B, D] MM-Adapter routing tokens from position 0
    AttentionMask mask;                         // the prefill's options (causal, block_first_key)
    std::size_t length() const { return layers.empty() ? 0 : layers.front().length(); }
  };

  // The plain model (no PEFT module, every weight trainable).
  Llama(const Config& config, Rng& rng) : Llama(config, Peft{}, rng) {}

  Llama(const Config& config, const Peft& peft, Rng& rng)
      : config_(validated(config, peft)),
        peft_(peft),
        head_({.in = config.dim, .out = config.vocab, .bias = false, .trainable_weight = base_trainable(peft),
               .trainable_bias = false},
              rng) {
    const bool trainable = base_trainable(peft);
    const std::size_t d = config.dim;
    ::mixpeft::Tensor<accumulator_t<T>> table = empty<accumulator_t<T>>({config.vocab, d});
    init::normal(table, rng, 0.0, 0.02);
    embed_ = Parameter<T, Backend>("model.embed_tokens.weight", Backend::template from_host<T>(std::move(table)),
                                   trainable, /*decay=*/false);
    rope_ = std::make_shared<const typename Attention::Rope>(d / config.n_heads, config.max_seq, config.rope_theta);
    typename Adapter::Config mm = peft.mm_adapter.value_or(typename Adapter::Config{});
    mm.dim = d;
    blocks_.reserve(config.n_layers);
    for (std::size_t i = 0; i < config.n_layers; ++i) {
      typename Attention::Config ac{.dim = d,
                                    .heads = config.n_heads,
                                    .bias = false,
                                    .lora_targets = peft.lora_targets,
                                    .lora = peft.lora,
                                    .trainable_base = trainable};
      Block& b = blocks_.emplace_back(Block{
          Parameter<T, Backend>("input_layernorm.weight", ones(d), trainable, false),
          Parameter<T, Backend>("post_attention_layernorm.weight", ones(d), trainable, false),
          Attention(ac, rope_, rng), FFN(d, config.ffn_dim, peft.ffn, trainable, rng), std::nullopt, std::nullopt});
      if (peft.mm_adapter) b.adapter_attn.emplace(mm, rng);
      if (peft.mm_adapter_ffn) b.adapter_mlp.emplace(mm, rng);
    }
    norm_ = Parameter<T, Backend>("model.norm.weight", ones(d), trainable, false);
  }

  // ---- embeddings -----------------------------------------------------------------------------------------

  // ids [B, T] -> [B, T, D].
  Tensor embed(const IdTensor& ids) const {
    expect_shape("Llama::embed", "ids", ids, {any_extent, any_extent});
    Tensor x;
    embedding_forward(ids, embed_.value, x);
    return x;
  }
  // Accumulates d_embeddings [B, T, D] into the token table's gradient (no work while it is frozen).
  void embed_backward(const IdTensor& ids, const Tensor& d_embeddings) {
    if (embed_.trainable) embedding_backward(ids, d_embeddings, &embed_.grad);
  }

  // ---- training forward / backward ------------------------------------------------------------------------

  // x [B, T, D] embeddings -> hidden [B, T, D] after the final RMSNorm.
  Tensor forward_embeddings(const Tensor& x, const AttentionMask& mask, Cache& cache) {
    expect_shape("Llama", "embeddings", x, {any_extent, any_extent, config_.dim});
    require<ShapeError>(x.shape()[1] <= config_.max_seq, "Llama: ", x.shape()[1], " tokens exceed max_seq = ",
                        config_.max_seq);
    cache.blocks.resize(blocks_.size());
    Tensor h;
    assign(h, x);
    for (std::size_t i = 0; i < blocks_.size(); ++i) h = block_forward(blocks_[i], h, mask, cache.blocks[i]);
    cache.x_final = std::move(h);
    Tensor hidden;
    rmsnorm_forward(cache.x_final, norm_.value, config_.norm_eps, hidden, cache.rstd_final);
    return hidden;
  }

  // d_hidden [B, T, D] -> d_embeddings [B, T, D]. balance: one RouterGrad per layer (or empty for none).
  Tensor backward_embeddings(Cache& cache, const Tensor& d_hidden,
                             std::span<const RouterGrad<T, Backend>> balance = {}) {
    require<ShapeError>(cache.blocks.size() == blocks_.size(), "Llama::backward_embeddings: called before forward");
    expect_same_shape("Llama::backward_embeddings", "d_hidden", d_hidden, "the forward's hidden", cache.x_final);
    require<ConfigError>(balance.empty() || balance.size() == blocks_.size(), "Llama::backward_embeddings: ",
                         balance.size(), " router gradients for ", blocks_.size(), " layers");
    Tensor dx;
    rmsnorm_backward(cache.x_final, norm_.value, cache.rstd_final, d_hidden, dx, grad_of(norm_));
    const RouterGrad<T, Backend> none{};
    for (std::size_t i = blocks_.size(); i-- > 0;)
      dx = block_backward(blocks_[i], cache.blocks[i], dx, balance.empty() ? none : balance[i]);
    return dx;
  }

  // hidden [B, T, D] -> logits [B, T, V].
  Tensor logits(const Tensor& hidden, Cache& cache) {
    expect_width("Llama::logits", "hidden", hidden, config_.dim);
    return head_.forward(hidden, cache.head);
  }
  // d_logits [B, T, V] -> d_hidden [B, T, D].
  Tensor logits_backward(Cache& cache, const Tensor& d_logits) { return head_.backward(cache.head, d_logits); }

  // ids [B, T] -> logits [B, T, V].
  Tensor forward_ids(const IdTensor& ids, const AttentionMask& mask, Cache& cache) {
    cache.ids = ids;
    return logits(forward_embeddings(embed(ids), mask, cache), cache);
  }
  // The full backward of forward_ids: d_logits [B, T, V] down to the token table.
  void backward_ids(Cache& cache, const Tensor& d_logits, std::span<const RouterGrad<T, Backend>> balance = {}) {
    const Tensor dx = backward_embeddings(cache, logits_backward(cache, d_logits), balance);
    embed_backward(cache.ids, dx);
  }

  // The routing of every layer's MoLE FFN in the last forward (null where a layer has no router).
  std::vector<const RoutingResult<T, Backend>*> routing(const Cache& cache) const {
    std::vector<const RoutingResult<T, Backend>*> out;
    for (std::size_t i = 0; i < blocks_.size(); ++i)
      out.push_back(i < cache.blocks.size() ? blocks_[i].mlp.routing(cache.blocks[i].mlp) : nullptr);
    return out;
  }

  // ---- inference with a KV cache --------------------------------------------------------------------------

  // Runs the prompt embeddings x [B, T, D] into an empty KV cache; returns logits [B, T, V].
  // The mask must be causal without key_lengths (no padding with a KV cache); block_first_key is kept.
  Tensor prefill(const Tensor& x, const AttentionMask& mask, KVCache& kv) {
    expect_shape("Llama::prefill", "embeddings", x, {any_extent, any_extent, config_.dim});
    require<ConfigError>(mask.causal && mask.key_lengths.empty(), "Llama::prefill: a KV cache needs causal ",
                         "attention without key_lengths (padding)");
    kv = KVCache{};
    kv.layers.resize(blocks_.size());
    kv.route_attn.resize(blocks_.size());
    kv.route_mlp.resize(blocks_.size());
    kv.mask = mask;
    return cached_logits(x, kv);
  }
  // ids [B, t] at positions L .. L + t - 1 (L = kv.length()) -> logits [B, t, V].
  Tensor decode(const IdTensor& ids, KVCache& kv) {
    require<ConfigError>(kv.length() > 0, "Llama::decode: the KV cache is empty; call prefill first");
    return cached_logits(embed(ids), kv);
  }

  // Greedy decoding of one sequence from prompt embeddings x [1, T, D]: returns the new tokens, stopping after
  // `eos` (included), after max_new_tokens, or when max_seq positions are used. Runs in eval mode.
  std::vector<std::int64_t> generate_from_embeddings(const Tensor& x, const AttentionMask& mask,
                                                     std::size_t max_new_tokens,
                                                     std::optional<std::int64_t> eos = std::nullopt) {
    expect_shape("Llama::generate", "embeddings", x, {1, any_extent, config_.dim});
    // Eval mode for the call; the previous mode comes back on every exit, exceptions included.
    struct ModeGuard {
      Llama& model;
      bool was_training;
      ~ModeGuard() { model.set_training(was_training); }
    } guard{*this, training_};
    set_training(false);
    std::vector<std::int64_t> out;
    KVCache kv;
    Tensor logits = prefill(x, mask, kv);
    while (out.size() < max_new_tokens) {
      const std::int64_t next = argmax_last_token(logits);
      out.push_back(next);
      if ((eos && next == *eos) || kv.length() >= config_.max_seq || out.size() == max_new_tokens) break;
      IdTensor ids = empty<std::int64_t>({1, 1});
      ids.fill(next);
      logits = decode(ids, kv);
    }
    return out;
  }
  std::vector<std::int64_t> generate(const std::vector<std::int64_t>& prompt, std::size_t max_new_tokens,
                                     std::optional<std::int64_t> eos = std::nullopt) {
    require<ConfigError>(!prompt.empty(), "Llama::generate: the prompt is empty");
    IdTensor ids = empty<std::int64_t>({1, prompt.size()});
    std::copy(prompt.begin(), prompt.end(), ids.begin());
    return generate_from_embeddings(embed(ids), AttentionMask{}, max_new_tokens, eos);
  }

  // ---- parameters -----------------------------------------------------------------------------------------

  void collect_parameters(ParameterList<T, Backend>& list, const std::string& prefix = "") {
    add_parameter(list, prefix, embed_);
    for (std::size_t i = 0; i < blocks_.size(); ++i) {
      Block& b = blocks_[i];
      const std::string p = join_name(prefix, "model.layers." + std::to_string(i));
      b.attn.collect_parameters(list, join_name(p, "self_attn"));
      b.mlp.collect_parameters(list, join_name(p, "mlp"));
      add_parameter(list, p, b.norm_in);
      add_parameter(list, p, b.norm_post);
      if (b.adapter_attn) b.adapter_attn->collect_parameters(list, join_name(p, "adapter_attn"));
      if (b.adapter_mlp) b.adapter_mlp->collect_parameters(list, join_name(p, "adapter_mlp"));
    }
    add_parameter(list, prefix, norm_);
    head_.collect_parameters(list, join_name(prefix, "lm_head"));
  }
  void collect_rngs(NamedRngs& list, const std::string& prefix = "") {
    for (std::size_t i = 0; i < blocks_.size(); ++i) {
      Block& b = blocks_[i];
      const std::string p = join_name(prefix, "model.layers." + std::to_string(i));
      b.attn.collect_rngs(list, join_name(p, "self_attn"));
      b.mlp.collect_rngs(list, join_name(p, "mlp"));
      if (b.adapter_attn) b.adapter_attn->collect_rngs(list, join_name(p, "adapter_attn"));
      if (b.adapter_mlp) b.adapter_mlp->collect_rngs(list, join_name(p, "adapter_mlp"));
    }
  }

  // The pretrained weights only, under their Hugging Face names (what a LlamaForCausalLM checkpoint holds).
  void collect_base_parameters(ParameterList<T, Backend>& list, const std::string& prefix = "") {
    add_parameter(list, prefix, embed_);
    for (std::size_t i = 0; i < blocks_.size(); ++i) {
      Block& b = blocks_[i];
      const std::string p = join_name(prefix, "model.layers." + std::to_string(i));
      b.attn.collect_base_parameters(list, join_name(p, "self_attn"));
      b.mlp.collect_base_parameters(list, join_name(p, "mlp"));
      add_parameter(list, p, b.norm_in);
      add_parameter(list, p, b.norm_post);
    }
    add_parameter(list, prefix, norm_);
    head_.collect_parameters(list, join_name(prefix, "lm_head"));
  }

  void set_training(bool on) {
    training_ = on;
    for (Block& b : blocks_) {
      b.attn.set_training(on);
      b.mlp.set_training(on);
      if (b.adapter_attn) b.adapter_attn->set_training(on);
      if (b.adapter_mlp) b.adapter_mlp->set_training(on);
    }
  }
  bool training() const { return training_; }

  const Config& config() const { return config_; }
  const Peft& peft() const { return peft_; }
  std::size_t num_layers() const { return blocks_.size(); }
  Attention& attention(std::size_t i) { return blocks_.at(i).attn; }
  FFN& mlp(std::size_t i) { return blocks_.at(i).mlp; }
  Adapter* adapter_attn(std::size_t i) { return blocks_.at(i).adapter_attn ? &*blocks_[i].adapter_attn : nullptr; }
  Adapter* adapter_mlp(std::size_t i) { return blocks_.at(i).adapter_mlp ? &*blocks_[i].adapter_mlp : nullptr; }
  Parameter<T, Backend>& embed_tokens() { return embed_; }

 private:
  struct Block {
    Parameter<T, Backend> norm_in, norm_post;
    Attention attn;
    FFN mlp;
    std::optional<Adapter> adapter_attn, adapter_mlp;
  };

  static const Config& validated(const Config& c, const Peft& peft) {
    require<ConfigError>(c.vocab > 0 && c.dim > 0 && c.n_layers > 0 && c.ffn_dim > 0,
                         "Llama: vocab, dim, n_layers and ffn_dim must be > 0 (got vocab = ", c.vocab, ", dim = ",
                         c.dim, ", n_layers = ", c.n_layers, ", ffn_dim = ", c.ffn_dim, ")");
    require<ConfigError>(c.n_heads > 0 && c.dim % c.n_heads == 0 && (c.dim / c.n_heads) % 2 == 0, "Llama: n_heads (",
                         c.n_heads, ") must divide dim (", c.dim, ") into heads of even width (RoPE)");
    require<ConfigError>(std::isfinite(c.norm_eps) && c.norm_eps > 0, "Llama: norm_eps must be > 0 (got ",
                         c.norm_eps, ")");
    require<ConfigError>(std::isfinite(c.rope_theta) && c.rope_theta > 0, "Llama: rope_theta must be > 0 (got ",
                         c.rope_theta, ")");
    require<ConfigError>(c.max_seq > 0, "Llama: max_seq must be > 0");
    require<ConfigError>(!peft.mm_adapter_ffn || peft.mm_adapter.has_value(),
                         "Llama: mm_adapter_ffn needs mm_adapter options");
    return c;
  }

  static bool base_trainable(const Peft& peft) { return !peft.freeze_base.value_or(peft.any()); }

  static Tensor ones(std::size_t d) {
    ::mixpeft::Tensor<accumulator_t<T>> t = empty<accumulator_t<T>>({d});
    init::constant(t, accumulator_t<T>(1));
    return Backend::template from_host<T>(std::move(t));
  }
  static Tensor* grad_of(Parameter<T, Backend>& p) { return p.trainable ? &p.grad : nullptr; }

  // x [B, T, D] -> x + FFN(RMSNorm(x + Attn(RMSNorm(x)))) with the adapters in place.
  Tensor block_forward(Block& b, const Tensor& x, const AttentionMask& mask, BlockCache& c) {
    assign(c.x, x);
    Tensor h;
    rmsnorm_forward(x, b.norm_in.value, config_.norm_eps, h, c.rstd_in);
    if (b.adapter_attn) h = b.adapter_attn->forward(h, first_token(h), c.adapter_attn);
    c.x_mid = b.attn.forward(h, mask, c.attn);
    add_to(c.x_mid, x);
    rmsnorm_forward(c.x_mid, b.norm_post.value, config_.norm_eps, h, c.rstd_post);
    if (b.adapter_mlp) h = b.adapter_mlp->forward(h, first_token(h), c.adapter_mlp);
    Tensor y = b.mlp.forward(h, c.mlp);
    add_to(y, c.x_mid);
    return y;
  }

  Tensor block_backward(Block& b, BlockCache& c, const Tensor& dy, const RouterGrad<T, Backend>& balance) {
    Tensor dh = b.mlp.backward(c.mlp, dy, balance);
    if (b.adapter_mlp) dh = adapter_backward(*b.adapter_mlp, c.adapter_mlp, dh);
    Tensor d_mid;
    rmsnorm_backward(c.x_mid, b.norm_post.value, c.rstd_post, dh, d_mid, grad_of(b.norm_post));
    add_to(d_mid, dy);
    dh = b.attn.backward(c.attn, d_mid);
    if (b.adapter_attn) dh = adapter_backward(*b.adapter_attn, c.adapter_attn, dh);
    Tensor dx;
    rmsnorm_backward(c.x, b.norm_in.value, c.rstd_in, dh, dx, grad_of(b.norm_in));
    add_to(dx, d_mid);
    return dx;
  }

  // The adapter's input gradient with its routing-token gradient added into row 0.
  static Tensor adapter_backward(Adapter& adapter, typename Adapter::Cache& c, const Tensor& dy) {
    auto grads = adapter.backward(c, dy);
    add_to_first_token(grads.x, grads.route_tokens);
    return std::move(grads.x);
  }

  // One KV-cache step: embeddings x [B, t, D] -> logits [B, t, V].
  Tensor cached_logits(const Tensor& x, KVCache& kv) {
    const bool first = kv.length() == 0;
    require<ConfigError>(kv.length() + x.shape()[1] <= config_.max_seq, "Llama: the KV cache holds ", kv.length(),
                         " positions; ", x.shape()[1], " more exceed max_seq = ", config_.max_seq);
    AttentionMask mask{.causal = true, .block_first_key = kv.mask.block_first_key, .key_lengths = {}};
    Tensor h, a, rstd;
    assign(h, x);
    for (std::size_t i = 0; i < blocks_.size(); ++i) {
      Block& b = blocks_[i];
      rmsnorm_forward(h, b.norm_in.value, config_.norm_eps, a, rstd);
      if (b.adapter_attn) {
        if (first) kv.route_attn[i] = first_token(a);
        typename Adapter::Cache ac;
        a = b.adapter_attn->forward(a, kv.route_attn[i], ac);
      }
      Tensor mid = b.attn.forward_cached(a, mask, kv.layers[i]);
      add_to(mid, h);
      rmsnorm_forward(mid, b.norm_post.value, config_.norm_eps, a, rstd);
      if (b.adapter_mlp) {
        if (first) kv.route_mlp[i] = first_token(a);
        typename Adapter::Cache ac;
        a = b.adapter_mlp->forward(a, kv.route_mlp[i], ac);
      }
      typename FFN::Cache fc;
      h = b.mlp.forward(a, fc);
      add_to(h, mid);
    }
    Tensor hidden;
    rmsnorm_forward(h, norm_.value, config_.norm_eps, hidden, rstd);
    typename Linear<T, Backend>::Cache hc;
    return head_.forward(hidden, hc);
  }

  Config config_;
  Peft peft_;
  Linear<T, Backend> head_;      // lm_head [V, D]
  Parameter<T, Backend> embed_;  // [V, D]
  std::shared_ptr<const typename Attention::Rope> rope_;
  std::vector<Block> blocks_;
  Parameter<T, Backend> norm_;   // [D]
  bool training_ = true;
};

}  // namespace mixpeft
