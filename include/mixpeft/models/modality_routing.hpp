// mixpeft/models/modality_routing.hpp — the routing token of an MM-Adapter inside a transformer block.
//
// LaVIN routes each sequence's MM-Adapters from row 0 of the block's normed input (the modality token in the
// LLM, the [cls] token in the ViT). The token is part of the adapter's input x, so its gradient has two paths:
//   forward:   t = x[:, 0, :]                                  // [B, D]
//   backward:  dx[:, 0, :] += dt                               (added to the adapter's input gradient)
// Shapes: x, dx [B, T, D]; t, dt [B, D].
#pragma once

#include <xtensor/xview.hpp>

#include "mixpeft/core/tensor.hpp"

namespace mixpeft {

template <class T>
Tensor<T> first_token(const Tensor<T>& x) {
  expect_shape("first_token", "x", x, {any_extent, any_extent, any_extent});
  return xt::view(x, xt::all(), 0, xt::all());
}

template <class T>
void add_to_first_token(Tensor<T>& dx, const Tensor<T>& d_first) {
  expect_shape("add_to_first_token", "d_first", d_first, {dx.shape()[0], dx.shape()[2]});
  xt::view(dx, xt::all(), 0, xt::all()) += d_first;
}

}  // namespace mixpeft
