#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <string>

#include <xtensor/xview.hpp>

#include "mixpeft/models/hf_weights.hpp"
#include "mixpeft/models/vit.hpp"
#include "mixpeft/testing/gradcheck.hpp"

using namespace mixpeft;
using namespace mixpeft::testing;

namespace {
using VitD = ClipVit<double>;

const std::filesystem::path golden_path = std::filesystem::path(MIXPEFT_TEST_DATA_DIR) / "vit_golden.safetensors";

// 4 patches of 2x2 pixels, 2 channels, 4 blocks, [cls] after blocks 1 and 3.
VitD::Config tiny_config(bool norm_taken = false) {
  return {.image_size = 4, .patch = 2, .channels = 2, .dim = 8, .n_layers = 4, .n_heads = 2, .mlp_dim = 12,
          .layer_norm_eps = 1e-5, .take_every = 2, .norm_taken = norm_taken};
}

// LoRA on the given targets (rank 2, dropout on so that eval mode must switch it off).
VitD::Peft lora_on(VitLoRATargets targets) {
  VitD::Peft peft;
  peft.lora_targets = targets;
  peft.lora = {.rank = 2, .alpha = 4, .dropout = 0.1};
  return peft;
}
constexpr VitLoRATargets mlp_targets{.fc1 = true, .fc2 = true};
constexpr VitLoRATargets all_targets{.q = true, .k = true, .v = true, .o = true, .fc1 = true, .fc2 = true};

VitD::Peft adapters() {
  VitD::Peft peft;
  peft.mm_adapter = MMAdapter<double>::Config{.hidden = 4, .groups = 2, .scale = 0.9, .temperature = 3.0};
  return peft;
}

template <class Model>
void randomize(Model& model, Rng& rng, double scale = 0.4) {
  for (auto& ref : parameters_of<double>(model))
    ref.param->value = random_tensor<double>(shape_of(ref.param->value), rng, scale);
}

// A parameter the loss does not reach (a key bias under softmax, whose gradient is zero) is checked against an
// absolute bound: its finite differences carry only rounding noise.
void expect_gradient(const std::function<double()>& loss, Tensor<double>& x, const Tensor<double>& analytic,
                     const std::string& name) {
  const Tensor<double> numeric = numerical_gradient(loss, x);
  if (xt::amax(xt::abs(analytic))() < 1e-10) EXPECT_LT(xt::amax(xt::abs(numeric))(), 1e-8) << name;
  else EXPECT_LT(relative_error(analytic, numeric), 1e-6) << name;
}

// L = <hidden, Rh> + <cls, Rc> (either term optional); checks d_images and every trainable parameter.
void gradient_check(VitD model, bool use_hidden, bool use_cls, std::uint64_t seed = 3) {
  model.set_training(false);
  Rng rng(seed);
  const auto& c = model.config();
  Tensor<double> images = random_tensor<double>({2, c.channels, c.image_size, c.image_size}, rng);
  const Tensor<double> Rh = use_hidden ? random_tensor<double>({2, model.num_tokens(), c.dim}, rng) : empty<double>({0});
  const Tensor<double> Rc = use_cls ? random_tensor<double>({2, model.num_taken(), c.dim}, rng) : empty<double>({0});
  auto loss = [&] {
    VitD::Cache cache;
    const auto out = model.forward(images, cache);
    return (use_hidden ? dot(out.hidden, Rh) : 0.0) + (use_cls ? dot(out.cls, Rc) : 0.0);
  };
  VitD::Cache cache;
  model.forward(images, cache);
  auto params = parameters_of<double>(model);
  zero_grads(params);
  const Tensor<double> d_images = model.backward(cache, Rh, Rc, /*images_grad=*/true);
  expect_gradient(loss, images, d_images, "images");
  std::size_t checked = 0;
  for (auto& ref : params) {
    if (!ref.param->trainable) continue;
    const Tensor<double> g = ref.param->grad;
    expect_gradient(loss, ref.param->value, g, ref.name);
    ++checked;
  }
  EXPECT_GT(checked, 0u);
}
}  // namespace

// ---- golden (numpy reference, tools/make_golden.py) -----------------------------------------------------------

template <class T>
void golden_test(double tolerance, const typename ClipVit<T>::Peft& peft = {}) {
  SafetensorsFile file(golden_path);
  const auto g = file.read<std::int64_t>("golden.config");
  const Tensor<double> want_hidden = file.read<double>("golden.hidden"), want_cls = file.read<double>("golden.cls"),
                       want_normed = file.read<double>("golden.cls_normed");
  for (bool norm_taken : {false, true}) {
    Rng rng(1);
    ClipVit<T> model({.image_size = std::size_t(g(0)), .patch = std::size_t(g(1)), .channels = std::size_t(g(2)),
                      .dim = std::size_t(g(3)), .n_layers = std::size_t(g(4)), .n_heads = std::size_t(g(5)),
                      .mlp_dim = std::size_t(g(6)), .layer_norm_eps = 1e-5, .take_every = std::size_t(g(7)),
                      .norm_taken = norm_taken},
                     peft, rng);
    const LoadReport report = load_hf_weights(model, golden_path);
    EXPECT_EQ(report.loaded.size(), 7u + 16u * std::size_t(g(4)));
    EXPECT_TRUE(report.missing.empty());
    for (const auto& n : report.unexpected) EXPECT_TRUE(n.starts_with("golden.")) << n;  // the references
    const Tensor<T> images = file.read<T>("golden.images");
    typename ClipVit<T>::Cache cache;
    const auto out = model.forward(images, cache);
    EXPECT_LT(max_abs_diff(xt::cast<double>(out.hidden), want_hidden), tolerance);
    EXPECT_LT(max_abs_diff(xt::cast<double>(out.cls), norm_taken ? want_normed : want_cls), tolerance);
  }
}

TEST(ClipVit, GoldenDouble) { golden_test<double>(1e-10); }
TEST(ClipVit, GoldenFloat) { golden_test<float>(1e-4); }
// The checkpoint loads into the base weights with LoRA on every projection (fresh B = 0: the golden output).
TEST(ClipVit, GoldenWithLoRAOnEveryProjection) {
  ClipVit<double>::Peft pd;
  pd.lora_targets = all_targets;
  golden_test<double>(1e-10, pd);
  ClipVit<float>::Peft pf;
  pf.lora_targets = all_targets;
  golden_test<float>(1e-4, pf);
}

TEST(ClipVit, HfRoundTripWithMlpLoRASavesAndLoadsTheBaseOnly) {
  Rng rng(21);
  VitD source(tiny_config(), lora_on(all_targets), rng);
  randomize(source, rng);
  const std::string path = (std::filesystem::temp_directory_path() / "mixpeft_test_vit_lora.safetensors").string();
  save_hf_weights(source, path, DType::F64);
  {
    SafetensorsFile file(path);
    EXPECT_EQ(file.names().size(), 7u + 16u * 4u);
    for (const auto& n : file.names()) EXPECT_EQ(n.find("lora_"), std::string::npos) << n;
  }
  VitD plain(tiny_config(), {}, rng);
  const LoadReport report = load_hf_weights(plain, path);
  EXPECT_EQ(report.loaded.size(), 7u + 16u * 4u);
  VitD loaded(tiny_config(), lora_on(mlp_targets), rng);
  EXPECT_EQ(load_hf_weights(loaded, path).loaded.size(), 7u + 16u * 4u);
  std::remove(path.c_str());
  for (std::size_t i = 0; i < 4; ++i) {
    EXPECT_EQ(loaded.fc1(i).weight().value, source.fc1(i).weight().value) << i;
    EXPECT_EQ(loaded.fc2(i).weight().value, source.fc2(i).weight().value) << i;
  }
  // Fresh LoRA on the loaded model: the plain model's output, bit for bit.
  plain.set_training(false);
  loaded.set_training(false);
  const Tensor<double> images = random_tensor<double>({2, 2, 4, 4}, rng);
  VitD::Cache a, b;
  const auto x = plain.forward(images, a), y = loaded.forward(images, b);
  EXPECT_EQ(x.hidden, y.hidden);
  EXPECT_EQ(x.cls, y.cls);
}

TEST(ClipVit, PatchifyCutsPatchesInConvOrder) {
  // One image, 2 channels, 4x4 pixels, 2x2 patches: pixel value = 100 c + 10 y + x.
  Tensor<double> image = empty<double>({1, 2, 4, 4});
  for (std::size_t c = 0; c < 2; ++c)
    for (std::size_t y = 0; y < 4; ++y)
      for (std::size_t x = 0; x < 4; ++x) image(0, c, y, x) = double(100 * c + 10 * y + x);
  const Tensor<double> patches = patchify(image, 2);
  ASSERT_EQ(shape_of(patches), (Shape{1, 4, 8}));
  // Patch 1 is (row 0, column 1): pixels y in {0, 1}, x in {2, 3}, channel-major.
  EXPECT_EQ(Tensor<double>(xt::view(patches, 0, 1, xt::all())), (Tensor<double>{2, 3, 12, 13, 102, 103, 112, 113}));
  EXPECT_EQ(Tensor<double>(xt::view(patches, 0, 2, xt::all())), (Tensor<double>{20, 21, 30, 31, 120, 121, 130, 131}));
  EXPECT_EQ(unpatchify(patches, shape_of(image), 2), image);
}

TEST(ClipVit, PatchWeightRoundTripsInConvLayout) {
  Rng rng(2);
  VitD source(tiny_config(), {}, rng);
  randomize(source, rng);
  const std::string path = (std::filesystem::temp_directory_path() / "mixpeft_test_vit_roundtrip.safetensors").string();
  save_hf_weights(source, path, DType::F64);
  SafetensorsFile file(path);
  EXPECT_EQ(file.info("vision_model.embeddings.patch_embedding.weight").shape, (Shape{8, 2, 2, 2}));
  VitD loaded(tiny_config(), adapters(), rng);
  load_hf_weights(loaded, path);
  EXPECT_EQ(loaded.patch_weight().value, source.patch_weight().value);
  std::remove(path.c_str());
}

TEST(ClipVit, LoadErrorsNameTheTensorAndBothShapes) {
  Rng rng(3);
  VitD wrong_patch({.image_size = 8, .patch = 2, .channels = 3, .dim = 24, .n_layers = 4, .n_heads = 4,
                    .mlp_dim = 40, .take_every = 2},
                   {}, rng);
  try {
    load_hf_weights(wrong_patch, golden_path);
    FAIL() << "expected ShapeError";
  } catch (const ShapeError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("vision_model.embeddings.patch_embedding.weight"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[24, 3, 4, 4]"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[24, 3, 2, 2]"), std::string::npos) << msg;
  }
  VitD five_layers({.image_size = 8, .patch = 4, .channels = 3, .dim = 24, .n_layers = 5, .n_heads = 4,
                    .mlp_dim = 40, .take_every = 1},
                   {}, rng);
  EXPECT_THROW(load_hf_weights(five_layers, golden_path), FormatError);
}

// ---- parameters and freezing ----------------------------------------------------------------------------------

TEST(ClipVit, HuggingFaceParameterNames) {
  Rng rng(4);
  VitD model(tiny_config(), adapters(), rng);
  std::vector<std::string> names;
  for (const auto& ref : parameters_of<double>(model)) names.push_back(ref.name);
  for (const char* n :
       {"vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.class_embedding",
        "vision_model.embeddings.position_embedding.weight", "vision_model.pre_layrnorm.weight",
        "vision_model.pre_layrnorm.bias", "vision_model.encoder.layers.3.self_attn.out_proj.bias",
        "vision_model.encoder.layers.0.layer_norm1.weight", "vision_model.encoder.layers.0.layer_norm2.bias",
        "vision_model.encoder.layers.2.mlp.fc1.weight", "vision_model.encoder.layers.2.mlp.fc2.bias",
        "vision_model.post_layernorm.weight", "vision_model.encoder.layers.1.adapter_attn.conv_B.weight",
        "vision_model.encoder.layers.1.adapter_attn.expert_weights.bias"})
    EXPECT_NE(std::find(names.begin(), names.end(), n), names.end()) << n;
  ParameterList<double> base;
  model.collect_base_parameters(base);
  EXPECT_EQ(base.size(), 7u + 16u * 4u);
  for (const auto& ref : base) {
    EXPECT_FALSE(ref.param->trainable) << ref.name;
    EXPECT_EQ(ref.param->grad.size(), 0u) << ref.name;
  }
}

TEST(ClipVit, MlpLoRAParameterNamesShapesAndFreezing) {
  Rng rng(14);
  VitD model(tiny_config(), lora_on(mlp_targets), rng);
  std::vector<std::string> trainable;
  for (const auto& ref : parameters_of<double>(model))
    if (ref.param->trainable) trainable.push_back(ref.name);
  std::vector<std::string> want;
  for (std::size_t i = 0; i < 4; ++i)
    for (const char* fc : {"fc1", "fc2"})
      for (const char* f : {"lora_A", "lora_B"})
        want.push_back("vision_model.encoder.layers." + std::to_string(i) + ".mlp." + fc + "." + f + ".weight");
  EXPECT_EQ(trainable, want);  // only the LoRA factors, in model order
  for (std::size_t i = 0; i < 4; ++i) {
    ASSERT_TRUE(model.fc1(i).has_lora());
    ASSERT_TRUE(model.fc2(i).has_lora());
    EXPECT_EQ(shape_of(model.fc1(i).lora().lora_A().value), (Shape{2, 8}));
    EXPECT_EQ(shape_of(model.fc1(i).lora().lora_B().value), (Shape{12, 2}));
    EXPECT_EQ(shape_of(model.fc2(i).lora().lora_A().value), (Shape{2, 12}));
    EXPECT_EQ(shape_of(model.fc2(i).lora().lora_B().value), (Shape{8, 2}));
    EXPECT_EQ(xt::amax(xt::abs(model.fc2(i).lora().lora_B().value))(), 0.0);
    EXPECT_FALSE(model.attention(i).projection(0).has_lora());
  }
  ParameterList<double> base;
  model.collect_base_parameters(base);
  EXPECT_EQ(base.size(), 7u + 16u * 4u);
  for (const auto& ref : base) {
    EXPECT_FALSE(ref.param->trainable) << ref.name;
    EXPECT_EQ(ref.name.find("lora_"), std::string::npos) << ref.name;
  }
  NamedRngs rngs;
  model.collect_rngs(rngs);
  std::vector<std::string> rng_names;
  for (const auto& [name, r] : rngs) rng_names.push_back(name);
  for (const char* n :
       {"vision_model.encoder.layers.0.mlp.fc1.dropout_rng", "vision_model.encoder.layers.3.mlp.fc2.dropout_rng"})
    EXPECT_NE(std::find(rng_names.begin(), rng_names.end(), n), rng_names.end()) << n;
  EXPECT_EQ(rng_names.size(), 8u);
  // Untargeted: plain Linears, no LoRA parameters, no RNGs.
  VitD plain(tiny_config(), lora_on({.q = true}), rng);
  EXPECT_FALSE(plain.fc1(0).has_lora());
  EXPECT_FALSE(plain.fc2(0).has_lora());
  for (const auto& ref : parameters_of<double>(plain))
    EXPECT_FALSE(ref.name.find(".mlp.") != std::string::npos && ref.name.find("lora_") != std::string::npos)
        << ref.name;
}

TEST(ClipVit, MlpLoRADropoutFollowsTrainingMode) {
  Rng rng(15);
  VitD::Peft peft = lora_on(mlp_targets);
  peft.lora.dropout = 0.5;
  VitD model(tiny_config(), peft, rng);
  randomize(model, rng);
  const Tensor<double> images = random_tensor<double>({2, 2, 4, 4}, rng);
  VitD::Cache c;
  model.set_training(false);
  const Tensor<double> eval1 = model.forward(images, c).hidden, eval2 = model.forward(images, c).hidden;
  EXPECT_EQ(eval1, eval2);
  model.set_training(true);
  EXPECT_GT(max_abs_diff(model.forward(images, c).hidden, eval1), 1e-6);
}

TEST(ClipVit, FrozenBaseGetsNoGradientsAndNoImageGradientUnlessAsked) {
  Rng rng(5);
  VitD model(tiny_config(), adapters(), rng);
  randomize(model, rng);
  VitD::Cache cache;
  const auto out = model.forward(random_tensor<double>({3, 2, 4, 4}, rng), cache);
  const Tensor<double> d_images = model.backward(cache, {}, random_tensor<double>(shape_of(out.cls), rng));
  EXPECT_EQ(d_images.size(), 0u);
  ParameterList<double> base;
  model.collect_base_parameters(base);
  for (const auto& ref : base) EXPECT_EQ(ref.param->grad.size(), 0u) << ref.name;
  for (std::size_t i = 0; i < 4; ++i)  // [cls] after block 3 is the last gradient source: every adapter learns
    EXPECT_GT(xt::amax(xt::abs(model.adapter(i)->A().grad))(), 0.0) << i;
}

TEST(ClipVit, FreshAdaptersLeaveTheEncoderUnchanged) {
  Rng rng(6);
  VitD plain(tiny_config(true), {}, rng);
  randomize(plain, rng);
  VitD adapted(tiny_config(true), adapters(), rng);
  ParameterList<double> from, to;
  plain.collect_base_parameters(from);
  adapted.collect_base_parameters(to);
  for (std::size_t i = 0; i < from.size(); ++i) to[i].param->value = from[i].param->value;
  const Tensor<double> images = random_tensor<double>({2, 2, 4, 4}, rng);
  VitD::Cache a, b;
  const auto x = plain.forward(images, a), y = adapted.forward(images, b);
  EXPECT_LT(max_abs_diff(x.hidden, y.hidden), 1e-12);
  EXPECT_LT(max_abs_diff(x.cls, y.cls), 1e-12);
}

// Fresh LoRA (B = 0) on every projection: the base model's outputs bit for bit, in eval and (dropout on) training.
TEST(ClipVit, FreshLoRALeavesTheEncoderBitIdentical) {
  for (const VitLoRATargets& targets : {mlp_targets, all_targets}) {
    Rng rng(16);
    VitD plain(tiny_config(true), {}, rng);
    randomize(plain, rng);
    VitD lora(tiny_config(true), lora_on(targets), rng);
    ParameterList<double> from, to;
    plain.collect_base_parameters(from);
    lora.collect_base_parameters(to);
    ASSERT_EQ(from.size(), to.size());
    for (std::size_t i = 0; i < from.size(); ++i) {
      ASSERT_EQ(from[i].name, to[i].name);
      to[i].param->value = from[i].param->value;
    }
    const Tensor<double> images = random_tensor<double>({2, 2, 4, 4}, rng);
    for (bool training : {false, true}) {
      plain.set_training(training);
      lora.set_training(training);
      VitD::Cache a, b;
      const auto x = plain.forward(images, a), y = lora.forward(images, b);
      EXPECT_EQ(x.hidden, y.hidden) << training;
      EXPECT_EQ(x.cls, y.cls) << training;
    }
  }
}

TEST(ClipVit, EachImageIsRoutedFromItsOwnClsToken) {
  Rng rng(7);
  VitD model(tiny_config(), adapters(), rng);
  randomize(model, rng);
  model.set_training(false);
  const Tensor<double> pair = random_tensor<double>({2, 2, 4, 4}, rng);
  const Tensor<double> first = xt::view(pair, xt::range(0, 1), xt::all(), xt::all(), xt::all());
  VitD::Cache a, b;
  const auto both = model.forward(pair, a), alone = model.forward(first, b);
  EXPECT_LT(max_abs_diff(xt::view(both.hidden, xt::range(0, 1), xt::all(), xt::all()), alone.hidden), 1e-12);
  EXPECT_LT(max_abs_diff(xt::view(both.cls, xt::range(0, 1), xt::all(), xt::all()), alone.cls), 1e-12);
}

// ---- gradient checks ------------------------------------------------------------------------------------------

TEST(ClipVit, GradientCheckAdaptersFromClsTokens) {
  Rng rng(8);
  VitD model(tiny_config(), adapters(), rng);
  randomize(model, rng);
  gradient_check(model, /*use_hidden=*/false, /*use_cls=*/true);
}

TEST(ClipVit, GradientCheckAdaptersFromHiddenAndNormedCls) {
  Rng rng(9);
  VitD model(tiny_config(true), adapters(), rng);
  randomize(model, rng);
  gradient_check(model, true, true);
}

TEST(ClipVit, GradientCheckFullFineTuning) {
  Rng rng(10);
  VitD model(tiny_config(true), {}, rng);
  randomize(model, rng);
  gradient_check(model, true, true);
  gradient_check(model, false, true, 4);
}

TEST(ClipVit, GradientCheckLoRAOnAttention) {
  Rng rng(11);
  VitD::Peft peft;
  peft.lora_targets = {.q = true, .v = true};
  peft.lora = {.rank = 2, .alpha = 4, .dropout = 0.1};
  VitD model(tiny_config(), peft, rng);
  randomize(model, rng);
  gradient_check(model, true, false);
}

TEST(ClipVit, GradientCheckLoRAOnMlp) {
  Rng rng(17);
  VitD model(tiny_config(true), lora_on(mlp_targets), rng);
  randomize(model, rng);
  gradient_check(model, true, true);      // LoRA factors on fc1, fc2 of every block, and the images
  gradient_check(model, false, true, 5);  // from the [cls] tokens only
}

TEST(ClipVit, GradientCheckLoRAOnOneMlpLayerWithAdaptersAndAttentionLoRA) {
  for (const VitLoRATargets& targets : {VitLoRATargets{.fc2 = true}, VitLoRATargets{.fc1 = true},
                                        VitLoRATargets{.q = true, .v = true, .fc1 = true, .fc2 = true}}) {
    Rng rng(18);
    VitD::Peft peft = adapters();
    peft.lora_targets = targets;
    peft.lora = {.rank = 3, .alpha = 6, .dropout = 0.0, .use_rslora = true};
    VitD model(tiny_config(), peft, rng);
    randomize(model, rng);
    gradient_check(model, true, false);
  }
}

// Frozen base: d_cls alone reaches every block's MLP LoRA factors, no base weight gets a gradient.
TEST(ClipVit, MlpLoRAFrozenBaseGetsNoGradients) {
  Rng rng(19);
  VitD model(tiny_config(), lora_on(mlp_targets), rng);
  randomize(model, rng);
  model.set_training(false);
  VitD::Cache cache;
  const auto out = model.forward(random_tensor<double>({3, 2, 4, 4}, rng), cache);
  auto params = parameters_of<double>(model);
  zero_grads(params);
  EXPECT_EQ(model.backward(cache, {}, random_tensor<double>(shape_of(out.cls), rng)).size(), 0u);
  ParameterList<double> base;
  model.collect_base_parameters(base);
  for (const auto& ref : base) EXPECT_EQ(ref.param->grad.size(), 0u) << ref.name;
  for (std::size_t i = 0; i < 4; ++i)
    for (auto* fc : {&model.fc1(i), &model.fc2(i)}) {
      EXPECT_GT(xt::amax(xt::abs(fc->lora().lora_A().grad))(), 0.0) << i;
      EXPECT_GT(xt::amax(xt::abs(fc->lora().lora_B().grad))(), 0.0) << i;
    }
}

// ---- errors -----------------------------------------------------------------------------------------------------

TEST(ClipVit, BadConfigsThrowConfigError) {
  Rng rng(12);
  auto make = [&](VitD::Config c, VitD::Peft p = {}) { VitD m(c, p, rng); };
  EXPECT_NO_THROW(make(tiny_config()));
  auto c = tiny_config();
  c.patch = 3;  // does not divide 4
  EXPECT_THROW(make(c), ConfigError);
  c = tiny_config();
  c.n_heads = 3;
  EXPECT_THROW(make(c), ConfigError);
  c = tiny_config();
  c.take_every = 3;  // does not divide 4 layers
  EXPECT_THROW(make(c), ConfigError);
  c = tiny_config();
  c.layer_norm_eps = 0;
  EXPECT_THROW(make(c), ConfigError);
  c = tiny_config();
  c.mlp_dim = 0;
  EXPECT_THROW(make(c), ConfigError);
  VitD::Peft p = adapters();
  p.mm_adapter->temperature = 0;
  EXPECT_THROW(make(tiny_config(), p), ConfigError);
}

TEST(ClipVit, WrongShapesThrowShapeError) {
  Rng rng(13);
  VitD model(tiny_config(), adapters(), rng);
  VitD::Cache cache;
  EXPECT_THROW(model.forward(zeros<double>({1, 3, 4, 4}), cache), ShapeError);  // channels
  EXPECT_THROW(model.forward(zeros<double>({1, 2, 6, 6}), cache), ShapeError);  // image size
  EXPECT_THROW(model.backward(cache, {}, zeros<double>({1, 2, 8})), ShapeError);  // before forward
  model.forward(zeros<double>({1, 2, 4, 4}), cache);
  EXPECT_THROW(model.backward(cache, {}, zeros<double>({1, 3, 8})), ShapeError);
  EXPECT_THROW(model.backward(cache, zeros<double>({1, 4, 8}), {}), ShapeError);
}
