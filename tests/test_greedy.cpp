// argmax_last_token (ops/greedy.hpp): the last position's most probable token, ties to the lowest id, typed errors.
#include <gtest/gtest.h>

#include <cmath>

#include "mixpeft/ops/greedy.hpp"

using namespace mixpeft;

TEST(Greedy, ArgmaxOfTheLastPositionWithTiesToTheLowestId) {
  Tensor<float> logits = zeros<float>({1, 3, 5});
  logits(0, 0, 4) = 9.0f;  // an earlier position never counts
  logits(0, 2, 1) = 2.0f;
  logits(0, 2, 3) = 2.0f;
  EXPECT_EQ(argmax_last_token(logits), 1);
  logits(0, 2, 0) = NAN;  // a NaN never wins
  EXPECT_EQ(argmax_last_token(logits), 1);
  logits(0, 2, 4) = 3.0f;
  EXPECT_EQ(argmax_last_token(logits), 4);
}

TEST(Greedy, TypedErrors) {
  EXPECT_THROW(argmax_last_token(zeros<float>({2, 3, 5})), ShapeError);  // one sequence only
  EXPECT_THROW(argmax_last_token(zeros<float>({1, 0, 5})), ShapeError);
  EXPECT_THROW(argmax_last_token(zeros<float>({3, 5})), ShapeError);
}
