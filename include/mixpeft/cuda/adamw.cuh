// mixpeft/cuda/adamw.cuh — AdamW (train/adamw.hpp) on device parameters: one fused kernel per parameter.
//
// For a parameter p with gradient g at its step t = 1, 2, ... (the CPU formulas, term for term):
//   m <- b1 m + c1 g                       b1 = beta1, c1 = 1 - beta1
//   v <- b2 v + (c2 g) g                   b2 = beta2, c2 = 1 - beta2
//   p <- p decay - (step_size m) / (sqrt(v) / bias2_sqrt + eps)
//   decay = 1 - lr wd where p.weight_decay is set, else 1; step_size = lr / (1 - beta1^t); bias2_sqrt = sqrt(1 - beta2^t)
// The scalars (AdamWScalars, from adamw_scalars) are computed on the host in double and rounded to the state type
// exactly as the CPU does; nothing is read back, so a step never synchronises. Element updates use the
// round-to-nearest intrinsics (__fmul_rn, __fdiv_rn, __fsqrt_rn, ...), which nvcc never contracts into FMAs and
// --use_fast_math does not approximate: the device evaluates the CPU's expression in the CPU's order, so it matches
// a CPU build without FMA contraction bit for bit (with contraction, to a few ulp).
//
//   adamw_update(p, g, m, v, s)              T = float or double: p, m, v updated in place; all share one shape.
//   adamw_update(master, g, m, v, s, w)      mixed precision: fp32 master weights, m and v; g bf16; the bf16 copy
//                                            w = bf16(master) (round to nearest even) written by the same kernel.
// Shapes: any; g, m, v (and w, resized) share the parameter's shape. 16-byte packs when every pointer is aligned
// (8 bytes for the bf16 arrays of the mixed kernel), element by element otherwise and for the tail.
//
// cuda::AdamW<T> mirrors mixpeft::AdamW<T>'s API over a ParameterList<T, Cuda> (state keyed by name, created at a
// parameter's first step, frozen parameters never touched, step(lr) for schedules, gradients left as they are).
// T = float or double: m, v are T. T = __nv_bfloat16: the state holds an fp32 master copy (taken from the bf16 value
// at the first step) and fp32 m, v; each step updates the master and rewrites the bf16 value from it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include "mixpeft/core/error.hpp"
#include "mixpeft/core/parameter.hpp"
#include "mixpeft/cuda/backend.cuh"
#include "mixpeft/cuda/device_tensor.cuh"
#include "mixpeft/cuda/elementwise.cuh"
#include "mixpeft/cuda/error.cuh"
#include "mixpeft/cuda/kernel_utils.cuh"
#include "mixpeft/train/adamw.hpp"

namespace mixpeft::cuda {

template <class S>
struct AdamWScalars {
  S decay, step_size, bias2_sqrt, eps, b1, b2, c1, c2;
};

// The CPU's per-step scalars for step t >= 1 (bias corrections in double, then rounded to S).
template <class S>
AdamWScalars<S> adamw_scalars(const AdamWConfig& config, std::int64_t step, bool weight_decay) {
  static_assert(std::is_same_v<S, float> || std::is_same_v<S, double>, "adamw_scalars: S is float or double");
  require<ConfigError>(step >= 1, "adamw_scalars: step must be >= 1 (got ", step, ")");
  const double bias1 = 1.0 - std::pow(config.beta1, double(step));
  const double bias2 = 1.0 - std::pow(config.beta2, double(step));
  return {weight_decay ? S(1.0 - config.lr * config.weight_decay) : S(1),
          S(config.lr / bias1),
          S(std::sqrt(bias2)),
          S(config.eps),
          S(config.beta1),
          S(config.beta2),
          S(1.0 - config.beta1),
          S(1.0 - config.beta2)};
}

namespace detail::adamw {

__device__ inline float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ inline double mul(double a, double b) { return __dmul_rn(a, b); }
__device__ inline float add(float a, float b) { return __fadd_rn(a, b); }
__device__ inline double add(double a, double b) { return __dadd_rn(a, b); }
__device__ inline float sub(float a, float b) { return __fsub_rn(a, b); }
__device__ inline double sub(double a, double b) { return __dsub_rn(a, b); }
__device__ inline float divide(float a, float b) { return __fdiv_rn(a, b); }
__device__ inline double divide(double a, double b) { return __ddiv_rn(a, b); }
__device__ inline float root(float a) { return __fsqrt_rn(a); }
__device__ inline double root(double a) { return __dsqrt_rn(a); }

template <class S>
__device__ inline void update(S& w, S& m, S& v, S g, const AdamWScalars<S>& s) {
  m = add(mul(s.b1, m), mul(s.c1, g));
  v = add(mul(s.b2, v), mul(mul(s.c2, g), g));
  w = sub(mul(w, s.decay), divide(mul(s.step_size, m), add(divide(root(v), s.bias2_sqrt), s.eps)));
}

// G: the gradient's type (S, or bf16); Copy: also write bf16(w) to `copy`.
template <class S, class G, bool Copy, int V>
__global__ void adamw_kernel(std::size_t n, S* __restrict__ w, S* __restrict__ m, S* __restrict__ v,
                             const G* __restrict__ g, __nv_bfloat16* __restrict__ copy, AdamWScalars<S> s) {
  using cuda::detail::Pack;
  const std::size_t packs = (n + V - 1) / V;
  for (std::size_t p = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; p < packs;
       p += std::size_t(gridDim.x) * blockDim.x) {
    const std::size_t base = p * V;
    if (base + V <= n) {
      Pack<S, V> pw = *reinterpret_cast<const Pack<S, V>*>(w + base);
      Pack<S, V> pm = *reinterpret_cast<const Pack<S, V>*>(m + base);
      Pack<S, V> pv = *reinterpret_cast<const Pack<S, V>*>(v + base);
      const Pack<G, V> pg = *reinterpret_cast<const Pack<G, V>*>(g + base);
#pragma unroll
      for (int j = 0; j < V; ++j) update(pw.v[j], pm.v[j], pv.v[j], S(widen(pg.v[j])), s);
      *reinterpret_cast<Pack<S, V>*>(w + base) = pw;
      *reinterpret_cast<Pack<S, V>*>(m + base) = pm;
      *reinterpret_cast<Pack<S, V>*>(v + base) = pv;
      if constexpr (Copy) {
        Pack<__nv_bfloat16, V> pc;
#pragma unroll
        for (int j = 0; j < V; ++j) pc.v[j] = __float2bfloat16_rn(float(pw.v[j]));
        *reinterpret_cast<Pack<__nv_bfloat16, V>*>(copy + base) = pc;
      }
    } else {
      for (std::size_t i = base; i < n; ++i) {
        S wi = w[i], mi = m[i], vi = v[i];
        update(wi, mi, vi, S(widen(g[i])), s);
        w[i] = wi;
        m[i] = mi;
        v[i] = vi;
        if constexpr (Copy) copy[i] = __float2bfloat16_rn(float(wi));
      }
    }
  }
}

// Raw-pointer launcher (the tensor overloads check shapes first). copy is null unless Copy.
template <class S, class G, bool Copy>
void launch(const char* op, std::size_t n, S* w, S* m, S* v, const G* g, __nv_bfloat16* copy,
            const AdamWScalars<S>& s) {
  if (n == 0) return;
  constexpr int V = int(16 / sizeof(S));  // float: 4, double: 2
  bool aligned = is_aligned(w, 16) && is_aligned(m, 16) && is_aligned(v, 16) && is_aligned(g, sizeof(G) * V);
  if constexpr (Copy) aligned = aligned && is_aligned(copy, sizeof(__nv_bfloat16) * V);
  constexpr unsigned block = 256;
  const cudaStream_t stream = current_stream();
  if (aligned)
    adamw_kernel<S, G, Copy, V><<<grid_size((n + V - 1) / V, block), block, 0, stream>>>(n, w, m, v, g, copy, s);
  else
    adamw_kernel<S, G, Copy, 1><<<grid_size(n, block), block, 0, stream>>>(n, w, m, v, g, copy, s);
  check_launch(op);
}

template <class P, class G, class S>
void check_shapes(std::string_view op, const DeviceTensor<P>& param, const DeviceTensor<G>& grad,
                  const DeviceTensor<S>& m, const DeviceTensor<S>& v) {
  expect_same_shape(op, "grad", grad, "param", param);
  expect_same_shape(op, "m", m, "param", param);
  expect_same_shape(op, "v", v, "param", param);
}

}  // namespace detail::adamw

// One AdamW step on a float or double parameter: param, m, v updated in place from grad.
template <class T>
void adamw_update(DeviceTensor<T>& param, const DeviceTensor<T>& grad, DeviceTensor<T>& m, DeviceTensor<T>& v,
                  const AdamWScalars<T>& s) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "adamw_update: float or double parameters (bf16: the mixed-precision overload)");
  detail::adamw::check_shapes("adamw_update", param, grad, m, v);
  detail::adamw::launch<T, T, false>("adamw_update", param.size(), param.data(), m.data(), v.data(), grad.data(),
                                     nullptr, s);
}

// Mixed precision: fp32 master, m, v updated from a bf16 gradient; weights = bf16(master) (resized to its shape).
inline void adamw_update(DeviceTensor<float>& master, const DeviceTensor<__nv_bfloat16>& grad, DeviceTensor<float>& m,
                         DeviceTensor<float>& v, const AdamWScalars<float>& s, DeviceTensor<__nv_bfloat16>& weights) {
  detail::adamw::check_shapes("adamw_update (mixed precision)", master, grad, m, v);
  resize_to(weights, shape_of(master));
  detail::adamw::launch<float, __nv_bfloat16, true>("adamw_update (mixed precision)", master.size(), master.data(),
                                                    m.data(), v.data(), grad.data(), weights.data(), s);
}

template <class T>
class AdamW {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, __nv_bfloat16>,
                "cuda::AdamW: float, double or __nv_bfloat16 parameters");
  static constexpr bool mixed = std::is_same_v<T, __nv_bfloat16>;

 public:
  using state_type = std::conditional_t<mixed, float, T>;

  struct State {
    DeviceTensor<state_type> m;       // first moment, shape of the parameter
    DeviceTensor<state_type> v;       // second moment
    DeviceTensor<state_type> master;  // bf16 parameters: the fp32 master weights; empty otherwise
    std::int64_t step = 0;            // steps taken by this parameter
  };

  explicit AdamW(ParameterList<T, Cuda> params, AdamWConfig config = {}) : params_(std::move(params)) {
    set_config(config);
    std::set<std::string> seen;
    for (const auto& ref : params_)
      require<ConfigError>(seen.insert(ref.name).second, "AdamW: duplicate parameter name \"", ref.name, "\"");
  }

  const AdamWConfig& config() const { return config_; }
  void set_config(const AdamWConfig& config) {
    config.validate();
    config_ = config;
  }
  void set_lr(double lr) {
    AdamWConfig c = config_;
    c.lr = lr;
    set_config(c);
  }

  const ParameterList<T, Cuda>& parameters() const { return params_; }
  std::map<std::string, State>& state() { return state_; }
  const std::map<std::string, State>& state() const { return state_; }

  void zero_grad() { zero_grads(params_); }

  void step(double lr) {
    set_lr(lr);
    step();
  }

  void step() {
    for (const auto& ref : params_) {
      Parameter<T, Cuda>& p = *ref.param;
      if (!p.trainable) continue;
      expect_same_shape("AdamW", ref.name + ".grad", p.grad, ref.name, p.value);
      State& s = state_for(ref.name, p);
      ++s.step;
      const auto scalars = adamw_scalars<state_type>(config_, s.step, p.weight_decay);
      if constexpr (mixed) adamw_update(s.master, p.grad, s.m, s.v, scalars, p.value);
      else adamw_update(p.value, p.grad, s.m, s.v, scalars);
    }
  }

 private:
  State& state_for(const std::string& name, const Parameter<T, Cuda>& p) {
    auto [it, created] = state_.try_emplace(name);
    State& s = it->second;
    if (created) {
      s.m = DeviceTensor<state_type>(shape_of(p.value));
      s.v = DeviceTensor<state_type>(shape_of(p.value));
      set_zero(s.m);
      set_zero(s.v);
      if constexpr (mixed) convert(p.value, s.master);
    }
    expect_same_shape("AdamW", "state of " + name, s.m, name, p.value);
    expect_same_shape("AdamW", "state of " + name, s.v, name, p.value);
    if constexpr (mixed) expect_same_shape("AdamW", "master weights of " + name, s.master, name, p.value);
    return s;
  }

  ParameterList<T, Cuda> params_;
  AdamWConfig config_;
  std::map<std::string, State> state_;
};

}  // namespace mixpeft::cuda
