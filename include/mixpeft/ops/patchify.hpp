// mixpeft/ops/patchify.hpp — cutting images into flattened patches (the ViT's patch embedding input) and back.
//
//   patchify:    patches[b, i Wp + j, (c P + y) P + x] = images[b, c, i P + y, j P + x]
//   unpatchify:  the inverse (and adjoint: a permutation), images[b, c, i P + y, j P + x] = patches[...]
// Patch (i, j) is row i Wp + j; its pixels are flattened in (channel, row, column) order, so a linear map of
// the patches with W [D, C P P] is the conv with kernel = stride = P and weight [D, C, P, P].
// Shapes: images [B, C, Hp P, Wp P]; patches [B, Hp Wp, C P P]. P > 0 must divide both image extents.
// cuda/patchify.cuh has both ops on device tensors (one gather kernel each).
#pragma once

#include <cstddef>
#include <string_view>

#include <xtensor/xmanipulation.hpp>
#include <xtensor/xstrided_view.hpp>

#include "mixpeft/core/error.hpp"
#include "mixpeft/core/tensor.hpp"

namespace mixpeft {
namespace detail {

// Checks an image shape against patch size p (ConfigError for p = 0, ShapeError otherwise).
inline void check_patch_grid(std::string_view op, const Shape& image_shape, std::size_t p) {
  require<ConfigError>(p > 0, op, ": the patch size must be > 0");
  require<ShapeError>(image_shape.size() == 4, op, ": images have shape ", shape_string(image_shape),
                      ", expected [B, C, H, W]");
  require<ShapeError>(image_shape[2] % p == 0 && image_shape[3] % p == 0, op, ": images have shape ",
                      shape_string(image_shape), ", whose height and width the patch size ", p, " does not divide");
}

// [B, Hp Wp, C P P] for images of image_shape.
inline Shape patch_shape(const Shape& image_shape, std::size_t p) {
  return {image_shape[0], (image_shape[2] / p) * (image_shape[3] / p), image_shape[1] * p * p};
}

}  // namespace detail

// images [B, C, Hp P, Wp P] -> patches [B, Hp Wp, C P P].
template <class T>
Tensor<T> patchify(const Tensor<T>& images, std::size_t p) {
  const Shape is = shape_of(images);
  detail::check_patch_grid("patchify", is, p);
  const std::size_t b = is[0], c = is[1], hp = is[2] / p, wp = is[3] / p;
  Tensor<T> out = xt::transpose(xt::reshape_view(images, Shape{b, c, hp, p, wp, p}), {0, 2, 4, 1, 3, 5});
  out.reshape(detail::patch_shape(is, p));
  return out;
}

// patches [B, Hp Wp, C P P] -> images of image_shape [B, C, Hp P, Wp P].
template <class T>
Tensor<T> unpatchify(const Tensor<T>& patches, const Shape& image_shape, std::size_t p) {
  detail::check_patch_grid("unpatchify", image_shape, p);
  const Shape ps = detail::patch_shape(image_shape, p);
  expect_shape("unpatchify", "patches", patches, {ps[0], ps[1], ps[2]});
  const std::size_t b = image_shape[0], c = image_shape[1], hp = image_shape[2] / p, wp = image_shape[3] / p;
  Tensor<T> out = xt::transpose(xt::reshape_view(patches, Shape{b, hp, wp, c, p, p}), {0, 3, 1, 4, 2, 5});
  out.reshape(image_shape);
  return out;
}

}  // namespace mixpeft
