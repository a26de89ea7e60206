// The patch ops of ops/patchify.hpp: patchify against naive loops on a non-square image, unpatchify as its inverse
// and adjoint, gradient checks in double of both, and typed errors.
#include <gtest/gtest.h>

#include <string>

#include "mixpeft/ops/patchify.hpp"
#include "mixpeft/testing/gradcheck.hpp"

using namespace mixpeft;
using namespace mixpeft::testing;

namespace {

constexpr std::size_t B = 2, C = 3, P = 2, HP = 3, WP = 2;  // images [2, 3, 6, 4]

TEST(Patchify, MatchesNaiveLoops) {
  Rng rng(1);
  const Tensor<double> images = random_tensor<double>({B, C, HP * P, WP * P}, rng);
  const Tensor<double> patches = patchify(images, P);
  ASSERT_EQ(shape_of(patches), (Shape{B, HP * WP, C * P * P}));
  for (std::size_t b = 0; b < B; ++b)
    for (std::size_t i = 0; i < HP; ++i)
      for (std::size_t j = 0; j < WP; ++j)
        for (std::size_t c = 0; c < C; ++c)
          for (std::size_t y = 0; y < P; ++y)
            for (std::size_t x = 0; x < P; ++x)
              EXPECT_EQ(patches(b, i * WP + j, (c * P + y) * P + x), images(b, c, i * P + y, j * P + x));
}

TEST(Patchify, UnpatchifyIsTheInverseAndTheAdjoint) {
  Rng rng(2);
  const Tensor<double> images = random_tensor<double>({B, C, HP * P, WP * P}, rng);
  EXPECT_EQ(unpatchify(patchify(images, P), shape_of(images), P), images);
  const Tensor<double> r = random_tensor<double>({B, HP * WP, C * P * P}, rng);
  EXPECT_NEAR(dot(patchify(images, P), r), dot(images, unpatchify(r, shape_of(images), P)), 1e-12);
  // A patch as large as the image: one patch per image, its pixels in (c, y, x) order.
  const Tensor<double> one = patchify(images, 1);
  EXPECT_EQ(shape_of(one), (Shape{B, HP * P * WP * P, C}));
  EXPECT_EQ(unpatchify(one, shape_of(images), 1), images);
}

TEST(Patchify, GradientsCheckInDouble) {
  Rng rng(3);
  Tensor<double> images = random_tensor<double>({B, C, HP * P, WP * P}, rng);
  Tensor<double> patches = random_tensor<double>({B, HP * WP, C * P * P}, rng);
  const Tensor<double> r_patches = random_tensor<double>({B, HP * WP, C * P * P}, rng);
  const Tensor<double> r_images = random_tensor<double>(shape_of(images), rng);
  const Shape is = shape_of(images);
  EXPECT_LT(gradient_error([&] { return dot(patchify(images, P), r_patches); }, images, unpatchify(r_patches, is, P)),
            1e-6);
  EXPECT_LT(gradient_error([&] { return dot(unpatchify(patches, is, P), r_images); }, patches, patchify(r_images, P)),
            1e-6);
}

TEST(Patchify, TypedErrors) {
  const Tensor<float> images = zeros<float>({B, C, 6, 4});
  EXPECT_THROW(patchify(images, 0), ConfigError);
  EXPECT_THROW(patchify(images, 3), ShapeError);  // 3 does not divide 4
  EXPECT_THROW(patchify(zeros<float>({C, 6, 4}), 2), ShapeError);
  const Tensor<float> patches = zeros<float>({B, 6, 12});
  EXPECT_THROW(unpatchify(patches, Shape{B, C, 6, 4}, 0), ConfigError);
  EXPECT_THROW(unpatchify(patches, Shape{B, C, 6, 5}, 2), ShapeError);
  EXPECT_THROW(unpatchify(zeros<float>({B, 6, 11}), Shape{B, C, 6, 4}, 2), ShapeError);
  EXPECT_THROW(unpatchify(patches, Shape{C, 6, 4}, 2), ShapeError);
  try {
    patchify(images, 3);
    FAIL() << "no error";
  } catch (const ShapeError& e) {
    EXPECT_STREQ(e.what(), "patchify: images have shape [2, 3, 6, 4], whose height and width the patch size 3 does "
                           "not divide");
  }
}

}  // namespace
