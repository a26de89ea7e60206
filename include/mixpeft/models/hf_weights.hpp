// mixpeft/models/hf_weights.hpp — pretrained backbones from Hugging Face safetensors checkpoints.
//
// load_hf_weights copies every base (pretrained) parameter of a Llama or ClipVit from one or more safetensors
// files (a sharded checkpoint is a list of files) by its Hugging Face name, converting F32 / F16 / BF16 / F64 to
// the model's scalar type. PEFT modules (LoRA, experts, routers, MM-Adapters) are not in such checkpoints and
// keep their initial values. Everything is checked before any value changes:
//   FormatError   a parameter has no tensor in any file (all missing names listed), a tensor is in two files,
//                 a tensor is not floating point, or (allow_unexpected = false) a tensor matches no parameter
//   ShapeError    a stored shape differs from the parameter's (both shapes named)
// Tensors that match no parameter are ignored by default: checkpoints carry extra entries (the CLIP text tower,
// position_ids buffers, rotary inv_freq).
// The CLIP patch embedding is a Conv2d weight [D, C, P, P] on disk and a flattened linear weight [D, C P P] in
// ClipVit; both have the same row-major bytes, so it is checked as [D, C, P, P] and reshaped.
// save_hf_weights writes the base parameters back under the same names and layouts (F32 by default).
// options.prefix prepends a path to every name (e.g. "model.vision_tower.vision_tower" in LLaVA checkpoints).
#pragma once

#include <cstddef>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "mixpeft/core/error.hpp"
#include "mixpeft/core/parameter.hpp"
#include "mixpeft/core/tensor.hpp"
#include "mixpeft/io/dtype.hpp"
#include "mixpeft/io/safetensors.hpp"
#include "mixpeft/models/llama.hpp"
#include "mixpeft/models/vit.hpp"

namespace mixpeft {

struct HfLoadOptions {
  std::string prefix;            // prepended to every parameter name
  bool allow_unexpected = true;  // tensors that match no parameter are ignored
};

namespace detail::hf {

// A parameter and the shape its tensor has on disk (differs from the value's shape only for the patch conv).
template <class T>
struct Target {
  std::string name;
  Parameter<T>* param;
  Shape stored_shape;
};

template <class T>
std::vector<Target<T>> targets(const ParameterList<T>& list, const std::string& conv_name, const Shape& conv_shape) {
  std::vector<Target<T>> out;
  for (const auto& ref : list)
    out.push_back({ref.name, ref.param, ref.name == conv_name ? conv_shape : shape_of(ref.param->value)});
  return out;
}

template <class T>
LoadReport load(const std::vector<std::filesystem::path>& paths, const std::vector<Target<T>>& targets,
                const HfLoadOptions& options) {
  require<ConfigError>(!paths.empty(), "load_hf_weights: no checkpoint files given");
  std::vector<SafetensorsFile> files;
  for (const auto& p : paths) files.emplace_back(p);
  const std::string where = concat("load_hf_weights '", paths.front().string(), "'",
                                   paths.size() > 1 ? concat(" (+", paths.size() - 1, " more)") : std::string());
  std::map<std::string, std::size_t> owner;  // tensor name -> file index
  for (std::size_t f = 0; f < files.size(); ++f)
    for (const auto& name : files[f].names()) {
      const auto [it, fresh] = owner.emplace(name, f);
      require<FormatError>(fresh, where, ": tensor \"", name, "\" is in both '", paths[it->second].string(),
                           "' and '", paths[f].string(), "'");
    }

  LoadReport report;
  std::set<std::string> used;
  for (const auto& t : targets) {
    const auto it = owner.find(t.name);
    if (it == owner.end()) {
      report.missing.push_back(t.name);
      continue;
    }
    const TensorInfo& info = files[it->second].info(t.name);
    require<FormatError>(is_floating(info.dtype), where, ": tensor \"", t.name, "\" has dtype ",
                         dtype_name(info.dtype), ", expected a floating-point type (F32, F16, BF16, F64)");
    require<ShapeError>(info.shape == t.stored_shape, where, ": tensor \"", t.name, "\" has shape ",
                        shape_string(info.shape), " but the model expects ", shape_string(t.stored_shape));
    used.insert(t.name);
    report.loaded.push_back(t.name);
  }
  for (const auto& [name, f] : owner)
    if (!used.count(name)) report.unexpected.push_back(name);
  require<FormatError>(report.missing.empty(), where, ": no tensor for parameter(s) ",
                       detail::safetensors::name_list(report.missing));
  require<FormatError>(options.allow_unexpected || report.unexpected.empty(), where,
                       ": tensor(s) that match no parameter: ", detail::safetensors::name_list(report.unexpected));
  for (const auto& t : targets) {
    const Shape shape = shape_of(t.param->value);
    files[owner.at(t.name)].read_into(t.name, t.param->value);
    t.param->value.reshape(shape);
  }
  return report;
}

template <class T>
void save(const std::filesystem::path& path, const std::vector<Target<T>>& targets, DType dtype) {
  std::vector<Tensor<T>> stored;  // values in their on-disk shapes
  stored.reserve(targets.size());
  std::vector<TensorEntry<T>> entries;
  for (const auto& t : targets) {
    Tensor<T>& v = stored.emplace_back(t.param->value);
    v.reshape(t.stored_shape);
    entries.push_back({t.name, v, dtype});
  }
  save_safetensors(path, entries);
}

template <class T>
std::vector<Target<T>> llama_targets(Llama<T>& model, const std::string& prefix) {
  ParameterList<T> list;
  model.collect_base_parameters(list, prefix);
  return targets(list, "", {});
}

template <class T>
std::vector<Target<T>> vit_targets(ClipVit<T>& model, const std::string& prefix) {
  ParameterList<T> list;
  model.collect_base_parameters(list, prefix);
  const auto& c = model.config();
  return targets(list, join_name(prefix, "vision_model.embeddings.patch_embedding.weight"),
                 Shape{c.dim, c.channels, c.patch, c.patch});
}

}  // namespace detail::hf

template <class T>
LoadReport load_hf_weights(Llama<T>& model, const std::vector<std::filesystem::path>& files,
                           const HfLoadOptions& options = {}) {
  return detail::hf::load(files, detail::hf::llama_targets(model, options.prefix), options);
}
template <class T>
LoadReport load_hf_weights(ClipVit<T>& model, const std::vector<std::filesystem::path>& files,
                           const HfLoadOptions& options = {}) {
  return detail::hf::load(files, detail::hf::vit_targets(model, options.prefix), options);
}
template <class Model>
LoadReport load_hf_weights(Model& model, const std::filesystem::path& file, const HfLoadOptions& options = {}) {
  return load_hf_weights(model, std::vector<std::filesystem::path>{file}, options);
}

template <class T>
void save_hf_weights(Llama<T>& model, const std::filesystem::path& path, DType dtype = DType::F32,
                     const std::string& prefix = "") {
  detail::hf::save(path, detail::hf::llama_targets(model, prefix), dtype);
}
template <class T>
void save_hf_weights(ClipVit<T>& model, const std::filesystem::path& path, DType dtype = DType::F32,
                     const std::string& prefix = "") {
  detail::hf::save(path, detail::hf::vit_targets(model, prefix), dtype);
}

}  // namespace mixpeft
