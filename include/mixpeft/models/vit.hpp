// mixpeft/models/vit.hpp — the CLIP vision transformer (Hugging Face CLIPVisionModel) with LaVIN's MM-Adapters
// and LoRA.
//
//   patches  = the image cut into Np = (S/P)^2 patches, each flattened in (channel, row, column) order
//   e        = patches W_patch^T                                      conv with stride P, no bias == a linear map
//   x_0      = LayerNorm_pre([cls; e] + pos)                          [cls] prepended, learned positions
//   block i: h = LayerNorm_1(x)      a = MMAdapter(h, route = h[:, 0])     (when enabled, else a = h)
//            x' = x + Attn(a)         non-causal MHA, q/k/v/out projections with biases (optional LoRA)
//            x  = x' + fc2(QuickGELU(fc1(LayerNorm_2(x'))))   fc1, fc2 with biases (optional LoRA)
//   outputs: hidden = x_L (last_hidden_state, before post_layernorm), and the [cls] token x_i[:, 0] after every
//            `take_every`-th block (i = take_every - 1, 2 take_every - 1, ...: LaVIN takes 6 of 24), optionally
//            through post_layernorm (norm_taken), as cls [B, n_taken, D].
// PEFT (Peft): mm_adapter      an MM-Adapter before attention in every block (LaVIN)
//              lora_targets    LoRA (LoRALinear, W + s B A) on any of q, k, v, o (q/k/v/out_proj) and fc1, fc2
//                              (mlp.fc1, mlp.fc2), in every block; `lora` gives rank, alpha, dropout, rsLoRA.
//                              An untargeted projection stays a plain Linear (no extra work). MoLE does not
//                              apply: LoRAExperts is a SwiGLU FFN and this MLP is QuickGELU.
//              freeze_base     every pretrained weight frozen (default: when any PEFT module is on)
// Routing: each image's adapters route from its own normed [cls] token (row 0). The LaVIN reference code routes
// the ViT's adapters in a way that depends on the rest of the batch; routing per image makes an image's
// features independent of its batch-mates.
// Backward starts from d_hidden and/or d_cls (an absent tensor, default-constructed or of shape {0}, is zero):
// d_cls enters row 0 after its block, the chain runs down through the frozen blocks into their adapters, and
// stops at the lowest block with a trainable parameter unless the embeddings are trainable or d_images is
// requested (then through pre-LN, the positions, the [cls] token and the patch projection down to the pixels).
// Frozen weights get no gradient work.
// Cache: per block its input, both LayerNorms' statistics, x', fc1's output and the sub-layers' caches (with the
// LoRA intermediates of targeted layers); the embeddings' pre-LN input and statistics; the taken [cls] tokens
// (before post_layernorm).
// Parameter names (Hugging Face): vision_model.embeddings.{patch_embedding.weight, class_embedding,
// position_embedding.weight}, vision_model.pre_layrnorm.{weight,bias},
// vision_model.encoder.layers.{i}.{self_attn.{q,k,v,out}_proj, layer_norm1, layer_norm2, mlp.fc1, mlp.fc2}.*,
// vision_model.post_layernorm.*, adapters under vision_model.encoder.layers.{i}.adapter_attn.*, LoRA factors
// under their projection with PEFT's names (…self_attn.q_proj.lora_A.weight, …mlp.fc1.lora_B.weight).
// collect_base_parameters lists the pretrained weights only, so a Hugging Face checkpoint loads with LoRA on.
// The patch weight is stored flattened as [D, C P P]; Hugging Face's conv weight [D, C, P, P] has the same
// row-major bytes (hf_weights.hpp reshapes it).
// Shapes: images [B, C, S, S] (S = image_size), N = Np + 1 tokens, D width, hidden [B, N, D], cls [B, n_taken, D].
// Backends: device-generic. ClipVit<T, Cuda> runs this code unchanged on device tensors: patchify / unpatchify
// (ops/patchify.hpp), the embeddings' class_token_forward / _backward (ops/class_token.hpp), the taken tokens'
// copy_token_row / add_token_row (ops/token_rows.hpp), layernorm_*, quick_gelu_*, the layers, assign and add_to
// are op calls with CUDA overloads (cuda/*.cuh). Weights are drawn on the host with the CPU model's Rng sequence
// (in accumulator_t<T>) and handed over with Backend::from_host, so both backends hold the same model for one seed.
#pragma once

#include <cmath>
#include <cstddef>
#include <optional>
#include <string>
#include <vector>

#include "mixpeft/core/backend.hpp"
#include "mixpeft/core/error.hpp"
#include "mixpeft/core/init.hpp"
#include "mixpeft/core/parameter.hpp"
#include "mixpeft/core/rng.hpp"
#include "mixpeft/layers/linear.hpp"
#include "mixpeft/layers/lora_linear.hpp"
#include "mixpeft/layers/mm_adapter.hpp"
#include "mixpeft/layers/router.hpp"
#include "mixpeft/models/modality_routing.hpp"
#include "mixpeft/models/self_attention.hpp"
#include "mixpeft/ops/activations.hpp"
#include "mixpeft/ops/attention.hpp"
#include "mixpeft/ops/class_token.hpp"
#include "mixpeft/ops/elementwise.hpp"
#include "mixpeft/ops/layernorm.hpp"
#include "mixpeft/ops/patchify.hpp"
#include "mixpeft/ops/token_rows.hpp"

namespace mixpeft {

// Which of a ViT block's linear layers carry a LoRA adapter: the attention projections (as LoRATargets) and the
// MLP's fc1 and fc2.
struct VitLoRATargets {
  bool q = false, k = false, v = false, o = false, fc1 = false, fc2 = false;
  bool any() const { return attention().any() || fc1 || fc2; }
  LoRATargets attention() const { return {.q = q, .k = k, .v = v, .o = o}; }
};

// The ViT's architecture (ClipVit<T, Backend>::Config on every T and backend).
struct ClipVitConfig {
  std::size_t image_size = 0;
  std::size_t patch = 0;
  std::size_t channels = 3;
  std::size_t dim = 0;
  std::size_t n_layers = 0;
  std::size_t n_heads = 0;
  std::size_t mlp_dim = 0;
  double layer_norm_eps = 1e-5;
  std::size_t take_every = 4;  // [cls] after every take_every-th block; must divide n_layers
  bool norm_taken = false;     // pass the taken [cls] tokens through post_layernorm
};

template <class T, class Backend = Cpu>
class ClipVit {
 public:
  using Tensor = typename Backend::template tensor<T>;
  using HostTensor = ::mixpeft::Tensor<accumulator_t<T>>;  // initial values, drawn on the host
  using Attention = SelfAttention<T, Backend>;
  using Adapter = MMAdapter<T, Backend>;
  using Mlp = Projection<T, Backend>;  // fc1 / fc2: a Linear, or a LoRALinear when targeted

  using Config = ClipVitConfig;

  struct Peft {
    std::optional<typename Adapter::Config> mm_adapter{};  // one before attention in every block; dim from the model
    VitLoRATargets lora_targets{};  // q, k, v, o (attention) and fc1, fc2 (MLP)
    typename LoRALinear<T, Backend>::AdapterConfig lora{};
    std::optional<bool> freeze_base{};  // default: any PEFT module on

    bool any() const { return mm_adapter.has_value() || lora_targets.any(); }
  };

  struct Output {
    Tensor hidden;  // [B, N, D]
    Tensor cls;     // [B, n_taken, D]
  };

  struct BlockCache {
    Tensor x, mean1, rstd1;  // block input and LayerNorm_1 statistics
    typename Adapter::Cache adapter;
    typename Attention::Cache attn;
    Tensor x_mid, mean2, rstd2;  // x' and LayerNorm_2 statistics
    typename Mlp::Cache fc1, fc2;
    Tensor f;  // [B, N, mlp_dim] fc1 output (QuickGELU input)
  };

  struct Cache {
    Shape image_shape;
    typename Linear<T, Backend>::Cache patch;
    Tensor emb, mean0, rstd0;  // pre-LN input and statistics
    std::vector<BlockCache> blocks;
    Tensor cls_raw, cls_mean, cls_rstd;  // taken [cls] tokens before post_layernorm and its statistics
  };

  // The plain encoder (no PEFT module, every weight trainable).
  ClipVit(const Config& config, Rng& rng) : ClipVit(config, Peft{}, rng) {}

  ClipVit(const Config& config, const Peft& peft, Rng& rng)
      : config_(validated(config)),
        peft_(peft),
        patch_({.in = config.channels * config.patch * config.patch, .out = config.dim, .bias = false,
                .trainable_weight = base_trainable(peft), .trainable_bias = false},
               rng) {
    const bool trainable = base_trainable(peft);
    const std::size_t d = config.dim;
    HostTensor cls = empty<accumulator_t<T>>({d}), pos = empty<accumulator_t<T>>({num_tokens(), d});
    init::normal(cls, rng, 0.0, 0.02);
    init::normal(pos, rng, 0.0, 0.02);
    class_embedding_ =
        Parameter<T, Backend>("class_embedding", Backend::template from_host<T>(std::move(cls)), trainable, false);
    position_embedding_ = Parameter<T, Backend>("position_embedding.weight",
                                                Backend::template from_host<T>(std::move(pos)), trainable, false);
    pre_ln_ = norm_pair(d, trainable);
    post_ln_ = norm_pair(d, trainable);
    typename Adapter::Config mm = peft.mm_adapter.value_or(typename Adapter::Config{});
    mm.dim = d;
    blocks_.reserve(config.n_layers);
    for (std::size_t i = 0; i < config.n_layers; ++i) {
      typename Attention::Config ac{.dim = d,
                                    .heads = config.n_heads,
                                    .bias = true,
                                    .names = {"q_proj", "k_proj", "v_proj", "out_proj"},
                                    .lora_targets = peft.lora_targets.attention(),
                                    .lora = peft.lora,
                                    .trainable_base = trainable};
      const auto* lora1 = peft.lora_targets.fc1 ? &peft.lora : nullptr;
      const auto* lora2 = peft.lora_targets.fc2 ? &peft.lora : nullptr;
      Attention attn(ac, nullptr, rng);
      Mlp fc1(d, config.mlp_dim, /*bias=*/true, lora1, trainable, rng);
      Mlp fc2(config.mlp_dim, d, /*bias=*/true, lora2, trainable, rng);
      Block& b = blocks_.emplace_back(Block{norm_pair(d, trainable), norm_pair(d, trainable), std::move(attn),
                                            std::move(fc1), std::move(fc2), std::nullopt});
      if (peft.mm_adapter) b.adapter.emplace(mm, rng);
    }
  }

  // images [B, C, S, S] -> hidden [B, N, D] and the taken [cls] tokens [B, n_taken, D].
  Output forward(const Tensor& images, Cache& cache) {
    const std::size_t s = config_.image_size, d = config_.dim;
    expect_shape("ClipVit", "images", images, {any_extent, config_.channels, s, s});
    const std::size_t nb = images.shape()[0];
    cache.image_shape = shape_of(images);
    const Tensor e = patch_.forward(patchify(images, config_.patch), cache.patch);  // [B, Np, D]
    class_token_forward(class_embedding_.value, e, position_embedding_.value, cache.emb);  // [cls; e] + pos
    Tensor x;
    layernorm_forward(cache.emb, pre_ln_.weight.value, pre_ln_.bias.value, config_.layer_norm_eps, x, cache.mean0,
                      cache.rstd0);

    cache.blocks.resize(blocks_.size());
    resize_to(cache.cls_raw, Shape{nb, num_taken(), d});
    for (std::size_t i = 0; i < blocks_.size(); ++i) {
      x = block_forward(blocks_[i], x, cache.blocks[i]);
      if (taken(i)) copy_token_row(x, 0, cache.cls_raw, taken_index(i));
    }
    Output out{std::move(x), Tensor{}};
    if (config_.norm_taken)
      layernorm_forward(cache.cls_raw, post_ln_.weight.value, post_ln_.bias.value, config_.layer_norm_eps, out.cls,
                        cache.cls_mean, cache.cls_rstd);
    else
      assign(out.cls, cache.cls_raw);
    return out;
  }

  // d_hidden [B, N, D] and/or d_cls [B, n_taken, D] (absent: zero) -> d_images [B, C, S, S] when images_grad,
  // else an empty tensor (shape {0}).
  Tensor backward(Cache& cache, const Tensor& d_hidden, const Tensor& d_cls, bool images_grad = false) {
    require<ShapeError>(cache.blocks.size() == blocks_.size(), "ClipVit::backward: called before forward");
    const std::size_t nb = cache.image_shape[0], d = config_.dim;
    const bool has_hidden = detail::present(d_hidden), has_cls = detail::present(d_cls);
    if (has_hidden) expect_shape("ClipVit::backward", "d_hidden", d_hidden, {nb, num_tokens(), d});
    Tensor d_normed;  // [B, n_taken, D] gradient on the taken tokens before post_layernorm (when normed)
    const Tensor* d_raw = &d_cls;
    if (has_cls) {
      expect_shape("ClipVit::backward", "d_cls", d_cls, {nb, num_taken(), d});
      if (config_.norm_taken) {
        layernorm_backward(cache.cls_raw, post_ln_.weight.value, cache.cls_mean, cache.cls_rstd, d_cls, d_normed,
                           grad_of(post_ln_.weight), grad_of(post_ln_.bias));
        d_raw = &d_normed;
      }
    }
    Tensor empty_result = Backend::template zeros<T>(Shape{0});
    // Blocks above the highest gradient source get none; blocks below the lowest trainable one need none.
    std::size_t top = blocks_.size();
    if (!has_hidden) top = has_cls ? (num_taken() * config_.take_every) : 0;
    const bool to_embeddings = images_grad || embeddings_trainable();
    const std::size_t bottom = to_embeddings ? 0 : lowest_trainable_block();
    if (top <= bottom) return images_grad ? Backend::template zeros<T>(cache.image_shape) : std::move(empty_result);

    Tensor dx;
    if (has_hidden) assign(dx, d_hidden);
    else dx = Backend::template zeros<T>(Shape{nb, num_tokens(), d});
    for (std::size_t i = top; i-- > bottom;) {
      if (has_cls && taken(i)) add_token_row(*d_raw, taken_index(i), dx, 0);
      dx = block_backward(blocks_[i], cache.blocks[i], dx);
    }
    if (!to_embeddings) return empty_result;

    Tensor d_emb;
    layernorm_backward(cache.emb, pre_ln_.weight.value, cache.mean0, cache.rstd0, dx, d_emb,
                       grad_of(pre_ln_.weight), grad_of(pre_ln_.bias));
    const bool to_patches = images_grad || patch_.weight().trainable;
    Tensor d_e;  // [B, Np, D]
    class_token_backward(d_emb, grad_of(class_embedding_), grad_of(position_embedding_), to_patches ? &d_e : nullptr);
    if (!to_patches) return empty_result;
    const Tensor d_patches = patch_.backward(cache.patch, d_e);
    if (!images_grad) return empty_result;
    return unpatchify(d_patches, cache.image_shape, config_.patch);
  }

  void collect_parameters(ParameterList<T, Backend>& list, const std::string& prefix = "") {
    collect(list, prefix, /*base_only=*/false);
  }
  // The pretrained weights only, under their Hugging Face names (the patch weight flattened, see above).
  void collect_base_parameters(ParameterList<T, Backend>& list, const std::string& prefix = "") {
    collect(list, prefix, /*base_only=*/true);
  }
  void collect_rngs(NamedRngs& list, const std::string& prefix = "") {
    const std::string layers = join_name(prefix, "vision_model.encoder.layers");
    for (std::size_t i = 0; i < blocks_.size(); ++i) {
      const std::string p = join_name(layers, std::to_string(i));
      blocks_[i].attn.collect_rngs(list, join_name(p, "self_attn"));
      blocks_[i].fc1.collect_rngs(list, join_name(p, "mlp.fc1"));
      blocks_[i].fc2.collect_rngs(list, join_name(p, "mlp.fc2"));
      if (blocks_[i].adapter) blocks_[i].adapter->collect_rngs(list, join_name(p, "adapter_attn"));
    }
  }

  void set_training(bool on) {
    training_ = on;
    for (Block& b : blocks_) {
      b.attn.set_training(on);
      b.fc1.set_training(on);
      b.fc2.set_training(on);
      if (b.adapter) b.adapter->set_training(on);
    }
  }
  bool training() const { return training_; }

  const Config& config() const { return config_; }
  const Peft& peft() const { return peft_; }
  std::size_t num_tokens() const { return (config_.image_size / config_.patch) * (config_.image_size / config_.patch) + 1; }
  std::size_t num_taken() const { return config_.take_every ? config_.n_layers / config_.take_every : 0; }
  std::size_t num_layers() const { return blocks_.size(); }
  Adapter* adapter(std::size_t i) { return blocks_.at(i).adapter ? &*blocks_[i].adapter : nullptr; }
  Attention& attention(std::size_t i) { return blocks_.at(i).attn; }
  Mlp& fc1(std::size_t i) { return blocks_.at(i).fc1; }  // fc1(i).has_lora(), fc1(i).lora().lora_A(), ...
  Mlp& fc2(std::size_t i) { return blocks_.at(i).fc2; }
  Parameter<T, Backend>& patch_weight() { return patch_.weight(); }  // [D, C P P]

 private:
  struct Norm {
    Parameter<T, Backend> weight, bias;
  };
  struct Block {
    Norm ln1, ln2;
    Attention attn;
    Mlp fc1, fc2;
    std::optional<Adapter> adapter;
  };

  static const Config& validated(const Config& c) {
    require<ConfigError>(c.image_size > 0 && c.patch > 0 && c.image_size % c.patch == 0, "ClipVit: patch (", c.patch,
                         ") must be > 0 and divide image_size (", c.image_size, ")");
    require<ConfigError>(c.channels > 0 && c.dim > 0 && c.n_layers > 0 && c.mlp_dim > 0,
                         "ClipVit: channels, dim, n_layers and mlp_dim must be > 0 (got channels = ", c.channels,
                         ", dim = ", c.dim, ", n_layers = ", c.n_layers, ", mlp_dim = ", c.mlp_dim, ")");
    require<ConfigError>(c.n_heads > 0 && c.dim % c.n_heads == 0, "ClipVit: n_heads (", c.n_heads,
                         ") must be > 0 and divide dim (", c.dim, ")");
    require<ConfigError>(std::isfinite(c.layer_norm_eps) && c.layer_norm_eps > 0,
                         "ClipVit: layer_norm_eps must be > 0 (got ", c.layer_norm_eps, ")");
    require<ConfigError>(c.take_every == 0 || c.n_layers % c.take_every == 0, "ClipVit: take_every (", c.take_every,
                         ") must divide n_layers (", c.n_layers, "), or be 0 for no [cls] tokens");
    return c;
  }
  static bool base_trainable(const Peft& peft) { return !peft.freeze_base.value_or(peft.any()); }
  static Tensor* grad_of(Parameter<T, Backend>& p) { return p.trainable ? &p.grad : nullptr; }

  static Norm norm_pair(std::size_t d, bool trainable) {
    HostTensor w = empty<accumulator_t<T>>({d});
    init::constant(w, accumulator_t<T>(1));
    return {Parameter<T, Backend>("weight", Backend::template from_host<T>(std::move(w)), trainable, false),
            Parameter<T, Backend>("bias", Backend::template zeros<T>(Shape{d}), trainable, false)};
  }

  bool taken(std::size_t i) const { return config_.take_every && (i + 1) % config_.take_every == 0; }
  std::size_t taken_index(std::size_t i) const { return (i + 1) / config_.take_every - 1; }

  bool embeddings_trainable() const {
    return patch_.weight().trainable || class_embedding_.trainable || position_embedding_.trainable ||
           pre_ln_.weight.trainable || pre_ln_.bias.trainable;
  }
  std::size_t lowest_trainable_block() {
    for (std::size_t i = 0; i < blocks_.size(); ++i) {
      ParameterList<T, Backend> list;
      collect_block(list, blocks_[i], "", false);
      for (const auto& ref : list)
        if (ref.param->trainable) return i;
    }
    return blocks_.size();
  }

  Tensor block_forward(Block& b, const Tensor& x, BlockCache& c) {
    const double eps = config_.layer_norm_eps;
    assign(c.x, x);
    Tensor h;
    layernorm_forward(x, b.ln1.weight.value, b.ln1.bias.value, eps, h, c.mean1, c.rstd1);
    if (b.adapter) h = b.adapter->forward(h, first_token(h), c.adapter);
    c.x_mid = b.attn.forward(h, AttentionMask{.causal = false}, c.attn);
    add_to(c.x_mid, x);
    layernorm_forward(c.x_mid, b.ln2.weight.value, b.ln2.bias.value, eps, h, c.mean2, c.rstd2);
    c.f = b.fc1.forward(h, c.fc1);
    Tensor g;
    quick_gelu_forward(c.f, g);
    Tensor y = b.fc2.forward(g, c.fc2);
    add_to(y, c.x_mid);
    return y;
  }

  Tensor block_backward(Block& b, BlockCache& c, const Tensor& dy) {
    Tensor dg = b.fc2.backward(c.fc2, dy), df, d_mid;
    quick_gelu_backward(c.f, dg, df);
    const Tensor dh2 = b.fc1.backward(c.fc1, df);
    layernorm_backward(c.x_mid, b.ln2.weight.value, c.mean2, c.rstd2, dh2, d_mid, grad_of(b.ln2.weight),
                       grad_of(b.ln2.bias));
    add_to(d_mid, dy);
    Tensor dh = b.attn.backward(c.attn, d_mid);
    if (b.adapter) {
      auto grads = b.adapter->backward(c.adapter, dh);
      add_to_first_token(grads.x, grads.route_tokens);
      dh = std::move(grads.x);
    }
    Tensor dx;
    layernorm_backward(c.x, b.ln1.weight.value, c.mean1, c.rstd1, dh, dx, grad_of(b.ln1.weight),
                       grad_of(b.ln1.bias));
    add_to(dx, d_mid);
    return dx;
  }

  void collect_norm(ParameterList<T, Backend>& list, Norm& n, const std::string& prefix) {
    add_parameter(list, prefix, n.weight);
    add_parameter(list, prefix, n.bias);
  }

  void collect_block(ParameterList<T, Backend>& list, Block& b, const std::string& p, bool base_only) {
    if (base_only) b.attn.collect_base_parameters(list, join_name(p, "self_attn"));
    else b.attn.collect_parameters(list, join_name(p, "self_attn"));
    collect_norm(list, b.ln1, join_name(p, "layer_norm1"));
    if (base_only) {
      b.fc1.collect_base_parameters(list, join_name(p, "mlp.fc1"));
      b.fc2.collect_base_parameters(list, join_name(p, "mlp.fc2"));
    } else {
      b.fc1.collect_parameters(list, join_name(p, "mlp.fc1"));
      b.fc2.collect_parameters(list, join_name(p, "mlp.fc2"));
    }
    collect_norm(list, b.ln2, join_name(p, "layer_norm2"));
    if (!base_only && b.adapter) b.adapter->collect_parameters(list, join_name(p, "adapter_attn"));
  }

  void collect(ParameterList<T, Backend>& list, const std::string& prefix, bool base_only) {
    const std::string vm = join_name(prefix, "vision_model");
    const std::string emb = join_name(vm, "embeddings");
    add_parameter(list, emb, class_embedding_);
    patch_.collect_parameters(list, join_name(emb, "patch_embedding"));
    add_parameter(list, emb, position_embedding_);
    collect_norm(list, pre_ln_, join_name(vm, "pre_layrnorm"));
    for (std::size_t i = 0; i < blocks_.size(); ++i)
      collect_block(list, blocks_[i], join_name(vm, "encoder.layers." + std::to_string(i)), base_only);
    collect_norm(list, post_ln_, join_name(vm, "post_layernorm"));
  }

  Config config_;
  Peft peft_;
  Linear<T, Backend> patch_;                   // [D, C P P], no bias
  Parameter<T, Backend> class_embedding_;      // [D]
  Parameter<T, Backend> position_embedding_;   // [N, D]
  Norm pre_ln_, post_ln_;
  std::vector<Block> blocks_;
  bool training_ = true;
};

}  // namespace mixpeft
