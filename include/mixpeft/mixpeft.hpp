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

#include "mixpeft/ops/matmul.hpp"
