// mixpeft/ops/embedding.hpp — embedding lookup (token embeddings, learned modality / position embeddings).
//
//   forward:   y[k, :] = table[ids[k], :]                  for every index k of ids
//   backward:  dtable[ids[k], :] += dy[k, :]               (accumulated, repeated ids add up;
//                                                         skipped when dtable is null: frozen table)
// There is no input gradient (ids are integers). Backward needs only the ids.
// Every id must lie in [0, V); an id outside it throws IndexError naming the id, where it sits, and V.
// Shapes: ids [...] (any shape, e.g. [B, T]); table, dtable [V, D]; y, dy [..., D] (ids' shape + [D]).
#pragma once

#include <algorithm>
#include <cstdint>
#include <string_view>
#include <type_traits>

#include "mixpeft/core/error.hpp"
#include "mixpeft/core/parallel.hpp"
#include "mixpeft/core/tensor.hpp"

namespace mixpeft {

namespace detail {

inline Shape embedding_output_shape(const Tensor<std::int64_t>& ids, std::size_t d) {
  Shape shape = shape_of(ids);
  shape.push_back(d);
  return shape;
}

inline void check_embedding_ids(std::string_view op, const Tensor<std::int64_t>& ids, std::size_t vocab) {
  for (std::size_t k = 0; k < ids.size(); ++k) {
    const std::int64_t id = ids.data()[k];
    require<IndexError>(id >= 0 && std::uint64_t(id) < vocab, op, ": id ", id, " at flat index ", k,
                         " of ids ", shape_string(ids.shape()), " is out of range for a table of V = ", vocab,
                         " rows");
  }
}

}  // namespace detail

template <class T>
void embedding_forward(const Tensor<std::int64_t>& ids, const Tensor<T>& table, Tensor<T>& y) {
  constexpr std::string_view op = "embedding_forward";
  expect_shape(op, "table", table, {any_extent, any_extent});
  const std::size_t vocab = table.shape()[0], d = table.shape()[1];
  detail::check_embedding_ids(op, ids, vocab);
  resize_to(y, detail::embedding_output_shape(ids, d));
  parallel_rows(ids.size(), d, [&](std::size_t k) {
    const T* src = table.data() + std::size_t(ids.data()[k]) * d;
    std::copy(src, src + d, y.data() + k * d);
  });
}

template <class T>
void embedding_backward(const Tensor<std::int64_t>& ids, const Tensor<T>& dy, std::type_identity_t<Tensor<T>>* dtable) {
  constexpr std::string_view op = "embedding_backward";
  if (!dtable) return;
  expect_shape(op, "dtable", *dtable, {any_extent, any_extent});
  const std::size_t vocab = dtable->shape()[0], d = dtable->shape()[1];
  const Shape expected = detail::embedding_output_shape(ids, d);
  require<ShapeError>(shape_of(dy) == expected, op, ": dy has shape ", shape_string(dy.shape()), ", expected ",
                      shape_string(expected));
  detail::check_embedding_ids(op, ids, vocab);
  // Column blocks per thread: repeated ids never race, and the sum order is fixed (deterministic).
  parallel_ranges(d, ids.size(), [&](std::size_t c0, std::size_t c1) {
    for (std::size_t k = 0; k < ids.size(); ++k) {
      const T* src = dy.data() + k * d;
      T* dst = dtable->data() + std::size_t(ids.data()[k]) * d;
      for (std::size_t c = c0; c < c1; ++c) dst[c] += src[c];
    }
  });
}

}  // namespace mixpeft
