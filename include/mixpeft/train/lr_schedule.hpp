// mixpeft/train/lr_schedule.hpp — learning-rate schedules as pure functions of the optimizer step.
//
// WarmupCosineLr (LaVIN's schedule, from MAE's lr_sched: 2 warm-up epochs, then half-cosine to min_lr):
//   step <  W:       lr = base * step / W                                       (linear from 0)
//   W <= step < S:   lr = min + (base - min) * (1 + cos(pi * (step - W) / (S - W))) / 2
//   step >= S:       lr = min
// with W = warmup_steps and S = total_steps (for LaVIN: W = 2 * steps_per_epoch, S = 20 * steps_per_epoch,
// min = 0). ConstantLr returns the same rate at every step. Both are callables `double(std::int64_t)`,
// so a trainer can hold either as std::function<double(std::int64_t)>.
#pragma once

#include <cmath>
#include <cstdint>
#include <numbers>

#include "mixpeft/core/error.hpp"

namespace mixpeft {

class ConstantLr {
 public:
  explicit ConstantLr(double lr) : lr_(lr) {
    require<ConfigError>(std::isfinite(lr) && lr >= 0, "ConstantLr: lr must be finite and >= 0 (got ", lr, ")");
  }
  double operator()(std::int64_t) const { return lr_; }

 private:
  double lr_;
};

class WarmupCosineLr {
 public:
  WarmupCosineLr(double base_lr, std::int64_t warmup_steps, std::int64_t total_steps, double min_lr = 0.0)
      : base_(base_lr), min_(min_lr), warmup_(warmup_steps), total_(total_steps) {
    require<ConfigError>(std::isfinite(base_lr) && base_lr >= 0, "WarmupCosineLr: base_lr must be finite and >= 0 (got ",
                         base_lr, ")");
    require<ConfigError>(std::isfinite(min_lr) && min_lr >= 0 && min_lr <= base_lr,
                         "WarmupCosineLr: min_lr must be in [0, base_lr] (got ", min_lr, ", base_lr ", base_lr, ")");
    require<ConfigError>(total_steps > 0, "WarmupCosineLr: total_steps must be > 0 (got ", total_steps, ")");
    require<ConfigError>(warmup_steps >= 0 && warmup_steps <= total_steps,
                         "WarmupCosineLr: warmup_steps must be in [0, total_steps] (got ", warmup_steps,
                         ", total_steps ", total_steps, ")");
  }

  double operator()(std::int64_t step) const {
    require<ConfigError>(step >= 0, "WarmupCosineLr: step must be >= 0 (got ", step, ")");
    if (step < warmup_) return base_ * double(step) / double(warmup_);
    if (step >= total_) return min_;
    const double progress = double(step - warmup_) / double(total_ - warmup_);
    return min_ + (base_ - min_) * 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
  }

  double base_lr() const { return base_; }
  double min_lr() const { return min_; }
  std::int64_t warmup_steps() const { return warmup_; }
  std::int64_t total_steps() const { return total_; }

 private:
  double base_, min_;
  std::int64_t warmup_, total_;
};

}  // namespace mixpeft
