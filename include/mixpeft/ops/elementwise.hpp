// mixpeft/ops/elementwise.hpp — element-wise helpers shared by ops and layers.
//
//   add_to(dst, src):                   dst += src            (same element count and width; leading axes may differ)
//   add_transposed(src, alpha, dst):    dst += alpha * src^T  (src [C, R], dst [R, C]; accumulated, never aliased)
// add_transposed is how a layer folds a gradient it computed transposed (LoRA's dB^T [r, out]) into the
// parameter's gradient [out, r]; the CUDA op of the same name (cuda/elementwise.cuh) is a tiled transpose kernel.
// detail::for_blocks splits flat storage into blocks spread across threads, each handed to Eigen's vectorised
// array expressions through detail::ArrayView.
#pragma once

#include <algorithm>
#include <cstddef>
#include <string_view>
#include <type_traits>

#include "mixpeft/core/error.hpp"
#include "mixpeft/core/parallel.hpp"
#include "mixpeft/core/tensor.hpp"

namespace mixpeft {

namespace detail {
template <class T>
using ArrayView = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;
template <class T>
using ConstArrayView = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>;

// Calls f(offset, length) over the flat storage of a tensor with `n` elements, split across threads.
template <class F>
void for_blocks(std::size_t n, F&& f) {
  constexpr std::size_t block = 4096;
  const std::size_t blocks = (n + block - 1) / block;
  parallel_rows(blocks, block, [&](std::size_t b) {
    const std::size_t begin = b * block;
    f(begin, std::min(block, n - begin));
  });
}
}  // namespace detail

// dst += src (same number of elements, shapes may differ in their leading axes).
template <class T>
void add_to(Tensor<T>& dst, const Tensor<T>& src) {
  require<ShapeError>(dst.size() == src.size() && cols(dst) == cols(src), "add_to: src has shape ",
                      shape_string(src.shape()), " but dst has shape ", shape_string(dst.shape()));
  detail::for_blocks(dst.size(), [&](std::size_t o, std::size_t len) {
    detail::ArrayView<T>(dst.data() + o, Eigen::Index(len)) +=
        detail::ConstArrayView<T>(src.data() + o, Eigen::Index(len));
  });
}

// dst[R, C] += alpha * src[C, R]^T. Both are rank 2; dst must not share storage with src.
template <class T>
void add_transposed(const Tensor<T>& src, std::type_identity_t<T> alpha, Tensor<T>& dst) {
  constexpr std::string_view op = "add_transposed";
  expect_shape(op, "dst", dst, {any_extent, any_extent});
  const std::size_t r = dst.shape()[0], c = dst.shape()[1];
  expect_shape(op, "src", src, {c, r});
  require<ConfigError>(src.size() == 0 || src.data() != dst.data(), op, ": dst must not alias src");
  auto D = matrix_view(dst.data(), r, c);
  const auto S = matrix_view(src.data(), c, r);
  if (alpha == T(1)) D.noalias() += S.transpose();
  else D.noalias() += alpha * S.transpose();
}

}  // namespace mixpeft
