// The token-row ops of ops/token_rows.hpp: copy_token_row and add_token_row against naive loops (other rows
// untouched), gradient checks in double (each op's gradient is the other op), and typed errors.
#include <gtest/gtest.h>

#include "mixpeft/ops/token_rows.hpp"
#include "mixpeft/testing/gradcheck.hpp"

using namespace mixpeft;
using namespace mixpeft::testing;

namespace {

constexpr std::size_t B = 3, N = 5, S = 4, D = 7;

TEST(TokenRows, CopyMatchesNaiveLoops) {
  Rng rng(1);
  const Tensor<double> src = random_tensor<double>({B, N, D}, rng);
  const Tensor<double> before = random_tensor<double>({B, S, D}, rng);
  Tensor<double> dst = before;
  copy_token_row(src, 3, dst, 2);
  for (std::size_t b = 0; b < B; ++b)
    for (std::size_t s = 0; s < S; ++s)
      for (std::size_t j = 0; j < D; ++j) EXPECT_EQ(dst(b, s, j), s == 2 ? src(b, 3, j) : before(b, s, j));
}

TEST(TokenRows, AddMatchesNaiveLoops) {
  Rng rng(2);
  const Tensor<double> src = random_tensor<double>({B, S, D}, rng);
  const Tensor<double> before = random_tensor<double>({B, N, D}, rng);
  Tensor<double> dst = before;
  add_token_row(src, 1, dst, 0);
  add_token_row(src, 3, dst, 0);
  for (std::size_t b = 0; b < B; ++b)
    for (std::size_t n = 0; n < N; ++n)
      for (std::size_t j = 0; j < D; ++j)
        EXPECT_DOUBLE_EQ(dst(b, n, j), n == 0 ? before(b, 0, j) + src(b, 1, j) + src(b, 3, j) : before(b, n, j));
}

// L = <copy(src) into dst, R>: dL/dsrc = add_token_row(R); L = <dst + add(src), R>: dL/dsrc = copy_token_row(R).
TEST(TokenRows, GradientsCheckInDouble) {
  Rng rng(3);
  Tensor<double> src_n = random_tensor<double>({B, N, D}, rng), src_s = random_tensor<double>({B, S, D}, rng);
  const Tensor<double> base_s = random_tensor<double>({B, S, D}, rng), base_n = random_tensor<double>({B, N, D}, rng);
  const Tensor<double> r_s = random_tensor<double>({B, S, D}, rng), r_n = random_tensor<double>({B, N, D}, rng);
  const auto copy_loss = [&] {
    Tensor<double> dst = base_s;
    copy_token_row(src_n, 4, dst, 1);
    return dot(dst, r_s);
  };
  Tensor<double> d_src_n = zeros<double>({B, N, D});
  add_token_row(r_s, 1, d_src_n, 4);
  EXPECT_LT(gradient_error(copy_loss, src_n, d_src_n), 1e-6);
  const auto add_loss = [&] {
    Tensor<double> dst = base_n;
    add_token_row(src_s, 2, dst, 0);
    return dot(dst, r_n);
  };
  Tensor<double> d_src_s = zeros<double>({B, S, D});
  copy_token_row(r_n, 0, d_src_s, 2);
  EXPECT_LT(gradient_error(add_loss, src_s, d_src_s), 1e-6);
}

TEST(TokenRows, TypedErrors) {
  const Tensor<float> src = zeros<float>({B, N, D});
  Tensor<float> dst = zeros<float>({B, S, D});
  EXPECT_THROW(copy_token_row(src, N, dst, 0), ShapeError);      // token out of range
  EXPECT_THROW(copy_token_row(src, 0, dst, S), ShapeError);      // slot out of range
  EXPECT_THROW(copy_token_row(zeros<float>({B + 1, N, D}), 0, dst, 0), ShapeError);  // batch
  EXPECT_THROW(copy_token_row(zeros<float>({B, N, D + 1}), 0, dst, 0), ShapeError);  // width
  EXPECT_THROW(copy_token_row(zeros<float>({B, D}), 0, dst, 0), ShapeError);         // rank
  Tensor<float> wide = zeros<float>({B, N, D});
  EXPECT_THROW(add_token_row(dst, S, wide, 0), ShapeError);
  EXPECT_THROW(add_token_row(dst, 0, wide, N), ShapeError);
  EXPECT_THROW(add_token_row(zeros<float>({B, S, D - 1}), 0, wide, 0), ShapeError);
  try {
    copy_token_row(src, 0, dst, S);
    FAIL() << "no error";
  } catch (const ShapeError& e) {
    EXPECT_STREQ(e.what(), "copy_token_row: row 4 is out of range for dst of shape [3, 4, 7]");
  }
}

TEST(TokenRows, BlockCopyAndZeroTouchOnlyTheirRows) {
  Rng rng(5);
  const Tensor<double> src = random_tensor<double>({2, 6, D}, rng), before = random_tensor<double>({3, 9, D}, rng);
  Tensor<double> dst = before;
  copy_token_block(src, 1, 2, dst, 2, 4, 3);  // src[1, 2:5] -> dst[2, 4:7]
  for (std::size_t b = 0; b < 3; ++b)
    for (std::size_t t = 0; t < 9; ++t)
      for (std::size_t j = 0; j < D; ++j) {
        const bool in = b == 2 && t >= 4 && t < 7;
        EXPECT_EQ(dst(b, t, j), in ? src(1, t - 2, j) : before(b, t, j));
      }
  zero_token_block(dst, 0, 8, 1);
  for (std::size_t j = 0; j < D; ++j) EXPECT_EQ(dst(0, 8, j), 0.0);
  EXPECT_EQ(dst(0, 7, 0), before(0, 7, 0));
  copy_token_block(src, 0, 0, dst, 0, 0, 0);  // nothing
  EXPECT_EQ(dst(0, 0, 0), before(0, 0, 0));
  EXPECT_THROW(copy_token_block(src, 2, 0, dst, 0, 0, 1), ShapeError);  // no sequence 2 in src
  EXPECT_THROW(copy_token_block(src, 0, 4, dst, 0, 0, 3), ShapeError);  // rows 4..7 of 6
  EXPECT_THROW(copy_token_block(src, 0, 0, dst, 0, 7, 3), ShapeError);  // rows 7..10 of 9
  Tensor<double> narrow = zeros<double>({3, 9, D - 1});
  EXPECT_THROW(copy_token_block(src, 0, 0, narrow, 0, 0, 1), ShapeError);
  EXPECT_THROW(zero_token_block(dst, 3, 0, 1), ShapeError);
}

}  // namespace
