// mixpeft/ops/greedy.hpp — greedy decoding's choice of the next token.
//
//   argmax_last_token(logits):  argmax_v logits[0, t - 1, v]      logits [1, t, V] -> a token id (ties: lowest v)
// The CUDA op of the same name (cuda/greedy.cuh) copies the last row (V values) to the host and decides there.
#pragma once

#include <cstddef>
#include <cstdint>

#include "mixpeft/core/error.hpp"
#include "mixpeft/core/tensor.hpp"

namespace mixpeft {

// The most probable token of a row of V logits (the first of equal maxima; a NaN never wins; all NaN: 0).
template <class T>
std::int64_t argmax_row(const T* row, std::size_t vocab) {
  std::size_t best = vocab;
  for (std::size_t v = 0; v < vocab; ++v) {
    if (row[v] != row[v]) continue;  // NaN
    if (best == vocab || row[v] > row[best]) best = v;
  }
  return std::int64_t(best == vocab ? 0 : best);
}

template <class T>
std::int64_t argmax_last_token(const Tensor<T>& logits) {
  expect_shape("argmax_last_token", "logits", logits, {1, any_extent, any_extent});
  const std::size_t t = logits.shape()[1], vocab = logits.shape()[2];
  require<ShapeError>(t > 0 && vocab > 0, "argmax_last_token: logits has shape ", shape_string(logits.shape()));
  return argmax_row(logits.data() + (t - 1) * vocab, vocab);
}

}  // namespace mixpeft
