// The ViT embedding ops of ops/class_token.hpp: class_token_forward against naive loops, class_token_backward
// against naive batch sums (accumulating, each gradient skipped when null), gradient checks in double for the
// [cls] token, the patch embeddings and the positions, and typed errors.
#include <gtest/gtest.h>

#include "mixpeft/ops/class_token.hpp"
#include "mixpeft/testing/gradcheck.hpp"

using namespace mixpeft;
using namespace mixpeft::testing;

namespace {

constexpr std::size_t B = 3, M = 4, N = M + 1, D = 6;

struct Data {
  Rng rng{11};
  Tensor<double> cls = random_tensor<double>({D}, rng), e = random_tensor<double>({B, M, D}, rng),
                 pos = random_tensor<double>({N, D}, rng), d_emb = random_tensor<double>({B, N, D}, rng);
};

TEST(ClassToken, ForwardMatchesNaiveLoops) {
  Data d;
  Tensor<double> emb;
  class_token_forward(d.cls, d.e, d.pos, emb);
  ASSERT_EQ(shape_of(emb), (Shape{B, N, D}));
  for (std::size_t b = 0; b < B; ++b)
    for (std::size_t n = 0; n < N; ++n)
      for (std::size_t j = 0; j < D; ++j)
        EXPECT_DOUBLE_EQ(emb(b, n, j), (n == 0 ? d.cls(j) : d.e(b, n - 1, j)) + d.pos(n, j));
}

TEST(ClassToken, BackwardMatchesBatchSumsAndAccumulates) {
  Data d;
  const Tensor<double> cls0 = random_tensor<double>({D}, d.rng), pos0 = random_tensor<double>({N, D}, d.rng);
  Tensor<double> d_cls = cls0, d_pos = pos0, d_e = random_tensor<double>({1, 2}, d.rng);
  class_token_backward(d.d_emb, &d_cls, &d_pos, &d_e);
  ASSERT_EQ(shape_of(d_e), (Shape{B, M, D}));
  for (std::size_t j = 0; j < D; ++j) {
    double s = 0;
    for (std::size_t b = 0; b < B; ++b) s += d.d_emb(b, 0, j);
    EXPECT_NEAR(d_cls(j), cls0(j) + s, 1e-14);
  }
  for (std::size_t n = 0; n < N; ++n)
    for (std::size_t j = 0; j < D; ++j) {
      double s = 0;
      for (std::size_t b = 0; b < B; ++b) s += d.d_emb(b, n, j);
      EXPECT_NEAR(d_pos(n, j), pos0(n, j) + s, 1e-14);
    }
  for (std::size_t b = 0; b < B; ++b)
    for (std::size_t m = 0; m < M; ++m)
      for (std::size_t j = 0; j < D; ++j) EXPECT_EQ(d_e(b, m, j), d.d_emb(b, m + 1, j));
  // Null gradients are skipped; the others still come out.
  Tensor<double> only_cls = zeros<double>({D});
  class_token_backward<double>(d.d_emb, &only_cls, nullptr, nullptr);
  for (std::size_t j = 0; j < D; ++j) EXPECT_NEAR(only_cls(j), d_cls(j) - cls0(j), 1e-14);
  Tensor<double> only_e;
  class_token_backward<double>(d.d_emb, nullptr, nullptr, &only_e);
  EXPECT_EQ(only_e, d_e);
}

TEST(ClassToken, GradientsCheckInDouble) {
  Data d;
  const auto loss = [&] {
    Tensor<double> emb;
    class_token_forward(d.cls, d.e, d.pos, emb);
    return dot(emb, d.d_emb);
  };
  Tensor<double> d_cls = zeros<double>({D}), d_pos = zeros<double>({N, D}), d_e;
  class_token_backward(d.d_emb, &d_cls, &d_pos, &d_e);
  EXPECT_LT(gradient_error(loss, d.cls, d_cls), 1e-6);
  EXPECT_LT(gradient_error(loss, d.e, d_e), 1e-6);
  EXPECT_LT(gradient_error(loss, d.pos, d_pos), 1e-6);
}

TEST(ClassToken, TypedErrors) {
  const Tensor<float> cls = zeros<float>({D}), e = zeros<float>({B, M, D}), pos = zeros<float>({N, D});
  Tensor<float> emb;
  EXPECT_THROW(class_token_forward(zeros<float>({D + 1}), e, pos, emb), ShapeError);
  EXPECT_THROW(class_token_forward(zeros<float>({1, D}), e, pos, emb), ShapeError);
  EXPECT_THROW(class_token_forward(cls, zeros<float>({B, D}), pos, emb), ShapeError);
  EXPECT_THROW(class_token_forward(cls, e, zeros<float>({M, D}), emb), ShapeError);  // one position short
  const Tensor<float> d_emb = zeros<float>({B, N, D});
  Tensor<float> bad_cls = zeros<float>({D - 1}), bad_pos = zeros<float>({N + 1, D}), d_e;
  EXPECT_THROW(class_token_backward<float>(d_emb, &bad_cls, nullptr, &d_e), ShapeError);
  EXPECT_THROW(class_token_backward<float>(d_emb, nullptr, &bad_pos, &d_e), ShapeError);
  EXPECT_THROW(class_token_backward<float>(zeros<float>({B, 0, D}), nullptr, nullptr, &d_e), ShapeError);
  EXPECT_THROW(class_token_backward<float>(zeros<float>({B, D}), nullptr, nullptr, &d_e), ShapeError);
  try {
    class_token_forward(cls, e, zeros<float>({M, D}), emb);
    FAIL() << "no error";
  } catch (const ShapeError& e) {
    EXPECT_STREQ(e.what(), "class_token_forward: pos has shape [4, 6], expected [5, 6]");
  }
}

}  // namespace
