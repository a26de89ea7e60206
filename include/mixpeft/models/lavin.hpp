// mixpeft/models/lavin.hpp — LaVIN: a frozen CLIP ViT and a frozen LLaMA joined by Mixture-of-Modality Adaptation.
//
// Forward of one batch (SPEC 1):
//   cls   = ClipVit(images)                     [cls] after every take_every-th block (MM-Adapters in every block,
//                                               each image routed from its own [cls])            // [Ni, n, Dv]
//   v     = W2 SiLU(W1 cls + c1) + c2           the visual neck (W1 [Hn, Dv], W2 [D, Hn])          // [Ni, n, D]
//   x     = E[ids], then x[b, 0] = t_m[modality_b] and x[b, s_b .. s_b + n - 1] = v[image of b]   // [B, T, D]
//   h     = Llama(x)                            MM-Adapter before attention in every block (optionally also before
//                                               the FFN), routed from position 0; mask: causal, block_first_key
//                                               (no token but itself reads position 0), key_lengths (right padding)
//   loss  = CE(logits[b, t], labels[b, t + 1]) over the answer tokens (labels are -100 elsewhere)
// Sequences: image+text [t_m, BOS, prefix..., v_1..v_n, prompt..., answer...]; text-only [t_m, BOS, prefix...,
// prompt..., answer...]; both mixed in one batch, right-padded. Routing reads only position 0, which attends to
// nothing but itself, so every LLM adapter's routing weights depend on the modality alone.
// Backward: dlogits -> Llama (adapters accumulate, the frozen base computes input gradients only) -> dx;
//   d t_m[modality_b] += dx[b, 0];  dv = dx at the visual slots -> neck backward -> d_cls -> ClipVit backward
//   (through the frozen blocks into their adapters: LaVIN's joint optimisation). The frozen token table gets nothing.
//   On request (backward's / loss_and_backward's images_grad pointer, null by default) the ViT backward goes on
//   down to the pixels and writes d_images = dloss * d loss / d images [Ni, C, S, S] (shape {0} for a text-only
//   batch); without the request nothing below the lowest trainable ViT block is computed.
// Trainable: LLM adapters + routers, ViT adapters + routers, neck, modality embedding; everything else is frozen.
// Init: neck weights xavier-uniform, biases zero; t_m ~ N(0, 1) (nn.Embedding), with weight decay like LaVIN's
// 2-D parameters; adapters as MMAdapter.
// Cache: the ViT's and the LLaMA's caches, the neck's input and pre-activation, the logits and shifted targets.
// Parameter names: "vit." + ClipVit names, "llm." + Llama names, "neck.fc1.*", "neck.fc2.*",
// "modality_embedding.weight" ([2, D]: row 0 text-only, row 1 image+text).
// Shapes: B sequences, T positions, D LLM width, Dv ViT width, Hn neck width, n visual tokens per image,
// Ni images in the batch (one per image+text sample), V vocabulary; ids, labels [B, T] int64.
// Backends: device-generic. Lavin<T, Cuda> runs this code on device tensors: t_m and the visual tokens enter
// the sequence through embedding_forward and the token-row ops (ops/token_rows.hpp), and leave it the same way
// in backward. Ids, labels and the samples' images stay on the host (make_batch uploads the images); weights are
// drawn on the host with the CPU model's Rng sequence, so both backends build the same model from one seed.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include <xtensor/xview.hpp>

#include "mixpeft/core/backend.hpp"
#include "mixpeft/core/error.hpp"
#include "mixpeft/core/init.hpp"
#include "mixpeft/core/parameter.hpp"
#include "mixpeft/core/rng.hpp"
#include "mixpeft/layers/linear.hpp"
#include "mixpeft/layers/mm_adapter.hpp"
#include "mixpeft/models/llama.hpp"
#include "mixpeft/models/param_count.hpp"
#include "mixpeft/models/vit.hpp"
#include "mixpeft/ops/activations.hpp"
#include "mixpeft/ops/attention.hpp"
#include "mixpeft/ops/cross_entropy.hpp"
#include "mixpeft/ops/embedding.hpp"
#include "mixpeft/ops/token_rows.hpp"

namespace mixpeft {

// Parameter counts of a Lavin model (printable: `std::cout << counts`).
struct LavinParameterCount {
  std::size_t llm_adapters = 0;        // MM-Adapters and their routers in the LLM
  std::size_t vit_adapters = 0;        // MM-Adapters and their routers in the ViT
  std::size_t neck = 0;
  std::size_t modality_embedding = 0;
  std::size_t trainable = 0;           // the sum of the four above
  std::size_t total = 0;               // trainable + the frozen LLaMA and ViT

  friend std::ostream& operator<<(std::ostream& os, const LavinParameterCount& c) {
    using param_count::format_count;
    return os << "llm adapters " << format_count(c.llm_adapters) << ", vit adapters " << format_count(c.vit_adapters)
              << ", neck " << format_count(c.neck) << ", modality embedding " << format_count(c.modality_embedding)
              << ", trainable " << format_count(c.trainable) << " of " << format_count(c.total);
  }
};

template <class T, class Backend = Cpu>
class Lavin {
 public:
  using Tensor = typename Backend::template tensor<T>;
  using HostTensor = ::mixpeft::Tensor<accumulator_t<T>>;  // images as samples hold them, initial weights
  using IdTensor = ::mixpeft::Tensor<std::int64_t>;        // token ids stay on the host on every backend
  using LLM = Llama<T, Backend>;
  using ViT = ClipVit<T, Backend>;
  using Adapter = MMAdapter<T, Backend>;

  struct Config {
    typename LLM::Config llm{};
    typename ViT::Config vit{};                    // take_every: LaVIN takes [cls] after every 4th of 24 blocks
    typename Adapter::Config llm_adapter{};        // dim is taken from the LLM; defaults h 8, g 2, tau 10, drop 0.1
    std::optional<typename Adapter::Config> vit_adapter = typename Adapter::Config{};  // nullopt: ViT fully frozen
    bool adapter_before_ffn = false;               // a second MM-Adapter before each LLM FFN
    std::size_t neck_hidden = 128;
    std::int64_t bos_id = 1;                       // LLaMA's <s>
    std::int64_t pad_id = 0;                       // placeholder id at padded, modality and visual positions
  };

  // A batch of right-padded sequences (make_batch builds one from Samples).
  struct Batch {
    IdTensor ids;                                          // [B, T]; placeholders at 0, visual slots and padding
    std::vector<std::size_t> lengths;                      // [B] valid positions of each sequence
    std::vector<std::optional<std::size_t>> visual_start;  // [B] first visual slot; nullopt: a text-only sample
    Tensor images;                                         // [Ni, C, S, S] the image samples' images, batch order
    IdTensor labels;                                       // [B, T] answer ids at their positions, -100 elsewhere
  };

  // One example before collation; the sequence is [t_m, BOS, prefix, (visual tokens), prompt, answer].
  struct Sample {
    std::vector<std::int64_t> prefix, prompt, answer;
    std::optional<HostTensor> image;  // [C, S, S] on the host; absent: text-only
  };

  struct Cache {
    std::vector<std::size_t> modality;                         // [B] rows of t_m
    std::vector<std::pair<std::size_t, std::size_t>> visual;   // (sequence, first slot) of each image, batch order
    IdTensor ids;                                              // for the token table, while it is trainable
    typename ViT::Cache vit;
    typename Linear<T, Backend>::Cache fc1, fc2;
    Tensor neck_pre;                                           // [Ni, n, Hn] SiLU input
    AttentionMask mask;
    typename LLM::Cache llm;
    Tensor logits;                                             // [B, T, V]
    IdTensor targets;                                          // [B, T] labels shifted left by one
    typename Backend::template cross_entropy_cache<T> ce;
  };

  // What a training step reports (the Trainer reads loss and tokens).
  struct Loss {
    double loss = 0;
    std::size_t tokens = 0;   // valid positions processed
    std::size_t targets = 0;  // answer tokens in the loss
  };

  Lavin(const Config& config, Rng& rng)
      : config_(validated(config)),
        vit_(config.vit, vit_peft(config), rng),
        llm_(config.llm, llm_peft(config), rng),
        fc1_({.in = config.vit.dim, .out = config.neck_hidden, .bias = true}, rng),
        fc2_({.in = config.neck_hidden, .out = config.llm.dim, .bias = true}, rng) {
    for (Linear<T, Backend>* fc : {&fc1_, &fc2_}) {  // LaVIN's neck init, drawn on the host
      HostTensor w = empty<accumulator_t<T>>(shape_of(fc->weight().value));
      init::xavier_uniform(w, rng);
      fc->weight().value = Backend::template from_host<T>(std::move(w));
      set_zero(fc->bias().value);
    }
    HostTensor table = empty<accumulator_t<T>>({2, config.llm.dim});
    init::normal(table, rng);
    modality_ = Parameter<T, Backend>("modality_embedding.weight", Backend::template from_host<T>(std::move(table)),
                                      true);
  }

  // ---- batches --------------------------------------------------------------------------------------------

  // Collates samples into one right-padded batch with labels on the answer tokens.
  Batch make_batch(const std::vector<Sample>& samples) const {
    require<ConfigError>(!samples.empty(), "Lavin::make_batch: no samples");
    const std::size_t n = num_visual_tokens(), nb = samples.size();
    const auto& vc = config_.vit;
    Batch batch;
    std::size_t longest = 0, images = 0;
    for (const Sample& s : samples) {
      const std::size_t len = 2 + s.prefix.size() + (s.image ? n : 0) + s.prompt.size() + s.answer.size();
      batch.lengths.push_back(len);
      longest = std::max(longest, len);
      if (s.image) {
        expect_shape("Lavin::make_batch", "image", *s.image, {vc.channels, vc.image_size, vc.image_size});
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
      std::size_t t = 1;
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
        batch.visual_start.push_back(t);
        std::copy(s.image->data(), s.image->data() + s.image->size(), pixels.data() + image++ * s.image->size());
        t += n;
      } else {
        batch.visual_start.push_back(std::nullopt);
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
    c.mask = {.causal = true, .block_first_key = true, .key_lengths = batch.lengths};
    return llm_.logits(llm_.forward_embeddings(x, c.mask, c.llm), c.llm);
  }

  // Mean cross-entropy over the answer tokens.
  T loss(const Batch& batch, Cache& c) {
    c.logits = forward(batch, c);
    shift_labels(batch.labels, c.targets);
    return cross_entropy_forward(c.logits, c.targets, c.ce);
  }

  // Accumulates dloss * d loss / d(trainable parameters) into their gradients. images_grad (optional): written
  // with dloss * d loss / d(batch.images) [Ni, C, S, S] (shape {0} when the batch has no image); null: not computed.
  void backward(Cache& c, T dloss = T(1), Tensor* images_grad = nullptr) {
    require<ConfigError>(c.logits.dimension() == 3, "Lavin::backward: called before loss");
    Tensor dlogits;
    cross_entropy_backward(c.logits, c.targets, c.ce, dloss, dlogits);
    embeddings_backward(c, llm_.backward_embeddings(c.llm, llm_.logits_backward(c.llm, dlogits)), images_grad);
  }

  // One micro-batch of training: loss, then backward (gradients accumulate; images_grad as in backward).
  Loss loss_and_backward(const Batch& batch, Tensor* images_grad = nullptr) {
    const T value = loss(batch, train_cache_);
    backward(train_cache_, T(1), images_grad);
    std::size_t tokens = 0;
    for (std::size_t len : batch.lengths) tokens += len;
    return {double(value), tokens, train_cache_.ce.valid};
  }

  // Routing weights [B, 2] of every LLM block's adapter before attention in the last forward.
  std::vector<Tensor> routing_weights(const Cache& c) const {
    std::vector<Tensor> out(c.llm.blocks.size());
    for (std::size_t i = 0; i < out.size(); ++i) assign(out[i], c.llm.blocks[i].adapter_attn.weights);
    return out;
  }

  // Greedy decoding of a sample's answer (its `answer` is ignored), in eval mode: the new tokens, stopping after
  // `eos` (included) or max_new_tokens. The previous mode comes back on every exit, exceptions included.
  std::vector<std::int64_t> generate(Sample sample, std::size_t max_new_tokens,
                                     std::optional<std::int64_t> eos = std::nullopt) {
    struct ModeGuard {
      Lavin& model;
      bool was_training;
      ~ModeGuard() { model.set_training(was_training); }
    } guard{*this, training_};
    set_training(false);
    sample.answer.clear();
    Cache c;
    const Tensor x = embeddings(make_batch({sample}), c);
    return llm_.generate_from_embeddings(x, {.causal = true, .block_first_key = true, .key_lengths = {}},
                                         max_new_tokens, eos);
  }

  // ---- parameters -----------------------------------------------------------------------------------------

  void collect_parameters(ParameterList<T, Backend>& list, const std::string& prefix = "") {
    vit_.collect_parameters(list, join_name(prefix, "vit"));
    llm_.collect_parameters(list, join_name(prefix, "llm"));
    fc1_.collect_parameters(list, join_name(prefix, "neck.fc1"));
    fc2_.collect_parameters(list, join_name(prefix, "neck.fc2"));
    add_parameter(list, prefix, modality_);
  }
  void collect_rngs(NamedRngs& list, const std::string& prefix = "") {
    vit_.collect_rngs(list, join_name(prefix, "vit"));
    llm_.collect_rngs(list, join_name(prefix, "llm"));
  }

  // Counts of the allocated model.
  LavinParameterCount parameter_count() {
    LavinParameterCount c;
    for (std::size_t i = 0; i < llm_.num_layers(); ++i)
      for (Adapter* a : {llm_.adapter_attn(i), llm_.adapter_mlp(i)})
        if (a) c.llm_adapters += numel(parameters_of<T, Backend>(*a));
    for (std::size_t i = 0; i < vit_.num_layers(); ++i)
      if (Adapter* a = vit_.adapter(i)) c.vit_adapters += numel(parameters_of<T, Backend>(*a));
    c.neck = numel(parameters_of<T, Backend>(fc1_)) + numel(parameters_of<T, Backend>(fc2_));
    c.modality_embedding = modality_.numel();
    c.trainable = c.llm_adapters + c.vit_adapters + c.neck + c.modality_embedding;
    c.total = numel(parameters_of<T, Backend>(*this));
    return c;
  }

  // The same counts from a configuration alone (nothing is allocated).
  static LavinParameterCount parameter_count(const Config& config) {
    const Config& c = validated(config);
    const auto& a = c.llm_adapter;
    LavinParameterCount n;
    n.llm_adapters = c.llm.n_layers * (c.adapter_before_ffn ? 2 : 1) * param_count::mm_adapter(c.llm.dim, a.hidden, a.groups);
    if (c.vit_adapter)
      n.vit_adapters = c.vit.n_layers * param_count::mm_adapter(c.vit.dim, c.vit_adapter->hidden, c.vit_adapter->groups);
    n.neck = param_count::linear(c.vit.dim, c.neck_hidden, true) + param_count::linear(c.neck_hidden, c.llm.dim, true);
    n.modality_embedding = 2 * c.llm.dim;
    n.trainable = n.llm_adapters + n.vit_adapters + n.neck + n.modality_embedding;
    n.total = n.trainable + param_count::llama(c.llm) + param_count::clip_vit(c.vit);
    return n;
  }

  void set_training(bool on) {
    training_ = on;
    vit_.set_training(on);
    llm_.set_training(on);
  }
  bool training() const { return training_; }

  const Config& config() const { return config_; }
  std::size_t num_visual_tokens() const { return vit_.num_taken(); }
  LLM& llm() { return llm_; }
  ViT& vit() { return vit_; }
  Linear<T, Backend>& neck_fc1() { return fc1_; }
  Linear<T, Backend>& neck_fc2() { return fc2_; }
  Parameter<T, Backend>& modality_embedding() { return modality_; }

 private:
  static const Config& validated(const Config& c) {
    require<ConfigError>(c.vit.take_every > 0, "Lavin: the ViT must take [cls] tokens (vit.take_every > 0, LaVIN: 4)");
    require<ConfigError>(c.neck_hidden > 0, "Lavin: neck_hidden must be > 0");
    require<ConfigError>(c.bos_id >= 0 && std::size_t(c.bos_id) < c.llm.vocab && c.pad_id >= 0 &&
                             std::size_t(c.pad_id) < c.llm.vocab,
                         "Lavin: bos_id (", c.bos_id, ") and pad_id (", c.pad_id, ") must lie in [0, vocab = ",
                         c.llm.vocab, ")");
    return c;
  }
  static typename ViT::Peft vit_peft(const Config& c) {
    typename ViT::Peft p;
    p.mm_adapter = c.vit_adapter;
    p.freeze_base = true;
    return p;
  }
  static typename LLM::Peft llm_peft(const Config& c) {
    typename LLM::Peft p;
    p.mm_adapter = c.llm_adapter;
    p.mm_adapter_ffn = c.adapter_before_ffn;
    p.freeze_base = true;
    return p;
  }
  static std::size_t numel(const ParameterList<T, Backend>& list) { return count_parameters(list, false); }

  // [B, 1] the t_m row of each sequence (1: it has an image).
  static IdTensor modality_ids(const Cache& c) {
    IdTensor ids = empty<std::int64_t>({c.modality.size(), 1});
    for (std::size_t b = 0; b < c.modality.size(); ++b) ids.data()[b] = std::int64_t(c.modality[b]);
    return ids;
  }

  // targets[b, t] = labels[b, t + 1] (the next token's label), ignore_index at the last position.
  static void shift_labels(const IdTensor& labels, IdTensor& targets) {
    resize_to(targets, shape_of(labels));
    targets.fill(default_ignore_index);
    const std::size_t nt = labels.shape()[1];
    if (nt > 1) xt::view(targets, xt::all(), xt::range(0, nt - 1)) = xt::view(labels, xt::all(), xt::range(1, nt));
  }

  void check_batch(const Batch& batch) const {
    constexpr const char* op = "Lavin";
    expect_shape(op, "ids", batch.ids, {any_extent, any_extent});
    expect_same_shape(op, "labels", batch.labels, "ids", batch.ids);
    const std::size_t nb = batch.ids.shape()[0], nt = batch.ids.shape()[1], n = num_visual_tokens();
    require<ShapeError>(batch.lengths.size() == nb && batch.visual_start.size() == nb, op, ": ", nb,
                        " sequences but ", batch.lengths.size(), " lengths and ", batch.visual_start.size(),
                        " visual_start entries");
    std::size_t images = 0;
    for (std::size_t b = 0; b < nb; ++b) {
      const std::size_t len = batch.lengths[b];
      require<IndexError>(len >= 1 && len <= nt, op, ": length ", len, " of sequence ", b, " is outside [1, ", nt, "]");
      const auto& s = batch.visual_start[b];
      if (s) {
        ++images;
        require<IndexError>(*s >= 1 && *s + n <= len, op, ": the ", n, " visual tokens of sequence ", b,
                            " start at ", *s, " and do not fit between position 1 and its length ", len);
      }
      for (std::size_t t = 0; t < nt; ++t) {
        const bool slot = t == 0 || t >= len || (s && t >= *s && t < *s + n);
        require<ConfigError>(!slot || batch.labels(b, t) == default_ignore_index, op, ": label of sequence ", b,
                             " at position ", t, " (modality token, visual slot or padding) must be ",
                             default_ignore_index);
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

  // x [B, T, D]: token embeddings, t_m at position 0, the neck's visual tokens at the visual slots.
  Tensor embeddings(const Batch& batch, Cache& c) {
    check_batch(batch);
    const std::size_t nb = batch.ids.shape()[0], n = num_visual_tokens();
    Tensor x = llm_.embed(batch.ids);
    if (llm_.embed_tokens().trainable) c.ids = batch.ids;
    c.modality.assign(nb, 0);
    c.visual.clear();
    for (std::size_t b = 0; b < nb; ++b) {
      if (batch.visual_start[b]) {
        c.modality[b] = 1;
        c.visual.emplace_back(b, *batch.visual_start[b]);
      }
    }
    Tensor tm;  // [B, 1, D] each sequence's t_m, placed at position 0
    embedding_forward(modality_ids(c), modality_.value, tm);
    copy_token_row(tm, 0, x, 0);
    if (c.visual.empty()) return x;
    const Tensor cls = vit_.forward(batch.images, c.vit).cls;  // [Ni, n, Dv]
    c.neck_pre = fc1_.forward(cls, c.fc1);
    Tensor act;
    silu_forward(c.neck_pre, act);
    const Tensor v = fc2_.forward(act, c.fc2);                 // [Ni, n, D]
    for (std::size_t i = 0; i < c.visual.size(); ++i) {
      const auto [b, s] = c.visual[i];
      copy_token_block(v, i, 0, x, b, s, n);
    }
    return x;
  }

  // dx [B, T, D] -> the modality embedding, the neck and the ViT adapters (and d_images when images_grad).
  void embeddings_backward(Cache& c, Tensor dx, Tensor* images_grad) {
    const std::size_t n = num_visual_tokens();
    if (images_grad && c.visual.empty()) resize_to(*images_grad, Shape{0});
    if (modality_.trainable) {
      Tensor d_tm;  // [B, 1, D]
      resize_to(d_tm, Shape{c.modality.size(), 1, config_.llm.dim});
      copy_token_row(dx, 0, d_tm, 0);
      embedding_backward(modality_ids(c), d_tm, &modality_.grad);
    }
    if (!c.visual.empty()) {
      Tensor dv;
      resize_to(dv, Shape{c.visual.size(), n, config_.llm.dim});
      for (std::size_t i = 0; i < c.visual.size(); ++i) {
        const auto [b, s] = c.visual[i];
        copy_token_block(dx, b, s, dv, i, 0, n);
      }
      const Tensor d_act = fc2_.backward(c.fc2, dv);
      Tensor d_pre;
      silu_backward(c.neck_pre, d_act, d_pre);
      Tensor d_images = vit_.backward(c.vit, Tensor{}, fc1_.backward(c.fc1, d_pre), images_grad != nullptr);
      if (images_grad) *images_grad = std::move(d_images);
    }
    if (llm_.embed_tokens().trainable) {  // positions that do not hold token embeddings pass nothing to the table
      for (std::size_t b = 0; b < c.modality.size(); ++b) zero_token_block(dx, b, 0, 1);
      for (const auto& [b, s] : c.visual) zero_token_block(dx, b, s, n);
      llm_.embed_backward(c.ids, dx);
    }
  }

  Config config_;
  ViT vit_;
  LLM llm_;
  Linear<T, Backend> fc1_, fc2_;     // neck: [Hn, Dv], [D, Hn]
  Parameter<T, Backend> modality_;   // t_m [2, D]
  Cache train_cache_;
  bool training_ = true;
};

}  // namespace mixpeft
