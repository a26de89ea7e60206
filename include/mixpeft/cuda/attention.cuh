// mixpeft/cuda/attention.cuh — masked multi-head scaled-dot-product attention on the device (ops/attention.hpp).
//
// Per sequence b and head h, with Q, K, V the head's [T, dh] slices of q, k, v and scale = 1/sqrt(dh):
//   forward:   S = scale * Q K^T                      [Tq, Tk]
//              P = softmax over the allowed keys of each row of S, 0 at masked keys
//              O = P V                                 [Tq, dh]
//   backward:  dV = P^T dO
//              dP = dO V^T
//              dS = P * (dP - rowsum(dP * P))          (softmax backward; 0 wherever P is 0)
//              dQ = scale * dS K,   dK = scale * dS^T Q
// dq, dk, dv are written. The mask (AttentionMask: causal with the Tk - Tq offset, key_lengths, block_first_key)
// has the CPU op's meaning: query i at absolute position p = Tk - Tq + i sees keys j in [begin, end) with
//   end = min(key_lengths[b], p + 1 if causal),  begin = 1 if block_first_key and p >= 1, else 0;
// a row with no allowed key has P = 0, O = 0 and no gradient.
//
// Work: q, k, v (and dO) are permuted from [B, T, H*dh] to contiguous heads [B*H, T, dh]; every product is one
// strided-batched cuBLASLt GEMM over the B*H heads (cuda/matmul.cuh); the mask is applied by a fused masked
// softmax kernel (one block per row of S, in place), and backward's softmax step by the row kernel of
// cuda/softmax.cuh, in place on dP. Outputs are permuted back. The full [Tq, Tk] products are computed for
// causal masks too (the masked half is discarded): simple, and the GEMMs stay large.
// Cache: P [B, H, Tq, Tk] in T and the mask (the CPU op's AttentionCache, as cuda::AttentionCache).
// Backward also reads q, k, v, which the caller keeps, and uses B*H*Tq*Tk scratch for dS.
// Shapes: q, o, dq [B, Tq, D]   k, v, dk, dv [B, Tk, D]   P [B, H, Tq, Tk]   D = H * dh.
// append_tokens(kv, x): the KV cache's append, as on the CPU (two strided device copies).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "mixpeft/core/error.hpp"
#include "mixpeft/cuda/device_tensor.cuh"
#include "mixpeft/cuda/error.cuh"
#include "mixpeft/cuda/kernel_utils.cuh"
#include "mixpeft/cuda/matmul.cuh"
#include "mixpeft/cuda/softmax.cuh"
#include "mixpeft/ops/attention.hpp"

namespace mixpeft::cuda {

template <class T>
struct AttentionCache {
  DeviceTensor<T> probs;  // [B, H, Tq, Tk] attention probabilities, 0 at masked keys
  AttentionMask mask;     // the forward's mask
};

namespace detail {

// [B, t, H, dh] <-> [B, H, t, dh]: to_heads reads the first layout and writes the second, else the reverse.
template <class T>
__global__ void permute_heads_kernel(const T* __restrict__ src, T* __restrict__ dst, std::size_t batch,
                                     std::size_t t, std::size_t h_count, std::size_t dh, bool to_heads) {
  const std::size_t total = batch * t * h_count * dh;
  for (std::size_t e = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; e < total;
       e += std::size_t(gridDim.x) * blockDim.x) {
    // e indexes [B, t, H, dh]; `other` is the same entry in [B, H, t, dh].
    const std::size_t j = e % dh, h = (e / dh) % h_count, tt = (e / (dh * h_count)) % t, b = e / (dh * h_count * t);
    const std::size_t other = ((b * h_count + h) * t + tt) * dh + j;
    if (to_heads) dst[other] = src[e];
    else dst[e] = src[other];
  }
}

// x [B, t, H*dh] -> [B, H, t, dh]
template <class T>
DeviceTensor<T> split_heads(const DeviceTensor<T>& x, std::size_t heads) {
  const std::size_t batch = x.shape()[0], t = x.shape()[1], dh = x.shape()[2] / heads;
  DeviceTensor<T> out(Shape{batch, heads, t, dh});
  if (out.size() == 0) return out;
  constexpr unsigned block = 256;
  permute_heads_kernel<<<grid_size(out.size(), block), block, 0, current_stream()>>>(x.data(), out.data(), batch, t,
                                                                                    heads, dh, true);
  check_launch("attention split_heads");
  return out;
}

// [B, H, t, dh] -> x [B, t, H*dh] (x already has its shape)
template <class T>
void merge_heads(const DeviceTensor<T>& heads, DeviceTensor<T>& x) {
  const std::size_t batch = heads.shape()[0], h_count = heads.shape()[1], t = heads.shape()[2], dh = heads.shape()[3];
  if (heads.size() == 0) return;
  constexpr unsigned block = 256;
  permute_heads_kernel<<<grid_size(heads.size(), block), block, 0, current_stream()>>>(heads.data(), x.data(), batch,
                                                                                      t, h_count, dh, false);
  check_launch("attention merge_heads");
}

// In place on probs [B*H*Tq, Tk]: the scores of each row become the masked softmax.
template <class T>
__global__ void masked_softmax_kernel(T* probs, std::size_t heads, std::size_t tq, std::size_t tk,
                                      const std::int64_t* __restrict__ lengths, bool causal, bool block_first_key) {
  const std::size_t row = blockIdx.x, b = row / (heads * tq), i = row % tq, p = tk - tq + i;
  std::size_t end = lengths ? std::size_t(lengths[b]) : tk;
  if (causal && p + 1 < end) end = p + 1;
  const std::size_t begin = block_first_key && p >= 1 ? 1 : 0;
  T* r = probs + row * tk;
  softmax_row(r, r, tk, begin, end);
}

struct AttentionDims {
  std::size_t batch, tq, tk, heads, dh;
};

// Checks q [B, Tq, D], k and v [B, Tk, D] and that `heads` divides D.
template <class T>
AttentionDims attention_dims(std::string_view op, const DeviceTensor<T>& q, const DeviceTensor<T>& k,
                             const DeviceTensor<T>& v, std::size_t heads) {
  expect_shape(op, "q", q, {any_extent, any_extent, any_extent});
  const std::size_t batch = q.shape()[0], width = q.shape()[2];
  expect_shape(op, "k", k, {batch, any_extent, width});
  expect_shape(op, "v", v, {batch, k.shape()[1], width});
  require<ConfigError>(heads > 0, op, ": heads must be > 0 (got 0)");
  require<ConfigError>(width > 0 && width % heads == 0, op, ": heads (", heads, ") must divide the width of q (",
                       width, ")");
  return {batch, q.shape()[1], k.shape()[1], heads, width / heads};
}

// key_lengths as a device vector, or an empty tensor when every key is valid.
inline DeviceTensor<std::int64_t> upload_key_lengths(const AttentionMask& mask) {
  const std::vector<std::int64_t> lengths(mask.key_lengths.begin(), mask.key_lengths.end());
  return upload(std::span<const std::int64_t>(lengths));
}

}  // namespace detail

// o [B, Tq, D] from q [B, Tq, D], k [B, Tk, D], v [B, Tk, D]; caches P and the mask for backward.
// o must not alias q, k or v.
template <class T>
void attention_forward(const DeviceTensor<T>& q, const DeviceTensor<T>& k, const DeviceTensor<T>& v,
                       std::size_t heads, const AttentionMask& mask, DeviceTensor<T>& o, AttentionCache<T>& cache) {
  constexpr std::string_view op = "attention_forward";
  const auto dims = detail::attention_dims(op, q, k, v, heads);
  const std::size_t B = dims.batch, Tq = dims.tq, Tk = dims.tk, H = dims.heads, dh = dims.dh;
  require<ShapeError>(!(mask.causal || mask.block_first_key) || Tq <= Tk, op, ": q has shape ",
                      shape_string(q.shape()), " but k has shape ", shape_string(k.shape()),
                      "; causal or block_first_key attention needs Tq <= Tk");
  require<ConfigError>(mask.key_lengths.empty() || mask.key_lengths.size() == B, op, ": key_lengths has ",
                       mask.key_lengths.size(), " entries, expected one per sequence (B = ", B, ")");
  for (std::size_t b = 0; b < mask.key_lengths.size(); ++b)
    require<ConfigError>(mask.key_lengths[b] <= Tk, op, ": key_lengths[", b, "] = ", mask.key_lengths[b],
                         " exceeds the number of keys Tk = ", Tk);

  resize_to(o, shape_of(q));
  resize_to(cache.probs, Shape{B, H, Tq, Tk});
  cache.mask = mask;
  if (o.size() == 0) return;
  if (Tk == 0) {
    set_zero(o);
    return;
  }
  const double scale = 1.0 / std::sqrt(double(dh));
  const std::size_t bh = B * H;
  const auto qh = detail::split_heads(q, H), kh = detail::split_heads(k, H), vh = detail::split_heads(v, H);
  DeviceTensor<T> oh(Shape{B, H, Tq, dh});
  matmul(MatmulCall<T>{.ta = Trans::No, .tb = Trans::Yes, .m = Tq, .n = Tk, .k = dh, .alpha = scale,
                       .a = qh.data(), .lda = dh, .stride_a = std::int64_t(Tq * dh),
                       .b = kh.data(), .ldb = dh, .stride_b = std::int64_t(Tk * dh),
                       .c = cache.probs.data(), .ldc = Tk, .stride_c = std::int64_t(Tq * Tk), .batch = bh});
  const auto lengths = detail::upload_key_lengths(mask);
  detail::masked_softmax_kernel<<<unsigned(bh * Tq), row_block_size(Tk), 0, current_stream()>>>(
      cache.probs.data(), H, Tq, Tk, mask.key_lengths.empty() ? nullptr : lengths.data(), mask.causal,
      mask.block_first_key);
  check_launch("attention_forward masked softmax");
  matmul(MatmulCall<T>{.ta = Trans::No, .tb = Trans::No, .m = Tq, .n = dh, .k = Tk,
                       .a = cache.probs.data(), .lda = Tk, .stride_a = std::int64_t(Tq * Tk),
                       .b = vh.data(), .ldb = dh, .stride_b = std::int64_t(Tk * dh),
                       .c = oh.data(), .ldc = dh, .stride_c = std::int64_t(Tq * dh), .batch = bh});
  detail::merge_heads(oh, o);
}

// dq [B, Tq, D], dk and dv [B, Tk, D] (all written) from d_o [B, Tq, D] and the forward's q, k, v and cache.
template <class T>
void attention_backward(const DeviceTensor<T>& q, const DeviceTensor<T>& k, const DeviceTensor<T>& v,
                        const AttentionCache<T>& cache, const DeviceTensor<T>& d_o, DeviceTensor<T>& dq,
                        DeviceTensor<T>& dk, DeviceTensor<T>& dv) {
  constexpr std::string_view op = "attention_backward";
  expect_shape(op, "cache.probs", cache.probs, {any_extent, any_extent, any_extent, any_extent});
  const auto dims = detail::attention_dims(op, q, k, v, cache.probs.shape()[1]);
  const std::size_t B = dims.batch, Tq = dims.tq, Tk = dims.tk, H = dims.heads, dh = dims.dh;
  expect_same_shape(op, "d_o", d_o, "q", q);
  expect_shape(op, "cache.probs", cache.probs, {B, H, Tq, Tk});
  require<ShapeError>(cache.mask.key_lengths.empty() || cache.mask.key_lengths.size() == B, op,
                      ": the cache holds key_lengths for ", cache.mask.key_lengths.size(), " sequences but B = ", B);

  resize_to(dq, shape_of(q));
  resize_to(dk, shape_of(k));
  resize_to(dv, shape_of(v));
  if (cache.probs.size() == 0) {  // no (query, key) pair: every gradient is zero
    set_zero(dq);
    set_zero(dk);
    set_zero(dv);
    return;
  }
  const double scale = 1.0 / std::sqrt(double(dh));
  const std::size_t bh = B * H;
  const auto qh = detail::split_heads(q, H), kh = detail::split_heads(k, H), vh = detail::split_heads(v, H);
  const auto doh = detail::split_heads(d_o, H);
  DeviceTensor<T> dqh(Shape{B, H, Tq, dh}), dkh(Shape{B, H, Tk, dh}), dvh(Shape{B, H, Tk, dh});
  DeviceTensor<T> ds(Shape{B, H, Tq, Tk});
  const auto sq = std::int64_t(Tq * dh), sk = std::int64_t(Tk * dh), sp = std::int64_t(Tq * Tk);
  // dV = P^T dO
  matmul(MatmulCall<T>{.ta = Trans::Yes, .tb = Trans::No, .m = Tk, .n = dh, .k = Tq,
                       .a = cache.probs.data(), .lda = Tk, .stride_a = sp, .b = doh.data(), .ldb = dh, .stride_b = sq,
                       .c = dvh.data(), .ldc = dh, .stride_c = sk, .batch = bh});
  // dP = dO V^T, then dS = P * (dP - rowsum(dP * P)) in place
  matmul(MatmulCall<T>{.ta = Trans::No, .tb = Trans::Yes, .m = Tq, .n = Tk, .k = dh,
                       .a = doh.data(), .lda = dh, .stride_a = sq, .b = vh.data(), .ldb = dh, .stride_b = sk,
                       .c = ds.data(), .ldc = Tk, .stride_c = sp, .batch = bh});
  detail::softmax_backward_kernel<<<unsigned(bh * Tq), row_block_size(Tk), 0, current_stream()>>>(
      cache.probs.data(), ds.data(), ds.data(), Tk);
  check_launch("attention_backward softmax");
  // dQ = scale * dS K,  dK = scale * dS^T Q
  matmul(MatmulCall<T>{.ta = Trans::No, .tb = Trans::No, .m = Tq, .n = dh, .k = Tk, .alpha = scale,
                       .a = ds.data(), .lda = Tk, .stride_a = sp, .b = kh.data(), .ldb = dh, .stride_b = sk,
                       .c = dqh.data(), .ldc = dh, .stride_c = sq, .batch = bh});
  matmul(MatmulCall<T>{.ta = Trans::Yes, .tb = Trans::No, .m = Tk, .n = dh, .k = Tq, .alpha = scale,
                       .a = ds.data(), .lda = Tk, .stride_a = sp, .b = qh.data(), .ldb = dh, .stride_b = sq,
                       .c = dkh.data(), .ldc = dh, .stride_c = sk, .batch = bh});
  detail::merge_heads(dqh, dq);
  detail::merge_heads(dkh, dk);
  detail::merge_heads(dvh, dv);
}

// The KV cache's append (ops/attention.hpp): kv [B, L, D] becomes [B, L + t, D] with x [B, t, D] after each
// sequence's L tokens (kv empty: a copy of x). Two strided device copies into a new tensor.
template <class T>
void append_tokens(DeviceTensor<T>& kv, const DeviceTensor<T>& x) {
  expect_shape("append_tokens", "x", x, {any_extent, any_extent, any_extent});
  if (kv.dimension() != 3 || kv.size() == 0) {
    assign(kv, x);
    return;
  }
  expect_shape("append_tokens", "kv", kv, {x.shape()[0], any_extent, x.shape()[2]});
  const std::size_t b = x.shape()[0], l = kv.shape()[1], t = x.shape()[1], d = x.shape()[2];
  DeviceTensor<T> out(Shape{b, l + t, d});
  const std::size_t pitch = (l + t) * d * sizeof(T);
  MIXPEFT_CUDA_CHECK(cudaMemcpy2DAsync(out.data(), pitch, kv.data(), l * d * sizeof(T), l * d * sizeof(T), b,
                                       cudaMemcpyDeviceToDevice, current_stream()));
  if (x.size() > 0)
    MIXPEFT_CUDA_CHECK(cudaMemcpy2DAsync(out.data() + l * d, pitch, x.data(), t * d * sizeof(T), t * d * sizeof(T),
                                         b, cudaMemcpyDeviceToDevice, current_stream()));
  kv = std::move(out);
}

}  // namespace mixpeft::cuda
