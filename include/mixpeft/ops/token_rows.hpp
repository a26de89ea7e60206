// mixpeft/ops/token_rows.hpp — moving token rows between sequences of tokens (the ViT's taken [cls] tokens, the
// image tokens a multimodal model places into its text sequences).
//
//   copy_token_row(src, token, dst, slot):   dst[b, slot, :]   = src[b, token, :]     for every b
//   add_token_row(src, slot, dst, token):    dst[b, token, :] += src[b, slot, :]      for every b (its adjoint)
//   copy_token_block(src, sb, s0, dst, db, d0, n):  dst[db, d0 + i, :] = src[sb, s0 + i, :]   for i < n
//   zero_token_block(dst, db, d0, n):               dst[db, d0 + i, :] = 0                    for i < n
// A block copy is its own adjoint pattern: the backward of "copy a block in" is "copy the block out" (then zero
// it where the block replaced other values).
// The two are each other's adjoints: the ViT copies the [cls] token (row 0) of a block's output into slot s of
// the taken tokens, and its backward adds the gradient of slot s back into row 0.
// Shapes: src, dst [B, *, D] with the same B and D (the middle extents may differ); token, slot index the
// middle axes (ShapeError when out of range). dst keeps its shape (it must be allocated).
// cuda/token_rows.cuh has both ops on device tensors.
#pragma once

#include <algorithm>
#include <cstddef>
#include <string_view>

#include "mixpeft/core/error.hpp"
#include "mixpeft/core/tensor.hpp"

namespace mixpeft {
namespace detail {

// Checks src [B, Ns, D], dst [B, Nd, D], src_row < Ns, dst_row < Nd.
template <class Tensor>
void check_token_rows(std::string_view op, const Tensor& src, std::size_t src_row, const Tensor& dst,
                      std::size_t dst_row) {
  expect_shape(op, "dst", dst, {any_extent, any_extent, any_extent});
  expect_shape(op, "src", src, {dst.shape()[0], any_extent, dst.shape()[2]});
  require<ShapeError>(src_row < src.shape()[1], op, ": row ", src_row, " is out of range for src of shape ",
                      shape_string(src.shape()));
  require<ShapeError>(dst_row < dst.shape()[1], op, ": row ", dst_row, " is out of range for dst of shape ",
                      shape_string(dst.shape()));
}

}  // namespace detail

// dst[:, slot, :] = src[:, token, :].
template <class T>
void copy_token_row(const Tensor<T>& src, std::size_t token, Tensor<T>& dst, std::size_t slot) {
  detail::check_token_rows("copy_token_row", src, token, dst, slot);
  const std::size_t b = dst.shape()[0], ns = src.shape()[1], nd = dst.shape()[1], d = dst.shape()[2];
  for (std::size_t i = 0; i < b; ++i) {
    const T* s = src.data() + (i * ns + token) * d;
    std::copy(s, s + d, dst.data() + (i * nd + slot) * d);
  }
}

// dst[:, token, :] += src[:, slot, :].
template <class T>
void add_token_row(const Tensor<T>& src, std::size_t slot, Tensor<T>& dst, std::size_t token) {
  detail::check_token_rows("add_token_row", src, slot, dst, token);
  const std::size_t b = dst.shape()[0], ns = src.shape()[1], nd = dst.shape()[1], d = dst.shape()[2];
  for (std::size_t i = 0; i < b; ++i) {
    const T* s = src.data() + (i * ns + slot) * d;
    T* o = dst.data() + (i * nd + token) * d;
    for (std::size_t j = 0; j < d; ++j) o[j] += s[j];
  }
}

namespace detail {
// Checks that rows [start, start + n) of sequence `seq` exist in t [B, N, D].
template <class Tensor>
void check_token_block(std::string_view op, std::string_view name, const Tensor& t, std::size_t seq,
                       std::size_t start, std::size_t n) {
  expect_shape(op, name, t, {any_extent, any_extent, any_extent});
  require<ShapeError>(seq < t.shape()[0] && start + n <= t.shape()[1], op, ": rows [", start, ", ", start + n,
                      ") of sequence ", seq, " do not fit ", name, " of shape ", shape_string(t.shape()));
}
}  // namespace detail

// dst[dst_seq, dst_start + i, :] = src[src_seq, src_start + i, :] for i < n (same width D).
template <class T>
void copy_token_block(const Tensor<T>& src, std::size_t src_seq, std::size_t src_start, Tensor<T>& dst,
                      std::size_t dst_seq, std::size_t dst_start, std::size_t n) {
  constexpr std::string_view op = "copy_token_block";
  detail::check_token_block(op, "src", src, src_seq, src_start, n);
  detail::check_token_block(op, "dst", dst, dst_seq, dst_start, n);
  require<ShapeError>(src.shape()[2] == dst.shape()[2], op, ": src has shape ", shape_string(src.shape()),
                      " but dst has shape ", shape_string(dst.shape()));
  const std::size_t d = dst.shape()[2];
  const T* s = src.data() + (src_seq * src.shape()[1] + src_start) * d;
  std::copy(s, s + n * d, dst.data() + (dst_seq * dst.shape()[1] + dst_start) * d);
}

// dst[seq, start + i, :] = 0 for i < n.
template <class T>
void zero_token_block(Tensor<T>& dst, std::size_t seq, std::size_t start, std::size_t n) {
  detail::check_token_block("zero_token_block", "dst", dst, seq, start, n);
  T* o = dst.data() + (seq * dst.shape()[1] + start) * dst.shape()[2];
  std::fill(o, o + n * dst.shape()[2], T(0));
}

}  // namespace mixpeft
