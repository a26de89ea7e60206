// mixpeft/mixpeft.hpp — the whole CPU library in one include.
// CUDA headers (mixpeft/cuda/*.cuh) are included separately, from .cu files only.
#pragma once

#include "mixpeft/core/backend.hpp"
#include "mixpeft/core/error.hpp"
#include "mixpeft/core/init.hpp"
#include "mixpeft/core/parallel.hpp"
#include "mixpeft/core/parameter.hpp"
#include "mixpeft/core/rng.hpp"
#include "mixpeft/core/tensor.hpp"

#include "mixpeft/ops/activations.hpp"
#include "mixpeft/ops/attention.hpp"
#include "mixpeft/ops/cross_entropy.hpp"
#include "mixpeft/ops/dropout.hpp"
#include "mixpeft/ops/embedding.hpp"
#include "mixpeft/ops/layernorm.hpp"
#include "mixpeft/ops/matmul.hpp"
#include "mixpeft/ops/rmsnorm.hpp"
#include "mixpeft/ops/rope.hpp"
#include "mixpeft/ops/softmax.hpp"

#include "mixpeft/layers/linear.hpp"
#include "mixpeft/layers/lora_linear.hpp"

#include "mixpeft/io/atomic_file.hpp"
#include "mixpeft/io/dtype.hpp"
#include "mixpeft/io/npy.hpp"
#include "mixpeft/io/safetensors.hpp"

#include "mixpeft/train/adamw.hpp"
#include "mixpeft/train/checkpoint.hpp"
#include "mixpeft/train/grad_clip.hpp"
#include "mixpeft/train/lr_schedule.hpp"
