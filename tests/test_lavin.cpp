#include <gtest/gtest.h>

#include <map>
#include <sstream>
#include <string>

#include <xtensor/xsort.hpp>
#include <xtensor/xview.hpp>

#include "mixpeft/models/lavin.hpp"
#include "mixpeft/testing/gradcheck.hpp"
#include "mixpeft/train/adamw.hpp"

using namespace mixpeft;
using namespace mixpeft::testing;

namespace {
using LavinD = Lavin<double>;
using AdapterConfig = MMAdapter<double>::Config;

// ViT: 4 patches of 2x2 pixels, 2 blocks, [cls] after each (2 visual tokens); LLaMA: 2 blocks of width `dim`.
LavinD::Config tiny_config(bool before_ffn = false, std::size_t dim = 8) {
  LavinD::Config c;
  c.llm = {.vocab = 13, .dim = dim, .n_layers = 2, .n_heads = 2, .ffn_dim = 12, .max_seq = 32};
  c.vit = {.image_size = 4, .patch = 2, .channels = 2, .dim = 8, .n_layers = 2, .n_heads = 2, .mlp_dim = 12,
           .take_every = 1};
  c.llm_adapter = AdapterConfig{.hidden = 4, .groups = 2, .scale = 1.0, .dropout = 0.0, .temperature = 3.0};
  c.vit_adapter = AdapterConfig{.hidden = 4, .groups = 2, .scale = 1.0, .dropout = 0.0, .temperature = 3.0};
  c.adapter_before_ffn = before_ffn;
  c.neck_hidden = 6;
  return c;
}

LavinD::Sample sample(std::vector<std::int64_t> prefix, std::vector<std::int64_t> prompt,
                      std::vector<std::int64_t> answer, std::optional<Tensor<double>> image = std::nullopt) {
  return {.prefix = std::move(prefix), .prompt = std::move(prompt), .answer = std::move(answer), .image = std::move(image)};
}

Tensor<double> image(Rng& rng) { return random_tensor<double>({2, 4, 4}, rng); }

// One image+text sample (length 10) and one text-only sample (length 7).
std::vector<LavinD::Sample> mixed_samples(Rng& rng) {
  return {sample({3, 4}, {5, 6}, {7, 8}, image(rng)), sample({9}, {10, 11, 12}, {2})};
}

// Every parameter gets random values (adapter up-projections included), so each path carries signal.
void randomize(LavinD& model, Rng& rng, double scale = 0.4) {
  for (auto& ref : parameters_of<double>(model))
    ref.param->value = random_tensor<double>(shape_of(ref.param->value), rng, scale);
}

// Which trainable group a parameter belongs to ("" for the frozen backbone).
std::string group_of(const std::string& name) {
  if (name.rfind("llm.", 0) == 0 && name.find(".adapter_") != std::string::npos) return "llm adapters";
  if (name.rfind("vit.", 0) == 0 && name.find(".adapter_") != std::string::npos) return "vit adapters";
  if (name.rfind("neck.", 0) == 0) return "neck";
  if (name == "modality_embedding.weight") return "modality embedding";
  return "";
}

// A parameter the loss does not reach has a zero analytic gradient and finite differences of rounding size.
void expect_gradient(const std::function<double()>& loss, Tensor<double>& x, const Tensor<double>& analytic,
                     const std::string& name) {
  const Tensor<double> numeric = numerical_gradient(loss, x);
  if (xt::amax(xt::abs(analytic))() < 1e-10) EXPECT_LT(xt::amax(xt::abs(numeric))(), 1e-8) << name;
  else EXPECT_LT(relative_error(analytic, numeric), 1e-6) << name;
}

// Image+text, text-only, image+text: the second image belongs to the third sequence.
std::vector<LavinD::Sample> gradient_samples(Rng& rng) {
  std::vector<LavinD::Sample> s = mixed_samples(rng);
  s.push_back(sample({2}, {4}, {5, 6}, image(rng)));
  return s;
}

// The pixel gradient of the answer cross-entropy against central differences (dloss scales it).
void check_image_gradient(LavinD& model, LavinD::Batch& batch, double dloss = 1.0) {
  auto loss = [&] {
    LavinD::Cache c;
    return dloss * double(model.loss(batch, c));
  };
  LavinD::Cache cache;
  model.loss(batch, cache);
  Tensor<double> d_images;
  model.backward(cache, dloss, &d_images);
  ASSERT_EQ(shape_of(d_images), shape_of(batch.images));
  for (std::size_t i = 0; i < batch.images.shape()[0]; ++i)  // every image reaches the loss
    EXPECT_GT(xt::amax(xt::abs(xt::view(d_images, i, xt::all(), xt::all(), xt::all())))(), 1e-6) << "image " << i;
  EXPECT_LT(gradient_error(loss, batch.images, d_images), 1e-6);
}

// The answer cross-entropy of a mixed batch, differentiated w.r.t. every trainable parameter and the pixels.
void gradient_check(const LavinD::Config& config) {
  Rng rng(7);
  LavinD model(config, rng);
  model.set_training(false);
  randomize(model, rng);
  LavinD::Batch batch = model.make_batch(gradient_samples(rng));
  auto loss = [&] {
    LavinD::Cache c;
    return double(model.loss(batch, c));
  };
  auto params = parameters_of<double>(model);
  zero_grads(params);
  LavinD::Cache cache;
  model.loss(batch, cache);
  model.backward(cache);
  std::map<std::string, std::size_t> checked;
  for (auto& ref : params) {
    if (!ref.param->trainable) continue;
    const Tensor<double> g = ref.param->grad;
    expect_gradient(loss, ref.param->value, g, ref.name);
    EXPECT_GT(xt::amax(xt::abs(g))(), 0.0) << ref.name << " receives no gradient";
    ++checked[group_of(ref.name)];
  }
  EXPECT_EQ(checked.size(), 4u);
  EXPECT_EQ(checked.count(""), 0u) << "a backbone parameter is trainable";
  check_image_gradient(model, batch);
}

double max_diff(const Tensor<double>& a, const Tensor<double>& b) { return max_abs_diff(a, b); }
}  // namespace

// ---- gradients ------------------------------------------------------------------------------------------------

TEST(Lavin, GradientCheckMixedBatch) { gradient_check(tiny_config()); }

TEST(Lavin, GradientCheckWithAdaptersBeforeTheFeedForward) { gradient_check(tiny_config(/*before_ffn=*/true)); }

TEST(Lavin, ImageGradientThroughAFullyFrozenVisionTower) {
  LavinD::Config config = tiny_config();
  config.vit_adapter = std::nullopt;  // no trainable ViT parameter: the pixels' request alone drives the ViT backward
  Rng rng(17);
  LavinD model(config, rng);
  model.set_training(false);
  randomize(model, rng);
  LavinD::Batch batch = model.make_batch(gradient_samples(rng));
  check_image_gradient(model, batch, /*dloss=*/0.7);
}

TEST(Lavin, ImageGradientIsOptionalAndLeavesParameterGradientsAlone) {
  Rng rng(18);
  LavinD model(tiny_config(), rng);
  model.set_training(false);
  randomize(model, rng);
  const LavinD::Batch batch = model.make_batch(gradient_samples(rng));
  auto params = parameters_of<double>(model);
  zero_grads(params);
  model.loss_and_backward(batch);
  std::vector<Tensor<double>> plain;
  for (auto& ref : params) plain.push_back(ref.param->grad);
  zero_grads(params);
  Tensor<double> d_images;
  model.loss_and_backward(batch, &d_images);
  EXPECT_EQ(shape_of(d_images), shape_of(batch.images));
  for (std::size_t i = 0; i < params.size(); ++i)
    EXPECT_EQ(max_diff(params[i].param->grad, plain[i]), 0.0) << params[i].name;
  // A text-only batch has no pixels: the gradient is empty.
  d_images = random_tensor<double>({1, 2, 4, 4}, rng);
  model.loss_and_backward(model.make_batch({sample({3}, {4, 5}, {6, 7})}), &d_images);
  EXPECT_EQ(shape_of(d_images), (Shape{0}));
}

TEST(Lavin, FrozenParametersGetNoGradients) {
  Rng rng(8);
  LavinD model(tiny_config(), rng);
  randomize(model, rng);
  model.loss_and_backward(model.make_batch(mixed_samples(rng)));
  std::size_t trainable = 0;
  for (const auto& ref : parameters_of<double>(model)) {
    if (group_of(ref.name).empty()) {
      EXPECT_FALSE(ref.param->trainable) << ref.name;
      EXPECT_EQ(ref.param->grad.size(), 0u) << ref.name;
    } else {
      EXPECT_TRUE(ref.param->trainable) << ref.name;
      EXPECT_GT(xt::amax(xt::abs(ref.param->grad))(), 0.0) << ref.name;
      trainable += ref.param->numel();
    }
  }
  EXPECT_EQ(trainable, model.parameter_count().trainable);
}

TEST(Lavin, TextOnlyBatchSkipsTheVisionTower) {
  Rng rng(9);
  LavinD model(tiny_config(), rng);
  randomize(model, rng);
  const auto r = model.loss_and_backward(model.make_batch({sample({3}, {4, 5}, {6, 7}), sample({}, {8}, {9})}));
  EXPECT_EQ(r.targets, 3u);
  EXPECT_EQ(r.tokens, 7u + 4u);
  for (const auto& ref : parameters_of<double>(model)) {
    const std::string g = group_of(ref.name);
    if (g == "vit adapters" || g == "neck") {
      EXPECT_EQ(xt::amax(xt::abs(ref.param->grad))(), 0.0) << ref.name;
    }
  }
  // Only the text-only row of t_m is used.
  const auto& grad = model.modality_embedding().grad;
  EXPECT_GT(xt::amax(xt::abs(xt::view(grad, 0, xt::all())))(), 0.0);
  EXPECT_EQ(xt::amax(xt::abs(xt::view(grad, 1, xt::all())))(), 0.0);
}

// ---- routing --------------------------------------------------------------------------------------------------

TEST(Lavin, RoutingDependsOnTheModalityAlone) {
  Rng rng(10);
  LavinD model(tiny_config(/*before_ffn=*/true), rng);
  randomize(model, rng);
  const std::vector<LavinD::Sample> samples{sample({3, 4}, {5, 6}, {7, 8}, image(rng)), sample({9}, {10, 11, 12}, {2}),
                                            sample({}, {5}, {6, 7, 8}, image(rng)), sample({2, 2, 2}, {4}, {})};
  const LavinD::Batch a = model.make_batch(samples);
  // The same layout with every token but position 0 and every image replaced.
  LavinD::Batch b = a;
  for (std::size_t s = 0; s < b.lengths.size(); ++s)
    for (std::size_t t = 1; t < b.ids.shape()[1]; ++t) b.ids(s, t) = std::int64_t(rng.below(13));
  b.images = random_tensor<double>(shape_of(a.images), rng);

  LavinD::Cache ca, cb;
  const Tensor<double> logits_a = model.forward(a, ca), logits_b = model.forward(b, cb);
  EXPECT_GT(max_diff(logits_a, logits_b), 1e-3);  // the change reaches the output
  const auto wa = model.routing_weights(ca), wb = model.routing_weights(cb);
  ASSERT_EQ(wa.size(), 2u);
  for (std::size_t l = 0; l < wa.size(); ++l) {
    EXPECT_LT(max_diff(wa[l], wb[l]), 1e-15) << "layer " << l;
    // Same modality, different content and length: the same weights; text-only and image+text differ.
    const auto row = [&](std::size_t s) -> Tensor<double> { return xt::view(wa[l], s, xt::all()); };
    EXPECT_LT(max_diff(row(0), row(2)), 1e-15) << "layer " << l;
    EXPECT_LT(max_diff(row(1), row(3)), 1e-15) << "layer " << l;
    EXPECT_GT(max_diff(row(0), row(1)), 1e-3) << "layer " << l;
  }
  // The adapters before the FFN also route from position 0.
  for (std::size_t l = 0; l < 2; ++l)
    EXPECT_LT(max_diff(ca.llm.blocks[l].adapter_mlp.weights, cb.llm.blocks[l].adapter_mlp.weights), 1e-15);
}

TEST(Lavin, NoTokenAttendsToTheModalityToken) {
  Rng rng(11);
  LavinD model(tiny_config(), rng);
  randomize(model, rng);
  const LavinD::Batch batch = model.make_batch(mixed_samples(rng));
  LavinD::Cache c1, c2;
  const Tensor<double> base = model.forward(batch, c1);
  // Changing t_m moves position 0 and, through the routing weights, the adapters; with the adapters' up-projections
  // zeroed the modality token has no path to any other position.
  for (std::size_t l = 0; l < 2; ++l)
    for (auto* p : {&model.llm().adapter_attn(l)->B(), &model.llm().adapter_attn(l)->b(),
                    &model.llm().adapter_attn(l)->D(), &model.llm().adapter_attn(l)->d()})
      p->value.fill(0.0);
  const Tensor<double> before = model.forward(batch, c1);
  model.modality_embedding().value += 1.0;
  const Tensor<double> after = model.forward(batch, c2);
  const Tensor<double> rest_before = xt::view(before, xt::all(), xt::range(1, before.shape()[1]), xt::all());
  const Tensor<double> rest_after = xt::view(after, xt::all(), xt::range(1, after.shape()[1]), xt::all());
  EXPECT_LT(max_diff(rest_before, rest_after), 1e-12);
  EXPECT_GT(max_diff(before, after), 1e-3);
  EXPECT_GT(max_diff(base, before), 0.0);
}

// ---- training -------------------------------------------------------------------------------------------------

TEST(Lavin, OverfitsAFewSamplesAndGeneratesTheirAnswers) {
  Rng rng(12);
  LavinD model(tiny_config(/*before_ffn=*/true, /*dim=*/12), rng);  // no op spreads over threads at this size
  // A "pretrained" frozen head: larger weights than nn.Linear's init, so the frozen model can express confident
  // predictions.
  const auto head = parameters_of<double>(model.llm()).back();
  ASSERT_EQ(head.name, "lm_head.weight");
  head.param->value *= 4.0;
  // Two image samples with the same text and different answers: only the image tells them apart.
  const std::vector<LavinD::Sample> samples{sample({}, {5, 6}, {7, 8}, image(rng)), sample({}, {5, 6}, {9, 10}, image(rng)),
                                            sample({4}, {11}, {12, 2}), sample({}, {6, 5}, {3, 4})};
  const LavinD::Batch batch = model.make_batch(samples);
  AdamW<double> opt(parameters_of<double>(model), {.lr = 2e-2, .weight_decay = 0.0});
  double first = 0, last = 0;
  for (int step = 0; step < 300; ++step) {
    opt.zero_grad();
    last = model.loss_and_backward(batch).loss;
    if (step == 0) first = last;
    opt.step();
  }
  EXPECT_GT(first, 1.5);  // log V = 2.56 for uniform predictions; the scaled random head starts near or above it
  EXPECT_LT(last, 0.05);
  for (const auto& s : samples) EXPECT_EQ(model.generate(s, s.answer.size()), s.answer);
}

TEST(Lavin, GenerateRestoresTheModeOnEveryExit) {
  Rng rng(19);
  LavinD model(tiny_config(), rng);
  randomize(model, rng);
  const LavinD::Sample fits = sample({3}, {4, 5}, {}, image(rng));
  // 2 + 40 positions exceed max_seq = 32: the prefill throws after the model has switched to eval mode.
  const LavinD::Sample too_long = sample({}, std::vector<std::int64_t>(40, 5), {}, image(rng));
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

// ---- parameter counts -----------------------------------------------------------------------------------------

TEST(Lavin, ParameterCountOfLaVIN7B) {
  LavinD::Config c;
  c.llm = {.vocab = 32000, .dim = 4096, .n_layers = 32, .n_heads = 32, .ffn_dim = 11008};
  c.vit = {.image_size = 224, .patch = 14, .channels = 3, .dim = 1024, .n_layers = 24, .n_heads = 16, .mlp_dim = 4096,
           .take_every = 4};
  const LavinParameterCount n = LavinD::parameter_count(c);
  EXPECT_EQ(n.llm_adapters, 32u * 81930u);
  EXPECT_EQ(n.vit_adapters, 24u * 20490u);
  EXPECT_EQ(n.neck, 659584u);
  EXPECT_EQ(n.modality_embedding, 8192u);
  EXPECT_EQ(n.trainable, 3781296u);
  EXPECT_EQ(n.total, 3781296u + 6738415616u + 303179776u);  // + LLaMA-7B + CLIP ViT-L/14 vision tower
  std::ostringstream os;
  os << n;
  EXPECT_NE(os.str().find("trainable 3,781,296"), std::string::npos) << os.str();
}

TEST(Lavin, StaticParameterCountMatchesTheAllocatedModel) {
  for (bool before_ffn : {false, true})
    for (bool vit_adapters : {false, true}) {
      LavinD::Config c = tiny_config(before_ffn);
      if (!vit_adapters) c.vit_adapter = std::nullopt;
      Rng rng(13);
      LavinD model(c, rng);
      const LavinParameterCount want = LavinD::parameter_count(c), got = model.parameter_count();
      EXPECT_EQ(got.llm_adapters, want.llm_adapters);
      EXPECT_EQ(got.vit_adapters, want.vit_adapters);
      EXPECT_EQ(got.neck, want.neck);
      EXPECT_EQ(got.modality_embedding, want.modality_embedding);
      EXPECT_EQ(got.trainable, want.trainable);
      EXPECT_EQ(got.total, want.total);
      EXPECT_EQ(count_parameters(parameters_of<double>(model), true), want.trainable);
    }
}

// ---- construction and errors ----------------------------------------------------------------------------------

TEST(Lavin, FreshModelKeepsTheBackboneOutput) {
  // Zero-initialised adapters are the identity: the text positions equal the plain frozen LLaMA's output.
  Rng rng(14);
  LavinD model(tiny_config(), rng);
  const LavinD::Batch batch = model.make_batch({sample({3, 4}, {5}, {6})});
  LavinD::Cache c;
  const Tensor<double> logits = model.forward(batch, c);
  Llama<double>::Cache lc;
  Tensor<double> x = model.llm().embed(batch.ids);
  xt::view(x, 0, 0, xt::all()) = xt::view(model.modality_embedding().value, 0, xt::all());
  const Tensor<double> want =
      model.llm().logits(model.llm().forward_embeddings(x, {.causal = true, .block_first_key = true}, lc), lc);
  EXPECT_LT(max_diff(logits, want), 1e-12);
}

TEST(Lavin, MakeBatchLaysOutTheSequences) {
  Rng rng(15);
  LavinD model(tiny_config(), rng);
  const LavinD::Batch b = model.make_batch(mixed_samples(rng));
  EXPECT_EQ(b.lengths, (std::vector<std::size_t>{10, 7}));
  EXPECT_EQ(b.visual_start[0], std::optional<std::size_t>(4));
  EXPECT_FALSE(b.visual_start[1].has_value());
  EXPECT_EQ(shape_of(b.images), (Shape{1, 2, 4, 4}));
  const std::vector<std::int64_t> ids0(b.ids.begin(), b.ids.begin() + 10), ids1(b.ids.begin() + 10, b.ids.end());
  EXPECT_EQ(ids0, (std::vector<std::int64_t>{0, 1, 3, 4, 0, 0, 5, 6, 7, 8}));
  EXPECT_EQ(ids1, (std::vector<std::int64_t>{0, 1, 9, 10, 11, 12, 2, 0, 0, 0}));
  const std::vector<std::int64_t> labels1(b.labels.begin() + 10, b.labels.end());
  EXPECT_EQ(labels1, (std::vector<std::int64_t>{-100, -100, -100, -100, -100, -100, 2, -100, -100, -100}));
  EXPECT_EQ(b.labels(0, 8), 7);
  EXPECT_EQ(b.labels(0, 9), 8);
  EXPECT_EQ(b.labels(0, 7), -100);
}

TEST(Lavin, BadConfigsAndBatchesThrow) {
  LavinD::Config c = tiny_config();
  c.vit.take_every = 0;
  Rng rng(16);
  EXPECT_THROW(LavinD(c, rng), ConfigError);
  c = tiny_config();
  c.neck_hidden = 0;
  EXPECT_THROW(LavinD(c, rng), ConfigError);
  c = tiny_config();
  c.bos_id = 13;
  EXPECT_THROW(LavinD::parameter_count(c), ConfigError);

  LavinD model(tiny_config(), rng);
  const LavinD::Batch good = model.make_batch(mixed_samples(rng));
  LavinD::Cache cache;
  LavinD::Batch bad = good;
  bad.labels(0, 5) = 3;  // a visual slot
  try {
    model.loss(bad, cache);
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("position 5"), std::string::npos) << e.what();
  }
  bad = good;
  bad.visual_start[0] = 9;
  EXPECT_THROW(model.loss(bad, cache), IndexError);
  bad = good;
  bad.lengths[1] = 11;
  EXPECT_THROW(model.loss(bad, cache), IndexError);
  bad = good;
  bad.visual_start[1] = 2;  // two image samples, one image
  EXPECT_THROW(model.loss(bad, cache), ShapeError);
  bad = good;
  bad.lengths.pop_back();
  EXPECT_THROW(model.loss(bad, cache), ShapeError);
  EXPECT_THROW(model.make_batch({sample({}, {1}, {2}, random_tensor<double>({3, 4, 4}, rng))}), ShapeError);
  EXPECT_THROW(model.backward(cache), ConfigError);  // no successful loss yet
}
