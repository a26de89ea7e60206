// mixpeft/train/trainer.hpp — a small generic training loop: accumulation, schedule, clipping, AdamW, checkpoints.
//
// One optimizer step over k micro-batches (step t = 0, 1, ...; t counts the steps taken so far):
//   zero the gradients of the trainable parameters
//   for each micro-batch i:  r_i = loss_and_backward(batch_i)        (backward accumulates into Parameter::grad)
//   g <- g / k                                                       (the mean over micro-batches)
//   n = ||g||  (global norm, before clipping);  if clip_norm: g <- g * clip_norm / (n + 1e-6) when n > clip_norm
//   lr = schedule(t);  AdamW step with lr;  t <- t + 1
//   report: loss = mean_i r_i.loss, lr, n, tokens = sum_i r_i.tokens, seconds, tokens per second
// With micro-batches that hold equally many loss tokens, the mean of their losses is the loss of the whole batch,
// so k micro-batches give the same update as one batch of all their samples.
// Models: anything with `loss_and_backward(batch)` returning a report with `.loss` (convertible to double) and
// `.tokens` (to std::size_t) — Lavin, LlavaMole or a lambda (step() takes any such callable).
// Checkpoints (train/checkpoint.hpp): save() writes the trainable parameters, AdamW state, the step counter and the
// named Rngs (rngs_of(model): dropout and router noise, plus any data-order Rng of the caller); resume() restores
// them, so training continues bit-identically (the schedule is a function of the step, and data order is the
// caller's: next_batches(t) in run()).
// Only trainable parameters are handed to AdamW; frozen ones are never read or written.
// Backends: Trainer<T, Cuda> steps a device model with cuda::AdamW (fp32 master weights for bf16) and the device
// gradient norm; its checkpoints (cuda/checkpoint.cuh) have the CPU's format, so a run can resume on either backend.
#pragma once

#include <chrono>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "mixpeft/core/error.hpp"
#include "mixpeft/core/parameter.hpp"
#include "mixpeft/core/rng.hpp"
#include "mixpeft/train/adamw.hpp"
#include "mixpeft/train/checkpoint.hpp"
#include "mixpeft/train/grad_clip.hpp"

namespace mixpeft {

// What one loss_and_backward call reports.
template <class R>
concept LossReport = requires(const R& r) {
  { r.loss } -> std::convertible_to<double>;
  { r.tokens } -> std::convertible_to<std::size_t>;
};

// A callable that runs forward and backward on one micro-batch.
template <class F, class Batch>
concept LossFunction = std::invocable<F&, const Batch&> && LossReport<std::invoke_result_t<F&, const Batch&>>;

// A model with loss_and_backward(batch).
template <class M, class Batch>
concept LossModel = requires(M& model, const Batch& batch) {
  { model.loss_and_backward(batch) } -> LossReport;
};

// The named Rngs of anything with collect_rngs(list, prefix) (the counterpart of parameters_of), for save/resume.
template <class Module>
NamedRngs rngs_of(Module& owner, const std::string& prefix = "") {
  NamedRngs list;
  owner.collect_rngs(list, prefix);
  return list;
}

struct TrainerConfig {
  AdamWConfig adamw{};                         // its lr is replaced by the schedule's at every step
  std::function<double(std::int64_t)> schedule{};  // lr at step t (WarmupCosineLr, ConstantLr); empty: adamw.lr
  std::optional<double> clip_norm{};           // max global gradient norm; nullopt: no clipping
};

// One optimizer step, as the callback sees it.
struct TrainStep {
  std::int64_t step = 0;     // steps taken, this one included
  double loss = 0;           // mean over the micro-batches
  double lr = 0;
  double grad_norm = 0;      // before clipping
  std::size_t micro_batches = 0;
  std::size_t tokens = 0;
  double seconds = 0;
  double tokens_per_second = 0;
};

template <class T, class Backend = Cpu>
class Trainer {
 public:
  using Callback = std::function<void(const TrainStep&)>;
  using Optimizer = typename Backend::template optimizer<T>;  // AdamW (cuda::AdamW on the CUDA backend)

  // params: the model's parameters (frozen ones are left out).
  Trainer(const ParameterList<T, Backend>& params, TrainerConfig config)
      : config_(std::move(config)), optimizer_(trainable_only(params), config_.adamw) {
    if (config_.clip_norm)
      require<ConfigError>(*config_.clip_norm > 0, "Trainer: clip_norm must be > 0 (got ", *config_.clip_norm, ")");
  }

  // One optimizer step; loss_and_backward(batch) runs forward and backward on one micro-batch.
  template <class Batch, class F>
    requires LossFunction<F, Batch>
  TrainStep step(F&& loss_and_backward, std::span<const Batch> micro_batches) {
    require<ConfigError>(!micro_batches.empty(), "Trainer::step: no micro-batches");
    const auto start = std::chrono::steady_clock::now();
    optimizer_.zero_grad();
    TrainStep s;
    s.micro_batches = micro_batches.size();
    for (const Batch& batch : micro_batches) {
      const auto r = loss_and_backward(batch);
      s.loss += double(r.loss);
      s.tokens += std::size_t(r.tokens);
    }
    const double k = double(micro_batches.size());
    s.loss /= k;
    if (micro_batches.size() > 1) scale_grads(optimizer_.parameters(), 1.0 / k);
    s.grad_norm = config_.clip_norm ? clip_grad_norm(optimizer_.parameters(), *config_.clip_norm)
                                    : grad_norm(optimizer_.parameters());
    s.lr = lr_at(step_);
    optimizer_.step(s.lr);
    s.step = ++step_;
    s.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    s.tokens_per_second = s.seconds > 0 ? double(s.tokens) / s.seconds : 0.0;
    return s;
  }

  template <class Batch, class Model>
    requires LossModel<Model, Batch>
  TrainStep step(Model& model, std::span<const Batch> micro_batches) {
    return step<Batch>([&](const Batch& b) { return model.loss_and_backward(b); }, micro_batches);
  }

  // Steps until step() == last_step; next_batches(t) gives the micro-batches of step t; on_step sees each step.
  template <class Batch, class ModelOrFunction>
  void run(ModelOrFunction&& model, std::int64_t last_step,
           const std::function<std::vector<Batch>(std::int64_t)>& next_batches, const Callback& on_step = {}) {
    while (step_ < last_step) {
      const std::vector<Batch> batches = next_batches(step_);
      const TrainStep s = step<Batch>(model, std::span<const Batch>(batches));
      if (on_step) on_step(s);
    }
  }

  // Writes a checkpoint (trainable parameters, AdamW state, step counter, the named Rngs, extra).
  void save(const std::filesystem::path& path, const NamedRngs& rngs = {},
            nlohmann::json extra = nlohmann::json::object()) const {
    save_checkpoint(path, optimizer_, CheckpointInfo{step_, std::move(extra)}, rngs);
  }
  // Restores a checkpoint written by save(); returns its extra.
  nlohmann::json resume(const std::filesystem::path& path, const NamedRngs& rngs = {}) {
    CheckpointInfo info = load_checkpoint(path, optimizer_, rngs);
    step_ = info.step;
    return info.extra;
  }

  std::int64_t steps() const { return step_; }
  double lr_at(std::int64_t step) const { return config_.schedule ? config_.schedule(step) : config_.adamw.lr; }
  Optimizer& optimizer() { return optimizer_; }
  const TrainerConfig& config() const { return config_; }

 private:
  static ParameterList<T, Backend> trainable_only(const ParameterList<T, Backend>& params) {
    ParameterList<T, Backend> out;
    for (const auto& ref : params)
      if (ref.param->trainable) out.push_back(ref);
    require<ConfigError>(!out.empty(), "Trainer: the model has no trainable parameters");
    return out;
  }

  TrainerConfig config_;
  Optimizer optimizer_;
  std::int64_t step_ = 0;
};

}  // namespace mixpeft
