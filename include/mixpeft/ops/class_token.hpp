// mixpeft/ops/class_token.hpp — the ViT's token embeddings: a learned [cls] token before the patch embeddings,
// plus learned positions (Hugging Face CLIPVisionEmbeddings after the patch conv).
//
//   forward:   emb[b, 0, :]     = cls + pos[0, :]
//              emb[b, 1 + m, :] = e[b, m, :] + pos[1 + m, :]                                   (written)
//   backward:  d_cls += sum_b d_emb[b, 0, :]        (accumulated; skipped when d_cls is null)
//              d_pos += sum_b d_emb[b, :, :]        (accumulated; skipped when d_pos is null)
//              d_e    = d_emb[:, 1:, :]             (written; skipped when d_e is null)
// Batch sums run over b in order (on the CPU in T, as xt::sum; on the device in the column-sum helpers'
// accumulation type, deterministically).
// Shapes: cls, d_cls [D]; e, d_e [B, M, D]; pos, d_pos [M + 1, D]; emb, d_emb [B, M + 1, D].
// cuda/class_token.cuh has both ops on device tensors.
#pragma once

#include <algorithm>
#include <cstddef>
#include <string_view>

#include "mixpeft/core/error.hpp"
#include "mixpeft/core/tensor.hpp"

namespace mixpeft {
namespace detail {

template <class Tensor>
void check_class_token_forward(std::string_view op, const Tensor& cls, const Tensor& e, const Tensor& pos) {
  expect_shape(op, "cls", cls, {any_extent});
  const std::size_t d = cls.shape()[0];
  expect_shape(op, "e", e, {any_extent, any_extent, d});
  expect_shape(op, "pos", pos, {e.shape()[1] + 1, d});
}

template <class Tensor>
void check_class_token_backward(std::string_view op, const Tensor& d_emb, const Tensor* d_cls, const Tensor* d_pos) {
  expect_shape(op, "d_emb", d_emb, {any_extent, any_extent, any_extent});
  const std::size_t n = d_emb.shape()[1], d = d_emb.shape()[2];
  require<ShapeError>(n > 0, op, ": d_emb has shape ", shape_string(d_emb.shape()), " (no [cls] row)");
  if (d_cls) expect_shape(op, "d_cls", *d_cls, {d});
  if (d_pos) expect_shape(op, "d_pos", *d_pos, {n, d});
}

}  // namespace detail

// emb [B, M + 1, D] = [cls; e] + pos.
template <class T>
void class_token_forward(const Tensor<T>& cls, const Tensor<T>& e, const Tensor<T>& pos, Tensor<T>& emb) {
  detail::check_class_token_forward("class_token_forward", cls, e, pos);
  const std::size_t b = e.shape()[0], m = e.shape()[1], d = e.shape()[2], n = m + 1;
  resize_to(emb, Shape{b, n, d});
  const T* c = cls.data();
  const T* p = pos.data();
  for (std::size_t i = 0; i < b; ++i) {
    T* o = emb.data() + i * n * d;
    for (std::size_t j = 0; j < d; ++j) o[j] = c[j] + p[j];
    const T* s = e.data() + i * m * d;
    for (std::size_t k = 0; k < m * d; ++k) o[d + k] = s[k] + p[d + k];
  }
}

// The gradients of class_token_forward from d_emb [B, M + 1, D] (any of them may be null).
template <class T>
void class_token_backward(const Tensor<T>& d_emb, Tensor<T>* d_cls, Tensor<T>* d_pos, Tensor<T>* d_e) {
  detail::check_class_token_backward("class_token_backward", d_emb, d_cls, d_pos);
  const std::size_t b = d_emb.shape()[0], n = d_emb.shape()[1], d = d_emb.shape()[2], m = n - 1;
  const T* g = d_emb.data();
  if (d_pos) {
    T* o = d_pos->data();
    for (std::size_t k = 0; k < n * d; ++k) {
      T s = T(0);
      for (std::size_t i = 0; i < b; ++i) s += g[i * n * d + k];
      o[k] += s;
    }
  }
  if (d_cls) {
    T* o = d_cls->data();
    for (std::size_t j = 0; j < d; ++j) {
      T s = T(0);
      for (std::size_t i = 0; i < b; ++i) s += g[i * n * d + j];
      o[j] += s;
    }
  }
  if (d_e) {
    resize_to(*d_e, Shape{b, m, d});
    for (std::size_t i = 0; i < b; ++i)
      std::copy(g + i * n * d + d, g + (i + 1) * n * d, d_e->data() + i * m * d);
  }
}

}  // namespace mixpeft
