// mixpeft/models/llava_mole.hpp — LLaVA-MoLE: LLaVA-1.5 with LoRA on attention and a sparse mixture of LoRA experts
// on every FFN (SPEC 2).
//
// Forward of one batch:
//   F     = ClipVit(images)[:, 1:, :]           the patch tokens (no [cls]) of the hidden state after the block chosen by
//                                               feature_layer (-1 the last, -2 LLaVA-1.5's penultimate)  // [Ni, Np, Dv]
//   v     = W2 QuickGELU(W1 F + c1) + c2        the projector, LLaVA-1.5's "mlp2x_gelu" (W1 [D, Dv], W2 [D, D])
//   x     = E[ids], then x[b, s_b .. s_b + Np - 1] = v[image of b]                                  // [B, T, D]
//   h     = Llama(x)                            LoRA on q, k, v, o; LoRAExperts on every FFN (K = 1: plain LoRA FFN);
//                                               mask: causal, key_lengths (right padding)
//   loss  = CE(logits[b, t], labels[b, t + 1]) over the answer tokens  +  BalanceLoss(routing of every layer)
// Sequences: [BOS, prefix..., image tokens..., prompt..., answer...] (a text-only sample has no image tokens).
// The balance loss (layers/balance_loss.hpp; default MoLE's per-sample loss, weight 1e-2, per layer) counts the
// valid positions of each sequence (padding excluded), with sample ids b; its gradients go to each layer's router
// through Llama::backward_embeddings. Every loss() records each layer's routing in RouterStats, grouped by the
// samples' domain ids (reset_router_stats() starts a new report), and also keeps this call's own counts:
//   expert_counts[l][j] = valid positions routed to expert j in layer l by this forward   (sum_j = sum_b length_b)
// in Cache::expert_counts and Loss::expert_counts (empty when K = 1), independent of the accumulating statistics.
// Activation: QuickGELU, x sigmoid(1.702 x), the library's GELU (CLIP's approximation). LLaVA-1.5 uses the exact
// erf GELU; the two differ by at most about 0.02 per element, so projector weights from a LLaVA checkpoint load
// and work but do not reproduce its activations bit for bit.
// Feature layer: the ViT is built with only the blocks up to the chosen one (n_layers + feature_layer + 1); the
// later blocks' outputs are never used, so a Hugging Face checkpoint loads with their tensors ignored.
// Backward: dlogits (+ balance router gradients) -> Llama -> dx; dv = dx at the image slots -> projector backward.
// The frozen ViT gets no backward at all unless d_images is requested (backward's / loss_and_backward's images_grad
// pointer, null by default): then d_F -> d_hidden (zero at [cls]) -> ClipVit backward down to the pixels, written as
// d_images = dloss * d loss / d images [Ni, C, S, S] (shape {0} for a text-only batch). A vision-tower parameter made
// trainable also gets its gradient through the same path. The frozen LLaMA base computes input gradients only.
// Trainable: attention LoRAs, FFN expert LoRAs, routers, projector.
// Cache: the ViT's forward cache, the projector's inputs, the LLaMA's cache, logits, shifted targets, the balance
// tokens and per-layer routing, this forward's expert counts, the router-gradient buffers.
// Parameter names (Hugging Face LlavaForConditionalGeneration): "vision_tower." + ClipVit names,
// "multi_modal_projector.linear_{1,2}.*", "language_model." + Llama names (LoRA and experts below them).
// Shapes: B sequences, T positions, D LLM width, Dv ViT width, Np patches per image, Ni images, V vocabulary,
// L layers, K experts, N = B T routed rows per layer; ids, labels [B, T] int64.
// Backends: device-generic. LlavaMole<T, Cuda> runs this code on device tensors: the patch tokens enter the
// sequence through the token-row ops (ops/token_rows.hpp) and leave it the same way in backward; the balance
// tokens and domain ids are built on the host and handed over. Ids, labels and the samples' images stay on the
// host (make_batch uploads the images); weights are drawn on the host with the CPU model's Rng sequence.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <ostream>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <xtensor/xview.hpp>

#include "mixpeft/core/backend.hpp"
#include "mixpeft/core/error.hpp"
#include "mixpeft/core/parameter.hpp"
#include "mixpeft/core/rng.hpp"
#include "mixpeft/layers/balance_loss.hpp"
#include "mixpeft/layers/linear.hpp"
#include "mixpeft/layers/lora_experts.hpp"
#include "mixpeft/layers/lora_linear.hpp"
#include "mixpeft/layers/router_stats.hpp"
#include "mixpeft/models/llama.hpp"
#include "mixpeft/models/param_count.hpp"
#include "mixpeft/models/vit.hpp"
#include "mixpeft/ops/activations.hpp"
#include "mixpeft/ops/attention.hpp"
#include "mixpeft/ops/cross_entropy.hpp"
#include "mixpeft/ops/token_rows.hpp"

namespace mixpeft {

// Parameter counts of a LlavaMole model (printable: `std::cout << counts`).
struct LlavaMoleParameterCount {
  std::size_t attention_lora = 0;  // LoRA on q, k, v, o
  std::size_t ffn_experts = 0;     // the K LoRA experts of every FFN (gate, up, down)
  std::size_t routers = 0;         // one per layer when K > 1
  std::size_t projector = 0;
  std::size_t trainable = 0;       // the sum of the four above
  std::size_t total = 0;           // trainable + the frozen LLaMA and ViT (the blocks that are built)

  friend std::ostream& operator<<(std::ostream& os, const LlavaMoleParameterCount& c) {
    using param_count::format_count;
    return os << "attention lora " << format_count(c.attention_lora) << ", ffn experts "
              << format_count(c.ffn_experts) << ", routers " << format_count(c.routers) << ", projector "
              << format_count(c.projector) << ", trainable " << format_count(c.trainable) << " of "
              << format_count(c.total);
  }
};

template <class T, class Backend = Cpu>
class LlavaMole {
 public:
  using Tensor = typename Backend::template tensor<T>;
  using HostTensor = ::mixpeft::Tensor<accumulator_t<T>>;  // images as samples hold them
  using IdTensor = ::mixpeft::Tensor<std::int64_t>;        // token ids stay on the host on every backend
  using IndexTensor = typename Backend::template tensor<std::int32_t>;
  using LLM = Llama<T, Backend>;
  using ViT = ClipVit<T, Backend>;
  using Experts = LoRAExperts<T, Backend>;
  using Balance = BalanceLoss<T, Backend>;
  using Routing = RoutingResult<T, Backend>;

  struct Config {
    typename LLM::Config llm{};
    typename ViT::Config vit{};  // the checkpoint's tower; take_every is ignored (no [cls] tokens are taken)
    int feature_layer = -2;      // hidden state after block n_layers + feature_layer (LLaVA-1.5: -2)
    LoRATargets lora_targets{.q = true, .k = true, .v = true, .o = true};
    typename LoRALinear<T, Backend>::AdapterConfig lora{.rank = 32, .alpha = 64.0, .dropout = 0.05};
    typename Experts::Config experts{};     // K = 3, r = 32, alpha = 64 ...; dim and hidden come from the LLM
    typename Balance::Config balance{};     // MoLE per-sample loss, w = 1e-2, per layer
    std::size_t domains = 1;                // RouterStats groups; Batch::domains holds ids in [0, domains)
    std::int64_t bos_id = 1;
    std::int64_t pad_id = 0;                // placeholder id at image slots and padding
  };

  struct Batch {
    IdTensor ids;                                         // [B, T]; placeholders at image slots and padding
    std::vector<std::size_t> lengths;                     // [B] valid positions
    std::vector<std::optional<std::size_t>> image_start;  // [B] first image slot; nullopt: text-only
    Tensor images;                                        // [Ni, C, S, S] the image samples' images, batch order
    IdTensor labels;                                      // [B, T] answer ids at their positions, -100 elsewhere
    std::vector<std::size_t> domains;                     // [B] domain of each sample, or empty (all 0)
  };

  // One example before collation; the sequence is [BOS, prefix, (image tokens), prompt, answer].
  struct Sample {
    std::vector<std::int64_t> prefix, prompt, answer;
    std::optional<HostTensor> image;  // [C, S, S] on the host; absent: text-only
    std::size_t domain = 0;
  };

  struct Cache {
    std::vector<std::pair<std::size_t, std::size_t>> images;  // (sequence, first slot) of each image, batch order
    IdTensor ids;                                             // for the token table, while it is trainable
    typename ViT::Cache vit;
    typename Linear<T, Backend>::Cache proj1, proj2;
    Tensor proj_pre;                                          // [Ni, Np, D] QuickGELU input
    AttentionMask mask;
    typename LLM::Cache llm;
    Tensor logits;                                            // [B, T, V]
    IdTensor targets;                                         // [B, T] labels shifted left by one
    typename Backend::template cross_entropy_cache<T> ce;
    BalanceTokens<T, Backend> tokens;                         // valid positions and sample ids, [N] each
    std::vector<const Routing*> routing;                      // [L] (empty when K = 1)
    std::vector<RouterGrad<T, Backend>> router_grads;         // [L] balance gradients
    typename BalanceLoss<T, Backend>::Counts balance_counts;  // what the balance forward counted, for backward
    std::vector<std::vector<std::size_t>> expert_counts;      // [L][K] this forward's valid positions per expert
    T ce_value = 0, balance_value = 0;
  };

  struct Loss {
    double loss = 0;          // ce + balance
    double ce = 0;
    double balance = 0;       // already weighted
    std::size_t tokens = 0;   // valid positions processed
    std::size_t targets = 0;  // answer tokens in the loss
    std::vector<std::vector<std::size_t>> expert_counts;  // [L][K] this step's expert usage (empty when K = 1)
  };

  LlavaMole(const Config& config, Rng& rng)
      : config_(validated(config)),
        vit_(vit_config(config), frozen_vit(), rng),
        proj1_({.in = config.vit.dim, .out = config.llm.dim, .bias = true}, rng),
        proj2_({.in = config.llm.dim, .out = config.llm.dim, .bias = true}, rng),
        llm_(config.llm, llm_peft(config), rng),
        balance_(config.balance) {
    if (config.experts.experts > 1) stats_.emplace(config.experts.experts, config.domains);
  }

  // ---- batches --------------------------------------------------------------------------------------------

  Batch make_batch(const std::vector<Sample>& samples) const {
    require<ConfigError>(!samples.empty(), "LlavaMole::make_batch: no samples");
    const std::size_t n = num_image_tokens(), nb = samples.size();
    const auto& vc = config_.vit;
    Batch batch;
    std::size_t longest = 0, images = 0;
    for (const Sample& s : samples) {
      const std::size_t len = 1 + s.prefix.size() + (s.image ? n : 0) + s.prompt.size() + s.answer.size();
      batch.lengths.push_back(len);
      batch.domains.push_back(s.domain);
      longest = std::max(longest, len);
      if (s.image) {
        expect_shape("LlavaMole::make_batch", "image", *s.image, {vc.channels, vc.image_size, vc.image_size});
        ++images;
      }
    }
    batch.ids = empty<std::int64_t>({nb, longest});
    batch.ids.fill(config_.pad_id);
    batch.labels = empty<std::int64_t>({nb, longest});
    batch.labels.fill(default_ignore_index);
    HostTensor pixels =
        empty<accumulator_t<T>>(images ? Shape{images, vc.channels, vc.image_size, vc.image_size} : Shape{0});
    std::size_t image = 0;
    for (std::size_t b = 0; b < nb; ++b) {
      const Sample& s = samples[b];
      std::size_t t = 0;
      const auto put = [&](const std::vector<std::int64_t>& tokens, bool label) {
        for (std::int64_t id : tokens) {
          batch.ids(b, t) = id;
          if (label) batch.labels(b, t) = id;
          ++t;
        }
      };
      put({config_.bos_id}, false);
      put(s.prefix, false);
      if (s.image) {
        batch.image_start.push_back(t);
        std::copy(s.image->data(), s.image->data() + s.image->size(), pixels.data() + image++ * s.image->size());
        t += n;
      } else {
        batch.image_start.push_back(std::nullopt);
      }
      put(s.prompt, false);
      put(s.answer, true);
    }
    batch.images = Backend::template from_host<T>(std::move(pixels));
    return batch;
  }

  // ---- training forward / backward ------------------------------------------------------------------------

  // logits [B, T, V].
  Tensor forward(const Batch& batch, Cache& c) {
    const Tensor x = embeddings(batch, c);
    c.mask = {.causal = true, .block_first_key = false, .key_lengths = batch.lengths};
    return llm_.logits(llm_.forward_embeddings(x, c.mask, c.llm), c.llm);
  }

  // CE over the answer tokens + the weighted balance loss; records the routing in the router statistics and this
  // call's per-layer expert counts in c.expert_counts.
  T loss(const Batch& batch, Cache& c) {
    c.logits = forward(batch, c);
    shift_labels(batch.labels, c.targets);
    c.ce_value = cross_entropy_forward(c.logits, c.targets, c.ce);
    c.balance_value = T(0);
    c.routing.clear();
    c.expert_counts.clear();
    if (!stats_) return c.ce_value;
    c.routing = llm_.routing(c.llm);
    balance_tokens(batch, c.tokens);
    c.balance_value = balance_.forward(std::span<const Routing* const>(c.routing), c.tokens, &c.balance_counts);
    const std::size_t nb = batch.ids.shape()[0], nt = batch.ids.shape()[1];
    ::mixpeft::Tensor<std::int32_t> domains = empty<std::int32_t>({nb * nt});  // each position's domain
    for (std::size_t i = 0; i < nb * nt; ++i) domains.data()[i] = std::int32_t(batch.domains.empty() ? 0 : batch.domains[i / nt]);
    const IndexTensor groups = Backend::template from_host<std::int32_t>(std::move(domains));
    for (std::size_t l = 0; l < c.routing.size(); ++l) stats_->record(l, *c.routing[l], groups, c.tokens.mask);
    count_experts(c);
    return c.ce_value + c.balance_value;
  }

  // Accumulates dloss * d loss / d(trainable parameters), the balance term included. images_grad (optional):
  // written with dloss * d loss / d(batch.images) [Ni, C, S, S] (shape {0} when the batch has no image); null: the
  // frozen ViT gets no backward.
  void backward(Cache& c, T dloss = T(1), Tensor* images_grad = nullptr) {
    require<ConfigError>(c.logits.dimension() == 3, "LlavaMole::backward: called before loss");
    Tensor dlogits;
    cross_entropy_backward(c.logits, c.targets, c.ce, dloss, dlogits);
    c.router_grads.resize(c.routing.size());
    std::vector<RouterGrad<T, Backend>*> grads;
    for (auto& g : c.router_grads) {
      g.clear();
      grads.push_back(&g);
    }
    if (!c.routing.empty())
      balance_.backward(std::span<const Routing* const>(c.routing), c.tokens,
                        std::span<RouterGrad<T, Backend>* const>(grads), dloss, &c.balance_counts);
    embeddings_backward(c, llm_.backward_embeddings(c.llm, llm_.logits_backward(c.llm, dlogits), c.router_grads),
                        images_grad);
  }

  // One micro-batch of training: loss, then backward (gradients accumulate; images_grad as in backward).
  Loss loss_and_backward(const Batch& batch, Tensor* images_grad = nullptr) {
    const T value = loss(batch, train_cache_);
    backward(train_cache_, T(1), images_grad);
    std::size_t tokens = 0;
    for (std::size_t len : batch.lengths) tokens += len;
    return {double(value), double(train_cache_.ce_value), double(train_cache_.balance_value), tokens,
            train_cache_.ce.valid, train_cache_.expert_counts};
  }

  // Greedy decoding of a sample's answer (its `answer` is ignored), in eval mode. The previous mode comes back on
  // every exit, exceptions included.
  std::vector<std::int64_t> generate(Sample sample, std::size_t max_new_tokens,
                                     std::optional<std::int64_t> eos = std::nullopt) {
    struct ModeGuard {
      LlavaMole& model;
      bool was_training;
      ~ModeGuard() { model.set_training(was_training); }
    } guard{*this, training_};
    set_training(false);
    sample.answer.clear();
    Cache c;
    const Tensor x = embeddings(make_batch({sample}), c);
    return llm_.generate_from_embeddings(x, AttentionMask{}, max_new_tokens, eos);
  }

  // Expert usage per layer since the last reset (null when K = 1: there is no router).
  const RouterStats<T, Backend>* router_stats() const { return stats_ ? &*stats_ : nullptr; }
  void reset_router_stats() {
    if (stats_) stats_->reset();
  }

  // ---- parameters -----------------------------------------------------------------------------------------

  void collect_parameters(ParameterList<T, Backend>& list, const std::string& prefix = "") {
    vit_.collect_parameters(list, join_name(prefix, "vision_tower"));
    proj1_.collect_parameters(list, join_name(prefix, "multi_modal_projector.linear_1"));
    proj2_.collect_parameters(list, join_name(prefix, "multi_modal_projector.linear_2"));
    llm_.collect_parameters(list, join_name(prefix, "language_model"));
  }
  void collect_rngs(NamedRngs& list, const std::string& prefix = "") {
    vit_.collect_rngs(list, join_name(prefix, "vision_tower"));
    llm_.collect_rngs(list, join_name(prefix, "language_model"));
  }

  LlavaMoleParameterCount parameter_count() {
    LlavaMoleParameterCount c;
    for (std::size_t i = 0; i < llm_.num_layers(); ++i) {
      c.attention_lora += count_parameters(parameters_of<T, Backend>(llm_.attention(i)), true);
      auto& ffn = llm_.mlp(i).experts();
      if (auto* router = ffn.router()) c.routers += count_parameters(parameters_of<T, Backend>(*router), false);
      c.ffn_experts += count_parameters(parameters_of<T, Backend>(ffn.gate_lora()), false) +
                       count_parameters(parameters_of<T, Backend>(ffn.up_lora()), false) +
                       count_parameters(parameters_of<T, Backend>(ffn.down_lora()), false);
    }
    c.projector = count_parameters(parameters_of<T, Backend>(proj1_), false) +
                  count_parameters(parameters_of<T, Backend>(proj2_), false);
    c.trainable = c.attention_lora + c.ffn_experts + c.routers + c.projector;
    c.total = count_parameters(parameters_of<T, Backend>(*this), false);
    return c;
  }

  // The same counts from a configuration alone (nothing is allocated).
  static LlavaMoleParameterCount parameter_count(const Config& config) {
    const Config& c = validated(config);
    const std::size_t d = c.llm.dim, L = c.llm.n_layers, K = c.experts.experts;
    const LoRATargets& t = c.lora_targets;
    LlavaMoleParameterCount n;
    n.attention_lora = L * std::size_t(t.q + t.k + t.v + t.o) * param_count::lora(d, d, c.lora.rank);
    n.ffn_experts = L * K * 3 * param_count::lora(d, c.llm.ffn_dim, c.experts.rank);  // gate, up, down
    n.routers = K > 1 ? L * param_count::linear(d, K, c.experts.router_bias) : 0;
    n.projector = param_count::linear(c.vit.dim, d, true) + param_count::linear(d, d, true);
    n.trainable = n.attention_lora + n.ffn_experts + n.routers + n.projector;
    n.total = n.trainable + param_count::llama(c.llm) + param_count::clip_vit(vit_config(c));
    return n;
  }

  void set_training(bool on) {
    training_ = on;
    vit_.set_training(on);
    llm_.set_training(on);
  }
  bool training() const { return training_; }

  const Config& config() const { return config_; }
  std::size_t num_image_tokens() const { return vit_.num_tokens() - 1; }
  LLM& llm() { return llm_; }
  ViT& vit() { return vit_; }
  Linear<T, Backend>& projector1() { return proj1_; }
  Linear<T, Backend>& projector2() { return proj2_; }
  const Balance& balance_loss() const { return balance_; }

 private:
  static const Config& validated(const Config& c) {
    const int layers = int(c.vit.n_layers);
    require<ConfigError>(c.feature_layer <= -1 && c.feature_layer >= -layers, "LlavaMole: feature_layer (",
                         c.feature_layer, ") must lie in [-", layers, ", -1] (the ViT has ", layers, " blocks)");
    require<ConfigError>(c.experts.experts > 0, "LlavaMole: the number of experts K must be > 0 (K = 1: plain LoRA)");
    require<ConfigError>(c.domains > 0, "LlavaMole: domains must be > 0");
    require<ConfigError>(c.bos_id >= 0 && std::size_t(c.bos_id) < c.llm.vocab && c.pad_id >= 0 &&
                             std::size_t(c.pad_id) < c.llm.vocab,
                         "LlavaMole: bos_id (", c.bos_id, ") and pad_id (", c.pad_id, ") must lie in [0, vocab = ",
                         c.llm.vocab, ")");
    return c;
  }
  static typename ViT::Config vit_config(const Config& c) {
    typename ViT::Config v = c.vit;
    v.n_layers = std::size_t(int(c.vit.n_layers) + c.feature_layer + 1);
    v.take_every = 0;
    return v;
  }
  static typename ViT::Peft frozen_vit() {
    typename ViT::Peft p;
    p.freeze_base = true;
    return p;
  }
  static typename LLM::Peft llm_peft(const Config& c) {
    typename LLM::Peft p;
    p.lora_targets = c.lora_targets;
    p.lora = c.lora;
    p.ffn = c.experts;
    p.freeze_base = true;
    return p;
  }

  // targets[b, t] = labels[b, t + 1] (the next token's label), ignore_index at the last position.
  static void shift_labels(const IdTensor& labels, IdTensor& targets) {
    resize_to(targets, shape_of(labels));
    targets.fill(default_ignore_index);
    const std::size_t nt = labels.shape()[1];
    if (nt > 1) xt::view(targets, xt::all(), xt::range(0, nt - 1)) = xt::view(labels, xt::all(), xt::range(1, nt));
  }

  // mask [B T]: 1 before each sequence's length; sample_ids [B T]: the sequence (built on the host, handed over).
  static void balance_tokens(const Batch& batch, BalanceTokens<T, Backend>& tokens) {
    const std::size_t nb = batch.ids.shape()[0], nt = batch.ids.shape()[1];
    tokens.samples = nb;
    ::mixpeft::Tensor<std::int32_t> ids;
    batch_sample_ids(nb, nt, ids);
    tokens.sample_ids = Backend::template from_host<std::int32_t>(std::move(ids));
    HostTensor mask = empty<accumulator_t<T>>({nb * nt});
    for (std::size_t i = 0; i < nb * nt; ++i) mask.data()[i] = accumulator_t<T>(i % nt < batch.lengths[i / nt] ? 1 : 0);
    tokens.mask = Backend::template from_host<T>(std::move(mask));
  }

  void check_batch(const Batch& batch) const {
    constexpr const char* op = "LlavaMole";
    expect_shape(op, "ids", batch.ids, {any_extent, any_extent});
    expect_same_shape(op, "labels", batch.labels, "ids", batch.ids);
    const std::size_t nb = batch.ids.shape()[0], nt = batch.ids.shape()[1], n = num_image_tokens();
    require<ShapeError>(batch.lengths.size() == nb && batch.image_start.size() == nb &&
                            (batch.domains.empty() || batch.domains.size() == nb),
                        op, ": ", nb, " sequences but ", batch.lengths.size(), " lengths, ", batch.image_start.size(),
                        " image_start entries and ", batch.domains.size(), " domains");
    std::size_t images = 0;
    for (std::size_t b = 0; b < nb; ++b) {
      const std::size_t len = batch.lengths[b];
      require<IndexError>(len >= 1 && len <= nt, op, ": length ", len, " of sequence ", b, " is outside [1, ", nt, "]");
      require<IndexError>(batch.domains.empty() || batch.domains[b] < config_.domains, op, ": domain ",
                          batch.domains.empty() ? 0 : batch.domains[b], " of sequence ", b, " is outside [0, ",
                          config_.domains, ")");
      const auto& s = batch.image_start[b];
      if (s) {
        ++images;
        require<IndexError>(*s + n <= len, op, ": the ", n, " image tokens of sequence ", b, " start at ", *s,
                            " and do not fit in its length ", len);
      }
      for (std::size_t t = 0; t < nt; ++t) {
        const bool slot = t >= len || (s && t >= *s && t < *s + n);
        require<ConfigError>(!slot || batch.labels(b, t) == default_ignore_index, op, ": label of sequence ", b,
                             " at position ", t, " (image slot or padding) must be ", default_ignore_index);
      }
    }
    if (images > 0) {
      const auto& vc = config_.vit;
      expect_shape(op, "images", batch.images, {images, vc.channels, vc.image_size, vc.image_size});
    } else {
      if (batch.images.dimension() > 0 && batch.images.size() > 0)
        throw ShapeError(detail::concat(op, ": images has shape ", shape_string(batch.images.shape()),
                                        " but no sample has an image"));
    }
  }

  // x [B, T, D]: token embeddings with the projected patch tokens at the image slots.
  Tensor embeddings(const Batch& batch, Cache& c) {
    check_batch(batch);
    const std::size_t nb = batch.ids.shape()[0], n = num_image_tokens();
    Tensor x = llm_.embed(batch.ids);
    if (llm_.embed_tokens().trainable) c.ids = batch.ids;
    c.images.clear();
    for (std::size_t b = 0; b < nb; ++b)
      if (batch.image_start[b]) c.images.emplace_back(b, *batch.image_start[b]);
    if (c.images.empty()) return x;
    const Tensor hidden = vit_.forward(batch.images, c.vit).hidden;  // [Ni, Np + 1, Dv]
    Tensor patches;                                                   // [Ni, Np, Dv]: without [cls]
    resize_to(patches, Shape{c.images.size(), n, config_.vit.dim});
    for (std::size_t i = 0; i < c.images.size(); ++i) copy_token_block(hidden, i, 1, patches, i, 0, n);
    c.proj_pre = proj1_.forward(patches, c.proj1);
    Tensor act;
    quick_gelu_forward(c.proj_pre, act);
    const Tensor v = proj2_.forward(act, c.proj2);                    // [Ni, Np, D]
    for (std::size_t i = 0; i < c.images.size(); ++i) {
      const auto [b, s] = c.images[i];
      copy_token_block(v, i, 0, x, b, s, n);
    }
    return x;
  }

  // c.expert_counts[l][j]: valid positions of the last forward that layer l routed to expert j.
  void count_experts(Cache& c) const {
    const std::size_t K = config_.experts.experts;
    c.expert_counts.assign(c.routing.size(), std::vector<std::size_t>(K, 0));
    const IndexTensor no_groups = Backend::template zeros<std::int32_t>(Shape{0});
    for (std::size_t l = 0; l < c.routing.size(); ++l) {
      const auto& r = *c.routing[l];
      ExpertTally t{K, {0.0}, std::vector<double>(K, 0.0), std::vector<double>(K, 0.0)};
      tally_experts("LlavaMole::expert_counts", r.probs, r.experts, r.k, c.tokens.mask, no_groups, t);
      for (std::size_t j = 0; j < K; ++j) c.expert_counts[l][j] = std::size_t(t.count[j]);
    }
  }

  // Whether any vision-tower parameter is trainable (by default none is).
  bool vit_trainable() {
    for (const auto& ref : parameters_of<T, Backend>(vit_))
      if (ref.param->trainable) return true;
    return false;
  }

  // dx [B, T, D] -> the projector; into the ViT only when d_images is requested or a ViT parameter is trainable.
  void embeddings_backward(Cache& c, Tensor dx, Tensor* images_grad) {
    const std::size_t n = num_image_tokens();
    if (images_grad && c.images.empty()) resize_to(*images_grad, Shape{0});
    if (!c.images.empty()) {
      Tensor dv;
      resize_to(dv, Shape{c.images.size(), n, config_.llm.dim});
      for (std::size_t i = 0; i < c.images.size(); ++i) {
        const auto [b, s] = c.images[i];
        copy_token_block(dx, b, s, dv, i, 0, n);
      }
      const Tensor d_act = proj2_.backward(c.proj2, dv);
      Tensor d_pre;
      quick_gelu_backward(c.proj_pre, d_act, d_pre);
      const bool into_vit = images_grad || vit_trainable();
      if (into_vit || proj1_.weight().trainable || proj1_.bias().trainable) {
        const Tensor d_patches = proj1_.backward(c.proj1, d_pre);  // [Ni, Np, Dv]
        if (into_vit) {
          // [cls] (row 0) is not used
          Tensor d_hidden = Backend::template zeros<T>(Shape{c.images.size(), n + 1, config_.vit.dim});
          for (std::size_t i = 0; i < c.images.size(); ++i) copy_token_block(d_patches, i, 0, d_hidden, i, 1, n);
          Tensor d_images = vit_.backward(c.vit, d_hidden, Tensor{}, images_grad != nullptr);
          if (images_grad) *images_grad = std::move(d_images);
        }
      }
    }
    if (llm_.embed_tokens().trainable) {  // image slots hold no token embeddings
      for (const auto& [b, s] : c.images) zero_token_block(dx, b, s, n);
      llm_.embed_backward(c.ids, dx);
    }
  }

  Config config_;
  ViT vit_;
  Linear<T, Backend> proj1_, proj2_;  // [D, Dv], [D, D]
  LLM llm_;
  Balance balance_;
  std::optional<RouterStats<T, Backend>> stats_;
  Cache train_cache_;
  bool training_ = true;
};

}  // namespace mixpeft
