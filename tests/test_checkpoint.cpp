#include <gtest/gtest.h>

#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "mixpeft/core/init.hpp"
#include "mixpeft/core/parameter.hpp"
#include "mixpeft/core/rng.hpp"
#include "mixpeft/io/safetensors.hpp"
#include "mixpeft/train/adamw.hpp"
#include "mixpeft/train/checkpoint.hpp"
#include "mixpeft/train/grad_clip.hpp"
#include "mixpeft/train/lr_schedule.hpp"

using namespace mixpeft;
namespace fs = std::filesystem;

namespace {

class Checkpoint : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() / detail::concat("mixpeft_ckpt_", info->name(), "_", ::getpid());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path path(const std::string& name) const { return dir_ / name; }
  fs::path dir_;
};

// Linear regression on frozen features: pred = W (E x) + b, E frozen (the "backbone").
struct Model {
  Parameter<float> E, W, b;
  explicit Model(std::uint64_t seed) {
    Rng backbone(1), rng(seed);
    E = Parameter<float>("E", empty<float>({3, 3}), false);
    init::normal(E.value, backbone);
    W = Parameter<float>("W", empty<float>({2, 3}), true);
    init::normal(W.value, rng, 0.0, 0.1);
    b = Parameter<float>("b", zeros<float>({2}), true, /*decay=*/false);
  }
  ParameterList<float> parameters() {
    ParameterList<float> list;
    for (auto* p : {&E, &W, &b}) add_parameter(list, "head", *p);
    return list;
  }
};

// One optimizer step on a fresh batch drawn from `data` with label noise from `noise`.
void train_step(Model& m, AdamW<float>& opt, Rng& data, Rng& noise, std::int64_t step, const WarmupCosineLr& lr) {
  const float target[2][3] = {{1.0f, -2.0f, 0.5f}, {0.0f, 3.0f, -1.0f}};
  constexpr int batch = 4;
  opt.zero_grad();
  for (int n = 0; n < batch; ++n) {
    float x[3], h[3] = {0, 0, 0};
    for (float& v : x) v = float(data.normal());
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j) h[i] += m.E.value(i, j) * x[j];
    for (int o = 0; o < 2; ++o) {
      float pred = m.b.value(o), y = 0.01f * float(noise.normal());
      for (int i = 0; i < 3; ++i) {
        pred += m.W.value(o, i) * h[i];
        y += target[o][i] * x[i];
      }
      const float d = 2.0f * (pred - y) / (batch * 2);
      for (int i = 0; i < 3; ++i) m.W.grad(o, i) += d * h[i];
      m.b.grad(o) += d;
    }
  }
  clip_grad_norm(opt.parameters(), 1.0);
  opt.step(lr(step));
}

template <class T>
bool bitwise_equal(const Tensor<T>& a, const Tensor<T>& b) {
  return shape_of(a) == shape_of(b) && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

const AdamWConfig config{.lr = 1e-2, .beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.02};
const WarmupCosineLr schedule(5e-2, 3, 10);

}  // namespace

TEST_F(Checkpoint, ResumeContinuesBitIdentically) {
  // Ten steps in one go.
  Model straight(7);
  AdamW<float> opt_straight(straight.parameters(), config);
  Rng data(100), noise(200);
  for (std::int64_t s = 0; s < 10; ++s) train_step(straight, opt_straight, data, noise, s, schedule);

  // Five steps, a checkpoint, and five more in a fresh model, optimizer and generators.
  {
    Model first(7);
    AdamW<float> opt(first.parameters(), config);
    Rng d(100), n(200);
    for (std::int64_t s = 0; s < 5; ++s) train_step(first, opt, d, n, s, schedule);
    save_checkpoint(path("ckpt.safetensors"), opt, {.step = 5, .extra = {{"epoch", 0}}}, {{"data", &d}, {"noise", &n}});
  }
  Model resumed(12345);  // different initial weights: the checkpoint must overwrite them
  AdamW<float> opt(resumed.parameters(), {.lr = 1.0, .weight_decay = 0.5});
  Rng d(1), n(2);
  const CheckpointInfo info = load_checkpoint(path("ckpt.safetensors"), opt, {{"data", &d}, {"noise", &n}});
  EXPECT_EQ(info.step, 5);
  EXPECT_EQ(info.extra["epoch"], 0);
  EXPECT_EQ(opt.config().weight_decay, config.weight_decay);
  for (std::int64_t s = info.step; s < 10; ++s) train_step(resumed, opt, d, n, s, schedule);

  EXPECT_TRUE(bitwise_equal(resumed.W.value, straight.W.value));
  EXPECT_TRUE(bitwise_equal(resumed.b.value, straight.b.value));
  for (const auto& name : {"head.W", "head.b"}) {
    EXPECT_TRUE(bitwise_equal(opt.state().at(name).m, opt_straight.state().at(name).m)) << name;
    EXPECT_TRUE(bitwise_equal(opt.state().at(name).v, opt_straight.state().at(name).v)) << name;
    EXPECT_EQ(opt.state().at(name).step, 10);
  }
  EXPECT_EQ(d.next_u64(), data.next_u64());
  EXPECT_EQ(n.normal(), noise.normal());
}

TEST_F(Checkpoint, StoresTrainableParametersAndStateOnly) {
  Model m(3);
  AdamW<float> opt(m.parameters(), config);
  Rng d(1), n(2);
  train_step(m, opt, d, n, 1, schedule);
  save_checkpoint(path("c.safetensors"), opt, {.step = 1});
  const SafetensorsFile f(path("c.safetensors"));
  EXPECT_EQ(f.names(), (std::vector<std::string>{"model/head.W", "model/head.b", "optimizer/exp_avg/head.W",
                                                 "optimizer/exp_avg/head.b", "optimizer/exp_avg_sq/head.W",
                                                 "optimizer/exp_avg_sq/head.b"}));
  EXPECT_EQ(f.info("model/head.W").dtype, DType::F32);
  const auto meta = nlohmann::json::parse(f.metadata().at("mixpeft.checkpoint"));
  EXPECT_EQ(meta["version"], 1);
  EXPECT_EQ(meta["optimizer"]["steps"]["head.W"], 1);
  EXPECT_EQ(meta["optimizer"]["beta2"], 0.95);
  // The stored parameter can be read back as plain weights too.
  EXPECT_TRUE(bitwise_equal(f.read<float>("model/head.W"), m.W.value));
}

TEST_F(Checkpoint, MismatchesAreRejectedBeforeAnythingChanges) {
  Model m(3);
  AdamW<float> opt(m.parameters(), config);
  Rng d(1), n(2);
  train_step(m, opt, d, n, 1, schedule);
  save_checkpoint(path("c.safetensors"), opt, {.step = 1}, {{"data", &d}});

  // A model whose W has another shape: ShapeError naming the tensor and parameter, nothing restored.
  Model other(9);
  other.W = Parameter<float>("W", zeros<float>({3, 3}), true);
  AdamW<float> other_opt(other.parameters(), config);
  Rng d2(5);
  const Tensor<float> b_before = other.b.value;
  try {
    load_checkpoint(path("c.safetensors"), other_opt, {{"data", &d2}});
    FAIL() << "expected ShapeError";
  } catch (const ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("\"model/head.W\" has shape [2, 3]"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(bitwise_equal(other.b.value, b_before));
  EXPECT_TRUE(other_opt.state().empty());
  EXPECT_EQ(d2.next_u64(), Rng(5).next_u64());

  // A model with an extra trainable parameter: it has nothing to restore from.
  Model bigger(3);
  Parameter<float> extra("lora_A", zeros<float>({1}), true);
  ParameterList<float> list = bigger.parameters();
  add_parameter(list, "head", extra);
  AdamW<float> bigger_opt(list, config);
  EXPECT_THROW(load_checkpoint(path("c.safetensors"), bigger_opt), FormatError);

  // A model where b is frozen: the checkpoint holds a tensor the model cannot take.
  Model frozen_b(3);
  frozen_b.b.set_trainable(false);
  AdamW<float> frozen_opt(frozen_b.parameters(), config);
  EXPECT_THROW(load_checkpoint(path("c.safetensors"), frozen_opt), FormatError);

  // A generator the checkpoint does not know.
  AdamW<float> same_opt(m.parameters(), config);
  Rng unknown(0);
  EXPECT_THROW(load_checkpoint(path("c.safetensors"), same_opt, {{"dropout", &unknown}}), FormatError);

  // Plain weights are not a checkpoint.
  save_parameters(path("weights.safetensors"), m.parameters());
  EXPECT_THROW(load_checkpoint(path("weights.safetensors"), same_opt), FormatError);

  // Garbled checkpoint metadata.
  Tensor<float> t = {1.0f};
  save_safetensors<float>(path("bad.safetensors"), {{"model/head.b", t}}, {{"mixpeft.checkpoint", "{oops"}});
  EXPECT_THROW(load_checkpoint(path("bad.safetensors"), same_opt), FormatError);
  save_safetensors<float>(path("bad.safetensors"), {{"model/head.b", t}}, {{"mixpeft.checkpoint", R"({"version": 2})"}});
  EXPECT_THROW(load_checkpoint(path("bad.safetensors"), same_opt), FormatError);
}

// PEFT adapter export and load: tests/test_peft_adapter.cpp.
