// examples/common/backbones.hpp — the small "pretrained" LLaMA and CLIP ViT of the example programs, trained once
// and cached.
//
// API (namespace mixpeft::examples; stable, shared by lavin_ablation and mole_ablation):
//   BackboneSettings s;                        model configs, pre-training recipes, data seed (defaults below)
//   Backbones b = Backbones::obtain(s, cache_dir, data_dir, std::cout);
//        loads <cache_dir>/<s.name>.safetensors when its format version and settings hash match, else pre-trains
//        both backbones (printing progress and why), writes the file atomically and returns the weights
//   b.load_into(lavin.llm());  b.load_into(lavin.vit());       copy the base weights (Hugging Face names) into any
//        Llama<T> / ClipVit<T> built from s.llm / s.vit (PEFT modules may be on; a ViT with fewer blocks, as
//        LLaVA's feature_layer builds, takes the blocks it has); ShapeError when a config disagrees
//   b.stats(), b.from_cache(), b.file(), b.settings()          pre-training report and provenance
//   BackboneSettings::quick() / ::tiny()                       the default recipe / a seconds-long one for tests
//
// LLaMA: causal language model on data::pretrain_corpus windows (lm_batch), every weight trainable, mean
//   cross-entropy over all positions:  loss = -(1 / B T) sum_{b,t} log softmax(logits[b, t])[stream[s_b + t + 1]].
// ViT: supervised classification of data::vit_pretrain_images (17 classes: digit, scene shape kind, tissue spots)
//   through a temporary head on CLIP's pooled output:  logits = W_h post_layernorm(x_L[:, 0]) + b_h,  mean CE.
//   The head is discarded; take_every and norm_taken do not change any weight and are left out of the hash, so a
//   consumer may take [cls] tokens after any blocks. Held-out accuracy uses DigitSplit::test digits and fresh
//   scenes and tissues.
// Both: AdamW (0.9, 0.95), linear warm-up then half-cosine to 10% of the peak, global gradient-norm clip 1.0.
//
// Cache file: safetensors, tensors "llm.<HF name>" and "vit.<HF name>" in F32, metadata
//   format        "mixpeft-example-backbones"       format_version  backbone_format_version (bump on any change
//   settings      the settings as JSON               settings_hash   FNV-1a 64 of format_version + settings JSON
//   data_seed     the data seed                      stats           PretrainStats as JSON
// A missing, unreadable or mismatching file (other version, other hash: the differing settings are named, or
// tensors that do not fit the configs) is reported on the log and replaced.
// Reproducibility: pre-training is a function of the settings (data_seed: corpus, digit split, fact partition,
// images; init_seed: weights and batch order) up to floating-point reduction order with OpenMP threads.
// Speed: the default recipe takes about 40 s on one core (23 s LLaMA, 15 s ViT); run it on one OpenMP thread
// (omp_set_num_threads(1)): these shapes are too small for threads, and on a busy two-core machine two threads
// were 2-4x slower.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <map>
#include <ostream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "images.hpp"
#include "lavin_data.hpp"
#include "progress.hpp"
#include "tokenizer.hpp"
#include "mixpeft/core/error.hpp"
#include "mixpeft/core/parameter.hpp"
#include "mixpeft/core/rng.hpp"
#include "mixpeft/io/safetensors.hpp"
#include "mixpeft/layers/linear.hpp"
#include "mixpeft/models/llama.hpp"
#include "mixpeft/models/vit.hpp"
#include "mixpeft/ops/cross_entropy.hpp"
#include "mixpeft/train/adamw.hpp"
#include "mixpeft/train/grad_clip.hpp"
#include "mixpeft/train/lr_schedule.hpp"

namespace mixpeft::examples {

inline constexpr int backbone_format_version = 1;

// One pre-training recipe (AdamW, warm-up, cosine, clipping as above).
struct PretrainRecipe {
  std::size_t steps = 0;
  std::size_t batch = 0;
  double lr = 0.0;
  double weight_decay = 0.1;
  std::size_t warmup = 0;       // steps of linear warm-up
  std::size_t log_every = 100;  // progress line every this many steps (0: quiet)
};

struct BackboneSettings {
  std::string name = "backbones";  // cache file <cache_dir>/<name>.safetensors
  Llama<float>::Config llm{.vocab = data::vocab_size, .dim = 64, .n_layers = 3, .n_heads = 4, .ffn_dim = 176,
                           .norm_eps = 1e-5, .rope_theta = 10000.0, .max_seq = 128};
  ClipVit<float>::Config vit{.image_size = 8, .patch = 2, .channels = 3, .dim = 48, .n_layers = 4, .n_heads = 4,
                             .mlp_dim = 192, .layer_norm_eps = 1e-5, .take_every = 2, .norm_taken = false};
  double image_noise = 0.03;                // data::ImageSpec noise (size and channels come from vit)
  PretrainRecipe llm_recipe{.steps = 700, .batch = 16, .lr = 3e-3, .weight_decay = 0.1, .warmup = 40};
  std::size_t llm_window = 64;              // tokens per lm_batch window
  data::CorpusConfig corpus{};              // repeats, captions (its seed is set from data_seed)
  PretrainRecipe vit_recipe{.steps = 500, .batch = 64, .lr = 2e-3, .weight_decay = 0.05, .warmup = 30};
  std::size_t vit_scenes = 1200, vit_tissues = 1200;     // pre-training images besides the training digits
  std::size_t eval_scenes = 300, eval_tissues = 300;     // held-out images besides the test digits
  double digit_val_fraction = 0.1, digit_test_fraction = 0.2;  // data::split_digits (LaVIN's default split)
  std::uint64_t data_seed = 0;              // corpus, digit split, LavinConfig::seed of the fact partition, images
  std::uint64_t init_seed = 0;              // weights and batch order

  // The default recipe (about 40 s on one thread).
  static BackboneSettings quick() { return {}; }
  // A few steps on tiny models (tests).
  static BackboneSettings tiny() {
    BackboneSettings s;
    s.name = "backbones-tiny";
    s.llm.dim = 16;
    s.llm.n_layers = 1;
    s.llm.n_heads = 2;
    s.llm.ffn_dim = 32;
    s.vit.dim = 16;
    s.vit.n_layers = 2;
    s.vit.n_heads = 2;
    s.vit.mlp_dim = 32;
    s.vit.take_every = 1;
    s.llm_recipe = {.steps = 3, .batch = 2, .lr = 1e-3, .weight_decay = 0.1, .warmup = 1, .log_every = 0};
    s.llm_window = 16;
    s.corpus.repeats = 1;
    s.corpus.captions = 10;
    s.vit_recipe = {.steps = 3, .batch = 4, .lr = 1e-3, .weight_decay = 0.1, .warmup = 1, .log_every = 0};
    s.vit_scenes = s.vit_tissues = s.eval_scenes = s.eval_tissues = 8;
    return s;
  }

  // The LaVIN data configuration whose fact partition the corpus was built with (pass it, or a copy with the
  // same seed and fact fractions, to make_lavin_data so test facts stay out of the reading passages).
  data::LavinConfig lavin_data() const {
    data::LavinConfig c;
    c.image = image();
    c.seed = data_seed;
    return c;
  }
  data::ImageSpec image() const { return {.size = vit.image_size, .channels = vit.channels, .noise = image_noise}; }
};

// What pre-training reached (losses are means over the last 10% of the steps).
struct PretrainStats {
  double llm_loss_first = 0, llm_loss_last = 0, llm_seconds = 0;
  double vit_loss_first = 0, vit_loss_last = 0, vit_train_accuracy = 0, vit_heldout_accuracy = 0, vit_seconds = 0;
  std::size_t llm_tokens = 0, vit_images = 0;  // corpus tokens, pre-training images
};

namespace detail::backbones {

inline nlohmann::json recipe_json(const PretrainRecipe& r) {
  return {{"steps", r.steps}, {"batch", r.batch}, {"lr", r.lr}, {"weight_decay", r.weight_decay},
          {"warmup", r.warmup}};
}

// Everything that changes the weights (log_every, name, take_every and norm_taken do not).
inline nlohmann::json settings_json(const BackboneSettings& s) {
  const auto& l = s.llm;
  const auto& v = s.vit;
  return {
      {"llm", {{"vocab", l.vocab}, {"dim", l.dim}, {"n_layers", l.n_layers}, {"n_heads", l.n_heads},
               {"ffn_dim", l.ffn_dim}, {"norm_eps", l.norm_eps}, {"rope_theta", l.rope_theta}, {"max_seq", l.max_seq}}},
      {"vit", {{"image_size", v.image_size}, {"patch", v.patch}, {"channels", v.channels}, {"dim", v.dim},
               {"n_layers", v.n_layers}, {"n_heads", v.n_heads}, {"mlp_dim", v.mlp_dim},
               {"layer_norm_eps", v.layer_norm_eps}}},
      {"image_noise", s.image_noise},
      {"llm_recipe", recipe_json(s.llm_recipe)},
      {"llm_window", s.llm_window},
      {"corpus", {{"repeats", s.corpus.repeats}, {"captions", s.corpus.captions}}},
      {"vit_recipe", recipe_json(s.vit_recipe)},
      {"vit_images", {{"scenes", s.vit_scenes}, {"tissues", s.vit_tissues}, {"eval_scenes", s.eval_scenes},
                      {"eval_tissues", s.eval_tissues}}},
      {"digit_split", {{"val", s.digit_val_fraction}, {"test", s.digit_test_fraction}}},
      {"data_seed", s.data_seed},
      {"init_seed", s.init_seed},
      {"vocabulary_size", data::vocab_size},
  };
}

inline std::string settings_hash(const BackboneSettings& s) {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  const std::string text = std::to_string(backbone_format_version) + settings_json(s).dump();
  for (const char c : text) h = (h ^ std::uint64_t(static_cast<unsigned char>(c))) * 0x100000001b3ULL;
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h));
  return hex;
}

// "llm.dim = 96 (now 64), ..." for the leaves that differ between two settings objects.
inline void describe_differences(const nlohmann::json& stored, const nlohmann::json& now, const std::string& path,
                                 std::vector<std::string>& out) {
  if (stored.is_object() && now.is_object()) {
    for (const auto& [k, v] : now.items())
      describe_differences(stored.contains(k) ? stored.at(k) : nlohmann::json(), v, path.empty() ? k : path + "." + k,
                           out);
    return;
  }
  if (stored != now) out.push_back(path + " = " + (stored.is_null() ? "(absent)" : stored.dump()) + " (now " +
                                   now.dump() + ")");
}

inline nlohmann::json stats_json(const PretrainStats& p) {
  return {{"llm_loss_first", p.llm_loss_first}, {"llm_loss_last", p.llm_loss_last}, {"llm_seconds", p.llm_seconds},
          {"llm_tokens", p.llm_tokens}, {"vit_loss_first", p.vit_loss_first}, {"vit_loss_last", p.vit_loss_last},
          {"vit_train_accuracy", p.vit_train_accuracy}, {"vit_heldout_accuracy", p.vit_heldout_accuracy},
          {"vit_seconds", p.vit_seconds}, {"vit_images", p.vit_images}};
}

inline PretrainStats stats_from_json(const nlohmann::json& j) {
  PretrainStats p;
  p.llm_loss_first = j.at("llm_loss_first");
  p.llm_loss_last = j.at("llm_loss_last");
  p.llm_seconds = j.at("llm_seconds");
  p.llm_tokens = j.at("llm_tokens");
  p.vit_loss_first = j.at("vit_loss_first");
  p.vit_loss_last = j.at("vit_loss_last");
  p.vit_train_accuracy = j.at("vit_train_accuracy");
  p.vit_heldout_accuracy = j.at("vit_heldout_accuracy");
  p.vit_seconds = j.at("vit_seconds");
  p.vit_images = j.at("vit_images");
  return p;
}

// Mean of the first or last tenth of a loss curve.
inline double tenth_mean(const std::vector<double>& losses, bool last) {
  const std::size_t n = std::max<std::size_t>(1, losses.size() / 10);
  double sum = 0;
  for (std::size_t i = 0; i < n; ++i) sum += losses[last ? losses.size() - 1 - i : i];
  return sum / double(n);
}

// AdamW, warm-up + cosine to 10% of the peak, clip 1.0: the optimizer step shared by both pre-trainings.
class Optimizer {
 public:
  Optimizer(const ParameterList<float>& params, const PretrainRecipe& r)
      : params_(params),
        adamw_(params, AdamWConfig{.lr = r.lr, .beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = r.weight_decay}),
        schedule_(r.lr, std::int64_t(std::min(r.warmup, r.steps)), std::int64_t(std::max<std::size_t>(1, r.steps)),
                  0.1 * r.lr) {}
  void zero_grad() { adamw_.zero_grad(); }
  void step(std::size_t t) {
    clip_grad_norm(params_, 1.0);
    adamw_.step(schedule_(std::int64_t(t)));
  }

 private:
  ParameterList<float> params_;
  AdamW<float> adamw_;
  WarmupCosineLr schedule_;
};

inline void pretrain_llm(Llama<float>& llm, const std::vector<std::int64_t>& stream, const BackboneSettings& s,
                         Rng& rng, std::ostream& log, PretrainStats& stats) {
  const PretrainRecipe& r = s.llm_recipe;
  Optimizer opt(parameters_of<float>(llm), r);
  typename Llama<float>::Cache cache;
  CrossEntropyCache<float> ce;
  Tensor<float> dlogits;
  std::vector<double> losses;
  Progress progress("llm pretrain", r.steps, r.log_every, "tok", log);
  llm.set_training(true);
  for (std::size_t t = 0; t < r.steps; ++t) {
    const data::LmBatch batch = data::lm_batch(stream, r.batch, s.llm_window, rng);
    opt.zero_grad();
    const Tensor<float> logits = llm.forward_ids(batch.ids, AttentionMask{}, cache);
    const double loss = cross_entropy_forward(logits, batch.targets, ce);
    cross_entropy_backward(logits, batch.targets, ce, 1.0f, dlogits);
    llm.backward_ids(cache, dlogits);
    opt.step(t);
    losses.push_back(loss);
    progress.update(t + 1, loss, double(batch.ids.size()));
  }
  stats.llm_loss_first = losses.empty() ? 0 : tenth_mean(losses, false);
  stats.llm_loss_last = losses.empty() ? 0 : tenth_mean(losses, true);
  stats.llm_seconds = progress.seconds();
  stats.llm_tokens = stream.size();
}

// Accuracy of the pooled-[cls] classifier on a labelled set.
inline double vit_accuracy(ClipVit<float>& vit, Linear<float>& head, const data::LabelledImages& set) {
  vit.set_training(false);
  typename ClipVit<float>::Cache cache;
  typename Linear<float>::Cache hc;
  std::size_t right = 0;
  for (const auto& rows : data::minibatches(set.size(), 256)) {
    const data::LabelledImages b = data::subset(set, rows);
    const Tensor<float> logits = head.forward(vit.forward(b.images, cache).cls, hc);  // [n, 1, classes]
    const std::size_t classes = logits.shape()[2];
    for (std::size_t i = 0; i < rows.size(); ++i) {
      const float* row = logits.data() + i * classes;
      right += std::size_t(std::max_element(row, row + classes) - row) == std::size_t(b.labels[i]);
    }
  }
  vit.set_training(true);
  return set.size() ? double(right) / double(set.size()) : 0.0;
}

inline void pretrain_vit(ClipVit<float>& vit, const data::LabelledImages& train, const data::LabelledImages& heldout,
                         const BackboneSettings& s, Rng& rng, std::ostream& log, PretrainStats& stats) {
  const PretrainRecipe& r = s.vit_recipe;
  Linear<float> head({.in = s.vit.dim, .out = train.class_names.size(), .bias = true}, rng);
  ParameterList<float> params = parameters_of<float>(vit);
  head.collect_parameters(params, "head");
  Optimizer opt(params, r);
  typename ClipVit<float>::Cache cache;
  typename Linear<float>::Cache hc;
  CrossEntropyCache<float> ce;
  Tensor<float> dlogits;
  std::vector<double> losses;
  std::vector<std::vector<std::size_t>> epoch;
  std::size_t next = 0;
  Progress progress("vit pretrain", r.steps, r.log_every, "img", log);
  vit.set_training(true);
  for (std::size_t t = 0; t < r.steps; ++t) {
    if (next == epoch.size()) {
      epoch = data::minibatches(train.size(), r.batch, &rng);
      if (epoch.size() > 1 && epoch.back().size() < r.batch) epoch.pop_back();
      next = 0;
    }
    const data::LabelledImages b = data::subset(train, epoch[next++]);
    Tensor<std::int64_t> targets = empty<std::int64_t>({b.size(), 1});
    std::copy(b.labels.begin(), b.labels.end(), targets.begin());
    opt.zero_grad();
    const Tensor<float> logits = head.forward(vit.forward(b.images, cache).cls, hc);
    const double loss = cross_entropy_forward(logits, targets, ce);
    cross_entropy_backward(logits, targets, ce, 1.0f, dlogits);
    vit.backward(cache, empty<float>({0}), head.backward(hc, dlogits));
    opt.step(t);
    losses.push_back(loss);
    progress.update(t + 1, loss, double(b.size()));
  }
  stats.vit_loss_first = losses.empty() ? 0 : tenth_mean(losses, false);
  stats.vit_loss_last = losses.empty() ? 0 : tenth_mean(losses, true);
  stats.vit_seconds = progress.seconds();
  stats.vit_train_accuracy = vit_accuracy(vit, head, train);
  stats.vit_heldout_accuracy = vit_accuracy(vit, head, heldout);
  stats.vit_images = train.size();
}

template <class T, class Backend, class Model>
void copy_base(const std::map<std::string, Tensor<float>>& weights, const std::string& prefix, Model& model,
               const char* what) {
  ParameterList<T, Backend> list;
  model.collect_base_parameters(list);
  for (const auto& ref : list) {
    const auto it = weights.find(prefix + ref.name);
    require<ConfigError>(it != weights.end(), "Backbones::load_into(", what, "): the cache has no tensor \"", prefix,
                         ref.name, "\" (the model's config differs from the backbone settings)");
    expect_same_shape("Backbones::load_into", prefix + ref.name, ref.param->value, "the cached tensor", it->second);
    std::copy(it->second.begin(), it->second.end(), ref.param->value.begin());
  }
}

}  // namespace detail::backbones

class Backbones {
 public:
  // Loads the cache when it matches `settings`, else pre-trains and writes it (see the top of the file).
  // retrain = true skips the cache. data_dir holds the UCI digits (MIXPEFT_DATA_DIR in the examples).
  static Backbones obtain(const BackboneSettings& settings, const std::filesystem::path& cache_dir,
                          const std::filesystem::path& data_dir, std::ostream& log, bool retrain = false) {
    namespace db = detail::backbones;
    Backbones b;
    b.settings_ = settings;
    b.file_ = cache_dir / (settings.name + ".safetensors");
    const std::string why = retrain ? std::string("retraining was requested") : b.try_load();
    if (why.empty()) {
      log << "backbones: loaded " << b.file_.string() << " (settings hash " << db::settings_hash(settings) << ")\n";
      return b;
    }
    log << "backbones: " << why << "; pre-training both backbones\n";
    b.pretrain(data_dir, log);
    std::filesystem::create_directories(cache_dir);
    std::vector<TensorEntry<float>> entries;
    for (const auto& [name, t] : b.weights_) entries.push_back({name, t});
    save_safetensors(b.file_, entries,
                     {{"format", "mixpeft-example-backbones"},
                      {"format_version", std::to_string(backbone_format_version)},
                      {"settings", db::settings_json(settings).dump()},
                      {"settings_hash", db::settings_hash(settings)},
                      {"data_seed", std::to_string(settings.data_seed)},
                      {"stats", db::stats_json(b.stats_).dump()}});
    log << "backbones: wrote " << b.file_.string() << '\n';
    return b;
  }

  template <class T, class Backend>
  void load_into(Llama<T, Backend>& llm) const {
    detail::backbones::copy_base<T, Backend>(weights_, "llm.", llm, "Llama");
  }
  template <class T, class Backend>
  void load_into(ClipVit<T, Backend>& vit) const {
    detail::backbones::copy_base<T, Backend>(weights_, "vit.", vit, "ClipVit");
  }

  const BackboneSettings& settings() const { return settings_; }
  const PretrainStats& stats() const { return stats_; }
  bool from_cache() const { return from_cache_; }
  const std::filesystem::path& file() const { return file_; }

  // One line for logs: losses, accuracies and where the weights came from.
  std::string summary() const {
    std::ostringstream os;
    os << "LLaMA LM loss " << fixed(stats_.llm_loss_first, 3) << " -> " << fixed(stats_.llm_loss_last, 3) << " ("
       << fixed(stats_.llm_seconds, 1) << " s); ViT loss " << fixed(stats_.vit_loss_first, 3) << " -> "
       << fixed(stats_.vit_loss_last, 3) << ", accuracy train " << percent(stats_.vit_train_accuracy) << "% held-out "
       << percent(stats_.vit_heldout_accuracy) << "% (" << fixed(stats_.vit_seconds, 1) << " s)"
       << (from_cache_ ? " [cached]" : "");
    return os.str();
  }

 private:
  Backbones() = default;

  // Empty on success, else why the cache cannot be used.
  std::string try_load() {
    namespace db = detail::backbones;
    if (!std::filesystem::exists(file_)) return "no cache at " + file_.string();
    try {
      const SafetensorsFile f(file_);
      const Metadata& m = f.metadata();
      const auto get = [&](const char* key) {
        const auto it = m.find(key);
        return it == m.end() ? std::string() : it->second;
      };
      if (get("format") != "mixpeft-example-backbones") return "cache " + file_.string() + " is not a backbone file";
      if (get("format_version") != std::to_string(backbone_format_version))
        return "cache " + file_.string() + " has format version " + get("format_version") + " (now " +
               std::to_string(backbone_format_version) + ")";
      if (get("settings_hash") != db::settings_hash(settings_)) {
        std::vector<std::string> diff;
        db::describe_differences(nlohmann::json::parse(get("settings")), db::settings_json(settings_), "", diff);
        std::string list;
        for (std::size_t i = 0; i < diff.size(); ++i) list += (i ? ", " : "") + diff[i];
        return "cache " + file_.string() + " was made with other settings" + (list.empty() ? "" : ": " + list);
      }
      std::map<std::string, Tensor<float>> weights;
      for (const auto& name : f.names()) weights.emplace(name, f.read<float>(name));
      weights_ = std::move(weights);
      stats_ = db::stats_from_json(nlohmann::json::parse(get("stats")));
      Rng rng(0);  // check that every base tensor is there with the right shape
      Llama<float> llm(settings_.llm, rng);
      ClipVit<float> vit(settings_.vit, rng);
      load_into(llm);
      load_into(vit);
    } catch (const std::exception& e) {
      weights_.clear();
      return std::string("cache ") + file_.string() + " is unusable (" + e.what() + ")";
    }
    from_cache_ = true;
    return {};
  }

  void pretrain(const std::filesystem::path& data_dir, std::ostream& log) {
    namespace db = detail::backbones;
    const BackboneSettings& s = settings_;
    const data::Digits digits = data::load_digits(data_dir);
    const data::DigitSplit split = data::split_digits(digits, s.digit_val_fraction, s.digit_test_fraction, s.data_seed);
    data::CorpusConfig corpus = s.corpus;
    corpus.seed = s.data_seed;
    const std::vector<std::int64_t> stream = data::pretrain_corpus(s.lavin_data(), corpus);
    const data::LabelledImages train = data::vit_pretrain_images(
        digits, split.train,
        {.image = s.image(), .n_scenes = s.vit_scenes, .n_tissues = s.vit_tissues, .seed = s.data_seed});
    const data::LabelledImages heldout = data::vit_pretrain_images(
        digits, split.test,
        {.image = s.image(), .n_scenes = s.eval_scenes, .n_tissues = s.eval_tissues,
         .seed = data::detail::derive_seed(s.data_seed, "vit held-out")});
    log << "backbones: corpus " << param_count::format_count(stream.size()) << " tokens, " << train.size()
        << " ViT training images (" << heldout.size() << " held out)\n";

    Rng rng(data::detail::derive_seed(s.init_seed, "backbones"));
    Rng llm_rng = rng.split(), vit_rng = rng.split();
    Llama<float> llm(s.llm, llm_rng);
    db::pretrain_llm(llm, stream, s, llm_rng, log, stats_);
    ClipVit<float>::Config vc = s.vit;  // pool the final [cls] through post_layernorm, as CLIP does
    vc.take_every = vc.n_layers;
    vc.norm_taken = true;
    ClipVit<float> vit(vc, vit_rng);
    db::pretrain_vit(vit, train, heldout, s, vit_rng, log, stats_);

    weights_.clear();
    for (const auto& [prefix, list] : {std::pair{std::string("llm."), parameters_of<float>(llm)},
                                       std::pair{std::string("vit."), parameters_of<float>(vit)}})
      for (const auto& ref : list) weights_.emplace(prefix + ref.name, ref.param->value);
    from_cache_ = false;
    log << "backbones: " << summary() << '\n';
  }

  BackboneSettings settings_;
  std::filesystem::path file_;
  std::map<std::string, Tensor<float>> weights_;
  PretrainStats stats_;
  bool from_cache_ = false;
};

}  // namespace mixpeft::examples
