// first_token / add_to_first_token (models/modality_routing.hpp): row 0 of every sequence, and its adjoint.
#include <gtest/gtest.h>

#include "mixpeft/models/modality_routing.hpp"
#include "mixpeft/testing/gradcheck.hpp"

using namespace mixpeft;
using namespace mixpeft::testing;

TEST(ModalityRouting, FirstTokenAndItsAdjoint) {
  Rng rng(1);
  const Tensor<double> x = random_tensor<double>({3, 4, 5}, rng), d = random_tensor<double>({3, 5}, rng);
  const Tensor<double> t = first_token(x);
  ASSERT_EQ(shape_of(t), (Shape{3, 5}));
  Tensor<double> dx = random_tensor<double>({3, 4, 5}, rng);
  const Tensor<double> dx0 = dx;
  add_to_first_token(dx, d);
  for (std::size_t b = 0; b < 3; ++b)
    for (std::size_t j = 0; j < 5; ++j) {
      EXPECT_EQ(t(b, j), x(b, 0, j));
      EXPECT_EQ(dx(b, 0, j), dx0(b, 0, j) + d(b, j));
      for (std::size_t i = 1; i < 4; ++i) EXPECT_EQ(dx(b, i, j), dx0(b, i, j));
    }
  // <first_token(x), d> = <x, add_to_first_token(0, d)>: the adjoint pair.
  Tensor<double> z = zeros<double>({3, 4, 5});
  add_to_first_token(z, d);
  EXPECT_NEAR(dot(t, d), dot(x, z), 1e-12);
  Tensor<double> bad = zeros<double>({3, 4});
  EXPECT_THROW(add_to_first_token(dx, bad), ShapeError);
  EXPECT_THROW(first_token(bad), ShapeError);
}
