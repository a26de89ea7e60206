// lavin_ablation — LaVIN's ablation ladder (SPEC 1.5) at toy scale on the ScienceQA-like data of lavin_data.hpp.
//
// A small LLaMA and ViT are pre-trained once and cached (common/backbones.hpp), then frozen; every run tunes a
// fresh Lavin model (neck, adapters, modality token) on the same training samples in the same order and scores
// the test split by multiple choice (argmax over the offered options at the deciding position):
//   ladder     (a) text only            no visual tokens (every row text-only); LLM adapters
//              (b) + vision (MMT)       the frozen ViT's [cls] tokens through the neck; LLM adapters, ViT frozen
//              (c) + joint optimisation ViT adapters trained too (gradients flow through the frozen ViT)
//              (d) + MM-Adapter routing routers trained (LLM: from the modality token; ViT: from each image's [cls])
//   Rows (a)-(c) use the same MM-Adapter with its router frozen at zero: w = softmax(0) = (0.5, 0.5) for every
//   input, so the two up-projections (both zero-initialised, same gradients) stay equal and the block is a plain
//   RepAdapter, x + B (A x + a) + b. Their parameter counts count one up-projection and no router or modality
//   token (which nothing reads without routing); the neck is not counted in (a), where it is unused.
//   width      row (d) with adapter hidden width h in {2, 4, 8, 16}
//   tau        row (d) with router temperature tau in {1, 5, 10}
//   retention  text-only ability: the pre-trained LLM's knowledge of the held-out text facts (a cloze probe, "what
//              is 3 plus 4 ?" -> the option words, as the corpus states them) before tuning and, on the text-only
//              route, after tuning; and text questions after tuning on image questions only (image_fraction 1),
//              with and without routing.
// Every run also reports the cloze probe and, per LLM layer, the mean routing weight w0 of text-only and of image
// rows (the routing gap is their mean absolute difference over the layers).
// Deviations from LaVIN, each needed at this scale and switchable (see docs/results_lavin.md for the evidence):
//   answers name the option's content ("8") rather than its letter (--answer letter: ScienceQA's "(A)"); the
//   answer is the option alone (--sentence: "the answer is 8 ."); a second MM-Adapter sits before every LLM FFN
//   (--no-adapter-ffn: LaVIN's default placement, before attention only).
// Outputs in --out: lavin_runs.csv (one row per seed and run), lavin_tasks.csv (per-task accuracy),
// lavin_results.json (everything, with loss curves, tables, settings and timings) and results.md (the tables). For a given --seed the
// results are reproducible (on one thread; more threads change floating-point summation order).
#include <CLI/CLI.hpp>
#include <Eigen/Core>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/backbones.hpp"
#include "common/batch.hpp"
#include "common/lavin_data.hpp"
#include "common/progress.hpp"
#include "common/tokenizer.hpp"
#include "mixpeft/core/parameter.hpp"
#include "mixpeft/core/rng.hpp"
#include "mixpeft/io/atomic_file.hpp"
#include "mixpeft/models/lavin.hpp"
#include "mixpeft/models/param_count.hpp"
#include "mixpeft/train/lr_schedule.hpp"
#include "mixpeft/train/trainer.hpp"

namespace {

using namespace mixpeft;
namespace ex = mixpeft::examples;
namespace fs = std::filesystem;
using Model = Lavin<float>;
using data::LavinTask;

struct Options {
  std::uint64_t seed = 0;
  std::size_t seeds = 1;  // seeds seed .. seed + seeds - 1; tables give mean and standard deviation
  bool full = false;
  std::string out = "out/lavin_ablation";
  std::string cache_dir = "build/cache";
  std::string data_dir = MIXPEFT_DATA_DIR;
  bool retrain_backbones = false;
  int threads = 1;
  std::size_t log_every = 50;
  std::size_t take_every = 2;  // ViT [cls] after every take_every-th block: n_layers / take_every visual tokens
  std::size_t n_train = 2000, n_test = 600, batch = 32, epochs = 5, neck_hidden = 64;
  double lr = 1e-2, dropout = 0.1;
  std::string answer = "content";  // content: the option's text ("8"); letter: its letter ("A", ScienceQA's form)
  bool sentence = false;           // "the answer is 8 ." instead of "8"
  bool adapter_ffn = true;         // a second MM-Adapter before each LLM FFN (LaVIN's option)
  std::vector<std::string> groups = {"ladder", "width", "tau", "retention"};
};

struct RunSpec {
  std::string group, name;
  bool vision = true;         // visual tokens in the LLM's input
  bool joint = true;          // ViT adapters trained
  bool routing = true;        // routers (and the modality token) trained; else frozen at w = (0.5, 0.5)
  std::size_t hidden = 8;     // adapter width h (LLM and ViT)
  double tau = 10.0;          // router temperature
  double image_fraction = 0.5;
};

struct Scores {
  std::array<std::size_t, data::n_lavin_tasks> right{}, total{};
  double accuracy(bool image_tasks) const {
    std::size_t r = 0, n = 0;
    for (std::size_t t = 0; t < data::n_lavin_tasks; ++t)
      if (data::is_image_task(LavinTask(t)) == image_tasks) r += right[t], n += total[t];
    return n ? double(r) / double(n) : 0.0;
  }
  double overall() const {
    std::size_t r = 0, n = 0;
    for (std::size_t t = 0; t < data::n_lavin_tasks; ++t) r += right[t], n += total[t];
    return n ? double(r) / double(n) : 0.0;
  }
  double task(std::size_t t) const { return total[t] ? double(right[t]) / double(total[t]) : 0.0; }
};

struct Evaluation {
  Scores mc;                               // multiple choice on the test split
  double cloze = 0.0;                      // knowledge probe on the held-out text facts (text-only route)
  std::vector<double> w0_text, w0_image;   // per LLM layer: mean routing weight of branch 0
};

struct RunResult {
  RunSpec spec;
  std::uint64_t seed = 0;
  std::size_t trainable = 0;      // effective count (see the top of the file)
  std::size_t steps = 0;
  double seconds = 0.0, final_loss = 0.0;
  std::vector<double> losses;     // per optimizer step
  Evaluation eval;
};

// ---- batches ------------------------------------------------------------------------------------------------

// data::Batch (targets already shifted) -> Lavin::Batch (labels at the answer positions; Lavin shifts them).
Model::Batch to_lavin(const data::Batch<float>& d) {
  Model::Batch b;
  const std::size_t nb = d.ids.shape()[0], nt = d.ids.shape()[1];
  b.ids = d.ids;
  b.lengths = d.key_lengths;
  b.visual_start.assign(nb, std::nullopt);
  for (std::size_t i = 0; i < d.image_rows.size(); ++i) b.visual_start[d.image_rows[i]] = d.visual_start[i];
  b.images = d.images;
  b.labels = empty<std::int64_t>({nb, nt});
  b.labels.fill(data::ignore_label);
  for (std::size_t r = 0; r < nb; ++r)
    for (std::size_t t = 0; t + 1 < nt; ++t) b.labels(r, t + 1) = d.targets(r, t);
  return b;
}

struct EvalBatch {
  data::Batch<float> data;
  Model::Batch model;
};

std::vector<EvalBatch> eval_batches(const std::vector<data::Sample>& samples, std::size_t visual_tokens) {
  std::vector<EvalBatch> out;
  for (const auto& rows : data::minibatches(samples.size(), 100)) {
    auto d = data::make_batch<float>(samples, rows, {.visual_tokens = visual_tokens, .modality_slot = true});
    Model::Batch m = to_lavin(d);
    out.push_back({std::move(d), std::move(m)});
  }
  return out;
}

// The option texts of a sample, in letter order (every option is one token: "(A) 8 (B) 3 ...").
std::vector<std::int64_t> option_tokens(const data::Sample& s) {
  const std::int64_t open = data::token_id("("), close = data::token_id(")");
  std::vector<std::int64_t> options;
  for (std::size_t i = 0; i + 4 < s.prompt.size(); ++i)
    if (s.prompt[i] == open && s.prompt[i + 2] == close) {
      require<ConfigError>(s.prompt[i + 4] == open || s.prompt[i + 4] == data::token_id("answer"),
                           "option_tokens: an option of \"", data::sample_text(s), "\" is longer than one token");
      options.push_back(s.prompt[i + 3]);
    }
  require<ConfigError>(options.size() == s.choices.size(), "option_tokens: could not read the options of \"",
                       data::sample_text(s), "\"");
  return options;
}

// Content answers: "the answer is 8 ." instead of "the answer is A ."; the choices become the option texts.
void answer_with_content(std::vector<data::Sample>& samples) {
  for (auto& s : samples) {
    s.choices = option_tokens(s);
    s.answer[s.answer_index] = s.choices[s.correct];
  }
}

// The cloze form of a text question, as the corpus states facts: [context] question -> the option words.
std::optional<data::Sample> cloze_sample(const data::Sample& s) {
  if (data::is_image_task(LavinTask(s.task))) return std::nullopt;
  const std::int64_t question = data::token_id("?");
  data::Sample c;
  // prefix = "context : <text> ." -> <text> . (nothing for "none")
  if (!(s.prefix.size() == 4 && s.prefix[2] == data::token_id("none")))
    c.prompt.assign(s.prefix.begin() + 2, s.prefix.end());
  std::size_t i = 0;
  while (i < s.prompt.size() && s.prompt[i] != question) c.prompt.push_back(s.prompt[i++]);
  c.prompt.push_back(question);
  c.choices = option_tokens(s);
  c.correct = s.correct;
  c.answer = {c.choices[c.correct]};
  c.answer_index = 0;
  c.task = s.task;
  return c;
}

// ---- models -------------------------------------------------------------------------------------------------

Model::Config model_config(const ex::BackboneSettings& bs, const Options& o, const RunSpec& r) {
  Model::Config c;
  c.llm = bs.llm;
  c.vit = bs.vit;
  c.vit.take_every = o.take_every;
  const MMAdapter<float>::Config adapter{
      .dim = 0, .hidden = r.hidden, .groups = 2, .scale = 1.0, .dropout = o.dropout, .temperature = r.tau};
  c.llm_adapter = adapter;
  c.vit_adapter = r.joint ? std::optional(adapter) : std::nullopt;
  c.neck_hidden = o.neck_hidden;
  c.adapter_before_ffn = o.adapter_ffn;
  c.bos_id = data::token::bos;
  c.pad_id = data::token::pad;
  return c;
}

// Freezes what a run does not train and returns the effective trainable count.
std::size_t configure_trainable(Model& model, const RunSpec& r) {
  std::size_t duplicate = 0;
  for (const auto& ref : parameters_of<float>(model)) {
    if (!r.routing && ref.name.find(".expert_weights.") != std::string::npos) {
      ref.param->value.fill(0.0f);
      ref.param->set_trainable(false);
    }
    if (!r.routing && ref.name.find(".conv_D.") != std::string::npos) duplicate += ref.param->numel();
  }
  if (!r.routing) model.modality_embedding().set_trainable(false);
  if (!r.vision)
    for (auto* fc : {&model.neck_fc1(), &model.neck_fc2()}) {
      fc->weight().set_trainable(false);
      fc->bias().set_trainable(false);
    }
  return count_parameters(parameters_of<float>(model), true) - duplicate;
}

Scores score(Model& model, const std::vector<EvalBatch>& batches, Evaluation* routing = nullptr) {
  model.set_training(false);
  Model::Cache cache;
  Scores s;
  std::vector<double> w_text, w_image;
  std::size_t n_text = 0, n_image = 0;
  for (const auto& b : batches) {
    const Tensor<float> logits = model.forward(b.model, cache);
    const std::size_t v = logits.shape()[2], nt = logits.shape()[1];
    for (std::size_t r = 0; r < b.data.correct.size(); ++r) {
      const float* row = logits.data() + (r * nt + b.data.decide_pos[r]) * v;
      std::size_t best = 0;
      for (std::size_t k = 1; k < b.data.choices[r].size(); ++k)
        if (row[b.data.choices[r][k]] > row[b.data.choices[r][best]]) best = k;
      const std::size_t task = b.data.task[r];
      s.right[task] += best == b.data.correct[r];
      ++s.total[task];
    }
    if (!routing) continue;
    const auto weights = model.routing_weights(cache);  // per layer [B, 2]
    w_text.resize(weights.size());
    w_image.resize(weights.size());
    for (std::size_t r = 0; r < b.data.correct.size(); ++r) {
      const bool image = b.model.visual_start[r].has_value();
      (image ? n_image : n_text) += 1;
      for (std::size_t l = 0; l < weights.size(); ++l) (image ? w_image : w_text)[l] += weights[l](r, 0);
    }
  }
  if (routing) {
    for (auto& w : w_text) w = n_text ? w / double(n_text) : NAN;
    for (auto& w : w_image) w = n_image ? w / double(n_image) : NAN;
    routing->w0_text = std::move(w_text);
    routing->w0_image = std::move(w_image);
  }
  model.set_training(true);
  return s;
}

// ---- the experiment -----------------------------------------------------------------------------------------

class Experiment {
 public:
  Experiment(const Options& o, const ex::Backbones& backbones)
      : o_(o), backbones_(backbones), visual_tokens_(backbones.settings().vit.n_layers / o.take_every) {
    const auto& bs = backbones.settings();
    const data::Digits digits = data::load_digits(o.data_dir);
    const data::DigitSplit split =
        data::split_digits(digits, bs.digit_val_fraction, bs.digit_test_fraction, bs.data_seed);
    data::LavinConfig lc = bs.lavin_data();  // the fact partition the corpus was built with
    lc.n_train = o.n_train;
    lc.n_test = o.n_test;
    lc.n_val = 1;
    lc.answer_style = o.sentence ? data::AnswerStyle::Sentence : data::AnswerStyle::Letter;
    data_ = data::make_lavin_data(digits, split, lc);
    lc.image_fraction = 1.0;
    image_only_train_ = data::make_lavin_data(digits, split, lc).train;
    for (const auto& s : data_.test)
      if (auto c = cloze_sample(s)) cloze_.push_back(std::move(*c));
    if (o.answer == "content")
      for (auto* part : {&data_.train, &data_.test, &image_only_train_}) answer_with_content(*part);
    eval_vision_ = eval_batches(data_.test, visual_tokens_);
    eval_text_ = eval_batches(data_.test, 0);
    eval_cloze_ = eval_batches(cloze_, 0);
  }

  std::size_t visual_tokens() const { return visual_tokens_; }
  std::size_t cloze_size() const { return cloze_.size(); }
  std::size_t test_size() const { return data_.test.size(); }
  std::size_t train_size() const { return data_.train.size(); }
  std::string example(std::size_t i) const { return data::sample_text(data_.test.at(i)); }

  // The model before tuning (zero-initialised adapters are the identity): multiple choice and the cloze probe.
  Evaluation untuned(std::uint64_t seed) {
    Rng rng(data::detail::derive_seed(seed, "model"));
    Model model(model_config(backbones_.settings(), o_, RunSpec{}), rng);
    load(model);
    Evaluation e;
    e.mc = score(model, eval_vision_);
    e.cloze = score(model, eval_cloze_).accuracy(false);
    return e;
  }

  RunResult run(const RunSpec& spec, std::uint64_t seed) {
    RunResult result;
    result.spec = spec;
    result.seed = seed;
    Rng rng(data::detail::derive_seed(seed, "model"));
    Rng order(data::detail::derive_seed(seed, "order"));
    Model model(model_config(backbones_.settings(), o_, spec), rng);
    load(model);
    result.trainable = configure_trainable(model, spec);

    const std::vector<data::Sample>& train = spec.image_fraction == 1.0 ? image_only_train_ : data_.train;
    result.steps = (train.size() + o_.batch - 1) / o_.batch * o_.epochs;
    TrainerConfig tc{.adamw = {.lr = o_.lr, .beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.02},
                     .schedule = WarmupCosineLr(o_.lr, std::int64_t(std::max<std::size_t>(1, result.steps / 10)),
                                                std::int64_t(result.steps)),
                     .clip_norm = 1.0};
    Trainer<float> trainer(parameters_of<float>(model), tc);
    const data::BatchOptions options{.visual_tokens = spec.vision ? visual_tokens_ : 0, .modality_slot = true};
    std::printf("\n[%s, seed %llu] %s: h %zu, tau %g, image fraction %.1f, %s trainable, %zu steps\n",
                spec.group.c_str(), static_cast<unsigned long long>(seed), spec.name.c_str(), spec.hidden, spec.tau,
                spec.image_fraction, param_count::format_count(result.trainable).c_str(), result.steps);
    std::fflush(stdout);
    ex::Progress progress(spec.group, result.steps, o_.log_every, "tok", std::cout);
    model.set_training(true);
    for (std::size_t epoch = 0; epoch < o_.epochs; ++epoch)
      for (const auto& rows : data::minibatches(train.size(), o_.batch, &order)) {
        const Model::Batch batch = to_lavin(data::make_batch<float>(train, rows, options));
        const TrainStep s = trainer.step<Model::Batch>(model, std::span<const Model::Batch>(&batch, 1));
        result.losses.push_back(s.loss);
        progress.update(std::size_t(s.step), s.loss, double(s.tokens));
      }
    result.seconds = progress.seconds();
    const std::size_t tail = std::max<std::size_t>(1, result.losses.size() / 10);
    for (std::size_t i = result.losses.size() - tail; i < result.losses.size(); ++i)
      result.final_loss += result.losses[i] / double(tail);

    result.eval.mc = score(model, spec.vision ? eval_vision_ : eval_text_, &result.eval);
    result.eval.cloze = score(model, eval_cloze_).accuracy(false);
    std::printf("  -> image %s%%  text %s%%  overall %s%%  cloze %s%%  (%.1f s)\n",
                ex::percent(result.eval.mc.accuracy(true)).c_str(), ex::percent(result.eval.mc.accuracy(false)).c_str(),
                ex::percent(result.eval.mc.overall()).c_str(), ex::percent(result.eval.cloze).c_str(), result.seconds);
    std::fflush(stdout);
    return result;
  }

 private:
  void load(Model& model) const {
    backbones_.load_into(model.llm());
    backbones_.load_into(model.vit());
  }

  const Options& o_;
  const ex::Backbones& backbones_;
  std::size_t visual_tokens_;
  data::LavinData data_;
  std::vector<data::Sample> image_only_train_, cloze_;
  std::vector<EvalBatch> eval_vision_, eval_text_, eval_cloze_;
};

// The runs of the requested groups, each once (the sweeps share the ladder's row (d)).
std::vector<RunSpec> plan(const Options& o, const RunSpec& full_model) {
  const auto wants = [&](const std::string& g) { return std::find(o.groups.begin(), o.groups.end(), g) != o.groups.end(); };
  std::vector<RunSpec> specs;
  const auto add = [&](const RunSpec& s) {
    for (const auto& t : specs)
      if (t.vision == s.vision && t.joint == s.joint && t.routing == s.routing && t.hidden == s.hidden &&
          t.tau == s.tau && t.image_fraction == s.image_fraction)
        return;
    specs.push_back(s);
  };
  if (wants("ladder")) {
    add({.group = "ladder", .name = "(a) text only", .vision = false, .joint = false, .routing = false});
    add({.group = "ladder", .name = "(b) + vision (MMT, frozen ViT)", .joint = false, .routing = false});
    add({.group = "ladder", .name = "(c) + joint optimisation", .routing = false});
    add(full_model);
  }
  if (wants("width"))
    for (std::size_t h : {2, 4, 8, 16}) {
      RunSpec s = full_model;
      s.group = "width", s.name = "(d) h = " + std::to_string(h), s.hidden = h;
      add(s);
    }
  if (wants("tau"))
    for (double tau : {1.0, 5.0, 10.0}) {
      RunSpec s = full_model;
      s.group = "tau", s.name = "(d) tau = " + ex::fixed(tau, 0), s.tau = tau;
      add(s);
    }
  if (wants("retention")) {
    add({.group = "retention", .name = "(c) tuned on image questions only", .routing = false, .image_fraction = 1.0});
    add({.group = "retention", .name = "(d) tuned on image questions only", .image_fraction = 1.0});
  }
  return specs;
}

// ---- reporting ----------------------------------------------------------------------------------------------

double mean(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return v.empty() ? NAN : s / double(v.size());
}

// Mean over the LLM layers of |w0(text rows) - w0(image rows)|: 0 when routing ignores the modality.
double routing_gap(const Evaluation& e) {
  std::vector<double> gaps;
  for (std::size_t l = 0; l < e.w0_text.size() && l < e.w0_image.size(); ++l)
    gaps.push_back(std::abs(e.w0_text[l] - e.w0_image[l]));
  return mean(gaps);
}

// "72.3" for one seed, "72.3 ± 1.2" (sample standard deviation) for several; values are fractions unless scale.
std::string cell(const std::vector<double>& v, double scale = 100.0, int precision = 1) {
  const double m = mean(v);
  if (v.size() < 2) return ex::fixed(scale * m, precision);
  double ss = 0;
  for (double x : v) ss += (x - m) * (x - m);
  return ex::fixed(scale * m, precision) + " ± " + ex::fixed(scale * std::sqrt(ss / double(v.size() - 1)), precision);
}

// One metric of a spec over the seeds.
template <class F>
std::vector<double> over_seeds(const std::vector<RunResult>& runs, const std::string& name, F metric) {
  std::vector<double> v;
  for (const auto& r : runs)
    if (r.spec.name == name) v.push_back(metric(r));
  return v;
}

const auto image_acc = [](const RunResult& r) { return r.eval.mc.accuracy(true); };
const auto text_acc = [](const RunResult& r) { return r.eval.mc.accuracy(false); };
const auto overall_acc = [](const RunResult& r) { return r.eval.mc.overall(); };
const auto cloze_acc = [](const RunResult& r) { return r.eval.cloze; };

nlohmann::json run_json(const RunResult& r) {
  nlohmann::json tasks = nlohmann::json::object();
  for (std::size_t t = 0; t < data::n_lavin_tasks; ++t)
    tasks[std::string(data::lavin_task_name(LavinTask(t)))] = {{"right", r.eval.mc.right[t]},
                                                               {"total", r.eval.mc.total[t]}};
  return {{"seed", r.seed}, {"group", r.spec.group}, {"name", r.spec.name}, {"vision", r.spec.vision},
          {"joint", r.spec.joint}, {"routing", r.spec.routing}, {"hidden", r.spec.hidden}, {"tau", r.spec.tau},
          {"image_fraction", r.spec.image_fraction}, {"trainable", r.trainable}, {"steps", r.steps},
          {"seconds", r.seconds}, {"final_loss", r.final_loss}, {"image_accuracy", r.eval.mc.accuracy(true)},
          {"text_accuracy", r.eval.mc.accuracy(false)}, {"overall_accuracy", r.eval.mc.overall()},
          {"cloze_accuracy", r.eval.cloze}, {"w0_text", r.eval.w0_text}, {"w0_image", r.eval.w0_image},
          {"routing_gap", routing_gap(r.eval)},
          {"tasks", tasks}, {"losses", r.losses}};
}

void write_file(const fs::path& path, const std::string& text) { write_file_atomically(path, text); }

struct Tables {
  ex::Table ladder{{"Setting", "#T-Params", "IMG", "TXT", "Avg", "gain"}};
  ex::Table tasks{{"task"}};
  ex::Table width{{"h", "#T-Params", "IMG", "TXT", "Avg", "cloze", "final loss"}};
  ex::Table tau{{"tau", "#T-Params", "IMG", "TXT", "Avg", "cloze", "final loss"}};
  ex::Table retention{{"Model", "tuned on", "routing", "#T-Params", "TXT", "cloze", "routing gap"}};
};

Tables make_tables(const std::vector<RunSpec>& specs, const std::vector<RunResult>& runs, const Evaluation& untuned,
                   const RunSpec& full_model) {
  Tables t;
  double previous = NAN;
  std::vector<const RunSpec*> ladder;
  for (const auto& s : specs)
    if (s.group == "ladder") ladder.push_back(&s);
  for (const RunSpec* s : ladder) {
    const RunResult& first = *std::find_if(runs.begin(), runs.end(), [&](auto& r) { return r.spec.name == s->name; });
    const double avg = 100.0 * mean(over_seeds(runs, s->name, overall_acc));
    t.ladder.add({s->name, param_count::format_count(first.trainable), cell(over_seeds(runs, s->name, image_acc)),
                  cell(over_seeds(runs, s->name, text_acc)), cell(over_seeds(runs, s->name, overall_acc)),
                  std::isnan(previous) ? "" : (avg >= previous ? "+" : "") + ex::fixed(avg - previous, 1)});
    previous = avg;
  }
  // Per-task accuracy of the ladder's rows (columns a, b, c, d).
  std::vector<std::string> header{"task"};
  for (const RunSpec* s : ladder) header.push_back(s->name.substr(0, 3));
  t.tasks = ex::Table(header);
  if (!ladder.empty())
    for (std::size_t k = 0; k < data::n_lavin_tasks; ++k) {
      std::vector<std::string> row{std::string(data::lavin_task_name(LavinTask(k))) +
                                   (data::is_image_task(LavinTask(k)) ? " (img)" : "")};
      for (const RunSpec* s : ladder)
        row.push_back(cell(over_seeds(runs, s->name, [&](const RunResult& r) { return r.eval.mc.task(k); })));
      t.tasks.add(row);
    }

  const auto sweep = [&](ex::Table& table, const std::string& group, auto value) {
    std::vector<const RunSpec*> rows;
    for (const auto& s : specs)
      if (s.group == group || (s.name == full_model.name && std::any_of(specs.begin(), specs.end(), [&](auto& x) {
                                 return x.group == group;
                               })))
        rows.push_back(&s);
    std::sort(rows.begin(), rows.end(), [&](auto* a, auto* b) { return value(*a) < value(*b); });
    for (const RunSpec* s : rows) {
      const RunResult& first = *std::find_if(runs.begin(), runs.end(), [&](auto& r) { return r.spec.name == s->name; });
      table.add({ex::fixed(value(*s), 0), param_count::format_count(first.trainable),
                 cell(over_seeds(runs, s->name, image_acc)), cell(over_seeds(runs, s->name, text_acc)),
                 cell(over_seeds(runs, s->name, overall_acc)), cell(over_seeds(runs, s->name, cloze_acc)),
                 cell(over_seeds(runs, s->name, [](const RunResult& r) { return r.final_loss; }), 1.0, 3)});
    }
  };
  sweep(t.width, "width", [](const RunSpec& s) { return double(s.hidden); });
  sweep(t.tau, "tau", [](const RunSpec& s) { return s.tau; });

  t.retention.add({"pre-trained LLM (untuned)", "-", "-", "0", ex::percent(untuned.mc.accuracy(false)),
                   ex::percent(untuned.cloze), ""});
  for (const auto& s : specs)
    if (s.group == "retention" || s.name.rfind("(c)", 0) == 0 || s.name == full_model.name) {
      const RunResult& first = *std::find_if(runs.begin(), runs.end(), [&](auto& r) { return r.spec.name == s.name; });
      t.retention.add({s.name, s.image_fraction == 1.0 ? "image questions" : "image + text questions",
                       s.routing ? "yes" : "no", param_count::format_count(first.trainable),
                       cell(over_seeds(runs, s.name, text_acc)),
                       cell(over_seeds(runs, s.name, cloze_acc)),
                       cell(over_seeds(runs, s.name, [](const RunResult& r) { return routing_gap(r.eval); }), 1.0, 2)});
    }
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{"LaVIN ablation ladder (text only, + vision, + joint optimisation, + MM-Adapter routing), adapter "
               "width and temperature sweeps, and text-only retention, on toy ScienceQA-like data"};
  app.option_defaults()->always_capture_default();
  bool quick = false;
  std::string groups;
  app.add_option("--seed", o.seed, "seed of the tuning runs (model init, batch order, dropout)");
  app.add_option("--seeds", o.seeds, "run seeds seed .. seed + N - 1 and report mean ± standard deviation")
      ->check(CLI::PositiveNumber);
  app.add_flag("--quick", quick, "the default settings (about 2 minutes on one core once the backbones are cached, 40 s more to pre-train them)");
  app.add_flag("--full", o.full, "longer runs: 4000 training samples, 1000 test samples, 8 epochs");
  app.add_option("--out", o.out, "directory for lavin_runs.csv, lavin_tasks.csv, lavin_results.json and results.md (the tables)");
  app.add_option("--cache-dir", o.cache_dir, "where the pre-trained backbones are cached");
  app.add_option("--data-dir", o.data_dir, "directory with digits_images.npy and digits_labels.npy");
  app.add_flag("--retrain-backbones", o.retrain_backbones, "pre-train the backbones even when a cache matches");
  app.add_option("--threads", o.threads, "OpenMP / Eigen threads (1 is fastest for these tiny shapes)")
      ->check(CLI::PositiveNumber);
  app.add_option("--log-every", o.log_every, "progress line every N optimizer steps (0: quiet)");
  app.add_option("--take-every", o.take_every, "ViT [cls] token after every N-th block (4 blocks, N = 2: 2 tokens)")
      ->check(CLI::PositiveNumber);
  app.add_option("--epochs", o.epochs, "tuning epochs per run")->check(CLI::PositiveNumber);
  app.add_option("--lr", o.lr, "peak tuning learning rate (AdamW, 10% warm-up, cosine to 0)");
  app.add_option("--batch", o.batch, "tuning batch size")->check(CLI::PositiveNumber);
  app.add_option("--answer", o.answer, "the deciding answer token: content (the option's text) or letter (A-D)")
      ->check(CLI::IsMember({"content", "letter"}));
  app.add_flag("--sentence", o.sentence, "answer \"the answer is X .\" instead of \"X\"");
  app.add_flag("--adapter-ffn,!--no-adapter-ffn", o.adapter_ffn,
               "a second MM-Adapter before each LLM feed-forward (default on; off: LaVIN's default placement)");
  app.add_option("--neck-hidden", o.neck_hidden, "width of the visual neck's hidden layer")->check(CLI::PositiveNumber);
  app.add_option("--groups", groups, "comma-separated subset of ladder,width,tau,retention");
  CLI11_PARSE(app, argc, argv);
  if (quick && o.full) {
    std::cerr << "lavin_ablation: --quick and --full exclude each other\n";
    return 2;
  }
  if (o.full) {
    o.n_train = 4000;
    o.n_test = 1000;
    if (app.count("--epochs") == 0) o.epochs = 8;
  }
  if (!groups.empty()) {
    o.groups.clear();
    std::stringstream ss(groups);
    for (std::string g; std::getline(ss, g, ',');) {
      if (g != "ladder" && g != "width" && g != "tau" && g != "retention") {
        std::cerr << "lavin_ablation: unknown group '" << g << "' (ladder, width, tau, retention)\n";
        return 2;
      }
      o.groups.push_back(g);
    }
  }
#ifdef _OPENMP
  omp_set_num_threads(o.threads);
#endif
  Eigen::setNbThreads(o.threads);

  try {
    const auto start = std::chrono::steady_clock::now();
    const ex::Backbones backbones = ex::Backbones::obtain(ex::BackboneSettings::quick(), o.cache_dir, o.data_dir,
                                                          std::cout, o.retrain_backbones);
    std::cout << "backbones: " << backbones.summary() << '\n';
    const double backbone_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

    Experiment exp(o, backbones);
    std::printf("data: %zu training samples, %zu test samples (%zu held-out text facts in the cloze probe), "
                "%zu visual tokens per image\n  e.g. %s\n",
                exp.train_size(), exp.test_size(), exp.cloze_size(), exp.visual_tokens(), exp.example(0).c_str());
    const Evaluation untuned = exp.untuned(o.seed);
    std::printf("untuned: image %s%%  text %s%%  cloze %s%%\n", ex::percent(untuned.mc.accuracy(true)).c_str(),
                ex::percent(untuned.mc.accuracy(false)).c_str(), ex::percent(untuned.cloze).c_str());

    const RunSpec full_model{.group = "ladder", .name = "(d) + MM-Adapter routing"};
    const std::vector<RunSpec> specs = plan(o, full_model);
    std::vector<RunResult> runs;
    for (std::size_t k = 0; k < o.seeds; ++k)
      for (const auto& spec : specs) runs.push_back(exp.run(spec, o.seed + k));
    const double total_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

    const Tables t = make_tables(specs, runs, untuned, full_model);
    const std::string seeds = o.seeds == 1 ? "seed " + std::to_string(o.seed)
                                           : std::to_string(o.seeds) + " seeds from " + std::to_string(o.seed);
    std::ostringstream report;  // the tables, printed and written to results.md
    report << "LaVIN ablation: test accuracy (%) on " << exp.test_size() << " questions, " << seeds << '\n';
    t.ladder.print(report);
    report << "\nPer-task accuracy (%) of the ladder's rows\n";
    t.tasks.print(report);
    report << "\nAdapter width h (row (d))\n";
    t.width.print(report);
    report << "\nRouter temperature tau (row (d))\n";
    t.tau.print(report);
    report << "\nText-only ability (%): TXT = text questions (multiple choice), cloze = held-out facts in the corpus's "
              "form; routing gap = mean over LLM layers of |w0(text rows) - w0(image rows)|\n";
    t.retention.print(report);

    std::cout << "\nResults (also in " << (fs::path(o.out) / "results.md").string() << "):\n" << report.str();

    fs::create_directories(o.out);
    ex::Table csv({"seed", "group", "name", "vision", "joint", "routing", "hidden", "tau", "image_fraction",
                   "trainable", "steps", "seconds", "final_loss", "image_acc", "text_acc", "overall_acc", "cloze_acc",
                   "w0_text", "w0_image", "routing_gap"});
    ex::Table tasks({"seed", "name", "task", "image_task", "right", "total", "accuracy"});
    for (const auto& r : runs) {
      const std::string seed = std::to_string(r.seed);
      csv.add({seed, r.spec.group, r.spec.name, std::to_string(r.spec.vision), std::to_string(r.spec.joint),
               std::to_string(r.spec.routing), std::to_string(r.spec.hidden), ex::fixed(r.spec.tau, 1),
               ex::fixed(r.spec.image_fraction, 2), std::to_string(r.trainable), std::to_string(r.steps),
               ex::fixed(r.seconds, 2), ex::fixed(r.final_loss, 4), ex::fixed(r.eval.mc.accuracy(true), 4),
               ex::fixed(r.eval.mc.accuracy(false), 4), ex::fixed(r.eval.mc.overall(), 4), ex::fixed(r.eval.cloze, 4),
               ex::fixed(mean(r.eval.w0_text), 4), ex::fixed(mean(r.eval.w0_image), 4),
               ex::fixed(routing_gap(r.eval), 4)});
      for (std::size_t k = 0; k < data::n_lavin_tasks; ++k)
        tasks.add({seed, r.spec.name, std::string(data::lavin_task_name(LavinTask(k))),
                   std::to_string(data::is_image_task(LavinTask(k))), std::to_string(r.eval.mc.right[k]),
                   std::to_string(r.eval.mc.total[k]), ex::fixed(r.eval.mc.task(k), 4)});
    }
    write_file(fs::path(o.out) / "lavin_runs.csv", csv.csv());
    write_file(fs::path(o.out) / "lavin_tasks.csv", tasks.csv());
    write_file(fs::path(o.out) / "results.md", report.str());
    const auto& st = backbones.stats();
    nlohmann::json j = {
        {"seed", o.seed},
        {"seeds", o.seeds},
        {"mode", o.full ? "full" : "quick"},
        {"threads", o.threads},
        {"settings", {{"answer", o.answer}, {"sentence", o.sentence}, {"adapter_ffn", o.adapter_ffn},
                      {"n_train", exp.train_size()}, {"n_test", exp.test_size()}, {"batch", o.batch},
                      {"epochs", o.epochs}, {"lr", o.lr}, {"dropout", o.dropout}, {"neck_hidden", o.neck_hidden},
                      {"visual_tokens", exp.visual_tokens()}, {"cloze_questions", exp.cloze_size()}}},
        {"backbones", {{"file", backbones.file().string()}, {"from_cache", backbones.from_cache()},
                       {"summary", backbones.summary()}, {"llm_loss_first", st.llm_loss_first},
                       {"llm_loss_last", st.llm_loss_last}, {"vit_loss_last", st.vit_loss_last},
                       {"vit_train_accuracy", st.vit_train_accuracy}, {"vit_heldout_accuracy", st.vit_heldout_accuracy},
                       {"llm_seconds", st.llm_seconds}, {"vit_seconds", st.vit_seconds},
                       {"obtain_seconds", backbone_seconds}}},
        {"untuned", {{"image_accuracy", untuned.mc.accuracy(true)}, {"text_accuracy", untuned.mc.accuracy(false)},
                     {"overall_accuracy", untuned.mc.overall()}, {"cloze_accuracy", untuned.cloze}}},
        {"tables", {{"ladder", t.ladder.markdown()}, {"tasks", t.tasks.markdown()}, {"width", t.width.markdown()},
                    {"tau", t.tau.markdown()}, {"retention", t.retention.markdown()}}},
        {"runs", nlohmann::json::array()},
        {"total_seconds", total_seconds},
    };
    for (const auto& r : runs) j["runs"].push_back(run_json(r));
    write_file(fs::path(o.out) / "lavin_results.json", j.dump(1) + "\n");
    std::printf("\nwrote %s/{lavin_runs.csv, lavin_tasks.csv, lavin_results.json, results.md}; total %.1f s\n", o.out.c_str(),
                total_seconds);
  } catch (const std::exception& e) {
    std::cerr << "lavin_ablation: " << e.what() << '\n';
    return 1;
  }
  return 0;
}
