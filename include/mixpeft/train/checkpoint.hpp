// mixpeft/train/checkpoint.hpp — resumable training checkpoints; PEFT (LoRA) adapter export and load.
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
// PEFT adapters: export_peft_adapter(dir, params, config) writes what Hugging Face PEFT's save_pretrained writes
// for LoRA, and load_peft_adapter(dir, params) reads it (or PEFT's own output) back:
//   <dir>/adapter_model.safetensors   every trainable parameter under "base_model.model." + its name, e.g.
//                                     base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight  [r, in]
//                                     base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight  [out, r]
//                                     (LoRALinear's adapter "default" already has PEFT's saved names, without the
//                                     adapter name); metadata {"format": "pt", "mixpeft.lora": <shape fields>}
//   <dir>/adapter_config.json         {"peft_type": "LORA", "r", "lora_alpha", "lora_dropout", "target_modules",
//                                      "use_rslora", "bias": "none", "task_type": "CAUSAL_LM", "rank_pattern",
//                                      "alpha_pattern", "base_model_name_or_path", "modules_to_save", ...}
// A LoRA factor is a parameter with a "lora_A" / "lora_B" path component; its module is the path before it, its
// rank A's rows or B's columns, which must be rank_pattern's entry for the module or else r. target_modules, when
// the config leaves them empty, are the modules' last components in order of first appearance (["q_proj",
// "v_proj"]); a target or pattern key matches a module path equal to it or ending in "." + key (PEFT's rule, taken
// literally rather than as a regex). Each file is replaced atomically, weights first; the weights' "mixpeft.lora"
// metadata (r, lora_alpha, use_rslora, bias, target_modules, rank_pattern, alpha_pattern) lets the loader reject a
// config that does not belong to them, so a pair torn by a crash between the two renames is never used silently.
// Loading checks both files and the model before writing any trainable parameter (errors at load_peft_adapter).
#pragma once

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
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

// ---- the parts shared by the backends' save_checkpoint / load_checkpoint ----
namespace detail::checkpoint {

// The "mixpeft.checkpoint" metadata of a checkpoint (steps: parameter name -> AdamW step count).
inline Metadata metadata(const AdamWConfig& c, const nlohmann::json& steps, const CheckpointInfo& info,
                         const NamedRngs& rngs) {
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
    meta["rng"][name] = to_hex(*rng);
  }
  return {{"format", "mixpeft"}, {metadata_key, meta.dump()}};
}

// A checkpoint file checked against a model's trainable parameters (name -> shape) and the Rngs to restore.
struct CheckedFile {
  SafetensorsFile file;
  AdamWConfig config;
  std::map<std::string, std::int64_t> steps;  // parameter name -> AdamW step count, for those with moments
  CheckpointInfo info;
  std::map<std::string, std::string> rng_states;  // Rng name -> hex bytes

  // Restores the named Rngs (every one was checked to have a state of the right size).
  void restore_rngs(const NamedRngs& rngs, const std::string& where) const {
    for (const auto& [name, rng] : rngs) from_hex(rng_states.at(name), *rng, where);
  }
};

// Opens and checks a whole checkpoint before anything is restored: FormatError for a file that is not a mixpeft
// checkpoint, bad metadata, missing or foreign tensors or Rngs; ShapeError for a tensor of another shape.
inline CheckedFile open_checked(const std::filesystem::path& path, const std::map<std::string, Shape>& trainable,
                                const NamedRngs& rngs, const std::string& w) {
  using V = nlohmann::json::value_t;
  CheckedFile out{SafetensorsFile(path), {}, {}, {}, {}};
  const SafetensorsFile& file = out.file;
  const auto meta_it = file.metadata().find(metadata_key);
  require<FormatError>(meta_it != file.metadata().end(), w, ": not a mixpeft checkpoint (no \"", metadata_key,
                       "\" metadata)");
  nlohmann::json meta;
  try {
    meta = nlohmann::json::parse(meta_it->second);
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(detail::concat(w, ": checkpoint metadata is not valid JSON (", e.what(), ")"));
  }
  require<FormatError>(field(meta, "version", V::number_integer, w) == 1, w, ": unsupported checkpoint version ",
                       meta["version"].dump());
  const auto& opt = field(meta, "optimizer", V::object, w);
  require<FormatError>(field(opt, "type", V::string, w) == "AdamW", w, ": optimizer is ", opt["type"].dump(),
                       ", expected \"AdamW\"");
  AdamWConfig& config = out.config;
  config.lr = field(opt, "lr", V::number_float, w).get<double>();
  config.beta1 = field(opt, "beta1", V::number_float, w).get<double>();
  config.beta2 = field(opt, "beta2", V::number_float, w).get<double>();
  config.eps = field(opt, "eps", V::number_float, w).get<double>();
  config.weight_decay = field(opt, "weight_decay", V::number_float, w).get<double>();
  try {
    config.validate();
  } catch (const ConfigError& e) {
    throw FormatError(detail::concat(w, ": stored optimizer config is invalid: ", e.what()));
  }
  const auto& steps = field(opt, "steps", V::object, w);
  const auto& stored_rngs = field(meta, "rng", V::object, w);

  const auto expect_tensor = [&](const std::string& stored, const std::string& name, const Shape& shape) {
    require<FormatError>(file.contains(stored), w, ": no tensor \"", stored, "\" for parameter \"", name, "\"");
    const Shape& found = file.info(stored).shape;
    require<ShapeError>(found == shape, w, ": tensor \"", stored, "\" has shape ", shape_string(found),
                        " but parameter \"", name, "\" has shape ", shape_string(shape));
  };
  std::set<std::string> expected_tensors;
  for (const auto& [name, shape] : trainable) {
    expect_tensor(model_prefix + name, name, shape);
    expected_tensors.insert(model_prefix + name);
  }
  for (const auto& [name, t] : steps.items()) {
    const auto it = trainable.find(name);
    require<FormatError>(it != trainable.end(), w, ": optimizer state for \"", name,
                         "\", which is not a trainable parameter of the model");
    require<FormatError>(t.is_number_integer() && t.template get<std::int64_t>() > 0, w, ": optimizer step of \"", name,
                         "\" must be a positive integer, got ", t.dump());
    for (const auto& prefix : {exp_avg_prefix, exp_avg_sq_prefix}) {
      expect_tensor(prefix + name, name, it->second);
      expected_tensors.insert(prefix + name);
    }
    out.steps[name] = t.template get<std::int64_t>();
  }
  for (const auto& name : file.names())
    require<FormatError>(expected_tensors.count(name), w, ": tensor \"", name,
                         "\" matches no trainable parameter or optimizer state of the model");
  for (const auto& [name, rng] : rngs) {
    require<ConfigError>(rng != nullptr, w, ": Rng \"", name, "\" is null");
    require<FormatError>(stored_rngs.contains(name) && stored_rngs[name].is_string(), w, ": no state for Rng \"",
                         name, "\"");
    out.rng_states[name] = stored_rngs[name].template get<std::string>();
    require<FormatError>(out.rng_states[name].size() == 2 * sizeof(Rng), w, ": Rng \"", name,
                         "\" state has the wrong size for this build");
  }
  out.info.step = field(meta, "step", V::number_integer, w).get<std::int64_t>();
  out.info.extra = meta.contains("extra") ? meta["extra"] : nlohmann::json::object();
  return out;
}

inline std::string where(const char* op, const std::filesystem::path& path) {
  return detail::concat(op, " '", path.string(), "'");
}

// An optimizer's trainable parameters by name, and their shapes (what open_checked checks a file against).
template <class T, class Backend>
struct TrainableParameters {
  std::map<std::string, Parameter<T, Backend>*> params;
  std::map<std::string, Shape> shapes;
};
template <class T, class Backend>
TrainableParameters<T, Backend> trainable_parameters(const ParameterList<T, Backend>& list) {
  TrainableParameters<T, Backend> out;
  for (const auto& ref : list)
    if (ref.param->trainable) {
      out.params.emplace(ref.name, ref.param);
      out.shapes.emplace(ref.name, shape_of(ref.param->value));
    }
  return out;
}

}  // namespace detail::checkpoint

// Saves the optimizer's trainable parameters and AdamW state, the step counter, the Rngs and `extra`.
// (The CUDA optimizer's overload, in cuda/checkpoint.cuh, writes the same format.)
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
  save_safetensors(path, entries, dc::metadata(optimizer.config(), steps, info, rngs));
}

// Restores a checkpoint written by save_checkpoint into `optimizer`'s parameters and state and into the
// named Rngs; returns the step counter and `extra`. Nothing changes unless the whole file fits.
template <class T>
CheckpointInfo load_checkpoint(const std::filesystem::path& path, AdamW<T>& optimizer, const NamedRngs& rngs = {}) {
  namespace dc = detail::checkpoint;
  const std::string w = dc::where("load_checkpoint", path);
  const auto trainable = dc::trainable_parameters(optimizer.parameters());
  const dc::CheckedFile checked = dc::open_checked(path, trainable.shapes, rngs, w);

  for (const auto& [name, p] : trainable.params) checked.file.read_into(dc::model_prefix + name, p->value);
  optimizer.set_config(checked.config);
  auto& state = optimizer.state();
  state.clear();
  for (const auto& [name, step] : checked.steps) {
    auto& s = state[name];
    checked.file.read_into(dc::exp_avg_prefix + name, s.m);
    checked.file.read_into(dc::exp_avg_sq_prefix + name, s.v);
    s.step = step;
  }
  checked.restore_rngs(rngs, w);
  return checked.info;
}

// ---- PEFT adapters ---------------------------------------------------------------------------------------

// The fields of PEFT's LoraConfig that describe an adapter. `extra` is merged last (method-specific keys, e.g. the
// number of experts of a MoLE adapter); it may not override a key written here.
struct PeftLoraConfig {
  int r = 8;
  double lora_alpha = 8.0;
  double lora_dropout = 0.0;
  std::vector<std::string> target_modules;      // export: empty = derived from the LoRA parameters
  bool use_rslora = false;
  std::string bias = "none";
  std::string task_type = "CAUSAL_LM";          // empty: null
  std::string base_model_name_or_path;          // empty: null
  std::vector<std::string> modules_to_save;     // empty: null
  std::map<std::string, int> rank_pattern;      // module (dotted suffix) -> its rank, where it is not r
  std::map<std::string, double> alpha_pattern;  // module (dotted suffix) -> its alpha, where it is not lora_alpha
  nlohmann::json extra = nlohmann::json::object();

  // The keys to_json writes besides `extra` (from_json moves every other key of a file into `extra`).
  static constexpr const char* keys[] = {"peft_type",       "r",           "lora_alpha",       "lora_dropout",
                                         "target_modules",  "use_rslora",  "bias",             "task_type",
                                         "base_model_name_or_path",        "modules_to_save",  "rank_pattern",
                                         "alpha_pattern",   "inference_mode", "fan_in_fan_out", "init_lora_weights",
                                         "use_dora"};

  // PEFT's matching of a module path against a target or pattern key (taken literally, not as a regex).
  static bool matches(const std::string& path, const std::string& key) {
    return path == key || (path.size() > key.size() && path.ends_with(key) && path[path.size() - key.size() - 1] == '.');
  }
  int rank_for(const std::string& module) const {
    for (const auto& [key, rank] : rank_pattern)
      if (matches(module, key)) return rank;
    return r;
  }
  double alpha_for(const std::string& module) const {
    for (const auto& [key, alpha] : alpha_pattern)
      if (matches(module, key)) return alpha;
    return lora_alpha;
  }

  void validate() const {
    require<ConfigError>(r > 0, "PeftLoraConfig: rank r must be > 0 (got ", r, ")");
    require<ConfigError>(lora_alpha > 0, "PeftLoraConfig: lora_alpha must be > 0 (got ", lora_alpha, ")");
    require<ConfigError>(lora_dropout >= 0 && lora_dropout < 1, "PeftLoraConfig: lora_dropout must be in [0, 1) (got ",
                         lora_dropout, ")");
    require<ConfigError>(bias == "none" || bias == "all" || bias == "lora_only",
                         "PeftLoraConfig: bias must be \"none\", \"all\" or \"lora_only\" (got \"", bias, "\")");
    for (const auto& t : target_modules)
      require<ConfigError>(!t.empty(), "PeftLoraConfig: target_modules has an empty name");
    for (const auto& [key, rank] : rank_pattern)
      require<ConfigError>(rank > 0, "PeftLoraConfig: rank_pattern \"", key, "\" must be > 0 (got ", rank, ")");
    for (const auto& [key, alpha] : alpha_pattern)
      require<ConfigError>(alpha > 0, "PeftLoraConfig: alpha_pattern \"", key, "\" must be > 0 (got ", alpha, ")");
    require<ConfigError>(extra.is_object(), "PeftLoraConfig: extra must be a JSON object");
    for (const char* key : keys)
      require<ConfigError>(!extra.contains(key), "PeftLoraConfig: extra must not override \"", key, "\"");
  }

  nlohmann::json to_json() const {
    const auto or_null = [](const auto& v) { return v.empty() ? nlohmann::json(nullptr) : nlohmann::json(v); };
    nlohmann::json j = {{"peft_type", "LORA"},
                        {"r", r},
                        {"lora_alpha", lora_alpha},
                        {"lora_dropout", lora_dropout},
                        {"target_modules", target_modules},
                        {"use_rslora", use_rslora},
                        {"bias", bias},
                        {"task_type", or_null(task_type)},
                        {"base_model_name_or_path", or_null(base_model_name_or_path)},
                        {"modules_to_save", or_null(modules_to_save)},
                        {"rank_pattern", rank_pattern.empty() ? nlohmann::json::object() : nlohmann::json(rank_pattern)},
                        {"alpha_pattern",
                         alpha_pattern.empty() ? nlohmann::json::object() : nlohmann::json(alpha_pattern)},
                        {"inference_mode", true},
                        {"fan_in_fan_out", false},
                        {"init_lora_weights", true},
                        {"use_dora", false}};
    j.update(extra);
    return j;
  }

  // Reads an adapter_config.json object (PEFT's or ours); FormatError naming `where` and the field.
  static PeftLoraConfig from_json(const nlohmann::json& j, const std::string& where) {
    require<FormatError>(j.is_object(), where, ": adapter config is not a JSON object");
    const auto has = [&](const char* key) { return j.contains(key) && !j.at(key).is_null(); };
    const auto bad = [&](const char* key, const char* expected) {
      return FormatError(detail::concat(where, ": \"", key, "\" must be ", expected, ", got ", j.at(key).dump()));
    };
    require<FormatError>(j.contains("peft_type") && j["peft_type"] == "LORA", where, ": peft_type is ",
                         j.contains("peft_type") ? j["peft_type"].dump() : std::string("missing"),
                         ", expected \"LORA\"");
    PeftLoraConfig c;
    require<FormatError>(has("r"), where, ": adapter config has no \"r\"");
    if (!j["r"].is_number_integer()) throw bad("r", "an integer");
    c.r = j["r"].get<int>();
    require<FormatError>(has("lora_alpha"), where, ": adapter config has no \"lora_alpha\"");
    if (!j["lora_alpha"].is_number()) throw bad("lora_alpha", "a number");
    c.lora_alpha = j["lora_alpha"].get<double>();
    if (has("lora_dropout")) {
      if (!j["lora_dropout"].is_number()) throw bad("lora_dropout", "a number");
      c.lora_dropout = j["lora_dropout"].get<double>();
    }
    const auto strings = [&](const char* key, std::vector<std::string>& out) {
      if (!has(key)) return;
      const auto& v = j.at(key);
      if (v.is_string()) out = {v.get<std::string>()};  // PEFT also accepts one name (or a regex) as a string
      else if (v.is_array() && std::all_of(v.begin(), v.end(), [](const auto& e) { return e.is_string(); }))
        out = v.get<std::vector<std::string>>();
      else throw bad(key, "a list of strings");
    };
    strings("target_modules", c.target_modules);
    strings("modules_to_save", c.modules_to_save);
    const auto flag = [&](const char* key, bool fallback) {
      if (!has(key)) return fallback;
      if (!j.at(key).is_boolean()) throw bad(key, "true or false");
      return j.at(key).get<bool>();
    };
    const auto text = [&](const char* key, std::string fallback) {
      if (!j.contains(key)) return fallback;
      if (j.at(key).is_null()) return std::string();
      if (!j.at(key).is_string()) throw bad(key, "a string or null");
      return j.at(key).get<std::string>();
    };
    c.use_rslora = flag("use_rslora", false);
    c.bias = text("bias", "none");
    c.task_type = text("task_type", "");
    c.base_model_name_or_path = text("base_model_name_or_path", "");
    require<FormatError>(!flag("use_dora", false), where, ": DoRA adapters (use_dora) are not supported");
    require<FormatError>(!flag("fan_in_fan_out", false), where,
                         ": fan_in_fan_out adapters (transposed Conv1D weights) are not supported");
    if (has("rank_pattern")) {
      if (!j["rank_pattern"].is_object()) throw bad("rank_pattern", "an object");
      for (const auto& [key, v] : j["rank_pattern"].items()) {
        require<FormatError>(v.is_number_integer(), where, ": rank_pattern \"", key, "\" must be an integer");
        c.rank_pattern[key] = v.get<int>();
      }
    }
    if (has("alpha_pattern")) {
      if (!j["alpha_pattern"].is_object()) throw bad("alpha_pattern", "an object");
      for (const auto& [key, v] : j["alpha_pattern"].items()) {
        require<FormatError>(v.is_number(), where, ": alpha_pattern \"", key, "\" must be a number");
        c.alpha_pattern[key] = v.get<double>();
      }
    }
    for (const auto& [key, v] : j.items())
      if (std::find_if(std::begin(keys), std::end(keys), [&](const char* k) { return key == k; }) == std::end(keys))
        c.extra[key] = v;
    try {
      c.validate();
    } catch (const ConfigError& e) {
      throw FormatError(detail::concat(where, ": invalid adapter config: ", e.what()));
    }
    return c;
  }
};

// The PeftLoraConfig of a LoRA adapter config (anything with rank, alpha, dropout, use_rslora, such as
// LoRALinear::AdapterConfig); target_modules are left empty, for export_peft_adapter to derive.
template <class AdapterConfig>
PeftLoraConfig peft_lora_config(const AdapterConfig& lora) {
  PeftLoraConfig c;
  c.r = int(lora.rank);
  c.lora_alpha = lora.alpha;
  c.lora_dropout = lora.dropout;
  c.use_rslora = lora.use_rslora;
  return c;
}

struct PeftExportOptions {
  DType dtype = DType::F32;                   // stored precision of the tensors
  std::string prefix = "base_model.model.";   // PEFT's name of the wrapped model inside a PeftModel
  NameMap rename{};                           // parameter name -> stored name; replaces `prefix` when set
};

struct PeftLoadOptions {
  std::string prefix = "base_model.model.";   // as at export
  NameMap rename{};                           // parameter name -> stored name; replaces `prefix` when set
  // When set, the adapter's r, lora_alpha, use_rslora, bias, rank_pattern and alpha_pattern (and target_modules,
  // as a set, when non-empty here) must equal these: ConfigError otherwise.
  std::optional<PeftLoraConfig> expect{};
};

namespace detail::peft {

inline constexpr const char* metadata_key = "mixpeft.lora";  // the shape-defining config fields, in the weights

// A LoRA factor: the dotted path before its "lora_A" / "lora_B" component, and which factor.
struct LoraFactor {
  std::string module;
  bool is_a = true;
};
inline std::optional<LoraFactor> lora_factor(const std::string& name) {
  for (std::size_t start = 0; start < name.size();) {
    std::size_t end = name.find('.', start);
    if (end == std::string::npos) end = name.size();
    const std::string_view part = std::string_view(name).substr(start, end - start);
    if (part == "lora_A" || part == "lora_B") return LoraFactor{name.substr(0, start == 0 ? 0 : start - 1), part == "lora_A"};
    start = end + 1;
  }
  return std::nullopt;
}
// The rank of a LoRA factor: A is [r, in], B is [out, r], stacked experts [K, r, in] and [K, out, r]; 0 otherwise.
inline std::size_t factor_rank(const Shape& shape, bool is_a) {
  if (shape.size() == 3) return shape[is_a ? 1 : 2];
  return shape.size() == 2 ? shape[is_a ? 0 : 1] : 0;
}
inline std::string last_component(const std::string& module) {
  const auto dot = module.rfind('.');
  return dot == std::string::npos ? module : module.substr(dot + 1);
}
inline bool any_target_matches(const std::vector<std::string>& targets, const std::string& module) {
  return std::any_of(targets.begin(), targets.end(), [&](const auto& t) { return PeftLoraConfig::matches(module, t); });
}

// The first field (of those that shape an adapter) where a and b differ, described; empty when none does.
inline std::string difference(const PeftLoraConfig& a, const PeftLoraConfig& b, bool compare_targets) {
  const auto str = [](const auto& v) { return nlohmann::json(v).dump(); };
  if (a.r != b.r) return concat("r = ", a.r, " vs ", b.r);
  if (a.lora_alpha != b.lora_alpha) return concat("lora_alpha = ", a.lora_alpha, " vs ", b.lora_alpha);
  if (a.use_rslora != b.use_rslora) return concat("use_rslora = ", a.use_rslora, " vs ", b.use_rslora);
  if (a.bias != b.bias) return concat("bias = \"", a.bias, "\" vs \"", b.bias, "\"");
  if (a.rank_pattern != b.rank_pattern) return concat("rank_pattern = ", str(a.rank_pattern), " vs ", str(b.rank_pattern));
  if (a.alpha_pattern != b.alpha_pattern)
    return concat("alpha_pattern = ", str(a.alpha_pattern), " vs ", str(b.alpha_pattern));
  const std::set<std::string> ta(a.target_modules.begin(), a.target_modules.end()),
      tb(b.target_modules.begin(), b.target_modules.end());
  if (compare_targets && ta != tb) return concat("target_modules = ", str(ta), " vs ", str(tb));
  return {};
}

inline nlohmann::json shape_fields(const PeftLoraConfig& c) {
  const nlohmann::json all = c.to_json();
  nlohmann::json j = nlohmann::json::object();
  for (const char* key : {"peft_type", "r", "lora_alpha", "use_rslora", "bias", "target_modules", "rank_pattern",
                          "alpha_pattern"})
    j[key] = all[key];
  return j;
}

}  // namespace detail::peft

// Writes what Hugging Face PEFT's save_pretrained writes for a LoRA adapter, and returns the config written:
//   <dir>/adapter_model.safetensors   every trainable parameter, stored as prefix + name (or rename(name))
//   <dir>/adapter_config.json         config.to_json(), with target_modules derived when config has none
// ConfigError, before anything is written, when the list has no LoRA factor, a factor's rank differs from the
// config's rank for its module, given target_modules miss a LoRA module or name none, or two names collide.
template <class T>
PeftLoraConfig export_peft_adapter(const std::filesystem::path& dir, const ParameterList<T>& params,
                                   const PeftLoraConfig& config, const PeftExportOptions& options = {}) {
  namespace dp = detail::peft;
  config.validate();
  const std::string w = detail::concat("export_peft_adapter '", dir.string(), "'");
  PeftLoraConfig out = config;
  std::vector<std::string> modules, derived;  // LoRA module paths; their last components in first-seen order
  std::set<std::string> stored;
  for (const auto& ref : params) {
    if (!ref.param->trainable) continue;
    const std::string name = options.rename ? options.rename(ref.name) : options.prefix + ref.name;
    require<ConfigError>(stored.insert(name).second, w, ": two parameters are stored as \"", name, "\"");
    const auto factor = dp::lora_factor(ref.name);
    if (!factor) continue;
    require<ConfigError>(!factor->module.empty(), w, ": LoRA parameter \"", ref.name, "\" belongs to no module");
    const Shape shape = shape_of(ref.param->value);
    const std::size_t rank = dp::factor_rank(shape, factor->is_a);
    const int expected = config.rank_for(factor->module);
    require<ConfigError>(rank == std::size_t(expected), w, ": LoRA parameter \"", ref.name, "\" has shape ",
                         shape_string(shape), " (rank ", rank, ") but the config gives module \"", factor->module,
                         "\" rank ", expected);
    if (std::find(modules.begin(), modules.end(), factor->module) == modules.end()) modules.push_back(factor->module);
    const std::string target = dp::last_component(factor->module);
    if (std::find(derived.begin(), derived.end(), target) == derived.end()) derived.push_back(target);
  }
  require<ConfigError>(!modules.empty(), w, ": no trainable LoRA parameter (\"...lora_A...\", \"...lora_B...\") ",
                       "in the list");
  if (out.target_modules.empty()) {
    out.target_modules = derived;
  } else {
    for (const auto& m : modules)
      require<ConfigError>(dp::any_target_matches(out.target_modules, m), w, ": LoRA module \"", m,
                           "\" matches none of target_modules ", nlohmann::json(out.target_modules).dump());
    for (const auto& t : out.target_modules)
      require<ConfigError>(std::any_of(modules.begin(), modules.end(),
                                       [&](const auto& m) { return PeftLoraConfig::matches(m, t); }),
                           w, ": target module \"", t, "\" carries no LoRA parameter");
  }

  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  require<IoError>(!ec, w, ": cannot create the directory: ", ec.message());
  // Weights first, then the config, each replaced atomically. The weights carry the config's shape-defining fields,
  // so load_peft_adapter rejects a pair torn by a crash between the two (new weights, old different config).
  SaveParametersOptions save{.trainable_only = true,
                             .dtype = options.dtype,
                             .metadata = {{"format", "pt"}, {dp::metadata_key, dp::shape_fields(out).dump()}},
                             .rename = options.rename};
  if (!options.rename) save.rename = [&](const std::string& n) { return options.prefix + n; };
  save_parameters(dir / "adapter_model.safetensors", params, save);
  write_file_atomically(dir / "adapter_config.json", out.to_json().dump(2) + "\n");
  return out;
}

// Reads <dir>/adapter_config.json and <dir>/adapter_model.safetensors (ours, or PEFT's for LoRA) into the
// trainable parameters of `params` (found under prefix + name, or rename(name)); frozen parameters are left alone.
// Returns the adapter's config. Everything is checked before any value changes:
//   IoError      a file cannot be opened or read
//   FormatError  malformed or truncated files, peft_type not "LORA", a stored LoRA factor whose rank is not the
//                config's (or whose module matches no target module), weights exported with another config
//                (metadata "mixpeft.lora"), no tensor for a trainable parameter, a tensor matching none
//   ConfigError  the config differs from options.expect, or a LoRA factor of the model has another rank than the
//                adapter's config gives its module
//   ShapeError   a stored tensor's shape differs from its parameter's
template <class T>
PeftLoraConfig load_peft_adapter(const std::filesystem::path& dir, const ParameterList<T>& params,
                                 const PeftLoadOptions& options = {}) {
  namespace dp = detail::peft;
  const std::string w = detail::concat("load_peft_adapter '", dir.string(), "'");
  const auto config_path = dir / "adapter_config.json";
  const std::vector<char> text = read_file_bytes(config_path);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text.begin(), text.end());
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(detail::concat(w, ": adapter_config.json is not valid JSON (", e.what(), ")"));
  }
  const PeftLoraConfig config = PeftLoraConfig::from_json(j, w + ": adapter_config.json");
  if (options.expect) {
    const std::string diff = dp::difference(config, *options.expect, !options.expect->target_modules.empty());
    require<ConfigError>(diff.empty(), w, ": the adapter does not have the expected config (adapter vs expected: ",
                         diff, ")");
  }

  const SafetensorsFile file(dir / "adapter_model.safetensors");
  if (const auto it = file.metadata().find(dp::metadata_key); it != file.metadata().end()) {
    nlohmann::json exported;
    try {
      exported = nlohmann::json::parse(it->second);
    } catch (const nlohmann::json::exception& e) {
      throw FormatError(detail::concat(w, ": adapter_model.safetensors metadata \"", dp::metadata_key,
                                       "\" is not valid JSON (", e.what(), ")"));
    }
    const PeftLoraConfig stored = PeftLoraConfig::from_json(exported, w + ": adapter_model.safetensors metadata");
    const std::string diff = dp::difference(config, stored, true);
    require<FormatError>(diff.empty(), w, ": adapter_config.json does not belong to adapter_model.safetensors, which ",
                         "was exported with another config (config vs weights: ", diff, ")");
  }
  for (const auto& name : file.names()) {
    const auto factor = dp::lora_factor(name);
    if (!factor) continue;
    const Shape& shape = file.info(name).shape;
    const std::size_t rank = dp::factor_rank(shape, factor->is_a);
    require<FormatError>(rank == std::size_t(config.rank_for(factor->module)), w, ": tensor \"", name, "\" has shape ",
                         shape_string(shape), " (rank ", rank, ") but adapter_config.json gives its module rank ",
                         config.rank_for(factor->module));
    require<FormatError>(config.target_modules.empty() || dp::any_target_matches(config.target_modules, factor->module),
                         w, ": tensor \"", name, "\" adapts a module that matches none of target_modules ",
                         nlohmann::json(config.target_modules).dump());
  }

  // Check every trainable parameter against the file before changing anything.
  std::vector<std::pair<std::string, Parameter<T>*>> plan;  // stored name -> destination
  std::map<std::string, std::string> frozen;                // stored name -> parameter name
  std::set<std::string> used;
  for (const auto& ref : params) {
    const std::string stored = options.rename ? options.rename(ref.name) : options.prefix + ref.name;
    if (!ref.param->trainable) {
      frozen.emplace(stored, ref.name);
      continue;
    }
    require<ConfigError>(used.insert(stored).second, w, ": two parameters are stored as \"", stored, "\"");
    const Shape expected = shape_of(ref.param->value);
    if (const auto factor = dp::lora_factor(ref.name)) {
      const std::size_t rank = dp::factor_rank(expected, factor->is_a);
      require<ConfigError>(rank == std::size_t(config.rank_for(factor->module)), w, ": parameter \"", ref.name,
                           "\" has LoRA rank ", rank, " but the adapter's config gives module \"", factor->module,
                           "\" rank ", config.rank_for(factor->module));
    }
    require<FormatError>(file.contains(stored), w, ": no tensor \"", stored, "\" for trainable parameter \"", ref.name,
                         "\"");
    const Shape& found = file.info(stored).shape;
    require<ShapeError>(found == expected, w, ": tensor \"", stored, "\" has shape ", shape_string(found),
                        " but parameter \"", ref.name, "\" has shape ", shape_string(expected));
    plan.emplace_back(stored, ref.param);
  }
  for (const auto& name : file.names()) {
    if (used.count(name)) continue;
    const auto it = frozen.find(name);
    require<FormatError>(it == frozen.end(), w, ": tensor \"", name, "\" is for parameter \"",
                         it == frozen.end() ? std::string() : it->second, "\", which is frozen in the model");
    throw FormatError(detail::concat(w, ": tensor \"", name, "\" matches no trainable parameter of the model"));
  }

  for (auto& [stored, param] : plan) file.read_into(stored, param->value);
  return config;
}

}  // namespace mixpeft
