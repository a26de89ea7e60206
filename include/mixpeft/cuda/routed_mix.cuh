// mixpeft/cuda/routed_mix.cuh — per-sequence mixtures by routing weights (ops/routed_mix.hpp) on the device.
//
//   routed_mix_forward:   E[b] = s sum_k w[b, k] W_k,  e[b] = s sum_k w[b, k] c_k
//   routed_mix_backward:  dw[b, k] = s (<W_k, G[b]> + <c_k, r[b]>)                       (written)
//                         dW_k += s sum_b w[b, k] G[b],  dc_k += s sum_b w[b, k] r[b]    (accumulated; null: frozen)
// The routing weights w are read by the kernels only: no host synchronisation, nothing copied to the host.
// Kernels: forward, one grid-stride pass over the B (|W| + |c|) outputs (K loads each); dw, one block per (b, k)
// reducing <W_k, G[b]> + <c_k, r[b]> (block_sum, deterministic); the source gradients, one grid-stride pass over
// the |W| + |c| entries, each summing its B sequences in order in acc_t<T> and rounding once into dW_k / dc_k.
// Shapes and checks as on the CPU (mixpeft::detail::routed_mix_dims). Types: float, double, __nv_bfloat16, __half.
// Caches nothing.
#pragma once

#include <cuda_runtime.h>

#include <array>
#include <cstddef>
#include <string_view>
#include <type_traits>

#include "mixpeft/core/error.hpp"
#include "mixpeft/cuda/device_tensor.cuh"
#include "mixpeft/cuda/error.cuh"
#include "mixpeft/cuda/kernel_utils.cuh"
#include "mixpeft/ops/routed_mix.hpp"

namespace mixpeft::cuda {
namespace detail::routed_mix {

// The K sources (and their gradients) passed by value to the kernels.
template <class P, std::size_t K>
struct Pointers {
  P p[K];
};

// out[b, i] for i < nw from W_k, then nw <= i < nw + nc from c_k: E and e are separate arrays.
template <class T, std::size_t K>
__global__ void forward_kernel(const T* __restrict__ w, acc_t<T> s, Pointers<const T*, K> W, Pointers<const T*, K> c,
                               std::size_t nb, std::size_t nw, std::size_t nc, T* __restrict__ E,
                               T* __restrict__ e) {
  using A = acc_t<T>;
  const std::size_t per = nw + nc, total = nb * per;
  for (std::size_t x = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; x < total;
       x += std::size_t(gridDim.x) * blockDim.x) {
    const std::size_t b = x / per, i = x % per;
    const bool weight = i < nw;
    A acc = 0;
#pragma unroll
    for (std::size_t k = 0; k < K; ++k) {
      const A sw = s * widen(w[b * K + k]);
      acc += sw * widen(weight ? W.p[k][i] : c.p[k][i - nw]);
    }
    if (weight) E[b * nw + i] = narrow<T>(acc);
    else e[b * nc + (i - nw)] = narrow<T>(acc);
  }
}

// dw[b, k] = s (<W_k, G[b]> + <c_k, r[b]>): block b * K + k.
template <class T, std::size_t K>
__global__ void dw_kernel(acc_t<T> s, Pointers<const T*, K> W, Pointers<const T*, K> c, const T* __restrict__ G,
                          const T* __restrict__ r, std::size_t nw, std::size_t nc, T* __restrict__ dw) {
  using A = acc_t<T>;
  const std::size_t b = blockIdx.x / K, k = blockIdx.x % K;
  const T* Wk = W.p[k];
  const T* ck = c.p[k];
  const T* Gb = G + b * nw;
  const T* rb = r + b * nc;
  A acc = 0;
  for (std::size_t i = threadIdx.x; i < nw; i += blockDim.x) acc += widen(Wk[i]) * widen(Gb[i]);
  for (std::size_t i = threadIdx.x; i < nc; i += blockDim.x) acc += widen(ck[i]) * widen(rb[i]);
  acc = block_sum(acc);
  if (threadIdx.x == 0) dw[blockIdx.x] = narrow<T>(s * acc);
}

// dW_k[i] += s sum_b w[b, k] G[b, i] (i < nw), dc_k[i - nw] += s sum_b w[b, k] r[b, i - nw]; null targets skipped.
template <class T, std::size_t K>
__global__ void source_grad_kernel(const T* __restrict__ w, acc_t<T> s, const T* __restrict__ G,
                                   const T* __restrict__ r, std::size_t nb, std::size_t nw, std::size_t nc,
                                   Pointers<T*, K> dW, Pointers<T*, K> dc) {
  using A = acc_t<T>;
  const std::size_t total = nw + nc;
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < total;
       i += std::size_t(gridDim.x) * blockDim.x) {
    const bool weight = i < nw;
    const std::size_t j = weight ? i : i - nw, n = weight ? nw : nc;
    const T* src = weight ? G : r;
#pragma unroll
    for (std::size_t k = 0; k < K; ++k) {
      T* dst = weight ? dW.p[k] : dc.p[k];
      if (dst == nullptr) continue;
      A acc = 0;
      for (std::size_t b = 0; b < nb; ++b) acc += widen(w[b * K + k]) * widen(src[b * n + j]);
      dst[j] = narrow<T>(widen(dst[j]) + s * acc);
    }
  }
}

}  // namespace detail::routed_mix

template <class T, std::size_t K>
void routed_mix_forward(const DeviceTensor<T>& w, std::type_identity_t<T> scale,
                        const std::array<const DeviceTensor<T>*, K>& W, const std::array<const DeviceTensor<T>*, K>& c,
                        DeviceTensor<T>& E, DeviceTensor<T>& e) {
  namespace rm = detail::routed_mix;
  constexpr std::string_view op = "routed_mix_forward";
  const mixpeft::detail::RoutedMixDims dims = mixpeft::detail::routed_mix_dims(op, w, W, c);
  for (std::size_t k = 0; k < K; ++k)
    require<ConfigError>((E.size() == 0 || E.data() != W[k]->data()) && (e.size() == 0 || e.data() != c[k]->data()),
                         op, ": E, e must not alias a source");
  resize_to(E, mixpeft::detail::stacked_shape(dims.sequences, dims.weight_shape));
  resize_to(e, mixpeft::detail::stacked_shape(dims.sequences, dims.bias_shape));
  const std::size_t total = dims.sequences * (dims.weight_size + dims.bias_size);
  if (total == 0) return;
  rm::Pointers<const T*, K> Wp{}, cp{};
  for (std::size_t k = 0; k < K; ++k) {
    Wp.p[k] = W[k]->data();
    cp.p[k] = c[k]->data();
  }
  constexpr unsigned block = 256;
  rm::forward_kernel<T, K><<<grid_size(total, block), block, 0, current_stream()>>>(
      w.data(), widen(scale), Wp, cp, dims.sequences, dims.weight_size, dims.bias_size, E.data(), e.data());
  check_launch(op.data());
}

template <class T, std::size_t K>
void routed_mix_backward(const DeviceTensor<T>& w, std::type_identity_t<T> scale,
                         const std::array<const DeviceTensor<T>*, K>& W, const std::array<const DeviceTensor<T>*, K>& c,
                         const DeviceTensor<T>& G, const DeviceTensor<T>& r, DeviceTensor<T>& dw,
                         const std::array<DeviceTensor<T>*, K>& dW, const std::array<DeviceTensor<T>*, K>& dc) {
  namespace rm = detail::routed_mix;
  constexpr std::string_view op = "routed_mix_backward";
  const mixpeft::detail::RoutedMixDims dims = mixpeft::detail::routed_mix_dims(op, w, W, c);
  const std::size_t nb = dims.sequences, nw = dims.weight_size, nc = dims.bias_size;
  const Shape G_shape = mixpeft::detail::stacked_shape(nb, dims.weight_shape),
              r_shape = mixpeft::detail::stacked_shape(nb, dims.bias_shape);
  require<ShapeError>(G.shape() == G_shape, op, ": G has shape ", shape_string(G.shape()), ", expected ",
                      shape_string(G_shape));
  require<ShapeError>(r.shape() == r_shape, op, ": r has shape ", shape_string(r.shape()), ", expected ",
                      shape_string(r_shape));
  for (std::size_t k = 0; k < K; ++k) {
    if (dW[k]) expect_same_shape(op, "dW_k", *dW[k], "W_k", *W[k]);
    if (dc[k]) expect_same_shape(op, "dc_k", *dc[k], "c_k", *c[k]);
  }
  require<ConfigError>(&dw != &w && &dw != &G && &dw != &r, op, ": dw must not alias an input");
  resize_to(dw, shape_of(w));
  if (nb == 0) return;
  rm::Pointers<const T*, K> Wp{}, cp{};
  rm::Pointers<T*, K> dWp{}, dcp{};
  bool any = false;
  for (std::size_t k = 0; k < K; ++k) {
    Wp.p[k] = W[k]->data();
    cp.p[k] = c[k]->data();
    dWp.p[k] = dW[k] && nw > 0 ? dW[k]->data() : nullptr;
    dcp.p[k] = dc[k] && nc > 0 ? dc[k]->data() : nullptr;
    any = any || dWp.p[k] || dcp.p[k];
  }
  const acc_t<T> s = widen(scale);
  const cudaStream_t stream = current_stream();
  rm::dw_kernel<T, K><<<unsigned(nb * K), row_block_size(nw + nc), 0, stream>>>(s, Wp, cp, G.data(), r.data(), nw, nc,
                                                                                dw.data());
  check_launch(op.data());
  if (any) {
    constexpr unsigned block = 256;
    rm::source_grad_kernel<T, K><<<grid_size(nw + nc, block), block, 0, stream>>>(w.data(), s, G.data(), r.data(), nb,
                                                                                  nw, nc, dWp, dcp);
    check_launch(op.data());
  }
}

}  // namespace mixpeft::cuda
