// mixpeft/cuda/backend.cuh — the CUDA backend tag, and every CUDA op (include this one header).
//
// `Layer<T, Cuda>` stores its parameters and activations as cuda::DeviceTensor<T>; its unqualified op calls
// (linear_forward(x, W, b, y), rmsnorm_backward(...), resize_to(t, shape), ...) then resolve by
// argument-dependent lookup to the overloads in namespace mixpeft::cuda declared by the headers below.
// Ops whose CPU versions take a host-side cache or table type have device counterparts, named by the
// aliases here so that generic code can spell them through the backend:
//   typename Backend::template attention_cache<T>, cross_entropy_cache<T>, rope_table<T>, optimizer<T>.
// The ids of embedding and the targets of cross-entropy stay host tensors on both backends.
// Parameters are initialised on the host (the same Rng draws as on the CPU) and moved here with
// Cuda::from_host<T>(host) (an upload on the current stream; a float host tensor is rounded once to a 16-bit T);
// Cuda::zeros<T>(shape) is a zeroed device tensor.
#pragma once

#include "mixpeft/core/backend.hpp"
#include "mixpeft/cuda/activations.cuh"
#include "mixpeft/cuda/attention.cuh"
#include "mixpeft/cuda/balance_loss.cuh"
#include "mixpeft/cuda/class_token.cuh"
#include "mixpeft/cuda/cross_entropy.cuh"
#include "mixpeft/cuda/device_tensor.cuh"
#include "mixpeft/cuda/dropout.cuh"
#include "mixpeft/cuda/elementwise.cuh"
#include "mixpeft/cuda/embedding.cuh"
#include "mixpeft/cuda/grad_clip.cuh"
#include "mixpeft/cuda/greedy.cuh"
#include "mixpeft/cuda/grouped_lora.cuh"
#include "mixpeft/cuda/grouped_projection.cuh"
#include "mixpeft/cuda/layernorm.cuh"
#include "mixpeft/cuda/matmul.cuh"
#include "mixpeft/cuda/patchify.cuh"
#include "mixpeft/cuda/rmsnorm.cuh"
#include "mixpeft/cuda/rope.cuh"
#include "mixpeft/cuda/routed_mix.cuh"
#include "mixpeft/cuda/router.cuh"
#include "mixpeft/cuda/softmax.cuh"
#include "mixpeft/cuda/token_rows.cuh"

namespace mixpeft {

namespace cuda {
template <class T>
class AdamW;  // cuda/adamw.cuh, included at the end (it names the Cuda tag)
}  // namespace cuda

// 16-bit storage computes in float (cuda::acc_t): layers draw such weights, and keep gates, in float.
template <>
struct accumulator<__nv_bfloat16> {
  using type = float;
};
template <>
struct accumulator<__half> {
  using type = float;
};

struct Cuda {
  template <class T>
  using tensor = cuda::DeviceTensor<T>;
  template <class T>
  using attention_cache = cuda::AttentionCache<T>;
  template <class T>
  using cross_entropy_cache = cuda::CrossEntropyCache<T>;
  template <class T>
  using rope_table = cuda::DeviceRopeTable<T>;
  template <class T>
  using optimizer = cuda::AdamW<T>;  // fp32 master weights for bf16 parameters
  static constexpr const char* name = "cuda";

  template <class T, class S>
  static cuda::DeviceTensor<T> from_host(const Tensor<S>& host) {
    return cuda::upload_as<T>(host);  // S = T, or float for a 16-bit T (rounded once on the device)
  }
  template <class T>
  static cuda::DeviceTensor<T> zeros(const Shape& shape) {
    cuda::DeviceTensor<T> t(shape);
    cuda::set_zero(t);
    return t;
  }
};

}  // namespace mixpeft

#include "mixpeft/cuda/adamw.cuh"       // after the Cuda tag, which its ParameterList<T, Cuda> names
#include "mixpeft/cuda/checkpoint.cuh"  // save / load_checkpoint of cuda::AdamW, for Trainer<T, Cuda>
