// mixpeft/cuda/elementwise.cuh — one launcher for element-wise kernels with vectorised loads.
//
// map_elements<T, NI, NO>(op, n, f, {in...}, {out...}) computes, for every i in [0, n),
//   f(i, x, y)   with x[k] = widen(in[k][i]) (k < NI) and y[k] (k < NO) stored as out[k][i] = narrow(y[k]).
// Each thread handles packs of V = 16 / sizeof(T) consecutive elements with one 16-byte load or store per
// array (float: 4, double: 2, bf16 / fp16: 8), and falls back to V = 1 when any pointer is not 16-byte aligned.
// The tail pack of an n that is not a multiple of V is handled element by element. Outputs may alias inputs
// (each element is read and written by the same thread), so ops can run in place.
#pragma once

#include <cuda_runtime.h>

#include <array>
#include <cstddef>

#include "mixpeft/cuda/error.cuh"
#include "mixpeft/cuda/kernel_utils.cuh"
#include "mixpeft/cuda/memory.cuh"

namespace mixpeft::cuda {
namespace detail {

template <class T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <class T, int K>
struct Pointers {
  T* p[K];
};

template <class T, int V, int NI, int NO, class F>
__global__ void map_kernel(std::size_t n, F f, Pointers<const T, NI> in, Pointers<T, NO> out) {
  using A = acc_t<T>;
  const std::size_t packs = (n + V - 1) / V;
  for (std::size_t p = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; p < packs;
       p += std::size_t(gridDim.x) * blockDim.x) {
    const std::size_t base = p * V;
    const bool full = base + V <= n;
    A x[V][NI];
    A y[V][NO];
#pragma unroll
    for (int k = 0; k < NI; ++k) {
      if (full) {
        const Pack<T, V> pack = *reinterpret_cast<const Pack<T, V>*>(in.p[k] + base);
#pragma unroll
        for (int j = 0; j < V; ++j) x[j][k] = widen(pack.v[j]);
      } else {
        for (int j = 0; j < V; ++j) x[j][k] = base + j < n ? widen(in.p[k][base + j]) : A(0);
      }
    }
#pragma unroll
    for (int j = 0; j < V; ++j)
      if (full || base + j < n) f(base + j, x[j], y[j]);
#pragma unroll
    for (int k = 0; k < NO; ++k) {
      if (full) {
        Pack<T, V> pack;
#pragma unroll
        for (int j = 0; j < V; ++j) pack.v[j] = narrow<T>(y[j][k]);
        *reinterpret_cast<Pack<T, V>*>(out.p[k] + base) = pack;
      } else {
        for (int j = 0; j < V; ++j)
          if (base + j < n) out.p[k][base + j] = narrow<T>(y[j][k]);
      }
    }
  }
}

template <class T, int NI, int NO, class F>
void map_elements(const char* name, std::size_t n, F f, const std::array<const T*, NI>& in,
                  const std::array<T*, NO>& out) {
  if (n == 0) return;
  constexpr int V = sizeof(T) >= 16 ? 1 : int(16 / sizeof(T));
  Pointers<const T, NI> ip{};
  Pointers<T, NO> op{};
  bool aligned = true;
  for (int k = 0; k < NI; ++k) {
    ip.p[k] = in[k];
    aligned = aligned && is_aligned(in[k], 16);
  }
  for (int k = 0; k < NO; ++k) {
    op.p[k] = out[k];
    aligned = aligned && is_aligned(out[k], 16);
  }
  constexpr unsigned block = 256;
  const cudaStream_t stream = current_stream();
  if (aligned) map_kernel<T, V, NI, NO><<<grid_size((n + V - 1) / V, block), block, 0, stream>>>(n, f, ip, op);
  else map_kernel<T, 1, NI, NO><<<grid_size(n, block), block, 0, stream>>>(n, f, ip, op);
  check_launch(name);
}

}  // namespace detail
}  // namespace mixpeft::cuda
