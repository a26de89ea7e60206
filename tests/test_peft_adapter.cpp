// PEFT (LoRA) adapter export and load (train/checkpoint.hpp) on a tiny Llama with LoRA on q, k, v, o.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <xtensor/xmath.hpp>
#include <xtensor/xsort.hpp>

#include "mixpeft/core/parameter.hpp"
#include "mixpeft/core/rng.hpp"
#include "mixpeft/io/atomic_file.hpp"
#include "mixpeft/io/safetensors.hpp"
#include "mixpeft/models/llama.hpp"
#include "mixpeft/testing/gradcheck.hpp"
#include "mixpeft/train/checkpoint.hpp"

using namespace mixpeft;
namespace fs = std::filesystem;

namespace {

using Model = Llama<float>;

const Model::Config tiny{.vocab = 13, .dim = 16, .n_layers = 2, .n_heads = 2, .ffn_dim = 24, .norm_eps = 1e-6,
                         .rope_theta = 100.0, .max_seq = 16};
const LoRATargets qkvo{.q = true, .k = true, .v = true, .o = true};

Model::Peft lora_peft(LoRATargets targets = qkvo, std::size_t rank = 4) {
  Model::Peft p;
  p.lora_targets = targets;
  p.lora = {.rank = rank, .alpha = 8.0, .dropout = 0.05};
  return p;
}

// The same frozen base for every seed (Rng(1)); the trainable parameters get values from `seed`, B included.
Model make_model(std::uint64_t seed, const Model::Peft& peft = lora_peft()) {
  Rng base(1);
  Model m(tiny, peft, base);
  Rng rng(seed);
  for (auto& ref : parameters_of<float>(m))
    if (ref.param->trainable) ref.param->value = mixpeft::testing::random_tensor<float>(shape_of(ref.param->value), rng, 0.3);
  return m;
}

std::vector<std::string> qkvo_keys(const std::vector<std::string>& projections = {"q", "k", "v", "o"}) {
  std::vector<std::string> keys;
  for (int i = 0; i < 2; ++i)
    for (const auto& p : projections)
      for (const char* f : {"lora_A", "lora_B"})
        keys.push_back(detail::concat("base_model.model.model.layers.", i, ".self_attn.", p, "_proj.", f, ".weight"));
  std::sort(keys.begin(), keys.end());
  return keys;
}

// The value of the parameter named `name`.
Tensor<float> value_of(Model& m, const std::string& name) {
  for (const auto& ref : parameters_of<float>(m))
    if (ref.name == name) return ref.param->value;
  ADD_FAILURE() << "no parameter " << name;
  return {};
}

template <class T>
bool bitwise_equal(const Tensor<T>& a, const Tensor<T>& b) {
  return shape_of(a) == shape_of(b) && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// Every parameter value of a model, by name.
std::map<std::string, Tensor<float>> snapshot(Model& m) {
  std::map<std::string, Tensor<float>> out;
  for (const auto& ref : parameters_of<float>(m)) out.emplace(ref.name, ref.param->value);
  return out;
}

Tensor<float> eval_logits(Model& m) {
  m.set_training(false);
  Tensor<std::int64_t> ids = empty<std::int64_t>({2, 5});
  Rng rng(77);
  for (auto& v : ids) v = std::int64_t(rng.below(tiny.vocab));
  Model::Cache cache;
  return m.forward_ids(ids, AttentionMask{}, cache);
}

nlohmann::json read_json(const fs::path& path) {
  const auto bytes = read_file_bytes(path);
  return nlohmann::json::parse(bytes.begin(), bytes.end());
}

class PeftAdapter : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() / detail::concat("mixpeft_peft_", info->name(), "_", ::getpid());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path path(const std::string& name) const { return dir_ / name; }

  // A copy of adapter `src` as `dst` whose tensors and metadata went through `edit`.
  fs::path edited(const fs::path& src, const std::string& dst,
                  const std::function<void(std::map<std::string, Tensor<float>>&, Metadata&)>& edit) {
    const fs::path out = path(dst);
    fs::create_directories(out);
    fs::copy_file(src / "adapter_config.json", out / "adapter_config.json");
    const SafetensorsFile file(src / "adapter_model.safetensors");
    std::map<std::string, Tensor<float>> tensors;
    for (const auto& name : file.names()) tensors.emplace(name, file.read<float>(name));
    Metadata metadata = file.metadata();
    edit(tensors, metadata);
    save_safetensors(out / "adapter_model.safetensors", tensors, DType::F32, metadata);
    return out;
  }
  // A copy of adapter `src` as `dst` whose adapter_config.json went through `edit`.
  fs::path edited_config(const fs::path& src, const std::string& dst, const std::function<void(nlohmann::json&)>& edit) {
    const fs::path out = path(dst);
    fs::create_directories(out);
    fs::copy_file(src / "adapter_model.safetensors", out / "adapter_model.safetensors");
    nlohmann::json j = read_json(src / "adapter_config.json");
    edit(j);
    write_file_atomically(out / "adapter_config.json", j.dump(2));
    return out;
  }

  fs::path dir_;
};

template <class E>
void expect_error(const std::function<void()>& f, const std::string& fragment) {
  try {
    f();
    ADD_FAILURE() << "expected an exception containing: " << fragment;
  } catch (const E& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type: " << e.what();
  }
}

}  // namespace

TEST_F(PeftAdapter, ExportWritesPeftNamesAndConfig) {
  Model m = make_model(10);
  const PeftLoraConfig written = export_peft_adapter(path("a"), parameters_of<float>(m), peft_lora_config(m.peft().lora));

  const SafetensorsFile weights(path("a") / "adapter_model.safetensors");
  EXPECT_EQ(weights.names(), qkvo_keys());  // trainable only: no base weight, norm, embedding or head
  EXPECT_EQ(weights.info("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").shape, (Shape{4, 16}));
  EXPECT_EQ(weights.info("base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight").shape, (Shape{16, 4}));
  EXPECT_EQ(weights.info("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").dtype, DType::F32);
  EXPECT_EQ(weights.metadata().at("format"), "pt");
  EXPECT_TRUE(bitwise_equal(weights.read<float>("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"),
                            value_of(m, "model.layers.1.self_attn.v_proj.lora_B.weight")));

  const nlohmann::json expected = {{"peft_type", "LORA"},
                                   {"r", 4},
                                   {"lora_alpha", 8.0},
                                   {"lora_dropout", 0.05},
                                   {"target_modules", {"q_proj", "k_proj", "v_proj", "o_proj"}},
                                   {"use_rslora", false},
                                   {"bias", "none"},
                                   {"task_type", "CAUSAL_LM"},
                                   {"base_model_name_or_path", nullptr},
                                   {"modules_to_save", nullptr},
                                   {"rank_pattern", nlohmann::json::object()},
                                   {"alpha_pattern", nlohmann::json::object()},
                                   {"inference_mode", true},
                                   {"fan_in_fan_out", false},
                                   {"init_lora_weights", true},
                                   {"use_dora", false}};
  EXPECT_EQ(read_json(path("a") / "adapter_config.json"), expected);
  EXPECT_EQ(written.target_modules, (std::vector<std::string>{"q_proj", "k_proj", "v_proj", "o_proj"}));
  // No temporary files are left behind.
  std::set<std::string> files;
  for (const auto& e : fs::directory_iterator(path("a"))) files.insert(e.path().filename().string());
  EXPECT_EQ(files, (std::set<std::string>{"adapter_config.json", "adapter_model.safetensors"}));
}

TEST_F(PeftAdapter, TargetModulesFollowTheLoraModules) {
  Model m = make_model(10, lora_peft({.q = true, .v = true}));
  PeftLoraConfig cfg = peft_lora_config(m.peft().lora);
  cfg.base_model_name_or_path = "meta-llama/Llama-2-7b-hf";
  export_peft_adapter(path("a"), parameters_of<float>(m), cfg, {.dtype = DType::BF16});
  const SafetensorsFile weights(path("a") / "adapter_model.safetensors");
  EXPECT_EQ(weights.names(), qkvo_keys({"q", "v"}));
  EXPECT_EQ(weights.info(qkvo_keys({"q", "v"})[0]).dtype, DType::BF16);
  const auto j = read_json(path("a") / "adapter_config.json");
  EXPECT_EQ(j["target_modules"], nlohmann::json({"q_proj", "v_proj"}));
  EXPECT_EQ(j["base_model_name_or_path"], "meta-llama/Llama-2-7b-hf");

  // A BF16 adapter loads, rounded to BF16.
  Model fresh = make_model(20, lora_peft({.q = true, .v = true}));
  load_peft_adapter(path("a"), parameters_of<float>(fresh));
  const Tensor<float> a = value_of(fresh, "model.layers.0.self_attn.q_proj.lora_A.weight");
  EXPECT_TRUE(bitwise_equal(a, weights.read<float>(qkvo_keys({"q", "v"})[0])));
  EXPECT_LT(xt::amax(xt::abs(a - value_of(m, "model.layers.0.self_attn.q_proj.lora_A.weight")))(), 1e-2);

  // Given target_modules are checked against the LoRA modules, by PEFT's suffix rule.
  cfg.target_modules = {"v_proj", "self_attn.q_proj"};
  EXPECT_NO_THROW(export_peft_adapter(path("b"), parameters_of<float>(m), cfg));
  EXPECT_EQ(read_json(path("b") / "adapter_config.json")["target_modules"], nlohmann::json({"v_proj", "self_attn.q_proj"}));
}

TEST_F(PeftAdapter, LoadRestoresTrainableParametersBitForBit) {
  Model trained = make_model(10);
  const PeftLoraConfig cfg = peft_lora_config(trained.peft().lora);
  export_peft_adapter(path("a"), parameters_of<float>(trained), cfg);

  Model fresh = make_model(20);  // same base, other LoRA values
  const auto trained_values = snapshot(trained);
  EXPECT_FALSE(bitwise_equal(snapshot(fresh).at("model.layers.0.self_attn.q_proj.lora_A.weight"),
                             trained_values.at("model.layers.0.self_attn.q_proj.lora_A.weight")));
  const Tensor<float> before = eval_logits(fresh);
  const Tensor<float> want = eval_logits(trained);
  EXPECT_FALSE(bitwise_equal(before, want));

  const PeftLoraConfig got = load_peft_adapter(path("a"), parameters_of<float>(fresh), {.expect = cfg});
  EXPECT_EQ(got.r, 4);
  EXPECT_EQ(got.lora_alpha, 8.0);
  EXPECT_EQ(got.target_modules, (std::vector<std::string>{"q_proj", "k_proj", "v_proj", "o_proj"}));
  std::size_t lora_params = 0;
  for (const auto& [name, value] : snapshot(fresh)) {
    EXPECT_TRUE(bitwise_equal(value, trained_values.at(name))) << name;
    lora_params += name.find(".lora_") != std::string::npos;
  }
  EXPECT_EQ(lora_params, 16u);
  EXPECT_TRUE(bitwise_equal(eval_logits(fresh), want));
}

TEST_F(PeftAdapter, RenamedExportLoadsWithTheSameRename) {
  Model trained = make_model(10);
  const NameMap rename = [](const std::string& n) { return "adapter/" + n; };
  export_peft_adapter(path("a"), parameters_of<float>(trained), peft_lora_config(trained.peft().lora),
                      {.rename = rename});
  EXPECT_TRUE(SafetensorsFile(path("a") / "adapter_model.safetensors")
                  .contains("adapter/model.layers.0.self_attn.q_proj.lora_A.weight"));
  Model fresh = make_model(20);
  EXPECT_THROW(load_peft_adapter(path("a"), parameters_of<float>(fresh)), FormatError);  // PEFT names expected
  load_peft_adapter(path("a"), parameters_of<float>(fresh), {.rename = rename});
  EXPECT_TRUE(bitwise_equal(eval_logits(fresh), eval_logits(trained)));
}

TEST_F(PeftAdapter, MoleExpertsNeedRankPatternAndLoadBack) {
  // LoRA rank 4 on attention, two rank-2 LoRA experts and a router on every FFN.
  Model::Peft peft = lora_peft();
  peft.ffn = Model::Experts::Config{.experts = 2, .rank = 2, .alpha = 4.0, .dropout = 0.0};
  Model trained = make_model(10, peft);
  PeftLoraConfig cfg = peft_lora_config(peft.lora);
  cfg.extra = {{"num_experts", 2}};
  expect_error<ConfigError>([&] { export_peft_adapter(path("a"), parameters_of<float>(trained), cfg); },
                            "\"model.layers.0.mlp.gate_proj.lora_A.weight\" has shape [2, 2, 16] (rank 2)");
  EXPECT_FALSE(fs::exists(path("a")));
  for (const char* m : {"gate_proj", "up_proj", "down_proj"}) {
    cfg.rank_pattern[m] = 2;
    cfg.alpha_pattern[m] = 4.0;
  }
  const PeftLoraConfig written = export_peft_adapter(path("a"), parameters_of<float>(trained), cfg);
  EXPECT_EQ(written.target_modules,
            (std::vector<std::string>{"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}));
  const SafetensorsFile weights(path("a") / "adapter_model.safetensors");
  EXPECT_TRUE(weights.contains("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"));
  EXPECT_TRUE(weights.contains("base_model.model.model.layers.1.mlp.router.weight"));
  const auto j = read_json(path("a") / "adapter_config.json");
  EXPECT_EQ(j["rank_pattern"], nlohmann::json({{"down_proj", 2}, {"gate_proj", 2}, {"up_proj", 2}}));
  EXPECT_EQ(j["num_experts"], 2);

  Model fresh = make_model(20, peft);
  const PeftLoraConfig got = load_peft_adapter(path("a"), parameters_of<float>(fresh), {.expect = cfg});
  EXPECT_EQ(got.extra["num_experts"], 2);
  const auto want = snapshot(trained);
  for (const auto& [name, value] : snapshot(fresh)) EXPECT_TRUE(bitwise_equal(value, want.at(name))) << name;
  EXPECT_TRUE(bitwise_equal(eval_logits(fresh), eval_logits(trained)));
}

TEST_F(PeftAdapter, LoadErrorsAreTypedAndChangeNothing) {
  Model trained = make_model(10);
  const PeftLoraConfig cfg = peft_lora_config(trained.peft().lora);
  const fs::path good = path("good");
  export_peft_adapter(good, parameters_of<float>(trained), cfg);
  const std::string q0_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
  const std::string v1_b = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight";

  Model fresh = make_model(20);
  const auto before = snapshot(fresh);
  const auto load = [&](const fs::path& dir, const PeftLoadOptions& options = {}) {
    return [&fresh, dir, options] { load_peft_adapter(dir, parameters_of<float>(fresh), options); };
  };

  // Truncated weights: in the data, and inside the header.
  const fs::path cut = edited(good, "cut", [](auto&, auto&) {});
  fs::resize_file(cut / "adapter_model.safetensors", fs::file_size(cut / "adapter_model.safetensors") - 4);
  expect_error<FormatError>(load(cut), "outside the 4092-byte data buffer");
  fs::resize_file(cut / "adapter_model.safetensors", 20);
  expect_error<FormatError>(load(cut), "exceeds the file size");

  // A missing tensor, an unknown one, one for a frozen parameter.
  expect_error<FormatError>(load(edited(good, "missing", [&](auto& t, auto&) { t.erase(v1_b); })),
                            "no tensor \"" + v1_b + "\" for trainable parameter");
  expect_error<FormatError>(
      load(edited(good, "unknown", [&](auto& t, auto&) { t.emplace("base_model.model.extra.weight", zeros<float>({2})); })),
      "tensor \"base_model.model.extra.weight\" matches no trainable parameter");
  expect_error<FormatError>(load(edited(good, "frozen",
                                        [&](auto& t, auto&) {
                                          t.emplace("base_model.model.model.norm.weight", zeros<float>({16}));
                                        })),
                            "which is frozen in the model");

  // A wrong shape (same rank, other width).
  expect_error<ShapeError>(load(edited(good, "shape", [&](auto& t, auto&) { t[v1_b] = zeros<float>({17, 4}); })),
                           "tensor \"" + v1_b + "\" has shape [17, 4] but parameter");

  // adapter_config.json's rank disagrees with the weights: caught by the export metadata, and without it (a file
  // as PEFT writes it) by the tensors' ranks.
  const fs::path r8 = edited_config(good, "r8", [](auto& j) { j["r"] = 8; });
  expect_error<FormatError>(load(r8), "does not belong to adapter_model.safetensors");
  expect_error<FormatError>(load(edited(r8, "r8_plain", [](auto&, Metadata& m) { m.erase("mixpeft.lora"); })),
                            "k_proj.lora_A.weight\" has shape [4, 16] (rank 4) but adapter_config.json gives its module rank 8");

  // The adapter disagrees with the model or the caller.
  Model rank8 = make_model(30, lora_peft(qkvo, 8));
  const auto rank8_before = snapshot(rank8);
  expect_error<ConfigError>([&] { load_peft_adapter(good, parameters_of<float>(rank8)); },
                            "\"model.layers.0.self_attn.q_proj.lora_A.weight\" has LoRA rank 8");
  for (const auto& [name, value] : snapshot(rank8)) EXPECT_TRUE(bitwise_equal(value, rank8_before.at(name))) << name;
  PeftLoraConfig other = cfg;
  other.lora_alpha = 16;
  expect_error<ConfigError>(load(good, {.expect = other}), "lora_alpha = 8 vs 16");
  other = cfg;
  other.target_modules = {"q_proj", "v_proj"};
  expect_error<ConfigError>(load(good, {.expect = other}), "target_modules");

  // Broken or foreign configs, and missing files.
  const fs::path garbled = edited(good, "garbled", [](auto&, auto&) {});
  write_file_atomically(garbled / "adapter_config.json", "{\"peft_type\": \"LORA\", ");
  expect_error<FormatError>(load(garbled), "adapter_config.json is not valid JSON");
  expect_error<FormatError>(load(edited_config(good, "ia3", [](auto& j) { j["peft_type"] = "IA3"; })),
                            "expected \"LORA\"");
  expect_error<FormatError>(load(edited_config(good, "dora", [](auto& j) { j["use_dora"] = true; })), "DoRA");
  expect_error<FormatError>(load(edited_config(good, "no_r", [](auto& j) { j.erase("r"); })), "no \"r\"");
  expect_error<FormatError>(load(edited_config(good, "r_text", [](auto& j) { j["r"] = "4"; })), "\"r\" must be");
  expect_error<FormatError>(
      load(edited_config(good, "targets", [](auto& j) { j["target_modules"] = {"q_proj", "k_proj", "v_proj"}; })),
      "does not belong");
  fs::remove(garbled / "adapter_config.json");
  EXPECT_THROW(load(garbled)(), IoError);
  EXPECT_THROW(load(path("nowhere"))(), IoError);

  for (const auto& [name, value] : snapshot(fresh)) EXPECT_TRUE(bitwise_equal(value, before.at(name))) << name;
  EXPECT_NO_THROW(load(good)());  // and the good adapter still loads
}

TEST_F(PeftAdapter, ExportRejectsInconsistentInputsBeforeWriting) {
  Model m = make_model(10);
  const auto params = parameters_of<float>(m);
  PeftLoraConfig cfg = peft_lora_config(m.peft().lora);
  const auto attempt = [&](const PeftLoraConfig& c) { return [&, c] { export_peft_adapter(path("x"), params, c); }; };

  PeftLoraConfig bad = cfg;
  bad.r = 8;
  expect_error<ConfigError>(attempt(bad), "\"model.layers.0.self_attn.q_proj.lora_A.weight\" has shape [4, 16]");
  bad = cfg;
  bad.target_modules = {"q_proj", "v_proj"};
  expect_error<ConfigError>(attempt(bad), "LoRA module \"model.layers.0.self_attn.k_proj\" matches none");
  bad.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"};
  expect_error<ConfigError>(attempt(bad), "target module \"gate_proj\" carries no LoRA parameter");
  bad = cfg;
  bad.r = 0;
  EXPECT_THROW(attempt(bad)(), ConfigError);
  bad = cfg;
  bad.lora_dropout = 1.0;
  EXPECT_THROW(attempt(bad)(), ConfigError);
  bad = cfg;
  bad.extra = {{"r", 16}};
  expect_error<ConfigError>(attempt(bad), "must not override \"r\"");
  expect_error<ConfigError>([&] { export_peft_adapter(path("x"), params, cfg, {.rename = [](auto&) { return "w"; }}); },
                            "two parameters are stored as \"w\"");

  // A model without LoRA (everything trainable) is not a LoRA adapter.
  Rng rng(1);
  Model plain(tiny, rng);
  expect_error<ConfigError>([&] { export_peft_adapter(path("x"), parameters_of<float>(plain), cfg); },
                            "no trainable LoRA parameter");
  EXPECT_FALSE(fs::exists(path("x")));
}

TEST_F(PeftAdapter, ConfigJsonRoundTripsAndReadsPeftFiles) {
  PeftLoraConfig c;
  c.r = 16;
  c.lora_alpha = 32;
  c.lora_dropout = 0.1;
  c.target_modules = {"q_proj", "v_proj"};
  c.use_rslora = true;
  c.modules_to_save = {"lm_head"};
  c.rank_pattern = {{"v_proj", 8}};
  c.alpha_pattern = {{"v_proj", 4.0}};
  c.extra = {{"num_experts", 3}};
  const PeftLoraConfig back = PeftLoraConfig::from_json(c.to_json(), "test");
  EXPECT_EQ(back.to_json(), c.to_json());
  EXPECT_EQ(back.rank_for("model.layers.3.self_attn.v_proj"), 8);
  EXPECT_EQ(back.rank_for("model.layers.3.self_attn.q_proj"), 16);
  EXPECT_EQ(back.alpha_for("model.layers.3.self_attn.xv_proj"), 32.0);  // a suffix only at a dot

  // What PEFT itself writes: integer alpha, null task_type, keys of later PEFT versions (kept in `extra`).
  const auto peft = nlohmann::json::parse(R"({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
      "target_modules": ["v_proj", "q_proj"], "bias": "none", "task_type": null, "fan_in_fan_out": false,
      "inference_mode": true, "init_lora_weights": true, "layers_to_transform": null, "revision": null,
      "use_rslora": false, "use_dora": false, "rank_pattern": {}, "alpha_pattern": {}, "megatron_core": "megatron.core"})");
  const PeftLoraConfig p = PeftLoraConfig::from_json(peft, "adapter_config.json");
  EXPECT_EQ(p.r, 8);
  EXPECT_EQ(p.lora_alpha, 16.0);
  EXPECT_EQ(p.task_type, "");
  EXPECT_EQ(p.extra, nlohmann::json({{"layers_to_transform", nullptr}, {"revision", nullptr},
                                     {"megatron_core", "megatron.core"}}));
  auto bad = peft;
  bad["lora_alpha"] = -1;
  EXPECT_THROW(PeftLoraConfig::from_json(bad, "x"), FormatError);
  bad = peft;
  bad["fan_in_fan_out"] = true;
  EXPECT_THROW(PeftLoraConfig::from_json(bad, "x"), FormatError);
  bad = peft;
  bad["target_modules"] = {1, 2};
  EXPECT_THROW(PeftLoraConfig::from_json(bad, "x"), FormatError);
}
