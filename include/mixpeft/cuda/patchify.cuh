// mixpeft/cuda/patchify.cuh — ops/patchify.hpp on the device: images <-> flattened patches.
//   patchify:    patches[b, i Wp + j, (c P + y) P + x] = images[b, c, i P + y, j P + x]
//   unpatchify:  the inverse permutation
// Each is one gather kernel: a grid-stride loop over the output elements (coalesced writes), each reading the
// element it maps from. Shapes and errors as on the CPU: images [B, C, Hp P, Wp P], patches [B, Hp Wp, C P P].
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "mixpeft/core/error.hpp"
#include "mixpeft/cuda/device_tensor.cuh"
#include "mixpeft/cuda/error.cuh"
#include "mixpeft/cuda/kernel_utils.cuh"
#include "mixpeft/cuda/memory.cuh"
#include "mixpeft/ops/patchify.hpp"

namespace mixpeft::cuda {
namespace detail {

struct PatchGrid {
  std::size_t batch, channels, height, width, p;  // images [batch, channels, height, width], patch p
};

// One element of each layout: the image offset of patch element (b, n, k).
__device__ inline std::size_t image_offset(const PatchGrid& g, std::size_t b, std::size_t n, std::size_t k) {
  const std::size_t wp = g.width / g.p, pp = g.p * g.p;
  const std::size_t i = n / wp, j = n % wp, c = k / pp, y = (k / g.p) % g.p, x = k % g.p;
  return ((b * g.channels + c) * g.height + i * g.p + y) * g.width + j * g.p + x;
}

template <class T>
__global__ void patchify_kernel(const T* __restrict__ images, T* __restrict__ patches, PatchGrid g) {
  const std::size_t np = (g.height / g.p) * (g.width / g.p), kk = g.channels * g.p * g.p, total = g.batch * np * kk;
  for (std::size_t o = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; o < total;
       o += std::size_t(gridDim.x) * blockDim.x) {
    const std::size_t k = o % kk, n = (o / kk) % np, b = o / (kk * np);
    patches[o] = images[image_offset(g, b, n, k)];
  }
}

template <class T>
__global__ void unpatchify_kernel(const T* __restrict__ patches, T* __restrict__ images, PatchGrid g) {
  const std::size_t wp = g.width / g.p, np = (g.height / g.p) * wp, kk = g.channels * g.p * g.p;
  const std::size_t total = g.batch * g.channels * g.height * g.width;
  for (std::size_t o = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; o < total;
       o += std::size_t(gridDim.x) * blockDim.x) {
    const std::size_t w = o % g.width, h = (o / g.width) % g.height, c = (o / (g.width * g.height)) % g.channels,
                      b = o / (g.width * g.height * g.channels);
    const std::size_t n = (h / g.p) * wp + w / g.p, k = (c * g.p + h % g.p) * g.p + w % g.p;
    images[o] = patches[(b * np + n) * kk + k];
  }
}

inline PatchGrid patch_grid(const Shape& s, std::size_t p) { return {s[0], s[1], s[2], s[3], p}; }

}  // namespace detail

// images [B, C, Hp P, Wp P] -> patches [B, Hp Wp, C P P].
template <class T>
DeviceTensor<T> patchify(const DeviceTensor<T>& images, std::size_t p) {
  mixpeft::detail::check_patch_grid("patchify", images.shape(), p);
  DeviceTensor<T> out(mixpeft::detail::patch_shape(images.shape(), p));
  if (out.size() == 0) return out;
  constexpr unsigned block = 256;
  detail::patchify_kernel<<<grid_size(out.size(), block), block, 0, current_stream()>>>(
      images.data(), out.data(), detail::patch_grid(images.shape(), p));
  check_launch("patchify");
  return out;
}

// patches [B, Hp Wp, C P P] -> images of image_shape [B, C, Hp P, Wp P].
template <class T>
DeviceTensor<T> unpatchify(const DeviceTensor<T>& patches, const Shape& image_shape, std::size_t p) {
  mixpeft::detail::check_patch_grid("unpatchify", image_shape, p);
  const Shape ps = mixpeft::detail::patch_shape(image_shape, p);
  expect_shape("unpatchify", "patches", patches, {ps[0], ps[1], ps[2]});
  DeviceTensor<T> out(image_shape);
  if (out.size() == 0) return out;
  constexpr unsigned block = 256;
  detail::unpatchify_kernel<<<grid_size(out.size(), block), block, 0, current_stream()>>>(
      patches.data(), out.data(), detail::patch_grid(image_shape, p));
  check_launch("unpatchify");
  return out;
}

}  // namespace mixpeft::cuda
