// mole_ablation — LLaVA-MoLE's data-conflict ablations (SPEC 2.4) at toy scale on a CPU.
//
// Pipeline (--seeds repeats stages 2-5 with seed, seed + 1, ...; the backbones are shared):
//   1. backbones  the small pretrained LLaMA and CLIP ViT of the examples (common/backbones.hpp, cached on disk)
//   2. data       three domains whose instructions conflict (common/mole_data.hpp): the same three questions
//                 with the same words, answered by different rules per domain; per-domain train / test splits
//   3. alignment  LLaVA's stage 1: only the projector trains, on captions of all three domains (next-token CE
//                 on the caption); it is then frozen for stage 2, because a trainable projector sees the image
//                 but not the question and can precompute domain-specific answers (--train-projector tries it)
//   4. tuning     LlavaMole: LoRA of rank r on q, k, v, o and K LoRA experts of rank r (alpha = 2 r) on every
//                 FFN, top-1 routing, MoLE balance loss of weight w; K = 1 is plain LoRA. The runs:
//                   single-domain LoRA, one per domain          LoRA on the mixture          MoLE (K) on the mixture
//                   MoLE with Switch-style gate scaling (the router then also learns from the task loss)
//                   rank sweep: LoRA on the mixture at each of --ranks (with --rank-singles, the single-domain
//                   LoRAs at each rank too, for the mixture's gap to them)
//                   expert sweep: K LoRA experts at rank r on the mixture, each of --expert-counts
//                 Runs with the same (training data, rank, K, gate scaling) train once and are shared by tables.
//                 AdamW (0.9, 0.999), no weight decay, 3% linear warm-up then cosine to 0, gradient clip 1.0.
//                 Every run sees each of its training samples --epochs times, so a single-domain run and the
//                 mixture run see a domain's data equally often.
//   5. scoring    accuracy: argmax over the question's answer choices of the logits that predict the answer
//                 token, per test domain (and per question); expert usage of every layer per domain, over all
//                 valid tokens and split into image tokens, text tokens and the decision token (the position
//                 whose logits give the answer); the normalised mutual information
//                 I(domain; expert) / H(domain) per layer (0: routing ignores the domain, 1: it identifies it).
// Outputs in --out: results.json (settings, machine, timings, every run and seed), accuracy.csv (the paper's
// table: rows = models, columns = domains + average, with parameter counts), rank_sweep.csv, expert_sweep.csv,
// runs.csv (every run and seed, per-question accuracies), usage.csv, routing_mi.csv, results.md (the tables).
// tools/plot_mole.py draws the figures from these files. Same seed, settings and --threads (default 1): same numbers.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <numeric>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <nlohmann/json.hpp>

#include "common/backbones.hpp"
#include "common/mole_data.hpp"
#include "common/progress.hpp"
#include "mixpeft/models/llava_mole.hpp"
#include "mixpeft/train/lr_schedule.hpp"
#include "mixpeft/train/trainer.hpp"

namespace {

using namespace mixpeft;
namespace ex = mixpeft::examples;
using Model = LlavaMole<float>;
using Json = nlohmann::json;
using data::n_domains;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

const std::map<std::string, BalanceKind> balance_kinds = {
    {"mole", BalanceKind::MoLE}, {"switch", BalanceKind::Switch}, {"gshard", BalanceKind::GShard},
    {"zloss", BalanceKind::ZLoss}};

std::string balance_name(BalanceKind kind) {
  for (const auto& [name, k] : balance_kinds)
    if (k == kind) return name;
  return "?";
}

// ---- settings ----------------------------------------------------------------------------------------------------

struct Settings {
  std::uint64_t seed = 0;
  std::size_t seeds = 1;                          // repeats with seed, seed + 1, ...
  std::array<std::size_t, n_domains> train_sizes = {1000, 1000, 1000};
  std::size_t test_size = 300;                    // per domain
  bool name_domain = false;                       // the easy control: the domain's noun in every prompt
  bool conflicting = true;                        // false: the control with consistent rules
  std::size_t captions = 300;                     // stage-1 captions per domain
  std::size_t align_epochs = 4;
  double align_lr = 3e-3;
  bool train_projector = false;                   // keep the projector trainable in stage 2
  std::size_t rank = 2;                           // LoRA rank r of the main table and of the expert sweep
  std::size_t experts = 3;                        // K of the MoLE row
  BalanceKind balance_kind = BalanceKind::MoLE;
  double balance_weight = 1e-2;
  bool gate_scaling_row = true;                   // add the "MoLE, gate scaling" row
  std::vector<std::size_t> ranks = {2, 4, 8, 16};
  bool rank_singles = true;                       // single-domain LoRAs at every sweep rank too (the gap)
  std::vector<std::size_t> expert_counts = {1, 2, 3, 4, 6};
  std::size_t epochs = 12;
  std::size_t batch = 30;                         // samples per step on the mixture; a single domain gets a third
  double lr = 5e-3;
  double dropout = 0.05;                          // LoRA dropout (the paper's)
  std::size_t log_lines = 3;                      // progress lines per training run

  static Settings quick() { return {}; }
  static Settings full() {
    Settings s;
    s.seeds = 3;
    s.train_sizes = {1800, 1200, 600};
    s.test_size = 500;
    s.captions = 600;
    s.ranks = {2, 4, 8, 16, 32};
    s.expert_counts = {1, 2, 3, 4, 6, 8};
    s.log_lines = 5;
    return s;
  }

  Json json() const {
    return {{"seed", seed}, {"seeds", seeds}, {"train_sizes", train_sizes}, {"test_size", test_size},
            {"name_domain", name_domain}, {"conflicting_rules", conflicting}, {"captions_per_domain", captions}, {"align_epochs", align_epochs},
            {"align_lr", align_lr}, {"train_projector", train_projector}, {"rank", rank}, {"alpha", "2 r"},
            {"experts", experts}, {"top_k", 1}, {"balance", balance_name(balance_kind) + ", per layer"},
            {"balance_weight", balance_weight}, {"gate_scaling_row", gate_scaling_row}, {"ranks", ranks}, {"rank_singles", rank_singles},
            {"expert_counts", expert_counts}, {"epochs", epochs}, {"batch", batch}, {"lr", lr},
            {"lora_dropout", dropout}, {"optimizer", "AdamW(0.9, 0.999), wd 0, 3% warm-up, cosine to 0, clip 1.0"}};
  }
};

// ---- data ----------------------------------------------------------------------------------------------------------

// One instruction sample in the model's form plus what scoring needs.
struct Example {
  Model::Sample sample;
  std::vector<std::int64_t> choices;
  std::size_t correct = 0, task = 0, answer_index = 0;
};

struct Splits {
  std::array<std::vector<Example>, n_domains> train, test;
};

Example to_example(const data::Sample& s) {
  Example e;
  e.sample = {.prefix = s.prefix, .prompt = s.prompt, .answer = s.answer,
              .image = s.has_image() ? std::optional<Tensor<float>>(s.image) : std::nullopt, .domain = s.domain};
  e.choices = s.choices;
  e.correct = s.correct;
  e.task = s.task;
  e.answer_index = s.answer_index;
  return e;
}

std::vector<Example> to_examples(const std::vector<data::Sample>& samples) {
  std::vector<Example> out;
  out.reserve(samples.size());
  for (const auto& s : samples) out.push_back(to_example(s));
  return out;
}

// The position whose logits predict the deciding answer token (LlavaMole's layout: BOS, prefix, image, prompt).
std::size_t decide_position(const Example& e, std::size_t image_tokens) {
  return e.sample.prefix.size() + (e.sample.image ? image_tokens : 0) + e.sample.prompt.size() + e.answer_index;
}

Model::Batch make_batch(const Model& model, const std::vector<const Example*>& examples) {
  std::vector<Model::Sample> samples;
  samples.reserve(examples.size());
  for (const Example* e : examples) samples.push_back(e->sample);
  return model.make_batch(samples);
}

// ---- models --------------------------------------------------------------------------------------------------------

// What distinguishes one training run.
struct RunKey {
  int domain = -1;  // the single training domain, or -1 for the mixture
  std::size_t rank = 0, experts = 1;
  bool gate_scaling = false;
  auto operator<=>(const RunKey&) const = default;
};

std::string run_name(const RunKey& k) {
  std::string name = k.experts == 1 ? "LoRA r" + std::to_string(k.rank)
                                    : "MoLE K" + std::to_string(k.experts) + " r" + std::to_string(k.rank);
  if (k.gate_scaling && k.experts > 1) name += " gate-scaled";
  return name + " on " + (k.domain < 0 ? std::string("mixture") : std::string(data::domain_name(data::Domain(k.domain))));
}

Model::Config model_config(const ex::BackboneSettings& b, const Settings& s, const RunKey& k) {
  Model::Config c;
  c.llm = b.llm;
  c.vit = b.vit;
  c.feature_layer = -2;
  const double alpha = 2.0 * double(k.rank);
  c.lora = {.rank = k.rank, .alpha = alpha, .dropout = s.dropout};
  c.experts = {.experts = k.experts, .rank = k.rank, .alpha = alpha, .dropout = s.dropout,
               .gate_scaling = k.gate_scaling};
  c.balance = {.kind = s.balance_kind, .weight = s.balance_weight, .scope = BalanceScope::PerLayer};
  c.domains = n_domains;
  c.bos_id = data::token::bos;
  c.pad_id = data::token::pad;
  return c;
}

// The projector's four tensors, as stage 1 leaves them.
struct Projector {
  Tensor<float> w1, b1, w2, b2;
  static Projector of(Model& m) {
    return {m.projector1().weight().value, m.projector1().bias().value, m.projector2().weight().value,
            m.projector2().bias().value};
  }
  void load_into(Model& m) const {
    m.projector1().weight().value = w1;
    m.projector1().bias().value = b1;
    m.projector2().weight().value = w2;
    m.projector2().bias().value = b2;
  }
};

bool is_projector(const std::string& name) { return name.rfind("multi_modal_projector.", 0) == 0; }

std::unique_ptr<Model> build_model(const Model::Config& config, const ex::Backbones& backbones, std::uint64_t seed) {
  Rng rng(seed);
  auto model = std::make_unique<Model>(config, rng);
  backbones.load_into(model->llm());
  backbones.load_into(model->vit());
  return model;
}

// ---- training ------------------------------------------------------------------------------------------------------

struct TrainReport {
  std::size_t steps = 0, samples = 0;
  double seconds = 0, ce = 0, balance = 0;  // ce and balance: means over the last epoch
};

// `epochs` passes over `examples` in shuffled minibatches (order from `order`), with the recipe at the top.
TrainReport train(Model& model, const std::vector<const Example*>& examples, std::size_t epochs, std::size_t batch,
                  double lr, Rng& order, const std::string& label, std::size_t log_lines) {
  const std::size_t per_epoch = (examples.size() + batch - 1) / batch, steps = epochs * per_epoch;
  require<ConfigError>(steps > 0, "train: no steps (", examples.size(), " samples, ", epochs, " epochs)");
  TrainerConfig config;
  config.adamw = {.lr = lr, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0.0};
  config.schedule = WarmupCosineLr(lr, std::int64_t(std::ceil(0.03 * double(steps))), std::int64_t(steps));
  config.clip_norm = 1.0;
  Trainer<float> trainer(parameters_of<float>(model), config);
  ex::Progress progress(label, steps, log_lines ? std::max<std::size_t>(1, steps / log_lines) : 0, "tok", std::cout);

  std::vector<std::vector<std::size_t>> epoch;
  double ce = 0, balance = 0;
  std::size_t last_epoch_steps = 0;
  const auto next_batches = [&](std::int64_t t) {
    if (std::size_t(t) % per_epoch == 0) epoch = data::minibatches(examples.size(), batch, &order);
    std::vector<const Example*> rows;
    for (std::size_t i : epoch[std::size_t(t) % per_epoch]) rows.push_back(examples[i]);
    return std::vector<Model::Batch>{make_batch(model, rows)};
  };
  const auto loss_and_backward = [&](const Model::Batch& b) {
    const Model::Loss r = model.loss_and_backward(b);
    if (trainer.steps() >= std::int64_t(steps - per_epoch)) {
      ce += r.ce;
      balance += r.balance;
      ++last_epoch_steps;
    }
    return r;
  };
  model.set_training(true);
  trainer.run<Model::Batch>(loss_and_backward, std::int64_t(steps), next_batches,
                            [&](const TrainStep& s) { progress.update(std::size_t(s.step), s.loss, double(s.tokens)); });
  return {steps, epochs * examples.size(), progress.seconds(), ce / double(last_epoch_steps),
          balance / double(last_epoch_steps)};
}

// Mean caption CE of the model over `examples` (eval mode).
double caption_loss(Model& model, const std::vector<Example>& examples) {
  model.set_training(false);
  double sum = 0;
  std::size_t n = 0;
  for (const auto& rows : data::minibatches(examples.size(), 128)) {
    std::vector<const Example*> b;
    for (std::size_t i : rows) b.push_back(&examples[i]);
    Model::Cache cache;
    sum += double(model.loss(make_batch(model, b), cache)) * double(rows.size());
    n += rows.size();
  }
  model.set_training(true);
  return sum / double(n);
}

struct AlignReport {
  Projector projector;
  double loss_before = 0, loss_after = 0, seconds = 0;
  std::size_t steps = 0, trainable = 0;
};

// LLaVA's stage 1: everything but the projector frozen, next-token CE on captions.
AlignReport align_projector(const ex::Backbones& backbones, const Settings& s, const data::Digits& digits,
                            const data::DigitSplit& split, const data::MoleConfig& data_config, std::uint64_t seed) {
  const auto start = Clock::now();
  const RunKey key{.domain = -1, .rank = 1, .experts = 1};
  auto model = build_model(model_config(backbones.settings(), s, key), backbones,
                           data::detail::derive_seed(seed, "align init"));
  std::size_t trainable = 0;
  for (auto& ref : parameters_of<float>(*model)) {
    ref.param->set_trainable(is_projector(ref.name));
    if (ref.param->trainable) trainable += ref.param->numel();
  }
  const std::vector<Example> captions = to_examples(data::mole_captions(digits, split.train, data_config, s.captions));
  data::MoleConfig heldout_config = data_config;
  heldout_config.seed = data::detail::derive_seed(data_config.seed, "held-out captions");
  const std::vector<Example> heldout = to_examples(data::mole_captions(digits, split.test, heldout_config, 100));
  std::vector<const Example*> rows;
  for (const auto& e : captions) rows.push_back(&e);

  AlignReport r;
  r.trainable = trainable;
  r.loss_before = caption_loss(*model, heldout);
  Rng order(data::detail::derive_seed(seed, "align order"));
  r.steps = train(*model, rows, s.align_epochs, s.batch, s.align_lr, order, "align projector", s.log_lines).steps;
  r.loss_after = caption_loss(*model, heldout);
  r.projector = Projector::of(*model);
  r.seconds = seconds_since(start);
  return r;
}

// ---- scoring -------------------------------------------------------------------------------------------------------

// Token kinds of the usage tables: every valid token, the image tokens, the text tokens, and the one position
// whose logits decide the answer (the last prompt token, ":").
enum TokenKind : std::size_t { AllTokens, ImageTokens, TextTokens, DecisionTokens, n_token_kinds };
constexpr std::array<std::string_view, n_token_kinds> token_kind_names = {"all", "image", "text", "decision"};

struct Scores {
  std::array<double, n_domains> accuracy{};                                          // per test domain
  std::array<std::array<double, data::n_mole_questions>, n_domains> by_question{};  // [domain][question]
  // counts[layer][kind][domain][expert]: tokens routed to the expert (empty for K = 1)
  std::vector<std::array<std::array<std::vector<double>, n_domains>, n_token_kinds>> counts;
  double seconds = 0;

  double average() const { return std::accumulate(accuracy.begin(), accuracy.end(), 0.0) / double(n_domains); }

  std::vector<double> usage(std::size_t layer, std::size_t kind, std::size_t domain) const {
    std::vector<double> u = counts[layer][kind][domain];
    const double total = std::accumulate(u.begin(), u.end(), 0.0);
    if (total > 0)
      for (double& x : u) x /= total;
    return u;
  }

  // I(domain; expert) / H(domain) over the tokens of one kind in one layer.
  double normalised_mi(std::size_t layer, std::size_t kind) const {
    const auto& c = counts[layer][kind];
    const std::size_t K = c[0].size();
    double total = 0;
    std::vector<double> pd(n_domains, 0.0), pe(K, 0.0);
    for (std::size_t d = 0; d < n_domains; ++d)
      for (std::size_t e = 0; e < K; ++e) {
        pd[d] += c[d][e];
        pe[e] += c[d][e];
        total += c[d][e];
      }
    double mi = 0, hd = 0;
    for (std::size_t d = 0; d < n_domains; ++d) {
      if (pd[d] > 0) hd -= pd[d] / total * std::log2(pd[d] / total);
      for (std::size_t e = 0; e < K; ++e)
        if (c[d][e] > 0) mi += c[d][e] / total * std::log2(c[d][e] * total / (pd[d] * pe[e]));
    }
    return hd > 0 ? mi / hd : 0.0;
  }

  // Smallest share of all test tokens that one expert receives in a layer.
  double min_expert_share(std::size_t layer) const {
    const std::size_t K = counts[layer][AllTokens][0].size();
    std::vector<double> pe(K, 0.0);
    for (std::size_t d = 0; d < n_domains; ++d)
      for (std::size_t e = 0; e < K; ++e) pe[e] += counts[layer][AllTokens][d][e];
    const double total = std::accumulate(pe.begin(), pe.end(), 0.0);
    return total > 0 ? *std::min_element(pe.begin(), pe.end()) / total : 0.0;
  }
};

// Adds one batch's routing to scores.counts, by layer, token kind and domain; decide[b]: row b's decision position.
void tally_routing(const Model& model, const Model::Batch& batch, const Model::Cache& cache,
                   const std::vector<std::size_t>& decide, std::size_t domain, Scores& scores) {
  const std::size_t L = cache.routing.size(), T = batch.ids.shape()[1], n_image = model.num_image_tokens();
  if (L == 0) return;
  const std::size_t K = cache.routing[0]->num_experts();
  if (scores.counts.empty()) {
    scores.counts.resize(L);
    for (auto& layer : scores.counts)
      for (auto& kind : layer)
        for (auto& d : kind) d.assign(K, 0.0);
  }
  for (std::size_t l = 0; l < L; ++l) {
    const auto& experts = cache.routing[l]->experts;  // [B T, 1]
    for (std::size_t b = 0; b < batch.lengths.size(); ++b)
      for (std::size_t t = 0; t < batch.lengths[b]; ++t) {
        const auto& s = batch.image_start[b];
        const bool image = s && t >= *s && t < *s + n_image;
        const auto e = std::size_t(experts.data()[b * T + t]);
        scores.counts[l][AllTokens][domain][e] += 1;
        scores.counts[l][image ? ImageTokens : TextTokens][domain][e] += 1;
        if (t == decide[b]) scores.counts[l][DecisionTokens][domain][e] += 1;
      }
  }
}

Scores evaluate(Model& model, const std::array<std::vector<Example>, n_domains>& test) {
  const auto start = Clock::now();
  Scores scores;
  model.set_training(false);
  model.reset_router_stats();
  const std::size_t n_image = model.num_image_tokens(), V = model.config().llm.vocab;
  for (std::size_t d = 0; d < n_domains; ++d) {
    std::array<double, data::n_mole_questions> right{}, asked{};
    for (const auto& rows : data::minibatches(test[d].size(), 150)) {
      std::vector<const Example*> examples;
      for (std::size_t i : rows) examples.push_back(&test[d][i]);
      const Model::Batch batch = make_batch(model, examples);
      Model::Cache cache;
      model.loss(batch, cache);
      const std::size_t T = batch.ids.shape()[1];
      std::vector<std::size_t> decide;
      for (std::size_t b = 0; b < examples.size(); ++b) {
        const Example& e = *examples[b];
        decide.push_back(decide_position(e, n_image));
        const float* logits = cache.logits.data() + (b * T + decide.back()) * V;
        std::size_t best = 0;
        for (std::size_t c = 1; c < e.choices.size(); ++c)
          if (logits[e.choices[c]] > logits[e.choices[best]]) best = c;
        right[e.task] += best == e.correct;
        asked[e.task] += 1;
      }
      tally_routing(model, batch, cache, decide, d, scores);
    }
    scores.accuracy[d] = std::accumulate(right.begin(), right.end(), 0.0) / double(test[d].size());
    for (std::size_t q = 0; q < data::n_mole_questions; ++q)
      scores.by_question[d][q] = asked[q] > 0 ? right[q] / asked[q] : 0.0;
  }
  // The model's RouterStats saw the same tokens: its per-domain usage must equal the tally's.
  if (const auto* stats = model.router_stats())
    for (std::size_t l = 0; l < stats->layers(); ++l)
      for (std::size_t d = 0; d < n_domains; ++d) {
        const auto a = stats->usage(l, d), b = scores.usage(l, AllTokens, d);
        for (std::size_t e = 0; e < a.size(); ++e)
          require<NumericError>(std::abs(a[e] - b[e]) < 1e-9, "mole_ablation: expert usage tally disagrees with "
                                "RouterStats at layer ", l, ", domain ", d, ", expert ", e);
      }
  model.set_training(true);
  scores.seconds = seconds_since(start);
  return scores;
}

// ---- one run -------------------------------------------------------------------------------------------------------

struct RunResult {
  RunKey key;
  std::uint64_t seed = 0;
  LlavaMoleParameterCount params;
  std::size_t trainable = 0, active = 0;  // trained parameters; those one token uses (one expert per FFN)
  TrainReport train;
  Scores scores;
};

RunResult run_one(const RunKey& key, const ex::Backbones& backbones, const Settings& s, const Splits& splits,
                  const Projector& projector, std::uint64_t seed, const std::string& label) {
  const std::string name = run_name(key);
  auto model = build_model(model_config(backbones.settings(), s, key), backbones,
                           data::detail::derive_seed(seed, "init " + name));
  projector.load_into(*model);
  if (!s.train_projector)
    for (auto& ref : parameters_of<float>(*model))
      if (is_projector(ref.name)) ref.param->set_trainable(false);

  RunResult r;
  r.key = key;
  r.seed = seed;
  r.params = model->parameter_count();
  const std::size_t projector_params = s.train_projector ? r.params.projector : 0;
  r.trainable = r.params.attention_lora + r.params.ffn_experts + r.params.routers + projector_params;
  r.active = r.params.attention_lora + r.params.ffn_experts / key.experts + r.params.routers + projector_params;
  std::cout << label << " " << name << ": " << param_count::format_count(r.trainable) << " trainable parameters ("
            << param_count::format_count(r.active) << " active per token)\n";

  std::vector<const Example*> rows;
  for (std::size_t d = 0; d < n_domains; ++d)
    if (key.domain < 0 || std::size_t(key.domain) == d)
      for (const auto& e : splits.train[d]) rows.push_back(&e);
  Rng order(data::detail::derive_seed(seed, "order " + name));
  // Batches hold the same number of samples per domain in every run: a single-domain run is the mixture run with
  // the other domains' samples taken out of each batch, so all runs take the same number of optimizer steps.
  const std::size_t batch = key.domain < 0 ? s.batch : s.batch / n_domains;
  r.train = train(*model, rows, s.epochs, batch, s.lr, order, "tune", s.log_lines);
  r.scores = evaluate(*model, splits.test);
  std::printf("    test accuracy  general %s  document %s  medical %s  average %s   (train %.1f s, eval %.1f s)\n",
              ex::percent(r.scores.accuracy[0]).c_str(), ex::percent(r.scores.accuracy[1]).c_str(),
              ex::percent(r.scores.accuracy[2]).c_str(), ex::percent(r.scores.average()).c_str(), r.train.seconds,
              r.scores.seconds);
  if (!r.scores.counts.empty()) {
    std::printf("    routing I(domain; expert) / H(domain) per layer: all tokens");
    for (std::size_t l = 0; l < r.scores.counts.size(); ++l) std::printf(" %.2f", r.scores.normalised_mi(l, AllTokens));
    std::printf(", decision tokens");
    for (std::size_t l = 0; l < r.scores.counts.size(); ++l)
      std::printf(" %.2f", r.scores.normalised_mi(l, DecisionTokens));
    std::printf("\n");
  }
  std::cout << std::flush;
  return r;
}

// ---- tables --------------------------------------------------------------------------------------------------------

// Mean and sample standard deviation over seeds.
struct Stat {
  double mean = 0, sd = 0;
};
Stat stat_of(const std::vector<double>& v) {
  Stat s;
  s.mean = std::accumulate(v.begin(), v.end(), 0.0) / double(v.size());
  if (v.size() > 1) {
    for (double x : v) s.sd += (x - s.mean) * (x - s.mean);
    s.sd = std::sqrt(s.sd / double(v.size() - 1));
  }
  return s;
}
Stat over_seeds(const std::vector<RunResult>& runs, const std::function<double(const RunResult&)>& f) {
  std::vector<double> v;
  for (const auto& r : runs) v.push_back(f(r));
  return stat_of(v);
}

// "87.3" or, over several seeds, "87.3 ± 1.2" (accuracies in percent).
std::string cell(const Stat& s, std::size_t seeds) {
  return ex::percent(s.mean) + (seeds > 1 ? " ± " + ex::percent(s.sd) : "");
}

// The tables in Markdown (strings with ±) and CSV (numbers, with _sd columns).
struct Tables {
  ex::Table md, csv;
  Tables(const std::vector<std::string>& fixed_columns, const std::vector<std::string>& stat_columns)
      : md(concat(fixed_columns, stat_columns, false)), csv(concat(fixed_columns, stat_columns, true)) {}

  void add(std::vector<std::string> fixed_cells, const std::vector<Stat>& stats, std::size_t seeds) {
    std::vector<std::string> m = fixed_cells, c = std::move(fixed_cells);
    for (const Stat& s : stats) {
      m.push_back(cell(s, seeds));
      c.push_back(ex::fixed(100.0 * s.mean, 2));
    }
    for (const Stat& s : stats) c.push_back(ex::fixed(100.0 * s.sd, 2));
    md.add(std::move(m));
    csv.add(std::move(c));
  }

 private:
  static std::vector<std::string> concat(std::vector<std::string> a, const std::vector<std::string>& b, bool sd) {
    a.insert(a.end(), b.begin(), b.end());
    if (sd)
      for (const auto& s : b) a.push_back(s + "_sd");
    return a;
  }
};

const std::vector<std::string> accuracy_columns = {"general", "document", "medical", "average"};

std::vector<Stat> accuracy_stats(const std::vector<RunResult>& runs) {
  std::vector<Stat> out;
  for (std::size_t d = 0; d < n_domains; ++d)
    out.push_back(over_seeds(runs, [d](const RunResult& r) { return r.scores.accuracy[d]; }));
  out.push_back(over_seeds(runs, [](const RunResult& r) { return r.scores.average(); }));
  return out;
}

std::string count(std::size_t n) { return param_count::format_count(n); }

void write_text(const std::filesystem::path& path, const std::string& text) {
  std::ofstream f(path);
  require<IoError>(bool(f), "mole_ablation: cannot write ", path.string());
  f << text;
}

Json scores_json(const RunResult& r) {
  Json j = {{"name", run_name(r.key)},
            {"seed", r.seed},
            {"train_on", r.key.domain < 0 ? "mixture" : std::string(data::domain_name(data::Domain(r.key.domain)))},
            {"rank", r.key.rank},
            {"experts", r.key.experts},
            {"gate_scaling", r.key.gate_scaling},
            {"parameters", {{"attention_lora", r.params.attention_lora}, {"ffn_experts", r.params.ffn_experts},
                            {"routers", r.params.routers}, {"projector", r.params.projector},
                            {"trainable", r.trainable}, {"active_per_token", r.active}, {"total", r.params.total}}},
            {"train", {{"steps", r.train.steps}, {"samples_seen", r.train.samples}, {"seconds", r.train.seconds},
                       {"last_epoch_ce", r.train.ce}, {"last_epoch_balance", r.train.balance}}},
            {"eval_seconds", r.scores.seconds},
            {"accuracy", Json::object()}};
  for (std::size_t d = 0; d < n_domains; ++d) {
    Json q = Json::object();
    for (std::size_t k = 0; k < data::n_mole_questions; ++k)
      q[std::string(data::mole_question_name(data::MoleQuestion(k)))] = r.scores.by_question[d][k];
    j["accuracy"][std::string(data::domain_name(data::Domain(d)))] = {{"all", r.scores.accuracy[d]}, {"by_question", q}};
  }
  j["accuracy"]["average"] = r.scores.average();
  if (!r.scores.counts.empty()) {
    Json layers = Json::array();
    for (std::size_t l = 0; l < r.scores.counts.size(); ++l) {
      Json layer = {{"layer", l}, {"min_expert_share", r.scores.min_expert_share(l)}};
      for (std::size_t k = 0; k < n_token_kinds; ++k) {
        Json usage = Json::object();
        for (std::size_t d = 0; d < n_domains; ++d)
          usage[std::string(data::domain_name(data::Domain(d)))] = r.scores.usage(l, k, d);
        layer[std::string(token_kind_names[k])] = {{"usage", usage}, {"normalised_mi", r.scores.normalised_mi(l, k)}};
      }
      layers.push_back(layer);
    }
    j["routing"] = layers;
  }
  return j;
}

}  // namespace

int main(int argc, char** argv) {
  const auto program_start = Clock::now();
  const bool full = std::any_of(argv + 1, argv + argc, [](const char* a) { return std::string_view(a) == "--full"; });
  Settings s = full ? Settings::full() : Settings::quick();
  std::string out_dir = "out/mole_ablation", cache_dir = "build/cache", data_dir = MIXPEFT_DATA_DIR;
  int threads = 1;
  bool retrain = false, quick_flag = false, full_flag = false, skip_sweeps = false;

  CLI::App app{"LLaVA-MoLE ablations at toy scale: single-domain LoRA vs LoRA vs MoLE on three conflicting "
               "domains, a LoRA-rank sweep, an expert-count sweep and per-domain expert usage (SPEC 2.4)"};
  app.add_flag("--quick", quick_flag, "the default settings (4-6 minutes on 2 cores once the backbones are cached)");
  app.add_flag("--full", full_flag, "longer runs: 2x data, 3 seeds, wider sweeps (defaults below are --quick's)");
  app.add_option("--seed", s.seed, "base seed of data, alignment and tuning")->capture_default_str();
  app.add_option("--seeds", s.seeds, "repeat everything but the backbones with seed, seed + 1, ...")
      ->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--out", out_dir, "directory for results (CSV, JSON, Markdown)")->capture_default_str();
  app.add_option("--cache-dir", cache_dir, "where the pretrained backbones are cached")->capture_default_str();
  app.add_option("--data-dir", data_dir, "directory with the UCI digits (digits_*.npy)")->capture_default_str();
  app.add_flag("--retrain-backbones", retrain, "pre-train the backbones even when a cache exists");
  app.add_option("--train-sizes", s.train_sizes, "training samples of general, document, medical")
      ->capture_default_str();
  app.add_option("--test-size", s.test_size, "test samples per domain")->capture_default_str();
  app.add_flag("--name-domain", s.name_domain, "put the domain's noun in the prompt (the easy control)");
  app.add_flag("--consistent-rules{false}", s.conflicting, "the control: true colour names and spot counts in "
               "every domain, so only the thresholds of \"is it high ?\" differ");
  app.add_option("--captions", s.captions, "stage-1 captions per domain")->capture_default_str();
  app.add_option("--align-epochs", s.align_epochs, "stage-1 epochs (projector only)")->capture_default_str();
  app.add_option("--align-lr", s.align_lr, "stage-1 learning rate")->capture_default_str();
  app.add_flag("--train-projector", s.train_projector, "keep the projector trainable during instruction tuning");
  app.add_option("--rank", s.rank, "LoRA rank r of the main table and the expert sweep")
      ->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--experts", s.experts, "K of the MoLE row")->capture_default_str()->check(CLI::Range(2, 64));
  app.add_option("--balance-kind", s.balance_kind, "balance loss: mole (per sample, the reference), switch, "
                 "gshard, zloss")
      ->transform(CLI::CheckedTransformer(balance_kinds, CLI::ignore_case))->default_str("mole");
  app.add_option("--balance-weight", s.balance_weight, "weight of the MoLE balance loss")->capture_default_str();
  app.add_option("--gate-scaling-row", s.gate_scaling_row, "add MoLE with Switch-style gate scaling to the table")
      ->capture_default_str();
  app.add_option("--ranks", s.ranks, "LoRA ranks of the rank sweep")->capture_default_str();
  app.add_option("--rank-singles", s.rank_singles, "train single-domain LoRAs at every sweep rank too")
      ->capture_default_str();
  app.add_option("--expert-counts", s.expert_counts, "expert counts K of the expert sweep")
      ->capture_default_str();
  app.add_flag("--skip-sweeps", skip_sweeps, "train only the main table's models");
  app.add_option("--epochs", s.epochs, "passes over each run's training data")->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--batch", s.batch, "samples per optimizer step on the mixture (a multiple of 3); single-domain "
                 "runs take a third, so every run takes the same steps")
      ->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--lr", s.lr, "peak learning rate of instruction tuning")->capture_default_str();
  app.add_option("--dropout", s.dropout, "LoRA dropout")->capture_default_str();
  app.add_option("--threads", threads, "OpenMP threads; one is fastest for these tiny matrices and makes the "
                 "numbers independent of the machine's core count")
      ->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--log-lines", s.log_lines, "progress lines per training run (0: none)")->capture_default_str();
  app.get_option("--quick")->excludes(app.get_option("--full"));
  CLI11_PARSE(app, argc, argv);

  if (skip_sweeps) {
    s.ranks.clear();
    s.expert_counts.clear();
  }
  try {
    for (std::size_t k : s.expert_counts) require<ConfigError>(k > 0, "--expert-counts: K must be > 0");
    for (std::size_t r : s.ranks) require<ConfigError>(r > 0, "--ranks: a rank must be > 0");
    require<ConfigError>(s.batch % n_domains == 0, "--batch must be a multiple of ", n_domains, " (got ", s.batch, ")");
    const std::filesystem::path out(out_dir);
    std::filesystem::create_directories(out);
#ifdef _OPENMP
    omp_set_num_threads(threads);
    threads = omp_get_max_threads();
#else
    threads = 1;
#endif
    std::cout << "mole_ablation (" << (full ? "full" : "quick") << "): seed " << s.seed << ", " << s.seeds
              << " seed(s), " << threads << " OpenMP thread(s), " << std::thread::hardware_concurrency()
              << " hardware threads\n";

    // 1. backbones
    auto t0 = Clock::now();
    const ex::BackboneSettings bs = ex::BackboneSettings::quick();
    const ex::Backbones backbones = ex::Backbones::obtain(bs, cache_dir, data_dir, std::cout, retrain);
    const double backbone_seconds = seconds_since(t0);
    std::cout << "backbones: " << backbones.summary() << " (" << ex::fixed(backbone_seconds, 1) << " s)\n";
    const data::Digits digits = data::load_digits(data_dir);
    const data::DigitSplit split =
        data::split_digits(digits, bs.digit_val_fraction, bs.digit_test_fraction, bs.data_seed);

    // The runs, in table order, each trained once per seed.
    const int mix = -1;
    const RunKey lora{mix, s.rank, 1, false}, mole{mix, s.rank, s.experts, false},
        mole_gate{mix, s.rank, s.experts, true};
    std::vector<RunKey> keys;
    const auto want = [&](const RunKey& k) {
      if (std::find(keys.begin(), keys.end(), k) == keys.end()) keys.push_back(k);
    };
    for (int d = 0; d < int(n_domains); ++d) want({d, s.rank, 1, false});
    want(lora);
    want(mole);
    if (s.gate_scaling_row) want(mole_gate);
    for (std::size_t r : s.ranks) {
      want({mix, r, 1, false});
      if (s.rank_singles)
        for (int d = 0; d < int(n_domains); ++d) want({d, r, 1, false});
    }
    for (std::size_t k : s.expert_counts) want({mix, s.rank, k, false});

    std::map<RunKey, std::vector<RunResult>> results;
    Json align_json = Json::array();
    double data_seconds = 0, align_seconds = 0;
    for (std::size_t rep = 0; rep < s.seeds; ++rep) {
      const std::uint64_t seed = s.seed + rep;
      std::cout << "\n== seed " << seed << " ==\n";
      // 2. data
      t0 = Clock::now();
      data::MoleConfig dc;
      dc.image = bs.image();
      dc.train_sizes = s.train_sizes;
      dc.test_size = s.test_size;
      dc.name_domain = s.name_domain;
      dc.conflicting = s.conflicting;
      dc.seed = data::detail::derive_seed(seed, "mole data");
      const data::MoleData mole_data = data::make_mole_data(digits, split, dc);
      Splits splits;
      for (std::size_t d = 0; d < n_domains; ++d) {
        splits.train[d] = to_examples(mole_data.train[d]);
        splits.test[d] = to_examples(mole_data.test[d]);
      }
      data_seconds += seconds_since(t0);
      std::cout << "data: train " << s.train_sizes[0] << " / " << s.train_sizes[1] << " / " << s.train_sizes[2]
                << ", test " << s.test_size << " per domain; e.g. "
                << data::sample_text(mole_data.train[0][0]) << "\n";
      // 3. alignment
      const AlignReport align = align_projector(backbones, s, digits, split, dc, seed);
      align_seconds += align.seconds;
      std::cout << "align: held-out caption CE " << ex::fixed(align.loss_before, 3) << " -> "
                << ex::fixed(align.loss_after, 3) << " (" << count(align.trainable) << " projector parameters, "
                << align.steps << " steps, " << ex::fixed(align.seconds, 1) << " s)\n";
      align_json.push_back({{"seed", seed}, {"caption_ce_before", align.loss_before},
                            {"caption_ce_after", align.loss_after}, {"steps", align.steps},
                            {"projector_parameters", align.trainable}, {"seconds", align.seconds}});
      // 4-5. tuning and scoring
      for (std::size_t i = 0; i < keys.size(); ++i)
        results[keys[i]].push_back(run_one(keys[i], backbones, s, splits, align.projector, seed,
                                           "[" + std::to_string(i + 1) + "/" + std::to_string(keys.size()) + "]"));
    }

    // ---- tables ----
    const std::size_t n = s.seeds;
    Tables main_table({"model", "trained on", "rank", "K", "trainable", "active"}, accuracy_columns);
    const auto add_run = [&](Tables& t, const std::string& model, const RunKey& k) {
      const auto& runs = results.at(k);
      t.add({model, k.domain < 0 ? "mixture" : std::string(data::domain_name(data::Domain(k.domain))),
             std::to_string(k.rank), std::to_string(k.experts), count(runs[0].trainable), count(runs[0].active)},
            accuracy_stats(runs), n);
    };
    for (int d = 0; d < int(n_domains); ++d)
      add_run(main_table, "LoRA (single domain)", {d, s.rank, 1, false});
    {  // each domain scored by the model tuned on it alone
      std::vector<Stat> diag;
      std::vector<double> avg(n, 0.0);
      for (std::size_t d = 0; d < n_domains; ++d) {
        const auto& runs = results.at({int(d), s.rank, 1, false});
        diag.push_back(over_seeds(runs, [d](const RunResult& r) { return r.scores.accuracy[d]; }));
        for (std::size_t i = 0; i < n; ++i) avg[i] += runs[i].scores.accuracy[d] / double(n_domains);
      }
      diag.push_back(stat_of(avg));
      const auto& one = results.at({0, s.rank, 1, false})[0];
      main_table.add({"single-domain experts (own domain)", "each its own", std::to_string(s.rank), "1",
                      "3 x " + count(one.trainable), count(one.active)},
                     diag, n);
    }
    add_run(main_table, "LoRA (mixture)", lora);
    add_run(main_table, "MoLE (mixture)", mole);
    if (s.gate_scaling_row) add_run(main_table, "MoLE, gate scaling (mixture)", mole_gate);

    // The rank sweep; with rank singles also each domain's own single-domain LoRA at that rank (its average over
    // the domains) and the mixture's gap to it.
    std::vector<std::string> rank_columns = accuracy_columns;
    if (s.rank_singles) rank_columns.insert(rank_columns.end(), {"single-domain average", "gap to single"});
    Tables rank_table({"rank", "trainable"}, rank_columns);
    for (std::size_t r : s.ranks) {
      const auto& runs = results.at({mix, r, 1, false});
      std::vector<Stat> stats = accuracy_stats(runs);
      if (s.rank_singles) {
        std::vector<double> single(n, 0.0), gap(n, 0.0);
        for (std::size_t i = 0; i < n; ++i) {
          for (std::size_t d = 0; d < n_domains; ++d)
            single[i] += results.at({int(d), r, 1, false})[i].scores.accuracy[d] / double(n_domains);
          gap[i] = runs[i].scores.average() - single[i];
        }
        stats.push_back(stat_of(single));
        stats.push_back(stat_of(gap));
      }
      rank_table.add({std::to_string(r), count(runs[0].trainable)}, stats, n);
    }

    Tables expert_table({"K", "trainable", "active"}, accuracy_columns);
    ex::Table expert_routing({"K", "min expert share (mean over layers)", "I(domain; expert) / H(domain) per layer"});
    for (std::size_t k : s.expert_counts) {
      const auto& runs = results.at({mix, s.rank, k, false});
      expert_table.add({std::to_string(k), count(runs[0].trainable), count(runs[0].active)}, accuracy_stats(runs), n);
      if (k == 1) continue;
      const std::size_t L = runs[0].scores.counts.size();
      std::string mi;
      for (std::size_t l = 0; l < L; ++l)
        mi += (l ? "  " : "") + ex::fixed(over_seeds(runs, [l](const RunResult& r) {
                                            return r.scores.normalised_mi(l, AllTokens);
                                          }).mean, 2);
      const Stat share = over_seeds(runs, [L](const RunResult& r) {
        double sum = 0;
        for (std::size_t l = 0; l < L; ++l) sum += r.scores.min_expert_share(l);
        return sum / double(L);
      });
      expert_routing.add({std::to_string(k), ex::fixed(share.mean, 3), mi});
    }

    // usage and routing information of every MoLE run and seed
    ex::Table usage_csv({"run", "seed", "experts", "layer", "tokens", "domain", "expert", "fraction"});
    ex::Table mi_csv({"run", "seed", "experts", "layer", "tokens", "normalised_mi", "min_expert_share"});
    for (const auto& [key, runs] : results)
      for (const auto& r : runs)
        for (std::size_t l = 0; l < r.scores.counts.size(); ++l)
          for (std::size_t k = 0; k < n_token_kinds; ++k) {
            mi_csv.add({run_name(key), std::to_string(r.seed), std::to_string(key.experts), std::to_string(l),
                        std::string(token_kind_names[k]), ex::fixed(r.scores.normalised_mi(l, k), 4),
                        ex::fixed(r.scores.min_expert_share(l), 4)});
            for (std::size_t d = 0; d < n_domains; ++d) {
              const auto u = r.scores.usage(l, k, d);
              for (std::size_t e = 0; e < u.size(); ++e)
                usage_csv.add({run_name(key), std::to_string(r.seed), std::to_string(key.experts), std::to_string(l),
                               std::string(token_kind_names[k]), std::string(data::domain_name(data::Domain(d))),
                               std::to_string(e), ex::fixed(u[e], 4)});
            }
          }
    // the default MoLE model's usage as a Markdown table (first seed)
    const RunResult& mole_first = results.at(mole)[0];
    std::vector<std::string> usage_headers = {"layer", "tokens", "domain"};
    for (std::size_t e = 0; e < s.experts; ++e) usage_headers.push_back("expert " + std::to_string(e));
    usage_headers.push_back("I/H(domain)");
    ex::Table usage_md(usage_headers);
    for (std::size_t l = 0; l < mole_first.scores.counts.size(); ++l)
      for (std::size_t k = 0; k < n_token_kinds; ++k)
        for (std::size_t d = 0; d < n_domains; ++d) {
          std::vector<std::string> row = {std::to_string(l), std::string(token_kind_names[k]),
                                          std::string(data::domain_name(data::Domain(d)))};
          for (double u : mole_first.scores.usage(l, k, d)) row.push_back(ex::fixed(u, 2));
          row.push_back(d == 0 ? ex::fixed(mole_first.scores.normalised_mi(l, k), 2) : "");
          usage_md.add(row);
        }

    ex::Table runs_csv({"run", "seed", "train_on", "rank", "experts", "gate_scaling", "trainable", "active",
                        "general", "document", "medical", "average", "general_number", "general_high",
                        "general_colour", "document_number", "document_high", "document_colour", "medical_number",
                        "medical_high", "medical_colour", "steps", "train_seconds", "eval_seconds", "last_epoch_ce",
                        "last_epoch_balance"});
    Json runs_json = Json::array();
    double run_seconds = 0;
    for (const auto& key : keys)
      for (const auto& r : results.at(key)) {
        std::vector<std::string> row = {run_name(key), std::to_string(r.seed),
                                        key.domain < 0 ? "mixture" : std::string(data::domain_name(data::Domain(key.domain))),
                                        std::to_string(key.rank), std::to_string(key.experts),
                                        key.gate_scaling ? "1" : "0", std::to_string(r.trainable),
                                        std::to_string(r.active)};
        for (double a : r.scores.accuracy) row.push_back(ex::fixed(100 * a, 2));
        row.push_back(ex::fixed(100 * r.scores.average(), 2));
        for (const auto& q : r.scores.by_question)
          for (double a : q) row.push_back(ex::fixed(100 * a, 2));
        row.insert(row.end(), {std::to_string(r.train.steps), ex::fixed(r.train.seconds, 2),
                               ex::fixed(r.scores.seconds, 2), ex::fixed(r.train.ce, 4), ex::fixed(r.train.balance, 5)});
        runs_csv.add(row);
        runs_json.push_back(scores_json(r));
        run_seconds += r.train.seconds + r.scores.seconds;
      }

    std::string md = "## Per-domain test accuracy (%)\n\n" + main_table.md.markdown();
    if (!s.ranks.empty()) md += "\n## LoRA-rank sweep on the mixture (%)\n\n" + rank_table.md.markdown();
    if (!s.expert_counts.empty())
      md += "\n## Expert-count sweep on the mixture, rank " + std::to_string(s.rank) + " (%)\n\n" +
            expert_table.md.markdown() + "\nRouting of the sweep's models on the test splits:\n\n" +
            expert_routing.markdown();
    md += "\n## Expert usage of " + run_name(mole) + " (seed " + std::to_string(mole_first.seed) +
          "): fraction of each domain's test tokens routed to each expert\n\n" + usage_md.markdown();
    std::cout << "\nResults (also in " << (out / "results.md").string() << "):\n\n" << md;

    const double total_seconds = seconds_since(program_start);
    Json results_json = {
        {"program", "mole_ablation"},
        {"preset", full ? "full" : "quick"},
        {"settings", s.json()},
        {"machine", {{"openmp_threads", threads}, {"hardware_threads", std::thread::hardware_concurrency()}}},
        {"backbones", {{"file", backbones.file().string()}, {"from_cache", backbones.from_cache()},
                       {"summary", backbones.summary()}, {"llm", {{"dim", bs.llm.dim}, {"layers", bs.llm.n_layers},
                       {"ffn_dim", bs.llm.ffn_dim}, {"vocab", bs.llm.vocab}}},
                       {"vit", {{"dim", bs.vit.dim}, {"layers", bs.vit.n_layers}, {"image_size", bs.vit.image_size},
                       {"patch", bs.vit.patch}}}, {"image_tokens", (bs.vit.image_size / bs.vit.patch) *
                                                                    (bs.vit.image_size / bs.vit.patch)}}},
        {"alignment", align_json},
        {"runs", runs_json},
        {"timings_seconds", {{"backbones", backbone_seconds}, {"data", data_seconds}, {"alignment", align_seconds},
                             {"tuning_and_scoring", run_seconds}, {"total", total_seconds}}}};
    write_text(out / "results.json", results_json.dump(2) + "\n");
    write_text(out / "accuracy.csv", main_table.csv.csv());
    write_text(out / "rank_sweep.csv", rank_table.csv.csv());
    write_text(out / "expert_sweep.csv", expert_table.csv.csv());
    write_text(out / "runs.csv", runs_csv.csv());
    write_text(out / "usage.csv", usage_csv.csv());
    write_text(out / "routing_mi.csv", mi_csv.csv());
    write_text(out / "results.md", md);
    std::printf("\ntimings: backbones %.1f s, data %.1f s, alignment %.1f s, tuning + scoring %.1f s, total %.1f s\n",
                backbone_seconds, data_seconds, align_seconds, run_seconds, total_seconds);
    std::cout << "wrote " << out.string() << "/{results.json, accuracy.csv, rank_sweep.csv, expert_sweep.csv, "
              << "runs.csv, usage.csv, routing_mi.csv, results.md}\n";
  } catch (const std::exception& e) {
    std::cerr << "mole_ablation: " << e.what() << '\n';
    return 1;
  }
  return 0;
}
