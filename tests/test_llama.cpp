#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <string>

#include <xtensor/xsort.hpp>
#include <xtensor/xview.hpp>

#include "mixpeft/layers/balance_loss.hpp"
#include "mixpeft/models/hf_weights.hpp"
#include "mixpeft/models/llama.hpp"
#include "mixpeft/testing/gradcheck.hpp"

using namespace mixpeft;
using namespace mixpeft::testing;

namespace {
using LlamaD = Llama<double>;
using Ids = Tensor<std::int64_t>;

const std::filesystem::path golden_path = std::filesystem::path(MIXPEFT_TEST_DATA_DIR) / "llama_golden.safetensors";

LlamaD::Config tiny_config() {
  return {.vocab = 11, .dim = 8, .n_layers = 2, .n_heads = 2, .ffn_dim = 12, .norm_eps = 1e-6, .rope_theta = 100.0,
          .max_seq = 16};
}

Ids random_ids(std::size_t b, std::size_t t, std::size_t vocab, Rng& rng) {
  Ids ids = empty<std::int64_t>({b, t});
  for (auto& v : ids) v = std::int64_t(rng.below(vocab));
  return ids;
}

// Every parameter gets random values (LoRA B, adapter up-projections and norms included), so each path carries signal.
template <class Model>
void randomize(Model& model, Rng& rng, double scale = 0.4) {
  for (auto& ref : parameters_of<double>(model)) ref.param->value = random_tensor<double>(shape_of(ref.param->value), rng, scale);
}

std::string temp_file(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("mixpeft_test_llama_" + name)).string();
}

// A parameter the loss does not reach (an expert that got no tokens, a key bias under softmax) has a zero analytic
// gradient while its finite differences carry rounding noise: such a gradient is checked against an absolute bound.
void expect_gradient(const std::function<double()>& loss, Tensor<double>& x, const Tensor<double>& analytic,
                     const std::string& name) {
  const Tensor<double> numeric = numerical_gradient(loss, x);
  if (xt::amax(xt::abs(analytic))() < 1e-10) EXPECT_LT(xt::amax(xt::abs(numeric))(), 1e-8) << name;
  else EXPECT_LT(relative_error(analytic, numeric), 1e-6) << name;
}

// Gradient check of forward_embeddings + logits w.r.t. the input embeddings and every trainable parameter, with an
// optional extra loss on the routers' probabilities (a stand-in for a balance loss: <p_l, Rp_l> per layer).
void gradient_check(LlamaD model, const AttentionMask& mask, bool router_loss = false, std::uint64_t seed = 5) {
  model.set_training(false);
  Rng rng(seed);
  Tensor<double> x = random_tensor<double>({2, 5, model.config().dim}, rng);
  const Tensor<double> R = random_tensor<double>({2, 5, model.config().vocab}, rng);
  std::vector<Tensor<double>> Rp;
  auto loss = [&] {
    LlamaD::Cache c;
    double l = dot(model.logits(model.forward_embeddings(x, mask, c), c), R);
    if (router_loss) {
      const auto routing = model.routing(c);
      for (std::size_t i = 0; i < routing.size(); ++i) l += dot(routing[i]->probs, Rp[i]);
    }
    return l;
  };
  LlamaD::Cache cache;
  const Tensor<double> logits = model.logits(model.forward_embeddings(x, mask, cache), cache);
  std::vector<RouterGrad<double>> balance;
  if (router_loss) {
    for (const auto* r : model.routing(cache)) {
      ASSERT_NE(r, nullptr);
      Rp.push_back(random_tensor<double>(shape_of(r->probs), rng));
      balance.push_back({.dprobs = Rp.back(), .dlogits = {}});
    }
  }
  auto params = parameters_of<double>(model);
  zero_grads(params);
  const Tensor<double> dx = model.backward_embeddings(cache, model.logits_backward(cache, R), balance);
  EXPECT_LT(gradient_error(loss, x, dx), 1e-6) << "input embeddings";
  std::size_t checked = 0;
  for (auto& ref : params) {
    if (!ref.param->trainable) continue;
    const Tensor<double> g = ref.param->grad;
    expect_gradient(loss, ref.param->value, g, ref.name);
    ++checked;
  }
  EXPECT_GT(checked, 0u);
}

bool contains(const std::vector<std::string>& names, const std::string& name) {
  return std::find(names.begin(), names.end(), name) != names.end();
}
}  // namespace

// ---- golden (numpy reference, tools/make_golden.py) -----------------------------------------------------------

template <class T>
void golden_test(double tolerance) {
  SafetensorsFile file(golden_path);
  const auto cfg = file.read<std::int64_t>("golden.config");
  Rng rng(1);
  Llama<T> model({.vocab = std::size_t(cfg(0)), .dim = std::size_t(cfg(1)), .n_layers = std::size_t(cfg(2)),
                  .n_heads = std::size_t(cfg(3)), .ffn_dim = std::size_t(cfg(4)), .norm_eps = 1e-6,
                  .rope_theta = 10000.0, .max_seq = 64},
                 {}, rng);
  const LoadReport report = load_hf_weights(model, golden_path);
  EXPECT_EQ(report.loaded.size(), 3u + 9u * std::size_t(cfg(2)));
  EXPECT_EQ(report.unexpected, (std::vector<std::string>{"golden.config", "golden.hidden", "golden.ids",
                                                         "golden.logits"}));
  const Ids ids = file.read<std::int64_t>("golden.ids");
  typename Llama<T>::Cache cache;
  const Tensor<T> hidden = model.forward_embeddings(model.embed(ids), AttentionMask{}, cache);
  const Tensor<T> logits = model.logits(hidden, cache);
  const Tensor<double> want_hidden = file.read<double>("golden.hidden"), want_logits = file.read<double>("golden.logits");
  EXPECT_LT(max_abs_diff(xt::cast<double>(hidden), want_hidden), tolerance);
  EXPECT_LT(max_abs_diff(xt::cast<double>(logits), want_logits), tolerance);
  EXPECT_LT(max_abs_diff(xt::cast<double>(model.forward_ids(ids, AttentionMask{}, cache)), want_logits), tolerance);
}

TEST(Llama, GoldenDouble) { golden_test<double>(1e-10); }
TEST(Llama, GoldenFloat) { golden_test<float>(2e-4); }

TEST(Llama, HalfPrecisionCheckpointsLoad) {
  Rng rng(2);
  LlamaD source(tiny_config(), {}, rng);
  randomize(source, rng);
  for (DType dtype : {DType::F16, DType::BF16}) {
    const std::string path = temp_file("half.safetensors");
    save_hf_weights(source, path, dtype);
    LlamaD loaded(tiny_config(), {}, rng);
    load_hf_weights(loaded, path);
    const auto a = parameters_of<double>(source), b = parameters_of<double>(loaded);
    const double tol = dtype == DType::F16 ? 2e-3 : 1.6e-2;  // relative rounding of the format
    for (std::size_t i = 0; i < a.size(); ++i)
      EXPECT_LT(max_abs_diff(a[i].param->value, b[i].param->value), tol * (1 + xt::amax(xt::abs(a[i].param->value))()))
          << a[i].name;
    std::remove(path.c_str());
  }
}

TEST(Llama, LoadErrorsNameTheTensorAndBothShapes) {
  Rng rng(3);
  LlamaD wrong_ffn({.vocab = 37, .dim = 32, .n_layers = 2, .n_heads = 4, .ffn_dim = 40}, {}, rng);
  try {
    load_hf_weights(wrong_ffn, golden_path);
    FAIL() << "expected ShapeError";
  } catch (const ShapeError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("model.layers.0.mlp.gate_proj.weight"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[48, 32]"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[40, 32]"), std::string::npos) << msg;
  }
  LlamaD three_layers({.vocab = 37, .dim = 32, .n_layers = 3, .n_heads = 4, .ffn_dim = 48}, {}, rng);
  try {
    load_hf_weights(three_layers, golden_path);
    FAIL() << "expected FormatError";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("model.layers.2.self_attn.q_proj.weight"), std::string::npos) << e.what();
  }
  LlamaD ok({.vocab = 37, .dim = 32, .n_layers = 2, .n_heads = 4, .ffn_dim = 48}, {}, rng);
  EXPECT_THROW(load_hf_weights(ok, golden_path, {.prefix = "", .allow_unexpected = false}), FormatError);
  EXPECT_THROW(load_hf_weights(ok, std::vector<std::filesystem::path>{golden_path, golden_path}), FormatError);
}

// ---- parameters and freezing ----------------------------------------------------------------------------------

TEST(Llama, HuggingFaceParameterNames) {
  Rng rng(4);
  LlamaD model(tiny_config(), rng);
  std::vector<std::string> names;
  for (const auto& ref : parameters_of<double>(model)) names.push_back(ref.name);
  std::vector<std::string> want{"model.embed_tokens.weight"};
  for (int i = 0; i < 2; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    for (const char* n : {"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                          "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                          "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"})
      want.push_back(p + n);
  }
  want.push_back("model.norm.weight");
  want.push_back("lm_head.weight");
  EXPECT_EQ(names, want);
  for (const auto& ref : parameters_of<double>(model)) EXPECT_TRUE(ref.param->trainable) << ref.name;  // plain: full FT
}

TEST(Llama, ZeroExpertsIsThePlainFeedForward) {
  Rng rng(18);
  LlamaD::Peft peft;
  peft.ffn = LoRAExperts<double>::Config{.experts = 0};
  LlamaD model(tiny_config(), peft, rng);
  EXPECT_FALSE(model.mlp(0).has_experts());
  EXPECT_EQ(parameters_of<double>(model).size(), 3u + 9u * 2u);
  EXPECT_TRUE(model.embed_tokens().trainable);  // no PEFT module: the base trains unless frozen explicitly
  peft.freeze_base = true;
  LlamaD frozen(tiny_config(), peft, rng);
  EXPECT_EQ(count_parameters(parameters_of<double>(frozen), true), 0u);
}

TEST(Llama, PeftModulesAreNamedAndTheBaseIsFrozen) {
  Rng rng(5);
  LlamaD::Peft peft;
  peft.lora_targets = {.q = true, .v = true};
  peft.lora = {.rank = 2, .alpha = 4, .dropout = 0};
  peft.ffn = LoRAExperts<double>::Config{.experts = 3, .rank = 2, .alpha = 4, .dropout = 0};
  peft.mm_adapter = MMAdapter<double>::Config{.hidden = 4, .groups = 2};
  peft.mm_adapter_ffn = true;
  LlamaD model(tiny_config(), peft, rng);
  std::vector<std::string> names;
  for (const auto& ref : parameters_of<double>(model)) names.push_back(ref.name);
  for (const char* n : {"model.layers.1.self_attn.q_proj.lora_A.weight", "model.layers.1.self_attn.v_proj.lora_B.weight",
                        "model.layers.0.mlp.gate_proj.lora_A.weight", "model.layers.0.mlp.router.weight",
                        "model.layers.0.adapter_attn.conv_A.weight", "model.layers.0.adapter_attn.expert_weights.weight",
                        "model.layers.1.adapter_mlp.conv_D.bias"})
    EXPECT_TRUE(contains(names, n)) << n;
  EXPECT_FALSE(contains(names, "model.layers.0.self_attn.k_proj.lora_A.weight"));

  ParameterList<double> base;
  model.collect_base_parameters(base);
  EXPECT_EQ(base.size(), 3u + 9u * 2u);
  for (const auto& ref : base) {
    EXPECT_FALSE(ref.param->trainable) << ref.name;
    EXPECT_EQ(ref.param->grad.size(), 0u) << ref.name;
  }
  // A training step leaves the frozen base without gradients and fills the PEFT modules'.
  randomize(model, rng);
  Ids ids = random_ids(2, 6, 11, rng);
  LlamaD::Cache cache;
  const Tensor<double> logits = model.forward_ids(ids, {.causal = true, .block_first_key = true}, cache);
  model.backward_ids(cache, random_tensor<double>(shape_of(logits), rng));
  for (const auto& ref : base) EXPECT_EQ(ref.param->grad.size(), 0u) << ref.name;
  for (const auto& ref : parameters_of<double>(model)) {  // experts may get no tokens; a top-1 router no task gradient
    if (ref.param->trainable && ref.name.find(".mlp.") == std::string::npos) {
      EXPECT_GT(xt::amax(xt::abs(ref.param->grad))(), 0.0) << ref.name;
    }
  }
  EXPECT_EQ(count_parameters(parameters_of<double>(model), true) + count_parameters(base, false),
            count_parameters(parameters_of<double>(model), false));
}

TEST(Llama, FreshPeftModulesLeaveTheBaseOutputUnchanged) {
  Rng rng(6);
  LlamaD plain(tiny_config(), {}, rng);
  randomize(plain, rng);
  LlamaD::Peft peft;
  peft.lora_targets = {.q = true, .k = true, .v = true, .o = true};
  peft.ffn = LoRAExperts<double>::Config{.experts = 2, .rank = 2};
  peft.mm_adapter = MMAdapter<double>::Config{.hidden = 4};
  peft.mm_adapter_ffn = true;
  LlamaD adapted(tiny_config(), peft, rng);
  ParameterList<double> from, to;
  plain.collect_base_parameters(from);
  adapted.collect_base_parameters(to);
  ASSERT_EQ(from.size(), to.size());
  for (std::size_t i = 0; i < from.size(); ++i) to[i].param->value = from[i].param->value;
  const Ids ids = random_ids(2, 7, 11, rng);
  LlamaD::Cache a, b;
  EXPECT_LT(max_abs_diff(plain.forward_ids(ids, {}, a), adapted.forward_ids(ids, {}, b)), 1e-12);
}

// ---- gradient checks ------------------------------------------------------------------------------------------

TEST(Llama, GradientCheckFullFineTuning) {
  Rng rng(7);
  LlamaD model(tiny_config(), {}, rng);
  randomize(model, rng);
  gradient_check(model, {});
  // The token table through backward_ids.
  Ids ids = random_ids(2, 4, 11, rng);
  const Tensor<double> R = random_tensor<double>({2, 4, 11}, rng);
  LlamaD::Cache cache;
  model.forward_ids(ids, {}, cache);
  zero_grads(parameters_of<double>(model));
  model.backward_ids(cache, R);
  const Tensor<double> g = model.embed_tokens().grad;
  auto loss = [&] {
    LlamaD::Cache c;
    return dot(model.forward_ids(ids, {}, c), R);
  };
  EXPECT_LT(gradient_error(loss, model.embed_tokens().value, g), 1e-6);
}

TEST(Llama, GradientCheckLoRAOnQueryAndValue) {
  Rng rng(8);
  LlamaD::Peft peft;
  peft.lora_targets = {.q = true, .v = true};
  peft.lora = {.rank = 2, .alpha = 3, .dropout = 0.1, .use_rslora = true};
  LlamaD model(tiny_config(), peft, rng);
  randomize(model, rng);
  gradient_check(model, {.causal = true, .block_first_key = false, .key_lengths = {5, 3}});
}

TEST(Llama, GradientCheckMoLE) {
  Rng rng(9);
  LlamaD::Peft peft;
  peft.ffn = LoRAExperts<double>::Config{.experts = 3, .rank = 2, .alpha = 4};
  LlamaD model(tiny_config(), peft, rng);
  randomize(model, rng, 0.8);
  gradient_check(model, {}, /*router_loss=*/true);
  peft.ffn->gate_scaling = true;  // the router also learns from the task loss
  LlamaD scaled(tiny_config(), peft, rng);
  randomize(scaled, rng, 0.8);
  gradient_check(scaled, {}, true, 11);
}

TEST(Llama, GradientCheckLoRAFeedForward) {
  Rng rng(10);
  LlamaD::Peft peft;
  peft.ffn = LoRAExperts<double>::Config{.experts = 1, .rank = 3, .alpha = 6};
  LlamaD model(tiny_config(), peft, rng);
  randomize(model, rng);
  gradient_check(model, {});
  for (const auto* r : model.routing(LlamaD::Cache{})) EXPECT_EQ(r, nullptr);
}

TEST(Llama, GradientCheckMMAdapters) {
  Rng rng(11);
  LlamaD::Peft peft;
  peft.mm_adapter = MMAdapter<double>::Config{.hidden = 4, .groups = 2, .scale = 0.8, .temperature = 2.0};
  peft.mm_adapter_ffn = true;
  LlamaD model(tiny_config(), peft, rng);
  randomize(model, rng);
  gradient_check(model, {.causal = true, .block_first_key = true});
}

TEST(Llama, BalanceLossGradientReachesEveryRouter) {
  Rng rng(17);
  LlamaD::Peft peft;
  peft.ffn = LoRAExperts<double>::Config{.experts = 3, .rank = 2, .alpha = 4};
  LlamaD model(tiny_config(), peft, rng);
  randomize(model, rng, 0.8);
  model.set_training(false);
  const BalanceLoss<double> balance({.kind = BalanceKind::Switch, .weight = 0.5});
  const Ids ids = random_ids(2, 6, 11, rng);
  const Tensor<double> R = random_tensor<double>({2, 6, 11}, rng);
  BalanceTokens<double> tokens;
  auto loss = [&] {
    LlamaD::Cache c;
    const double task = dot(model.forward_ids(ids, {}, c), R);
    return task + balance.forward(model.routing(c), tokens);
  };
  LlamaD::Cache cache;
  model.forward_ids(ids, {}, cache);
  auto params = parameters_of<double>(model);
  zero_grads(params);
  std::vector<RouterGrad<double>> grads(model.num_layers());
  std::vector<RouterGrad<double>*> grad_ptrs;
  for (auto& g : grads) grad_ptrs.push_back(&g);
  balance.backward(model.routing(cache), tokens, grad_ptrs);
  model.backward_ids(cache, R, grads);
  for (auto& ref : params) {
    if (ref.name.find("router") == std::string::npos) continue;
    EXPECT_GT(xt::amax(xt::abs(ref.param->grad))(), 0.0) << ref.name;
    const Tensor<double> g = ref.param->grad;
    expect_gradient(loss, ref.param->value, g, ref.name);
  }
}

TEST(Llama, RoutingIsExposedPerLayer) {
  Rng rng(12);
  LlamaD::Peft peft;
  peft.ffn = LoRAExperts<double>::Config{.experts = 4, .rank = 2};
  LlamaD model(tiny_config(), peft, rng);
  LlamaD::Cache cache;
  model.forward_ids(random_ids(3, 5, 11, rng), {}, cache);
  const auto routing = model.routing(cache);
  ASSERT_EQ(routing.size(), 2u);
  for (const auto* r : routing) {
    ASSERT_NE(r, nullptr);
    EXPECT_EQ(shape_of(r->probs), (Shape{15, 4}));
    EXPECT_EQ(xt::sum(r->counts)(), 15);
  }
  EXPECT_THROW(model.backward_embeddings(cache, zeros<double>({3, 5, 8}), std::vector<RouterGrad<double>>(1)),
               ConfigError);
}

// ---- generation -----------------------------------------------------------------------------------------------

void expect_kv_cache_matches_recomputation(LlamaD& model, const AttentionMask& mask, std::uint64_t seed) {
  model.set_training(false);
  Rng rng(seed);
  const Ids ids = random_ids(2, 9, 11, rng);
  LlamaD::Cache cache;
  const Tensor<double> full = model.forward_ids(ids, mask, cache);
  LlamaD::KVCache kv;
  const Ids prompt = xt::view(ids, xt::all(), xt::range(0, 4));
  const Tensor<double> first = model.prefill(model.embed(prompt), mask, kv);
  EXPECT_LT(max_abs_diff(first, xt::view(full, xt::all(), xt::range(0, 4), xt::all())), 1e-12);
  // Two tokens at once, then one at a time.
  Tensor<double> step = model.decode(xt::view(ids, xt::all(), xt::range(4, 6)), kv);
  EXPECT_LT(max_abs_diff(step, xt::view(full, xt::all(), xt::range(4, 6), xt::all())), 1e-12);
  for (std::size_t t = 6; t < 9; ++t) {
    step = model.decode(xt::view(ids, xt::all(), xt::range(t, t + 1)), kv);
    EXPECT_LT(max_abs_diff(step, xt::view(full, xt::all(), xt::range(t, t + 1), xt::all())), 1e-12) << t;
  }
  EXPECT_EQ(kv.length(), 9u);
}

TEST(Llama, KVCacheLogitsEqualRecomputation) {
  Rng rng(13);
  LlamaD plain(tiny_config(), {}, rng);
  randomize(plain, rng);
  expect_kv_cache_matches_recomputation(plain, {}, 1);
  LlamaD::Peft peft;
  peft.lora_targets = {.q = true, .v = true};
  peft.ffn = LoRAExperts<double>::Config{.experts = 3, .rank = 2};
  peft.mm_adapter = MMAdapter<double>::Config{.hidden = 4};
  peft.mm_adapter_ffn = true;
  LlamaD adapted(tiny_config(), peft, rng);
  randomize(adapted, rng);
  expect_kv_cache_matches_recomputation(adapted, {.causal = true, .block_first_key = true}, 2);
}

TEST(Llama, GreedyGenerationEqualsFullRecomputation) {
  Rng rng(14);
  LlamaD model(tiny_config(), {}, rng);
  randomize(model, rng, 0.8);
  const std::vector<std::int64_t> prompt{3, 1, 4};
  const auto generated = model.generate(prompt, 6);
  ASSERT_EQ(generated.size(), 6u);
  EXPECT_TRUE(model.training());  // restored after generation
  model.set_training(false);
  std::vector<std::int64_t> seq = prompt;
  for (std::size_t i = 0; i < generated.size(); ++i) {
    Ids ids = empty<std::int64_t>({1, seq.size()});
    std::copy(seq.begin(), seq.end(), ids.begin());
    LlamaD::Cache cache;
    const Tensor<double> logits = model.forward_ids(ids, {}, cache);
    const std::int64_t next = std::int64_t(xt::argmax(xt::view(logits, 0, seq.size() - 1, xt::all()))());
    EXPECT_EQ(generated[i], next) << i;
    seq.push_back(next);
  }
  // Stops after eos (included) and at max_seq.
  const std::int64_t eos = generated[2];
  const auto first_eos = std::find(generated.begin(), generated.end(), eos);
  EXPECT_EQ(model.generate(prompt, 6, eos), std::vector<std::int64_t>(generated.begin(), first_eos + 1));
  EXPECT_LE(model.generate(prompt, 100).size(), 16u - prompt.size() + 1);
  // A prompt longer than max_seq fails inside generation; the training mode still comes back.
  model.set_training(true);
  EXPECT_THROW(model.generate(std::vector<std::int64_t>(20, 1), 2), Error);
  EXPECT_TRUE(model.training());
}

// ---- errors -----------------------------------------------------------------------------------------------------

TEST(Llama, BadConfigsThrowConfigError) {
  Rng rng(15);
  auto make = [&](LlamaD::Config c, LlamaD::Peft p = {}) { LlamaD m(c, p, rng); };
  auto c = tiny_config();
  EXPECT_NO_THROW(make(c));
  EXPECT_THROW(make({.vocab = 0, .dim = 8, .n_layers = 1, .n_heads = 2, .ffn_dim = 8}), ConfigError);
  EXPECT_THROW(make({.vocab = 5, .dim = 8, .n_layers = 1, .n_heads = 3, .ffn_dim = 8}), ConfigError);
  EXPECT_THROW(make({.vocab = 5, .dim = 6, .n_layers = 1, .n_heads = 2, .ffn_dim = 8}), ConfigError);  // odd head
  EXPECT_THROW(make({.vocab = 5, .dim = 8, .n_layers = 1, .n_heads = 2, .ffn_dim = 8, .norm_eps = 0}), ConfigError);
  EXPECT_THROW(make({.vocab = 5, .dim = 8, .n_layers = 1, .n_heads = 2, .ffn_dim = 8, .rope_theta = -1}), ConfigError);
  EXPECT_THROW(make({.vocab = 5, .dim = 8, .n_layers = 1, .n_heads = 2, .ffn_dim = 8, .max_seq = 0}), ConfigError);
  LlamaD::Peft p;
  p.mm_adapter_ffn = true;
  EXPECT_THROW(make(c, p), ConfigError);
  p = {};
  p.lora_targets.k = true;
  p.lora.rank = 0;
  EXPECT_THROW(make(c, p), ConfigError);
  p = {};
  p.ffn = LoRAExperts<double>::Config{.experts = 1, .rank = 0};
  EXPECT_THROW(make(c, p), ConfigError);
  p = {};
  p.mm_adapter = MMAdapter<double>::Config{.hidden = 3, .groups = 2};
  EXPECT_THROW(make(c, p), ConfigError);
}

TEST(Llama, WrongShapesThrowShapeError) {
  Rng rng(16);
  LlamaD model(tiny_config(), {}, rng);
  LlamaD::Cache cache;
  EXPECT_THROW(model.forward_embeddings(zeros<double>({2, 3, 7}), {}, cache), ShapeError);
  EXPECT_THROW(model.forward_embeddings(zeros<double>({2, 17, 8}), {}, cache), ShapeError);  // beyond max_seq
  EXPECT_THROW(model.embed(Ids{1, 2, 3}), ShapeError);
  EXPECT_THROW(model.backward_embeddings(cache, zeros<double>({2, 3, 8})), ShapeError);  // before forward
  model.forward_embeddings(zeros<double>({2, 3, 8}), {}, cache);
  EXPECT_THROW(model.backward_embeddings(cache, zeros<double>({2, 4, 8})), ShapeError);
  EXPECT_THROW(model.logits(zeros<double>({2, 3, 9}), cache), ShapeError);
  EXPECT_THROW(model.forward_ids(Ids{{1, 11}}, {}, cache), IndexError);  // id out of range
  LlamaD::KVCache kv;
  EXPECT_THROW(model.decode(zeros<std::int64_t>({1, 1}), kv), ConfigError);  // empty cache
  EXPECT_THROW(model.prefill(zeros<double>({1, 3, 8}), {.causal = true, .block_first_key = false, .key_lengths = {2}}, kv),
               ConfigError);
}
