// mixpeft/cuda/elementwise.cuh — one launcher for element-wise kernels with vectorised loads.
//
// map_elements<T, NI, NO>(op, n, f, {in...}, {out...}) computes, for every i in [0, n),
//   f(i, x, y)   with x[k] = widen(in[k][i]) (k < NI) and y[k] (k < NO) stored as out[k][i] = narrow(y[k]).
// Each thread handles packs of V = 16 / sizeof(T) consecutive elements with one 16-byte load or store per
// array (float: 4, double: 2, bf16 / fp16: 8), and falls back to V = 1 when any pointer is not 16-byte aligned.
// The tail pack of an n that is not a multiple of V is handled element by element. Outputs may alias inputs
// (each element is read and written by the same thread), so ops can run in place.
//
// add_to(dst, src): dst += src, and add_transposed(src, alpha, dst): dst[R, C] += alpha * src[C, R]^T on
// DeviceTensors, the CUDA ops of ops/elementwise.hpp. add_transposed is
// a tiled transpose: each block stages a 32 x 32 tile of src in shared memory (rows padded
// to 33 entries so the transposed reads hit distinct banks), reading src and updating dst along their rows
// (coalesced both ways); tiles are visited by a grid-stride loop. dst must not alias src.
#pragma once

#include <cuda_runtime.h>

#include <array>
#include <cstddef>
#include <string_view>
#include <type_traits>

#include "mixpeft/core/error.hpp"
#include "mixpeft/core/tensor.hpp"
#include "mixpeft/cuda/device_tensor.cuh"
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

struct AddInto {  // y = x0 + x1
  template <class A>
  __device__ void operator()(std::size_t, const A (&x)[2], A (&y)[1]) const {
    y[0] = x[0] + x[1];
  }
};

inline constexpr int transpose_tile = 32;
inline constexpr int transpose_rows = 8;  // threads per tile column: a block is transpose_tile x transpose_rows

// dst[r, c] += alpha * src[c, r] for dst [rows, cols], src [cols, rows].
template <class T>
__global__ void add_transposed_kernel(const T* __restrict__ src, acc_t<T> alpha, std::size_t rows, std::size_t cols,
                                      T* __restrict__ dst) {
  constexpr int tile = transpose_tile;
  __shared__ acc_t<T> buf[tile][tile + 1];
  const std::size_t tiles_r = (rows + tile - 1) / tile, tiles_c = (cols + tile - 1) / tile;
  const unsigned tx = threadIdx.x, ty = threadIdx.y;
  // The trip count depends on blockIdx only, so every thread of a block reaches the same __syncthreads().
  for (std::size_t t = blockIdx.x; t < tiles_r * tiles_c; t += gridDim.x) {
    const std::size_t r0 = (t / tiles_c) * tile, c0 = (t % tiles_c) * tile;
    // buf[y][x] = src[c0 + y, r0 + x]: consecutive threads read consecutive entries of a src row.
    for (unsigned y = ty; y < unsigned(tile); y += transpose_rows) {
      const std::size_t sc = c0 + y, sr = r0 + tx;
      if (sc < cols && sr < rows) buf[y][tx] = widen(src[sc * rows + sr]);
    }
    __syncthreads();
    // dst[r0 + y, c0 + x] += alpha * src[c0 + x, r0 + y] = alpha * buf[x][y]: consecutive threads update
    // consecutive entries of a dst row.
    for (unsigned y = ty; y < unsigned(tile); y += transpose_rows) {
      const std::size_t dr = r0 + y, dc = c0 + tx;
      if (dr < rows && dc < cols) {
        T& d = dst[dr * cols + dc];
        d = narrow<T>(widen(d) + alpha * buf[tx][y]);
      }
    }
    __syncthreads();  // the next tile overwrites buf
  }
}

}  // namespace detail

// dst += src (same element count and width; leading axes may differ), as ops/elementwise.hpp's add_to.
template <class T>
void add_to(DeviceTensor<T>& dst, const DeviceTensor<T>& src) {
  require<ShapeError>(dst.size() == src.size() && cols(dst) == cols(src), "add_to: src has shape ",
                      shape_string(src.shape()), " but dst has shape ", shape_string(dst.shape()));
  detail::map_elements<T, 2, 1>("add_to", dst.size(), detail::AddInto{}, {dst.data(), src.data()}, {dst.data()});
}

// dst[R, C] += alpha * src[C, R]^T. Both are rank 2; dst must not share storage with src.
template <class T>
void add_transposed(const DeviceTensor<T>& src, std::type_identity_t<T> alpha, DeviceTensor<T>& dst) {
  constexpr std::string_view op = "add_transposed";
  expect_shape(op, "dst", dst, {any_extent, any_extent});
  const std::size_t r = dst.shape()[0], c = dst.shape()[1];
  expect_shape(op, "src", src, {c, r});
  require<ConfigError>(src.size() == 0 || src.data() != dst.data(), op, ": dst must not alias src");
  if (dst.size() == 0) return;
  constexpr std::size_t tile = detail::transpose_tile;
  const std::size_t tiles = ((r + tile - 1) / tile) * ((c + tile - 1) / tile);
  const dim3 block(detail::transpose_tile, detail::transpose_rows);
  detail::add_transposed_kernel<<<grid_size(tiles, 1), block, 0, current_stream()>>>(
      src.data(), acc_t<T>(widen(alpha)), r, c, dst.data());
  check_launch(op.data());
}

}  // namespace mixpeft::cuda
