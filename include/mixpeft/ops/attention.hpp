// mixpeft/ops/attention.hpp — masked multi-head scaled-dot-product attention.
//
// Per sequence b and head h, with Q, K, V the head's [T, dh] slices of q, k, v and scale = 1/sqrt(dh):
//   forward:   S = scale * Q K^T                      [Tq, Tk]
//              P = softmax over the allowed keys of each row of S, 0 at masked keys
//              O = P V                                 [Tq, dh]
//   backward:  dV = P^T dO
//              dP = dO V^T
//              dS = P * (dP - rowsum(dP * P))          (softmax backward; 0 wherever P is 0)
//              dQ = scale * dS K,   dK = scale * dS^T Q
// dq, dk, dv are written. q, k, v are the caller's projected (and RoPE-rotated) activations.
// append_tokens(kv, x) grows a KV cache [B, L, D] by the new tokens x [B, t, D] (cuda/attention.cuh has both ops).
//
// Mask: query i sits at absolute position p = Tk - Tq + i (Tq == Tk: self-attention; Tq = 1 with a longer Tk:
// KV-cache decoding). Key j is allowed for query i when all of these hold:
//   causal            j <= p
//   key_lengths       j <  key_lengths[b]            (right padding; empty vector: every key is valid)
//   block_first_key   j != 0 or p == 0               (LaVIN: no token but the modality token itself reads position 0)
// The allowed keys of a row form one contiguous range. A row with no allowed key has P = 0, hence O = 0 and no
// gradient flows through it (no NaN). causal and block_first_key need Tq <= Tk.
//
// Cache: P, B * H * Tq * Tk scalars (LLaMA-7B, 32 heads, T = 512, float: 32 MiB per layer, 1 GiB for 32 layers),
// and a copy of the mask (B integers). Backward also reads q, k, v, which the caller keeps.
//
// The (b, h) pairs are independent and spread over threads (parallel_rows); their GEMMs go to Eigen on strided
// views of the head slices (no copies; ops/matmul.hpp's gemm takes only contiguous matrices). Query rows are processed in blocks of `attention_row_block`, each block multiplying
// only the keys its last row may see, so causal attention does about half the FLOPs of the full product.
//
// Shapes: B batch, Tq queries, Tk keys, H heads, dh head width, D = H * dh.
//   q, o, dq [B, Tq, D]   k, v, dk, dv [B, Tk, D]   P [B, H, Tq, Tk]   heads contiguous in the last axis
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <string_view>
#include <utility>
#include <vector>

#include "mixpeft/core/error.hpp"
#include "mixpeft/core/parallel.hpp"
#include "mixpeft/core/tensor.hpp"
#include "mixpeft/ops/softmax.hpp"

namespace mixpeft {

struct AttentionMask {
  bool causal = true;                      // query at position p sees keys j <= p (false: ViT, cross-attention)
  bool block_first_key = false;            // key 0 is hidden from every query at position >= 1
  std::vector<std::size_t> key_lengths{};  // [B] valid keys per sequence; empty: all Tk keys are valid
};

template <class T>
struct AttentionCache {
  Tensor<T> probs;     // [B, H, Tq, Tk] attention probabilities, 0 at masked keys
  AttentionMask mask;  // the forward's mask: which key columns each row block of backward touches
};

namespace detail {

inline constexpr std::size_t attention_row_block = 64;

template <class T>
using HeadView = Eigen::Map<RowMatrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <class T>
using ConstHeadView = Eigen::Map<const RowMatrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;

// The [t, dh] slice of head h in sequence b of a [B, t, D] tensor: rows are D apart.
template <class T>
HeadView<T> head_view(Tensor<T>& x, std::size_t b, std::size_t h, std::size_t t, std::size_t dh) {
  const std::size_t d = cols(x);
  return HeadView<T>(x.data() + b * t * d + h * dh, Eigen::Index(t), Eigen::Index(dh), Eigen::OuterStride<>(d));
}
template <class T>
ConstHeadView<T> head_view(const Tensor<T>& x, std::size_t b, std::size_t h, std::size_t t, std::size_t dh) {
  const std::size_t d = cols(x);
  return ConstHeadView<T>(x.data() + b * t * d + h * dh, Eigen::Index(t), Eigen::Index(dh),
                          Eigen::OuterStride<>(d));
}

// Allowed keys [begin, end) of query i in a sequence with `length` valid keys; empty when begin >= end.
// `end` never decreases with i, so a block of rows needs keys [0, end of its last row).
struct KeyRange {
  std::size_t begin, end;
};
inline KeyRange key_range(const AttentionMask& mask, std::size_t tq, std::size_t tk, std::size_t length,
                          std::size_t i) {
  std::size_t end = length;
  if (mask.causal) end = std::min(end, tk - tq + i + 1);
  const std::size_t begin = mask.block_first_key && tk - tq + i >= 1 ? 1 : 0;
  return {begin, end};
}

struct AttentionDims {
  std::size_t batch, tq, tk, heads, dh;
};

// Checks q [B, Tq, D], k and v [B, Tk, D] and that `heads` divides D.
template <class T>
AttentionDims attention_dims(std::string_view op, const Tensor<T>& q, const Tensor<T>& k, const Tensor<T>& v,
                             std::size_t heads) {
  expect_shape(op, "q", q, {any_extent, any_extent, any_extent});
  const std::size_t batch = q.shape()[0], width = q.shape()[2];
  expect_shape(op, "k", k, {batch, any_extent, width});
  expect_shape(op, "v", v, {batch, k.shape()[1], width});
  require<ConfigError>(heads > 0, op, ": heads must be > 0 (got 0)");
  require<ConfigError>(width > 0 && width % heads == 0, op, ": heads (", heads, ") must divide the width of q (",
                       width, ")");
  return {batch, q.shape()[1], k.shape()[1], heads, width / heads};
}

}  // namespace detail

// o [B, Tq, D] from q [B, Tq, D], k [B, Tk, D], v [B, Tk, D]; caches P and the mask for backward.
// o must not alias q, k or v.
template <class T>
void attention_forward(const Tensor<T>& q, const Tensor<T>& k, const Tensor<T>& v, std::size_t heads,
                       const AttentionMask& mask, Tensor<T>& o, AttentionCache<T>& cache) {
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
  const T scale = T(1) / std::sqrt(T(dh));

  parallel_rows(B * H, 4 * Tq * Tk * dh, [&](std::size_t bh) {
    const std::size_t b = bh / H, h = bh % H;
    const std::size_t length = mask.key_lengths.empty() ? Tk : mask.key_lengths[b];
    const auto Q = detail::head_view(q, b, h, Tq, dh);
    const auto K = detail::head_view(k, b, h, Tk, dh);
    const auto V = detail::head_view(v, b, h, Tk, dh);
    auto O = detail::head_view(o, b, h, Tq, dh);
    auto P = matrix_view(cache.probs.data() + bh * Tq * Tk, Tq, Tk);
    for (std::size_t r0 = 0; r0 < Tq; r0 += detail::attention_row_block) {
      const std::size_t rn = std::min(detail::attention_row_block, Tq - r0);
      const auto r = Eigen::Index(r0), m = Eigen::Index(rn);
      const auto n = Eigen::Index(detail::key_range(mask, Tq, Tk, length, r0 + rn - 1).end);
      auto Pb = P.block(r, 0, m, n);
      Pb.noalias() = scale * Q.middleRows(r, m) * K.topRows(n).transpose();
      for (std::size_t i = r0; i < r0 + rn; ++i) {
        T* row = P.row(Eigen::Index(i)).data();
        const auto [begin, end] = detail::key_range(mask, Tq, Tk, length, i);
        if (begin >= end) {
          std::fill(row, row + Tk, T(0));
          continue;
        }
        softmax_row(row + begin, row + begin, end - begin);
        std::fill(row, row + begin, T(0));
        std::fill(row + end, row + Tk, T(0));
      }
      O.middleRows(r, m).noalias() = Pb * V.topRows(n);
    }
  });
}

// dq [B, Tq, D], dk and dv [B, Tk, D] (all written) from d_o [B, Tq, D] and the forward's q, k, v and cache.
template <class T>
void attention_backward(const Tensor<T>& q, const Tensor<T>& k, const Tensor<T>& v, const AttentionCache<T>& cache,
                        const Tensor<T>& d_o, Tensor<T>& dq, Tensor<T>& dk, Tensor<T>& dv) {
  constexpr std::string_view op = "attention_backward";
  expect_shape(op, "cache.probs", cache.probs, {any_extent, any_extent, any_extent, any_extent});
  const auto dims = detail::attention_dims(op, q, k, v, cache.probs.shape()[1]);
  const std::size_t B = dims.batch, Tq = dims.tq, Tk = dims.tk, H = dims.heads, dh = dims.dh;
  expect_same_shape(op, "d_o", d_o, "q", q);
  expect_shape(op, "cache.probs", cache.probs, {B, H, Tq, Tk});
  const AttentionMask& mask = cache.mask;
  require<ShapeError>(mask.key_lengths.empty() || mask.key_lengths.size() == B, op,
                      ": the cache holds key_lengths for ", mask.key_lengths.size(), " sequences but B = ", B);

  resize_to(dq, shape_of(q));
  resize_to(dk, shape_of(k));
  resize_to(dv, shape_of(v));
  const T scale = T(1) / std::sqrt(T(dh));

  parallel_rows(B * H, 8 * Tq * Tk * dh, [&](std::size_t bh) {
    const std::size_t b = bh / H, h = bh % H;
    const std::size_t length = mask.key_lengths.empty() ? Tk : mask.key_lengths[b];
    const auto Q = detail::head_view(q, b, h, Tq, dh);
    const auto K = detail::head_view(k, b, h, Tk, dh);
    const auto V = detail::head_view(v, b, h, Tk, dh);
    const auto dO = detail::head_view(d_o, b, h, Tq, dh);
    auto dQ = detail::head_view(dq, b, h, Tq, dh);
    auto dK = detail::head_view(dk, b, h, Tk, dh);
    auto dV = detail::head_view(dv, b, h, Tk, dh);
    const auto P = matrix_view(cache.probs.data() + bh * Tq * Tk, Tq, Tk);
    dK.setZero();
    dV.setZero();
    RowMatrix<T> dS(Eigen::Index(std::min(detail::attention_row_block, Tq)), Eigen::Index(Tk));  // dP, then dS
    Eigen::Array<T, Eigen::Dynamic, 1> row_dot(dS.rows());                                        // rowsum(dP * P)
    for (std::size_t r0 = 0; r0 < Tq; r0 += detail::attention_row_block) {
      const std::size_t rn = std::min(detail::attention_row_block, Tq - r0);
      const auto r = Eigen::Index(r0), m = Eigen::Index(rn);
      const auto n = Eigen::Index(detail::key_range(mask, Tq, Tk, length, r0 + rn - 1).end);
      const auto Pb = P.block(r, 0, m, n);
      auto dSb = dS.block(0, 0, m, n);
      dV.topRows(n).noalias() += Pb.transpose() * dO.middleRows(r, m);
      dSb.noalias() = dO.middleRows(r, m) * V.topRows(n).transpose();
      row_dot.head(m) = (dSb.array() * Pb.array()).rowwise().sum();
      dSb.array() = Pb.array() * (dSb.array().colwise() - row_dot.head(m));
      dQ.middleRows(r, m).noalias() = scale * dSb * K.topRows(n);
      dK.topRows(n).noalias() += scale * dSb.transpose() * Q.middleRows(r, m);
    }
  });
}

// The KV cache's append: kv [B, L, D] becomes [B, L + t, D] with x [B, t, D] after each sequence's L tokens
// (kv empty: kv = x). One copy of the cache per call (O(L) per decoded token).
template <class T>
void append_tokens(Tensor<T>& kv, const Tensor<T>& x) {
  expect_shape("append_tokens", "x", x, {any_extent, any_extent, any_extent});
  if (kv.dimension() != 3 || kv.size() == 0) {
    kv = x;
    return;
  }
  expect_shape("append_tokens", "kv", kv, {x.shape()[0], any_extent, x.shape()[2]});
  const std::size_t b = x.shape()[0], l = kv.shape()[1], t = x.shape()[1], d = x.shape()[2];
  Tensor<T> out = empty<T>({b, l + t, d});
  for (std::size_t i = 0; i < b; ++i) {
    std::copy(kv.data() + i * l * d, kv.data() + (i + 1) * l * d, out.data() + i * (l + t) * d);
    std::copy(x.data() + i * t * d, x.data() + (i + 1) * t * d, out.data() + i * (l + t) * d + l * d);
  }
  kv = std::move(out);
}

}  // namespace mixpeft
