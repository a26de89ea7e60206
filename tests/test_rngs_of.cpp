// rngs_of(model): every random stream of a model by name, and a bit-identical resume through the Trainer with
// LoRA dropout, expert dropout and router logit noise all on (LLaVA-MoLE).
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <functional>
#include <set>
#include <string>
#include <vector>

#include "mixpeft/layers/adapter.hpp"
#include "mixpeft/models/llava_mole.hpp"
#include "mixpeft/testing/gradcheck.hpp"
#include "mixpeft/train/lr_schedule.hpp"
#include "mixpeft/train/trainer.hpp"

using namespace mixpeft;
using namespace mixpeft::testing;

namespace {
using MoleD = LlavaMole<double>;

// Two LLaMA blocks with LoRA on q and v and three noisy-routed LoRA experts per FFN; every stream is on.
MoleD make_model() {
  MoleD::Config c;
  c.llm = {.vocab = 13, .dim = 8, .n_layers = 2, .n_heads = 2, .ffn_dim = 12, .max_seq = 32};
  c.vit = {.image_size = 4, .patch = 2, .channels = 2, .dim = 6, .n_layers = 3, .n_heads = 2, .mlp_dim = 10};
  c.lora_targets = {.q = true, .v = true};
  c.lora = {.rank = 2, .alpha = 4.0, .dropout = 0.3};
  c.experts = {.experts = 3, .rank = 2, .alpha = 4.0, .dropout = 0.3, .router_noise = RouterNoise::LogitNoise,
               .router_noise_level = 0.5};
  Rng rng(50);
  return MoleD(c, rng);
}

std::vector<MoleD::Sample> samples() {
  Rng rng(51);
  const auto id = [&] { return std::int64_t(2 + rng.below(11)); };
  std::vector<MoleD::Sample> out;
  for (int i = 0; i < 3; ++i) {
    MoleD::Sample s{.prefix = {id()}, .prompt = {id(), id()}, .answer = {id(), id()}, .image = {}};
    if (i == 0) s.image = random_tensor<double>({2, 4, 4}, rng);
    out.push_back(std::move(s));
  }
  return out;
}
}  // namespace

TEST(RngsOf, NamesEveryStreamOnce) {
  MoleD model = make_model();
  std::set<std::string> names;
  std::set<const Rng*> streams;
  for (const auto& [name, rng] : rngs_of(model)) {
    names.insert(name);
    streams.insert(rng);
  }
  // Per block: q and v LoRA dropout, the experts' dropout and the router's noise. The ViT has no random layers.
  EXPECT_EQ(names.size(), 8u);
  EXPECT_EQ(streams.size(), 8u);
  for (const char* name : {"language_model.model.layers.0.self_attn.q_proj.dropout_rng",
                           "language_model.model.layers.1.self_attn.v_proj.dropout_rng",
                           "language_model.model.layers.0.mlp.dropout_rng",
                           "language_model.model.layers.1.mlp.router.noise_rng"})
    EXPECT_EQ(names.count(name), 1u) << name;
  EXPECT_EQ(rngs_of(model, "m").front().first.rfind("m.language_model.", 0), 0u);
}

TEST(RngsOf, NamesAStandaloneAdaptersDropoutStream) {
  Rng rng(3);
  Adapter<double> adapter({.dim = 4, .hidden = 4, .groups = 2}, rng);
  const NamedRngs rngs = rngs_of(adapter, "adapter");
  ASSERT_EQ(rngs.size(), 1u);
  EXPECT_EQ(rngs[0].first, "adapter.dropout_rng");
}

TEST(RngsOf, ResumeWithDropoutAndRouterNoiseIsBitIdentical) {
  const auto data = samples();
  const auto next = [&](MoleD& model) {
    return std::function<std::vector<MoleD::Batch>(std::int64_t)>([&data, &model](std::int64_t step) {
      return std::vector<MoleD::Batch>{model.make_batch({data[std::size_t(step) % 3]})};
    });
  };
  const TrainerConfig config{.adamw = {.lr = 0.0, .weight_decay = 0.01}, .schedule = WarmupCosineLr(2e-2, 1, 4),
                             .clip_norm = 1.0};
  MoleD straight = make_model();
  Trainer<double> t_straight(parameters_of<double>(straight), config);
  t_straight.run<MoleD::Batch>(straight, 4, next(straight));

  const std::string path = (std::filesystem::temp_directory_path() / "mixpeft_test_rngs_of.safetensors").string();
  {
    MoleD first = make_model();
    Trainer<double> t_first(parameters_of<double>(first), config);
    t_first.run<MoleD::Batch>(first, 2, next(first));
    t_first.save(path, rngs_of(first));
  }
  MoleD resumed = make_model();
  Trainer<double> t_resumed(parameters_of<double>(resumed), config);
  t_resumed.resume(path, rngs_of(resumed));
  t_resumed.run<MoleD::Batch>(resumed, 4, next(resumed));

  // Control: the same resume without the Rngs draws other masks and noise.
  MoleD no_rngs = make_model();
  Trainer<double> t_no_rngs(parameters_of<double>(no_rngs), config);
  t_no_rngs.resume(path);
  t_no_rngs.run<MoleD::Batch>(no_rngs, 4, next(no_rngs));
  std::remove(path.c_str());

  const auto a = parameters_of<double>(resumed), b = parameters_of<double>(straight), c = parameters_of<double>(no_rngs);
  double control_diff = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (!a[i].param->trainable) continue;
    const Tensor<double>&x = a[i].param->value, &y = b[i].param->value;
    std::size_t differing = 0;
    for (std::size_t j = 0; j < x.size(); ++j) differing += x.data()[j] == y.data()[j] ? 0 : 1;
    EXPECT_EQ(differing, 0u) << a[i].name << ": max |diff| " << max_abs_diff(x, y);
    control_diff = std::max(control_diff, max_abs_diff(c[i].param->value, y));
  }
  EXPECT_GT(control_diff, 1e-6);
}
