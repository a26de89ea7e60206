#include <gtest/gtest.h>

#include <map>
#include <numeric>
#include <sstream>
#include <string>

#include <xtensor/xsort.hpp>
#include <xtensor/xview.hpp>

#include "mixpeft/models/llava_mole.hpp"
#include "mixpeft/testing/gradcheck.hpp"
#include "mixpeft/train/adamw.hpp"
#include "mixpeft/train/lr_schedule.hpp"

using namespace mixpeft;
using namespace mixpeft::testing;

namespace {
using MoleD = LlavaMole<double>;

// ViT: 3 blocks of which the first 2 are built (feature_layer -2), 4 patch tokens per image; LLaMA: 2 blocks.
MoleD::Config tiny_config(std::size_t experts = 3, BalanceKind kind = BalanceKind::MoLE, double weight = 0.5) {
  MoleD::Config c;
  c.llm = {.vocab = 13, .dim = 8, .n_layers = 2, .n_heads = 2, .ffn_dim = 12, .max_seq = 32};
  c.vit = {.image_size = 4, .patch = 2, .channels = 2, .dim = 6, .n_layers = 3, .n_heads = 2, .mlp_dim = 10};
  c.lora = {.rank = 2, .alpha = 4.0, .dropout = 0.0};
  c.experts = {.experts = experts, .rank = 2, .alpha = 4.0, .dropout = 0.0};
  c.balance = {.kind = kind, .weight = weight};
  c.domains = 2;
  return c;
}

MoleD::Sample sample(std::vector<std::int64_t> prefix, std::vector<std::int64_t> prompt,
                     std::vector<std::int64_t> answer, std::optional<Tensor<double>> image = std::nullopt,
                     std::size_t domain = 0) {
  return {.prefix = std::move(prefix), .prompt = std::move(prompt), .answer = std::move(answer),
          .image = std::move(image), .domain = domain};
}

Tensor<double> image(Rng& rng) { return random_tensor<double>({2, 4, 4}, rng); }

// One image+text sample (length 9) and one text-only sample (length 6).
std::vector<MoleD::Sample> mixed_samples(Rng& rng) {
  return {sample({3}, {5, 6}, {7}, image(rng), 0), sample({9}, {10, 11}, {2, 4}, std::nullopt, 1)};
}

void randomize(MoleD& model, Rng& rng, double scale = 0.4) {
  for (auto& ref : parameters_of<double>(model))
    ref.param->value = random_tensor<double>(shape_of(ref.param->value), rng, scale);
}

bool is_router(const std::string& name) { return name.find(".mlp.router.") != std::string::npos; }

// Which trainable group a parameter belongs to ("" for the frozen backbone).
std::string group_of(const std::string& name) {
  if (name.rfind("multi_modal_projector.", 0) == 0) return "projector";
  if (is_router(name)) return "routers";
  if (name.find(".self_attn.") != std::string::npos && name.find(".lora_") != std::string::npos) return "attention lora";
  if (name.find(".mlp.") != std::string::npos && name.find(".lora_") != std::string::npos) return "ffn experts";
  return "";
}

void expect_gradient(const std::function<double()>& loss, Tensor<double>& x, const Tensor<double>& analytic,
                     const std::string& name) {
  const Tensor<double> numeric = numerical_gradient(loss, x);
  if (xt::amax(xt::abs(analytic))() < 1e-10) EXPECT_LT(xt::amax(xt::abs(numeric))(), 1e-8) << name;
  else EXPECT_LT(relative_error(analytic, numeric), 1e-6) << name;
}

// Smallest gap between the two most probable experts over all routed rows of the last forward.
double routing_margin(const MoleD::Cache& c) {
  double margin = 1;
  for (const auto* r : c.routing) {
    const std::size_t n = r->probs.shape()[0], K = r->probs.shape()[1];
    for (std::size_t i = 0; i < n; ++i) {
      std::vector<double> p(r->probs.data() + i * K, r->probs.data() + (i + 1) * K);
      std::sort(p.rbegin(), p.rend());
      margin = std::min(margin, p[0] - p[1]);
    }
  }
  return margin;
}

// Image+text, text-only, image+text: the second image belongs to the third sequence.
std::vector<MoleD::Sample> gradient_samples(Rng& rng) {
  std::vector<MoleD::Sample> s = mixed_samples(rng);
  s.push_back(sample({}, {4}, {3, 5}, image(rng), 1));
  return s;
}

// The pixel gradient of the whole loss (balance term included) against central differences.
void check_image_gradient(MoleD& model, MoleD::Batch& batch, double dloss = 1.0) {
  auto loss = [&] {
    MoleD::Cache c;
    return dloss * double(model.loss(batch, c));
  };
  MoleD::Cache cache;
  model.loss(batch, cache);
  Tensor<double> d_images;
  model.backward(cache, dloss, &d_images);
  ASSERT_EQ(shape_of(d_images), shape_of(batch.images));
  for (std::size_t i = 0; i < batch.images.shape()[0]; ++i)  // every image reaches the loss
    EXPECT_GT(xt::amax(xt::abs(xt::view(d_images, i, xt::all(), xt::all(), xt::all())))(), 1e-6) << "image " << i;
  EXPECT_LT(gradient_error(loss, batch.images, d_images), 1e-6);
}

// CE + balance loss of a mixed batch, differentiated w.r.t. every trainable parameter and the pixels. Router
// weights are scaled up so that no top-1 choice flips under the finite-difference perturbation.
void gradient_check(const MoleD::Config& config) {
  Rng rng(21);
  MoleD model(config, rng);
  model.set_training(false);
  randomize(model, rng);
  for (auto& ref : parameters_of<double>(model))
    if (is_router(ref.name)) ref.param->value *= 8.0;
  MoleD::Batch batch = model.make_batch(gradient_samples(rng));
  auto loss = [&] {
    MoleD::Cache c;
    return double(model.loss(batch, c));
  };
  auto params = parameters_of<double>(model);
  zero_grads(params);
  MoleD::Cache cache;
  model.loss(batch, cache);
  if (config.experts.experts > 1) {
    ASSERT_GT(routing_margin(cache), 1e-3);
    EXPECT_GT(std::abs(cache.balance_value), 1e-3);
  }
  model.backward(cache);
  std::map<std::string, std::size_t> checked;
  for (auto& ref : params) {
    if (!ref.param->trainable) continue;
    const Tensor<double> g = ref.param->grad;
    expect_gradient(loss, ref.param->value, g, ref.name);
    ++checked[group_of(ref.name)];
  }
  EXPECT_EQ(checked.count(""), 0u) << "a backbone parameter is trainable";
  EXPECT_EQ(checked.count("routers"), config.experts.experts > 1 ? 1u : 0u);
  EXPECT_EQ(checked.size(), config.experts.experts > 1 ? 4u : 3u);
  check_image_gradient(model, batch, /*dloss=*/0.7);
}

std::size_t sum(const std::vector<std::size_t>& v) { return std::accumulate(v.begin(), v.end(), std::size_t(0)); }
}  // namespace

// ---- gradients ------------------------------------------------------------------------------------------------

TEST(LlavaMole, GradientCheckMoLEBalance) { gradient_check(tiny_config()); }

TEST(LlavaMole, GradientCheckSwitchBalanceWithGateScaling) {
  MoleD::Config c = tiny_config(3, BalanceKind::Switch);
  c.experts.gate_scaling = true;
  gradient_check(c);
}

TEST(LlavaMole, GradientCheckZLossDense) {
  MoleD::Config c = tiny_config(2, BalanceKind::ZLoss);
  c.experts.dense = true;
  gradient_check(c);
}

TEST(LlavaMole, GradientCheckGShardAcrossLayers) {
  MoleD::Config c = tiny_config(3, BalanceKind::GShard);
  c.balance.scope = BalanceScope::AcrossLayers;
  gradient_check(c);
}

TEST(LlavaMole, GradientCheckPlainLoRABaseline) { gradient_check(tiny_config(1)); }

TEST(LlavaMole, ImageGradientIsOptionalAndLeavesParameterGradientsAlone) {
  Rng rng(31);
  MoleD model(tiny_config(), rng);
  model.set_training(false);
  randomize(model, rng);
  const MoleD::Batch batch = model.make_batch(gradient_samples(rng));
  auto params = parameters_of<double>(model);
  zero_grads(params);
  model.loss_and_backward(batch);
  std::vector<Tensor<double>> plain;
  for (auto& ref : params) plain.push_back(ref.param->grad);
  zero_grads(params);
  Tensor<double> d_images;
  model.loss_and_backward(batch, &d_images);
  EXPECT_EQ(shape_of(d_images), shape_of(batch.images));
  for (std::size_t i = 0; i < params.size(); ++i) {
    EXPECT_EQ(max_abs_diff(params[i].param->grad, plain[i]), 0.0) << params[i].name;
    if (params[i].name.rfind("vision_tower.", 0) == 0) {
      EXPECT_EQ(params[i].param->grad.size(), 0u) << params[i].name;
    }
  }
  // A text-only batch has no pixels: the gradient is empty.
  d_images = random_tensor<double>({1, 2, 4, 4}, rng);
  model.loss_and_backward(model.make_batch({sample({3}, {4, 5}, {6, 7})}), &d_images);
  EXPECT_EQ(shape_of(d_images), (Shape{0}));
}

TEST(LlavaMole, AVisionTowerParameterMadeTrainableGetsItsGradient) {
  Rng rng(32);
  MoleD model(tiny_config(), rng);
  model.set_training(false);
  randomize(model, rng);
  for (auto& ref : parameters_of<double>(model))
    if (is_router(ref.name)) ref.param->value *= 8.0;
  Parameter<double>& patch = model.vit().patch_weight();
  patch.set_trainable(true);
  const MoleD::Batch batch = model.make_batch(gradient_samples(rng));
  auto loss = [&] {
    MoleD::Cache c;
    return double(model.loss(batch, c));
  };
  MoleD::Cache cache;
  model.loss(batch, cache);
  ASSERT_GT(routing_margin(cache), 1e-3);
  model.backward(cache);  // no pixel gradient requested: the trainable weight alone opens the ViT backward
  EXPECT_GT(xt::amax(xt::abs(patch.grad))(), 0.0);
  const Tensor<double> g = patch.grad;
  expect_gradient(loss, patch.value, g, patch.name);
}

TEST(LlavaMole, SparseRoutersLearnOnlyFromTheBalanceLoss) {
  for (double weight : {0.0, 1e-2}) {
    Rng rng(22);
    MoleD model(tiny_config(3, BalanceKind::MoLE, weight), rng);
    randomize(model, rng);
    const auto r = model.loss_and_backward(model.make_batch(mixed_samples(rng)));
    EXPECT_NEAR(r.loss, r.ce + r.balance, 1e-12);
    for (const auto& ref : parameters_of<double>(model))
      if (is_router(ref.name)) {
        const double g = xt::amax(xt::abs(ref.param->grad))();
        if (weight == 0.0) EXPECT_EQ(g, 0.0) << ref.name;
        else EXPECT_GT(g, 0.0) << ref.name;
      }
  }
}

TEST(LlavaMole, BalanceLossCountsValidPositionsPerSample) {
  Rng rng(23);
  MoleD model(tiny_config(3, BalanceKind::MoLE, 1.0), rng);
  randomize(model, rng);
  const MoleD::Batch batch = model.make_batch(mixed_samples(rng));
  MoleD::Cache c;
  model.loss(batch, c);
  // Reference: per sample b, sum over layers of sum_j mean_t p_tj * mean_t 1[k*_t = j] over its valid positions.
  double want = 0;
  for (const auto* r : c.routing) {
    double layer = 0;
    for (std::size_t b = 0; b < 2; ++b) {
      const std::size_t len = batch.lengths[b], T = batch.ids.shape()[1];
      std::vector<double> p(3, 0.0), f(3, 0.0);
      for (std::size_t t = 0; t < len; ++t) {
        for (std::size_t j = 0; j < 3; ++j) p[j] += r->probs(b * T + t, j) / double(len);
        f[std::size_t(r->experts(b * T + t, 0))] += 1.0 / double(len);
      }
      layer += std::inner_product(p.begin(), p.end(), f.begin(), 0.0) / 2.0;
    }
    want += layer;
  }
  EXPECT_NEAR(c.balance_value, want, 1e-12);
}

// ---- router statistics ----------------------------------------------------------------------------------------

TEST(LlavaMole, ExpertUsageIsReportedPerLayerAndDomain) {
  Rng rng(24);
  MoleD model(tiny_config(), rng);
  randomize(model, rng);
  const MoleD::Batch batch = model.make_batch(mixed_samples(rng));
  MoleD::Cache c;
  model.loss(batch, c);
  const RouterStats<double>* stats = model.router_stats();
  ASSERT_NE(stats, nullptr);
  ASSERT_EQ(stats->layers(), 2u);
  const std::size_t T = batch.ids.shape()[1];
  for (std::size_t l = 0; l < 2; ++l) {
    EXPECT_EQ(stats->tokens(l), double(batch.lengths[0] + batch.lengths[1]));
    for (std::size_t domain = 0; domain < 2; ++domain) {  // sample d is in domain d
      std::vector<double> want(3, 0.0);
      for (std::size_t t = 0; t < batch.lengths[domain]; ++t)
        want[std::size_t(c.routing[l]->experts(domain * T + t, 0))] += 1.0 / double(batch.lengths[domain]);
      const std::vector<double> got = stats->usage(l, domain);
      for (std::size_t j = 0; j < 3; ++j) EXPECT_NEAR(got[j], want[j], 1e-12) << "layer " << l << " domain " << domain;
    }
  }
  model.loss(batch, c);  // a second micro-batch adds up
  EXPECT_EQ(model.router_stats()->tokens(0), 2.0 * double(batch.lengths[0] + batch.lengths[1]));
  model.reset_router_stats();
  EXPECT_EQ(model.router_stats()->layers(), 0u);
}

TEST(LlavaMole, EachStepReportsItsOwnPerLayerExpertCounts) {
  Rng rng(33);
  MoleD model(tiny_config(), rng);
  randomize(model, rng);
  const MoleD::Batch a = model.make_batch(mixed_samples(rng)), b = model.make_batch(gradient_samples(rng));
  const RouterStats<double>& stats = *model.router_stats();
  // RouterStats' accumulated assignments per expert of layer l (top-1: one per valid token).
  const auto accumulated = [&](std::size_t l) {
    std::vector<double> counts = stats.usage(l);
    for (double& c : counts) c *= stats.tokens(l);
    return counts;
  };
  model.reset_router_stats();
  const MoleD::Loss ra = model.loss_and_backward(a);
  std::vector<std::vector<double>> before;
  for (std::size_t l = 0; l < 2; ++l) before.push_back(accumulated(l));
  const MoleD::Loss rb = model.loss_and_backward(b);
  for (const auto* r : {&ra, &rb}) {
    ASSERT_EQ(r->expert_counts.size(), 2u);
    for (const auto& layer : r->expert_counts) {
      ASSERT_EQ(layer.size(), 3u);
      EXPECT_EQ(sum(layer), r->tokens);  // every valid position is routed once; padding is not counted
    }
  }
  EXPECT_EQ(ra.tokens, a.lengths[0] + a.lengths[1]);
  for (std::size_t l = 0; l < 2; ++l) {
    const std::vector<double> after = accumulated(l);
    for (std::size_t j = 0; j < 3; ++j) {
      EXPECT_NEAR(before[l][j], double(ra.expert_counts[l][j]), 1e-9) << "layer " << l << " expert " << j;
      EXPECT_NEAR(after[j] - before[l][j], double(rb.expert_counts[l][j]), 1e-9) << "layer " << l << " expert " << j;
    }
  }
  // The second step's counts are that forward's routing alone (no dropout or noise here: a rerun routes alike).
  MoleD::Cache c;
  model.loss(b, c);
  EXPECT_EQ(c.expert_counts, rb.expert_counts);
  const std::size_t T = b.ids.shape()[1];
  for (std::size_t l = 0; l < 2; ++l) {
    std::vector<std::size_t> want(3, 0);
    for (std::size_t s = 0; s < b.lengths.size(); ++s)
      for (std::size_t t = 0; t < b.lengths[s]; ++t) ++want[std::size_t(c.routing[l]->experts(s * T + t, 0))];
    EXPECT_EQ(rb.expert_counts[l], want) << "layer " << l;
  }
}

TEST(LlavaMole, PlainLoRABaselineHasNoRouter) {
  Rng rng(25);
  MoleD model(tiny_config(1), rng);
  randomize(model, rng);
  const auto r = model.loss_and_backward(model.make_batch(mixed_samples(rng)));
  EXPECT_EQ(r.balance, 0.0);
  EXPECT_EQ(model.router_stats(), nullptr);
  EXPECT_TRUE(r.expert_counts.empty());
  for (const auto& ref : parameters_of<double>(model)) EXPECT_FALSE(is_router(ref.name)) << ref.name;
}

// ---- freezing, training ---------------------------------------------------------------------------------------

TEST(LlavaMole, FrozenParametersGetNoGradients) {
  Rng rng(26);
  MoleD model(tiny_config(), rng);
  randomize(model, rng);
  model.loss_and_backward(model.make_batch(mixed_samples(rng)));
  std::map<std::string, std::size_t> groups;
  for (const auto& ref : parameters_of<double>(model)) {
    const std::string g = group_of(ref.name);
    if (g.empty()) {
      EXPECT_FALSE(ref.param->trainable) << ref.name;
      EXPECT_EQ(ref.param->grad.size(), 0u) << ref.name;
    } else {
      EXPECT_TRUE(ref.param->trainable) << ref.name;
      groups[g] += ref.param->numel();
    }
  }
  const LlavaMoleParameterCount n = model.parameter_count();
  EXPECT_EQ(groups["attention lora"], n.attention_lora);
  EXPECT_EQ(groups["ffn experts"], n.ffn_experts);
  EXPECT_EQ(groups["routers"], n.routers);
  EXPECT_EQ(groups["projector"], n.projector);
}

TEST(LlavaMole, OverfitsAFewSamplesAndGeneratesTheirAnswers) {
  Rng rng(27);
  MoleD::Config config = tiny_config(3, BalanceKind::MoLE, 1e-2);
  config.llm.dim = 12;  // small enough that no op spreads over threads (keeps the test fast on a loaded machine)
  MoleD model(config, rng);
  const auto head = parameters_of<double>(model.llm()).back();
  ASSERT_EQ(head.name, "lm_head.weight");
  head.param->value *= 4.0;  // a "pretrained" head able to express confident predictions
  // Two image samples with the same text and different answers: only the image tells them apart.
  const std::vector<MoleD::Sample> samples{sample({}, {5, 6}, {7, 8}, image(rng)), sample({}, {5, 6}, {9, 10}, image(rng)),
                                           sample({4}, {11}, {12, 2}, std::nullopt, 1), sample({}, {6, 5}, {3, 4})};
  const MoleD::Batch batch = model.make_batch(samples);
  AdamW<double> opt(parameters_of<double>(model), {.weight_decay = 0.0});
  // Decaying to 0 settles the top-1 choices (a flip late in training would jolt the loss).
  const WarmupCosineLr schedule(2e-2, 10, 300);
  double first = 0;
  MoleD::Loss last;
  for (int step = 0; step < 300; ++step) {
    opt.zero_grad();
    last = model.loss_and_backward(batch);
    if (step == 0) first = last.ce;
    opt.step(schedule(step));
  }
  EXPECT_GT(first, 1.5);  // log V = 2.56 for uniform predictions; the scaled random head starts near or above it
  EXPECT_LT(last.ce, 0.05);
  for (const auto& s : samples) EXPECT_EQ(model.generate(s, s.answer.size()), s.answer);
}

TEST(LlavaMole, GenerateRestoresTheModeOnEveryExit) {
  Rng rng(34);
  MoleD model(tiny_config(), rng);
  randomize(model, rng);
  const MoleD::Sample fits = sample({3}, {4, 5}, {}, image(rng));
  // 1 + 4 + 40 positions exceed max_seq = 32: the prefill throws after the model has switched to eval mode.
  const MoleD::Sample too_long = sample({}, std::vector<std::int64_t>(40, 5), {}, image(rng));
  for (bool mode : {true, false}) {
    model.set_training(mode);
    EXPECT_EQ(model.generate(fits, 2).size(), 2u);
    EXPECT_EQ(model.training(), mode);
    EXPECT_THROW(model.generate(too_long, 2), ConfigError);
    EXPECT_EQ(model.training(), mode);
    EXPECT_EQ(model.llm().training(), mode);
    EXPECT_EQ(model.vit().training(), mode);
  }
}

// ---- structure, counts, errors --------------------------------------------------------------------------------

TEST(LlavaMole, ImageTokensComeFromTheChosenLayer) {
  Rng rng(28);
  MoleD model(tiny_config(), rng);
  EXPECT_EQ(model.vit().num_layers(), 2u);  // 3 + (-2) + 1
  EXPECT_EQ(model.num_image_tokens(), 4u);
  MoleD::Config last = tiny_config();
  last.feature_layer = -1;
  EXPECT_EQ(MoleD(last, rng).vit().num_layers(), 3u);
  // The projected patch tokens sit at the image slots: x = E[ids] elsewhere.
  const MoleD::Batch batch = model.make_batch({sample({3}, {5}, {6}, image(rng))});
  EXPECT_EQ(batch.image_start[0], std::optional<std::size_t>(2));
  EXPECT_EQ(batch.lengths[0], 1u + 1u + 4u + 1u + 1u);
  std::vector<std::string> names;
  for (const auto& ref : parameters_of<double>(model)) names.push_back(ref.name);
  EXPECT_NE(std::find(names.begin(), names.end(), "multi_modal_projector.linear_2.bias"), names.end());
  EXPECT_NE(std::find(names.begin(), names.end(), "vision_tower.vision_model.encoder.layers.1.mlp.fc2.weight"),
            names.end());
  EXPECT_EQ(std::find(names.begin(), names.end(), "vision_tower.vision_model.encoder.layers.2.mlp.fc2.weight"),
            names.end());
  EXPECT_NE(std::find(names.begin(), names.end(), "language_model.model.layers.1.mlp.down_proj.lora_B.weight"),
            names.end());
}

TEST(LlavaMole, StaticParameterCountMatchesTheAllocatedModel) {
  for (std::size_t experts : {1u, 3u}) {
    MoleD::Config c = tiny_config(experts);
    c.lora_targets = {.q = true, .v = true};
    Rng rng(29);
    MoleD model(c, rng);
    const LlavaMoleParameterCount want = MoleD::parameter_count(c), got = model.parameter_count();
    EXPECT_EQ(got.attention_lora, want.attention_lora);
    EXPECT_EQ(got.ffn_experts, want.ffn_experts);
    EXPECT_EQ(got.routers, want.routers);
    EXPECT_EQ(got.projector, want.projector);
    EXPECT_EQ(got.trainable, want.trainable);
    EXPECT_EQ(got.total, want.total);
    EXPECT_EQ(count_parameters(parameters_of<double>(model), true), want.trainable);
  }
  // LLaVA-1.5-7B shapes (Vicuna-7B, CLIP ViT-L/14-336 up to its penultimate block), K = 3, r = 32.
  MoleD::Config c;
  c.llm = {.vocab = 32000, .dim = 4096, .n_layers = 32, .n_heads = 32, .ffn_dim = 11008};
  c.vit = {.image_size = 336, .patch = 14, .channels = 3, .dim = 1024, .n_layers = 24, .n_heads = 16, .mlp_dim = 4096};
  const LlavaMoleParameterCount n = MoleD::parameter_count(c);
  EXPECT_EQ(n.attention_lora, 32u * 4u * 32u * (4096u + 4096u));
  EXPECT_EQ(n.ffn_experts, 32u * 3u * 3u * 32u * (4096u + 11008u));
  EXPECT_EQ(n.routers, 32u * (3u * 4096u + 3u));
  EXPECT_EQ(n.projector, 1024u * 4096u + 4096u + 4096u * 4096u + 4096u);
  std::ostringstream os;
  os << n;
  EXPECT_NE(os.str().find("routers 393,312"), std::string::npos) << os.str();
}

TEST(LlavaMole, BadConfigsAndBatchesThrow) {
  Rng rng(30);
  for (int layer : {0, -4}) {
    MoleD::Config c = tiny_config();
    c.feature_layer = layer;
    EXPECT_THROW(MoleD(c, rng), ConfigError) << layer;
  }
  MoleD::Config c = tiny_config();
  c.domains = 0;
  EXPECT_THROW(MoleD(c, rng), ConfigError);
  c = tiny_config();
  c.experts.experts = 0;
  EXPECT_THROW(MoleD(c, rng), ConfigError);

  MoleD model(tiny_config(), rng);
  const MoleD::Batch good = model.make_batch(mixed_samples(rng));
  MoleD::Cache cache;
  MoleD::Batch bad = good;
  bad.domains[1] = 2;
  EXPECT_THROW(model.loss(bad, cache), IndexError);
  bad = good;
  bad.labels(0, 3) = 4;  // an image slot
  EXPECT_THROW(model.loss(bad, cache), ConfigError);
  bad = good;
  bad.image_start[0] = 6;
  EXPECT_THROW(model.loss(bad, cache), IndexError);
  bad = good;
  bad.images = random_tensor<double>({2, 2, 4, 4}, rng);
  EXPECT_THROW(model.loss(bad, cache), ShapeError);
  bad = good;
  bad.domains.push_back(0);
  EXPECT_THROW(model.loss(bad, cache), ShapeError);
}
