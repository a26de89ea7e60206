// mixpeft/train/checkpoint.hpp — resumable training checkpoints and PEFT adapter export.
//
// A checkpoint is ONE safetensors file, replaced atomically, so a crash leaves the previous checkpoint:
//   "model/<name>"                 value of every trainable parameter of the optimizer, stored exactly
//   "optimizer/exp_avg/<name>"     AdamW first moment m     (for parameters that have taken a step)
//   "optimizer/exp_avg_sq/<name>"  AdamW second moment v
//   __metadata__ "mixpeft.checkpoint": a JSON string
//       {"version": 1, "step": <trainer step>, "optimizer": {"type": "AdamW", "lr", "beta1", "beta2",
//        "eps", "weight_decay", "steps": {<name>: t}}, "rng": {<name>: "<hex bytes>"}, "extra": {...}}
// Frozen parameters are not stored: they come from the backbone's own weights. Loading checks the
// whole file against the model first (FormatError for missing or foreign names, ShapeError for a
// different shape) and only then restores parameter values, optimizer state and config, and the named
// Rngs, so training resumes bit-identically. Rng state is its raw object bytes: a checkpoint's Rng blobs
// are meant for the same build that wrote them.
//
// export_peft_adapter(dir, ...) writes what Hugging Face PEFT's save_pretrained writes for LoRA:
//   <dir>/adapter_model.safetensors   trainable parameters by name (metadata {"format": "pt"})
//   <dir>/adapter_config.json         {"peft_type": "LORA", "r", "lora_alpha", "lora_dropout",
//                                      "target_modules", "use_rslora", "bias", "task_type", ...}
// each file replaced atomically.
#pragma once

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "mixpeft/core/error.hpp"
#include "mixpeft/core/parameter.hpp"
#include "mixpeft/core/rng.hpp"
#include "mixpeft/core/tensor.hpp"
#include "mixpeft/io/atomic_file.hpp"
#include "mixpeft/io/dtype.hpp"
#include "mixpeft/io/safetensors.hpp"
#include "mixpeft/train/adamw.hpp"

namespace mixpeft {

static_assert(std::is_trivially_copyable_v<Rng>, "checkpoints store an Rng as its object bytes");


struct CheckpointInfo {
  std::int64_t step = 0;                              // the trainer's step counter
  nlohmann::json extra = nlohmann::json::object();   // anything else the trainer wants back (epoch, ...)
};

namespace detail::checkpoint {

inline constexpr const char* metadata_key = "mixpeft.checkpoint";
inline const std::string model_prefix = "model/", exp_avg_prefix = "optimizer/exp_avg/",
                         exp_avg_sq_prefix = "optimizer/exp_avg_sq/";

inline std::string to_hex(const Rng& rng) {
  unsigned char bytes[sizeof(Rng)];
  std::memcpy(bytes, &rng, sizeof(Rng));
  static constexpr char digits[] = "0123456789abcdef";
  std::string s;
  for (unsigned char b : bytes) {
    s += digits[b >> 4];
    s += digits[b & 15];
  }
  return s;
}

inline void from_hex(const std::string& s, Rng& rng, const std::string& where) {
  require<FormatError>(s.size() == 2 * sizeof(Rng), where, ": Rng state has ", s.size() / 2, " bytes, this build's Rng has ",
                       sizeof(Rng));
  unsigned char bytes[sizeof(Rng)];
  const auto nibble = [&](char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    throw FormatError(concat(where, ": Rng state is not lowercase hex"));
  };
  for (std::size_t i = 0; i < sizeof(Rng); ++i) bytes[i] = static_cast<unsigned char>(nibble(s[2 * i]) * 16 + nibble(s[2 * i + 1]));
  std::memcpy(&rng, bytes, sizeof(Rng));
}

// Looks up a key of a JSON object with the expected type, or throws FormatError.
inline const nlohmann::json& field(const nlohmann::json& j, const char* key, nlohmann::json::value_t type,
                                   const std::string& where) {
  require<FormatError>(j.is_object() && j.contains(key), where, ": checkpoint metadata has no \"", key, "\"");
  const auto& v = j.at(key);
  const bool ok = type == nlohmann::json::value_t::number_float ? v.is_number()
                  : type == nlohmann::json::value_t::number_integer ? v.is_number_integer()
                                                                   : v.type() == type;
  require<FormatError>(ok, where, ": checkpoint metadata \"", key, "\" has the wrong type (", v.type_name(), ")");
  return v;
}

}  // namespace detail::checkpoint

// Saves the optimizer's trainable parameters and AdamW state, the step counter, the Rngs and `extra`.
template <class T>
void save_checkpoint(const std::filesystem::path& path, const AdamW<T>& optimizer, const CheckpointInfo& info = {},
                     const NamedRngs& rngs = {}) {
  namespace dc = detail::checkpoint;
  std::vector<TensorEntry<T>> entries;
  nlohmann::json steps = nlohmann::json::object();
  for (const auto& ref : optimizer.parameters()) {
    if (!ref.param->trainable) continue;
    entries.push_back({dc::model_prefix + ref.name, ref.param->value});
    const auto it = optimizer.state().find(ref.name);
    if (it == optimizer.state().end()) continue;
    entries.push_back({dc::exp_avg_prefix + ref.name, it->second.m});
    entries.push_back({dc::exp_avg_sq_prefix + ref.name, it->second.v});
    steps[ref.name] = it->second.step;
  }
  const AdamWConfig& c = optimizer.config();
  nlohmann::json meta = {{"version", 1},
                         {"step", info.step},
                         {"optimizer",
                          {{"type", "AdamW"}, {"lr", c.lr}, {"beta1", c.beta1}, {"beta2", c.beta2}, {"eps", c.eps},
                           {"weight_decay", c.weight_decay}, {"steps", steps}}},
                         {"rng", nlohmann::json::object()},
                         {"extra", info.extra}};
  for (const auto& [name, rng] : rngs) {
    require<ConfigError>(rng != nullptr, "save_checkpoint: Rng \"", name, "\" is null");
    require<ConfigError>(!meta["rng"].contains(name), "save_checkpoint: duplicate Rng name \"", name, "\"");
    meta["rng"][name] = dc::to_hex(*rng);
  }
  save_safetensors(path, entries, {{"format", "mixpeft"}, {dc::metadata_key, meta.dump()}});
}

// Restores a checkpoint written by save_checkpoint into `optimizer`'s parameters and state and into the
// named Rngs; returns the step counter and `extra`. Nothing changes unless the whole file fits.
template <class T>
CheckpointInfo load_checkpoint(const std::filesystem::path& path, AdamW<T>& optimizer, const NamedRngs& rngs = {}) {
  namespace dc = detail::checkpoint;
  using V = nlohmann::json::value_t;
  const SafetensorsFile file(path);
  const std::string w = detail::concat("load_checkpoint '", path.string(), "'");
  const auto meta_it = file.metadata().find(dc::metadata_key);
  require<FormatError>(meta_it != file.metadata().end(), w, ": not a mixpeft checkpoint (no \"", dc::metadata_key,
                       "\" metadata)");
  nlohmann::json meta;
  try {
    meta = nlohmann::json::parse(meta_it->second);
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(detail::concat(w, ": checkpoint metadata is not valid JSON (", e.what(), ")"));
  }
  require<FormatError>(dc::field(meta, "version", V::number_integer, w) == 1, w, ": unsupported checkpoint version ",
                       meta["version"].dump());
  const auto& opt = dc::field(meta, "optimizer", V::object, w);
  require<FormatError>(dc::field(opt, "type", V::string, w) == "AdamW", w, ": optimizer is ", opt["type"].dump(),
                       ", expected \"AdamW\"");
  AdamWConfig config;
  config.lr = dc::field(opt, "lr", V::number_float, w).get<double>();
  config.beta1 = dc::field(opt, "beta1", V::number_float, w).get<double>();
  config.beta2 = dc::field(opt, "beta2", V::number_float, w).get<double>();
  config.eps = dc::field(opt, "eps", V::number_float, w).get<double>();
  config.weight_decay = dc::field(opt, "weight_decay", V::number_float, w).get<double>();
  try {
    config.validate();
  } catch (const ConfigError& e) {
    throw FormatError(detail::concat(w, ": stored optimizer config is invalid: ", e.what()));
  }
  const auto& steps = dc::field(opt, "steps", V::object, w);
  const auto& stored_rngs = dc::field(meta, "rng", V::object, w);

  // Check everything against the model before changing anything.
  std::map<std::string, Parameter<T>*> trainable;
  for (const auto& ref : optimizer.parameters())
    if (ref.param->trainable) trainable.emplace(ref.name, ref.param);
  const auto expect_tensor = [&](const std::string& stored, const std::string& name, const Parameter<T>& p) {
    require<FormatError>(file.contains(stored), w, ": no tensor \"", stored, "\" for parameter \"", name, "\"");
    const Shape& found = file.info(stored).shape;
    require<ShapeError>(found == shape_of(p.value), w, ": tensor \"", stored, "\" has shape ", shape_string(found),
                        " but parameter \"", name, "\" has shape ", shape_string(p.value.shape()));
  };
  std::set<std::string> expected_tensors;
  for (const auto& [name, p] : trainable) {
    expect_tensor(dc::model_prefix + name, name, *p);
    expected_tensors.insert(dc::model_prefix + name);
  }
  for (const auto& [name, t] : steps.items()) {
    const auto it = trainable.find(name);
    require<FormatError>(it != trainable.end(), w, ": optimizer state for \"", name,
                         "\", which is not a trainable parameter of the model");
    require<FormatError>(t.is_number_integer() && t.template get<std::int64_t>() > 0, w, ": optimizer step of \"", name,
                         "\" must be a positive integer, got ", t.dump());
    for (const auto& prefix : {dc::exp_avg_prefix, dc::exp_avg_sq_prefix}) {
      expect_tensor(prefix + name, name, *it->second);
      expected_tensors.insert(prefix + name);
    }
  }
  for (const auto& name : file.names())
    require<FormatError>(expected_tensors.count(name), w, ": tensor \"", name,
                         "\" matches no trainable parameter or optimizer state of the model");
  for (const auto& [name, rng] : rngs) {
    require<ConfigError>(rng != nullptr, w, ": Rng \"", name, "\" is null");
    require<FormatError>(stored_rngs.contains(name) && stored_rngs[name].is_string(), w, ": no state for Rng \"",
                         name, "\"");
    require<FormatError>(stored_rngs[name].template get<std::string>().size() == 2 * sizeof(Rng), w, ": Rng \"", name,
                         "\" state has the wrong size for this build");
  }
  CheckpointInfo info;
  info.step = dc::field(meta, "step", V::number_integer, w).get<std::int64_t>();
  info.extra = meta.contains("extra") ? meta["extra"] : nlohmann::json::object();

  // Restore.
  for (const auto& [name, p] : trainable) file.read_into(dc::model_prefix + name, p->value);
  optimizer.set_config(config);
  auto& state = optimizer.state();
  state.clear();
  for (const auto& [name, t] : steps.items()) {
    auto& s = state[name];
    file.read_into(dc::exp_avg_prefix + name, s.m);
    file.read_into(dc::exp_avg_sq_prefix + name, s.v);
    s.step = t.template get<std::int64_t>();
  }
  for (const auto& [name, rng] : rngs) dc::from_hex(stored_rngs[name].template get<std::string>(), *rng, w);
  return info;
}

// ---- PEFT adapter export --------------------------------------------------------------------------------

// The fields of PEFT's LoraConfig that describe an adapter; `extra` is merged last (method-specific keys,
// e.g. the number of experts of a MoLE adapter).
struct PeftLoraConfig {
  int r = 8;
  double lora_alpha = 8.0;
  double lora_dropout = 0.0;
  std::vector<std::string> target_modules;
  bool use_rslora = false;
  std::string bias = "none";
  std::string task_type = "CAUSAL_LM";
  std::string base_model_name_or_path;
  std::vector<std::string> modules_to_save;
  nlohmann::json extra = nlohmann::json::object();

  void validate() const {
    require<ConfigError>(r > 0, "PeftLoraConfig: rank r must be > 0 (got ", r, ")");
    require<ConfigError>(lora_alpha > 0, "PeftLoraConfig: lora_alpha must be > 0 (got ", lora_alpha, ")");
    require<ConfigError>(lora_dropout >= 0 && lora_dropout < 1, "PeftLoraConfig: lora_dropout must be in [0, 1) (got ",
                         lora_dropout, ")");
    require<ConfigError>(bias == "none" || bias == "all" || bias == "lora_only",
                         "PeftLoraConfig: bias must be \"none\", \"all\" or \"lora_only\" (got \"", bias, "\")");
    require<ConfigError>(extra.is_object(), "PeftLoraConfig: extra must be a JSON object");
  }

  nlohmann::json to_json() const {
    nlohmann::json j = {{"peft_type", "LORA"},
                        {"r", r},
                        {"lora_alpha", lora_alpha},
                        {"lora_dropout", lora_dropout},
                        {"target_modules", target_modules},
                        {"use_rslora", use_rslora},
                        {"bias", bias},
                        {"task_type", task_type},
                        {"base_model_name_or_path", base_model_name_or_path.empty()
                                                        ? nlohmann::json(nullptr)
                                                        : nlohmann::json(base_model_name_or_path)},
                        {"modules_to_save", modules_to_save.empty() ? nlohmann::json(nullptr)
                                                                    : nlohmann::json(modules_to_save)},
                        {"inference_mode", true},
                        {"fan_in_fan_out", false},
                        {"init_lora_weights", true},
                        {"use_dora", false}};
    j.update(extra);
    return j;
  }
};

// Writes <dir>/adapter_model.safetensors (the trainable parameters, named by `rename` if given, e.g. to
// PEFT's "base_model.model." prefix) and <dir>/adapter_config.json, creating `dir` if needed.
template <class T>
void export_peft_adapter(const std::filesystem::path& dir, const ParameterList<T>& params,
                         const PeftLoraConfig& config, DType dtype = DType::F32, NameMap rename = {}) {
  config.validate();
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  require<IoError>(!ec, "export_peft_adapter: cannot create directory '", dir.string(), "': ", ec.message());
  save_parameters(dir / "adapter_model.safetensors", params,
                  {.trainable_only = true, .dtype = dtype, .metadata = {{"format", "pt"}}, .rename = std::move(rename)});
  write_file_atomically(dir / "adapter_config.json", config.to_json().dump(2) + "\n");
}

}  // namespace mixpeft
