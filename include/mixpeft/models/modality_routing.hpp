// mixpeft/models/modality_routing.hpp — the routing token of an MM-Adapter inside a transformer block.
//
// LaVIN routes each sequence's MM-Adapters from row 0 of the block's normed input (the modality token in the
// LLM, the [cls] token in the ViT). The token is part of the adapter's input x, so its gradient has two paths:
//   forward:   t = x[:, 0, :]                                  // [B, D]
//   backward:  dx[:, 0, :] += dt                               (added to the adapter's input gradient)
// Shapes: x, dx [B, T, D]; t, dt [B, D].
// Backends: any; both are the token-row ops (ops/token_rows.hpp, cuda/token_rows.cuh) on a [B, 1, D] view.
#pragma once

#include "mixpeft/core/tensor.hpp"
#include "mixpeft/ops/elementwise.hpp"
#include "mixpeft/ops/token_rows.hpp"

namespace mixpeft {

template <class Tensor>
Tensor first_token(const Tensor& x) {
  expect_shape("first_token", "x", x, {any_extent, any_extent, any_extent});
  const std::size_t b = x.shape()[0], d = x.shape()[2];
  Tensor t;
  resize_to(t, Shape{b, 1, d});
  copy_token_row(x, 0, t, 0);
  t.reshape({b, d});
  return t;
}

template <class Tensor>
void add_to_first_token(Tensor& dx, const Tensor& d_first) {
  expect_shape("add_to_first_token", "dx", dx, {any_extent, any_extent, any_extent});
  expect_shape("add_to_first_token", "d_first", d_first, {dx.shape()[0], dx.shape()[2]});
  Tensor rows;
  assign(rows, d_first);
  rows.reshape({dx.shape()[0], 1, dx.shape()[2]});
  add_token_row(rows, 0, dx, 0);
}

}  // namespace mixpeft
