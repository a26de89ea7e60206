#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include <xtensor/xsort.hpp>

#include "mixpeft/models/lavin.hpp"
#include "mixpeft/testing/gradcheck.hpp"
#include "mixpeft/train/lr_schedule.hpp"
#include "mixpeft/train/trainer.hpp"

using namespace mixpeft;
using namespace mixpeft::testing;

namespace {
using LavinD = Lavin<double>;

// A tiny LaVIN; without dropout its steps are deterministic.
LavinD make_model(std::uint64_t seed = 40, double dropout = 0.0, bool adapter_before_ffn = false) {
  LavinD::Config c;
  c.llm = {.vocab = 13, .dim = 8, .n_layers = 2, .n_heads = 2, .ffn_dim = 12, .max_seq = 32};
  c.vit = {.image_size = 4, .patch = 2, .channels = 2, .dim = 8, .n_layers = 2, .n_heads = 2, .mlp_dim = 12,
           .take_every = 1};
  c.llm_adapter = MMAdapter<double>::Config{.hidden = 4, .groups = 2, .dropout = dropout, .temperature = 3.0};
  c.vit_adapter = MMAdapter<double>::Config{.hidden = 4, .groups = 2, .dropout = dropout, .temperature = 3.0};
  c.adapter_before_ffn = adapter_before_ffn;
  c.neck_hidden = 6;
  Rng rng(seed);
  return LavinD(c, rng);
}

// Four samples of equal length with two answer tokens each (two with images); micro-batch i holds sample i.
std::vector<LavinD::Sample> samples(std::uint64_t seed) {
  Rng rng(seed);
  std::vector<LavinD::Sample> out;
  for (int i = 0; i < 4; ++i) {
    LavinD::Sample s;
    const auto id = [&] { return std::int64_t(2 + rng.below(11)); };
    s.answer = {id(), id()};
    if (i % 2 == 0) {
      s.prompt = {id()};
      s.image = random_tensor<double>({2, 4, 4}, rng);
    } else {
      s.prefix = {id()};
      s.prompt = {id(), id()};
    }
    out.push_back(std::move(s));
  }
  return out;
}

double max_param_diff(LavinD& a, LavinD& b, bool grads) {
  const auto pa = parameters_of<double>(a), pb = parameters_of<double>(b);
  double m = 0;
  for (std::size_t i = 0; i < pa.size(); ++i)
    if (pa[i].param->trainable)
      m = std::max(m, max_abs_diff(grads ? pa[i].param->grad : pa[i].param->value,
                                   grads ? pb[i].param->grad : pb[i].param->value));
  return m;
}

// Every trainable parameter of a and b holds exactly the same values (bit-identical training).
void expect_params_identical(LavinD& a, LavinD& b) {
  const auto pa = parameters_of<double>(a), pb = parameters_of<double>(b);
  ASSERT_EQ(pa.size(), pb.size());
  for (std::size_t i = 0; i < pa.size(); ++i) {
    if (!pa[i].param->trainable) continue;
    const Tensor<double>&x = pa[i].param->value, &y = pb[i].param->value;
    ASSERT_EQ(x.size(), y.size()) << pa[i].name;
    std::size_t differing = 0;
    for (std::size_t j = 0; j < x.size(); ++j) differing += x.data()[j] == y.data()[j] ? 0 : 1;
    EXPECT_EQ(differing, 0u) << pa[i].name << ": max |diff| " << max_abs_diff(x, y);
  }
}

std::string temp_file(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("mixpeft_test_trainer_" + name)).string();
}

// Minimises ||w - target||^2 / 2 on one parameter; a batch is the target.
struct Quadratic {
  Parameter<double> w{"w", zeros<double>({3}), true};
  struct Report {
    double loss;
    std::size_t tokens;
  };
  Report loss_and_backward(const Tensor<double>& target) {
    const Tensor<double> diff = w.value - target;
    w.grad += diff;
    return {0.5 * dot(diff, diff), 1};
  }
  void collect_parameters(ParameterList<double>& list, const std::string& prefix) { add_parameter(list, prefix, w); }
};
}  // namespace

TEST(Trainer, AccumulatingMicroBatchesEqualsOneBigBatch) {
  LavinD big = make_model(), micro = make_model();
  const auto data = samples(41);
  TrainerConfig config{.adamw = {.lr = 1e-2, .weight_decay = 0.02}, .schedule = {}, .clip_norm = 0.2};
  Trainer<double> t_big(parameters_of<double>(big), config), t_micro(parameters_of<double>(micro), config);
  const std::vector<LavinD::Batch> whole{big.make_batch(data)};
  std::vector<LavinD::Batch> parts;
  for (const auto& s : data) parts.push_back(micro.make_batch({s}));
  for (int step = 0; step < 3; ++step) {
    const TrainStep a = t_big.step(big, std::span<const LavinD::Batch>(whole));
    const TrainStep b = t_micro.step(micro, std::span<const LavinD::Batch>(parts));
    EXPECT_EQ(b.micro_batches, 4u);
    EXPECT_EQ(a.tokens, b.tokens);
    EXPECT_NEAR(a.loss, b.loss, 1e-13 * std::abs(a.loss));
    EXPECT_NEAR(a.grad_norm, b.grad_norm, 1e-13 * a.grad_norm);
    EXPECT_GT(a.grad_norm, 0.2);  // clipping is active
    EXPECT_LT(max_param_diff(big, micro, /*grads=*/true), 1e-14) << "step " << step;
    EXPECT_LT(max_param_diff(big, micro, /*grads=*/false), 1e-13) << "step " << step;
  }
}

TEST(Trainer, ResumedTrainingContinuesIdentically) {
  // Dropout in every MM-Adapter and a random data order: the checkpoint must carry both kinds of stream.
  constexpr double dropout = 0.3;
  const auto data = samples(42);
  const auto next = [&](LavinD& model, Rng& order) {
    return std::function<std::vector<LavinD::Batch>(std::int64_t)>([&data, &model, &order](std::int64_t) {
      const std::size_t i = std::size_t(order.below(4));  // two micro-batches per step, drawn from `order`
      return std::vector<LavinD::Batch>{model.make_batch({data[i]}), model.make_batch({data[(i + 1) % 4]})};
    });
  };
  const auto streams = [](LavinD& model, Rng& order) {
    NamedRngs rngs = rngs_of(model);
    rngs.emplace_back("data_order", &order);
    return rngs;
  };
  const TrainerConfig config{.adamw = {.lr = 0.0, .beta2 = 0.95, .weight_decay = 0.02},
                             .schedule = WarmupCosineLr(1e-2, 2, 6),
                             .clip_norm = 1.0};
  LavinD straight = make_model(40, dropout, true);
  Rng order_straight(7);
  Trainer<double> t_straight(parameters_of<double>(straight), config);
  t_straight.run<LavinD::Batch>(straight, 6, next(straight, order_straight));

  const std::string path = temp_file("resume.safetensors");
  {
    LavinD first = make_model(40, dropout, true);
    Rng order(7);
    Trainer<double> t_first(parameters_of<double>(first), config);
    t_first.run<LavinD::Batch>(first, 3, next(first, order));
    t_first.save(path, streams(first, order), {{"epoch", 1}});
  }
  LavinD resumed = make_model(40, dropout, true);
  Rng order(1234);  // the checkpoint must overwrite this state
  Trainer<double> t_resumed(parameters_of<double>(resumed), config);
  EXPECT_EQ(t_resumed.resume(path, streams(resumed, order))["epoch"], 1);
  EXPECT_EQ(t_resumed.steps(), 3);
  t_resumed.run<LavinD::Batch>(resumed, 6, next(resumed, order));
  EXPECT_EQ(t_resumed.steps(), 6);
  expect_params_identical(resumed, straight);
  EXPECT_EQ(order.next_u64(), order_straight.next_u64());

  // Control: restoring only the data order, not the layers' dropout streams, ends elsewhere.
  LavinD no_dropout_rngs = make_model(40, dropout, true);
  Rng order_only(1234);
  Trainer<double> t_no_dropout_rngs(parameters_of<double>(no_dropout_rngs), config);
  t_no_dropout_rngs.resume(path, {{"data_order", &order_only}});
  t_no_dropout_rngs.run<LavinD::Batch>(no_dropout_rngs, 6, next(no_dropout_rngs, order_only));
  EXPECT_GT(max_param_diff(no_dropout_rngs, straight, /*grads=*/false), 1e-6);

  // Control: restoring the parameters and Rngs without the AdamW moments ends elsewhere.
  LavinD no_moments = make_model(40, dropout, true);
  Rng order_no_moments(1234);
  Trainer<double> t_no_moments(parameters_of<double>(no_moments), config);
  t_no_moments.resume(path, streams(no_moments, order_no_moments));
  t_no_moments.optimizer().state().clear();
  t_no_moments.run<LavinD::Batch>(no_moments, 6, next(no_moments, order_no_moments));
  EXPECT_GT(max_param_diff(no_moments, straight, /*grads=*/false), 1e-4);
  std::remove(path.c_str());
}

TEST(Trainer, RngsOfNamesEveryRandomStream) {
  LavinD model = make_model(40, 0.1, true);
  const NamedRngs rngs = rngs_of(model, "lavin");
  std::vector<std::string> names;
  for (const auto& [name, rng] : rngs) {
    EXPECT_NE(rng, nullptr) << name;
    names.push_back(name);
  }
  // Two ViT blocks with one MM-Adapter each, two LLM blocks with two each; no other layer draws random numbers.
  const std::vector<std::string> expected{
      "lavin.vit.vision_model.encoder.layers.0.adapter_attn.dropout_rng",
      "lavin.vit.vision_model.encoder.layers.1.adapter_attn.dropout_rng",
      "lavin.llm.model.layers.0.adapter_attn.dropout_rng",
      "lavin.llm.model.layers.0.adapter_mlp.dropout_rng",
      "lavin.llm.model.layers.1.adapter_attn.dropout_rng",
      "lavin.llm.model.layers.1.adapter_mlp.dropout_rng"};
  EXPECT_EQ(names, expected);
}

TEST(Trainer, StepsFollowTheScheduleAndReportProgress) {
  LavinD model = make_model();
  const auto data = samples(43);
  const auto frozen_before = parameters_of<double>(model).front();  // the ViT's class embedding (frozen)
  ASSERT_FALSE(frozen_before.param->trainable);
  const Tensor<double> frozen_value = frozen_before.param->value;
  const WarmupCosineLr schedule(1e-2, 2, 5);
  Trainer<double> trainer(parameters_of<double>(model), {.adamw = {}, .schedule = schedule, .clip_norm = {}});
  std::vector<TrainStep> seen;
  trainer.run<LavinD::Batch>(
      model, 5, [&](std::int64_t) { return std::vector<LavinD::Batch>{model.make_batch(data)}; },
      [&](const TrainStep& s) { seen.push_back(s); });
  ASSERT_EQ(seen.size(), 5u);
  for (std::size_t i = 0; i < seen.size(); ++i) {
    EXPECT_EQ(seen[i].step, std::int64_t(i + 1));
    EXPECT_DOUBLE_EQ(seen[i].lr, schedule(std::int64_t(i)));
    EXPECT_EQ(seen[i].tokens, 4u * model.make_batch({data[0]}).lengths[0]);
    EXPECT_GT(seen[i].grad_norm, 0.0);
    EXPECT_GT(seen[i].tokens_per_second, 0.0);
    EXPECT_TRUE(std::isfinite(seen[i].loss));
  }
  EXPECT_EQ(seen[0].lr, 0.0);  // warm-up starts at 0: the first step changes nothing but the optimizer state
  EXPECT_LT(seen.back().loss, seen[1].loss);
  EXPECT_TRUE(std::equal(frozen_value.begin(), frozen_value.end(), frozen_before.param->value.begin()));
  const auto params = parameters_of<double>(model);
  EXPECT_EQ(trainer.optimizer().parameters().size(),
            std::size_t(std::count_if(params.begin(), params.end(), [](const auto& ref) { return ref.param->trainable; })));
}

TEST(Trainer, TrainsAnyCallable) {
  Quadratic q;
  const Tensor<double> target = {1.0, -2.0, 0.5};
  Trainer<double> trainer(parameters_of<double>(q), {.adamw = {.lr = 0.05, .weight_decay = 0.0}});
  // k identical micro-batches give the gradient of one (the sum is scaled by 1/k).
  const std::vector<Tensor<double>> batches(3, target);
  const auto fn = [&](const Tensor<double>& t) { return q.loss_and_backward(t); };
  const TrainStep first = trainer.step<Tensor<double>>(fn, std::span<const Tensor<double>>(batches));
  EXPECT_NEAR(first.grad_norm, std::sqrt(1.0 + 4.0 + 0.25), 1e-12);
  EXPECT_NEAR(first.loss, 0.5 * (1.0 + 4.0 + 0.25), 1e-12);
  EXPECT_EQ(first.tokens, 3u);
  for (int i = 0; i < 300; ++i) trainer.step<Tensor<double>>(q, std::span<const Tensor<double>>(batches.data(), 1));
  EXPECT_LT(max_abs_diff(q.w.value, target), 1e-2);
}

TEST(Trainer, BadUseThrows) {
  Quadratic q;
  EXPECT_THROW(Trainer<double>(parameters_of<double>(q), {.adamw = {}, .schedule = {}, .clip_norm = 0.0}), ConfigError);
  q.w.set_trainable(false);
  EXPECT_THROW(Trainer<double>(parameters_of<double>(q), {}), ConfigError);
  q.w.set_trainable(true);
  Trainer<double> trainer(parameters_of<double>(q), {});
  EXPECT_THROW(trainer.step<Tensor<double>>(q, std::span<const Tensor<double>>()), ConfigError);
  EXPECT_THROW(trainer.resume(temp_file("missing.safetensors")), Error);
  // A NaN gradient is caught before the update.
  const Tensor<double> nan_target = {NAN, 0.0, 0.0};
  const std::vector<Tensor<double>> nan_batch{nan_target};
  EXPECT_THROW(trainer.step<Tensor<double>>(q, std::span<const Tensor<double>>(nan_batch)), NumericError);
  EXPECT_EQ(trainer.steps(), 0);
}
