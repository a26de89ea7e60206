// mixpeft/cuda/checkpoint.cuh — training checkpoints of device models, in the format of train/checkpoint.hpp.
//
// save_checkpoint(path, cuda::AdamW<T>, info, rngs) and load_checkpoint(path, cuda::AdamW<T>, rngs) write and read
// the very file the CPU optimizer does, so a checkpoint moves between the backends (float <-> float,
// double <-> double, and bf16 device training <-> fp32 CPU training):
//   "model/<name>"                  T = float / double: the parameter, exactly. T = bf16: the fp32 master weights of
//                                   a parameter that has taken a step (its bf16 value is their rounding), otherwise
//                                   its bf16 value widened to fp32 (exact)
//   "optimizer/exp_avg/<name>"      m    (fp32 for bf16 parameters)
//   "optimizer/exp_avg_sq/<name>"   v
// Loading into a bf16 model: a parameter with moments gets master = the stored fp32 value and value = bf16(master)
// (round to nearest even, as every AdamW step writes it), so training resumes bit-identically; a parameter without
// moments gets value = bf16(stored) and takes its master from that value at its first step, as a fresh one does.
// Loading checks the whole file first (detail::checkpoint::open_checked) and reads every tensor to the host before
// the first device write, so a bad file changes nothing. Saving downloads every tensor (synchronising the current
// stream) and then replaces the file atomically. Trainer<T, Cuda>::save / resume call these by argument-dependent
// lookup; cuda/backend.cuh includes this header.
#pragma once

#include <cuda_bf16.h>

#include <deque>
#include <filesystem>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "mixpeft/core/parameter.hpp"
#include "mixpeft/core/rng.hpp"
#include "mixpeft/cuda/adamw.cuh"
#include "mixpeft/cuda/device_tensor.cuh"
#include "mixpeft/io/safetensors.hpp"
#include "mixpeft/train/checkpoint.hpp"

namespace mixpeft::cuda {

// Writes the trainable parameters and AdamW state of a device optimizer, the step counter, the Rngs and `extra`.
template <class T>
void save_checkpoint(const std::filesystem::path& path, const AdamW<T>& optimizer, const CheckpointInfo& info = {},
                     const NamedRngs& rngs = {}) {
  namespace dc = mixpeft::detail::checkpoint;
  using S = typename AdamW<T>::state_type;
  std::deque<Tensor<S>> host;  // the downloads; a deque keeps the entries' references valid as it grows
  std::vector<TensorEntry<S>> entries;
  const auto add = [&](std::string name, Tensor<S> values) {
    host.push_back(std::move(values));
    entries.push_back({std::move(name), host.back()});
  };
  nlohmann::json steps = nlohmann::json::object();
  for (const auto& ref : optimizer.parameters()) {
    if (!ref.param->trainable) continue;
    const auto it = optimizer.state().find(ref.name);
    const bool has_state = it != optimizer.state().end();
    if constexpr (std::is_same_v<T, __nv_bfloat16>)
      add(dc::model_prefix + ref.name, has_state ? download(it->second.master) : download_as<float>(ref.param->value));
    else
      add(dc::model_prefix + ref.name, download(ref.param->value));
    if (!has_state) continue;
    add(dc::exp_avg_prefix + ref.name, download(it->second.m));
    add(dc::exp_avg_sq_prefix + ref.name, download(it->second.v));
    steps[ref.name] = it->second.step;
  }
  save_safetensors(path, entries, dc::metadata(optimizer.config(), steps, info, rngs));
}

// Restores a checkpoint (written by either backend) into a device optimizer's parameters and state and into the
// named Rngs; returns the step counter and `extra`. Nothing changes unless the whole file fits.
template <class T>
CheckpointInfo load_checkpoint(const std::filesystem::path& path, AdamW<T>& optimizer, const NamedRngs& rngs = {}) {
  namespace dc = mixpeft::detail::checkpoint;
  using S = typename AdamW<T>::state_type;
  const std::string w = dc::where("load_checkpoint", path);
  const auto trainable = dc::trainable_parameters(optimizer.parameters());
  const dc::CheckedFile checked = dc::open_checked(path, trainable.shapes, rngs, w);
  const auto read = [&](const std::string& name) { return checked.file.read<S>(name); };
  std::map<std::string, Tensor<S>> values, m, v;
  for (const auto& [name, p] : trainable.params) values.emplace(name, read(dc::model_prefix + name));
  for (const auto& [name, step] : checked.steps) {
    m.emplace(name, read(dc::exp_avg_prefix + name));
    v.emplace(name, read(dc::exp_avg_sq_prefix + name));
  }

  optimizer.set_config(checked.config);
  auto& state = optimizer.state();
  state.clear();
  for (const auto& [name, step] : checked.steps) {
    auto& s = state[name];
    s.m = upload(m.at(name));
    s.v = upload(v.at(name));
    s.step = step;
  }
  for (const auto& [name, p] : trainable.params) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      const auto it = state.find(name);
      if (it != state.end()) {
        it->second.master = upload(values.at(name));
        convert(it->second.master, p->value);
      } else {
        convert(upload(values.at(name)), p->value);
      }
    } else {
      assign(p->value, upload(values.at(name)));
    }
  }
  checked.restore_rngs(rngs, w);
  return checked.info;
}

}  // namespace mixpeft::cuda
