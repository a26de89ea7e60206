// mixpeft/ops/token_rows.hpp — moving one token row between sequences of tokens (the ViT's taken [cls] tokens).
//
//   copy_token_row(src, token, dst, slot):   dst[b, slot, :]   = src[b, token, :]     for every b
//   add_token_row(src, slot, dst, token):    dst[b, token, :] += src[b, slot, :]      for every b (its adjoint)
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

}  // namespace mixpeft
