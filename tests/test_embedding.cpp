#include <gtest/gtest.h>

#include <cstdint>

#include "mixpeft/ops/embedding.hpp"
#include "mixpeft/testing/gradcheck.hpp"

using namespace mixpeft;
using namespace mixpeft::testing;

TEST(Embedding, ForwardGathersRows) {
  Tensor<double> table = {{0.0, 0.5}, {1.0, 1.5}, {2.0, 2.5}}, y;
  Tensor<std::int64_t> ids = {{2, 0}, {1, 2}};
  embedding_forward(ids, table, y);
  ASSERT_EQ(shape_of(y), (Shape{2, 2, 2}));
  Tensor<double> expected = {{{2.0, 2.5}, {0.0, 0.5}}, {{1.0, 1.5}, {2.0, 2.5}}};
  EXPECT_EQ(y, expected);
}

TEST(Embedding, BackwardScatterAddsRepeatedIdsAndAccumulates) {
  Tensor<std::int64_t> ids = {1, 3, 1};
  Tensor<double> dy = {{1.0, 2.0}, {3.0, 4.0}, {5.0, 6.0}};
  Tensor<double> dtable = zeros<double>({4, 2});
  embedding_backward(ids, dy, &dtable);
  Tensor<double> expected = {{0.0, 0.0}, {6.0, 8.0}, {0.0, 0.0}, {3.0, 4.0}};
  EXPECT_EQ(dtable, expected);
  embedding_backward(ids, dy, &dtable);
  EXPECT_EQ(dtable, Tensor<double>(2.0 * expected));
  embedding_backward<double>(ids, dy, nullptr);  // frozen table: nothing to do
}

TEST(Embedding, GradientCheck) {
  Rng rng(1);
  Tensor<std::int64_t> ids = {{4, 0, 4}, {2, 2, 1}};
  Tensor<double> table = random_tensor<double>({6, 5}, rng), R = random_tensor<double>({2, 3, 5}, rng);
  auto loss = [&] {
    Tensor<double> y;
    embedding_forward(ids, table, y);
    return dot(y, R);
  };
  Tensor<double> dtable = zeros<double>({6, 5});
  embedding_backward(ids, R, &dtable);
  EXPECT_LT(gradient_error(loss, table, dtable), 1e-6);
}

TEST(Embedding, LargeScatterMatchesSerialSumAcrossThreads) {
  Rng rng(2);
  const std::size_t n = 4096, vocab = 50, d = 64;
  Tensor<std::int64_t> ids = empty<std::int64_t>({n});
  for (auto& id : ids) id = std::int64_t(rng.below(vocab));
  Tensor<float> table = random_tensor<float>({vocab, d}, rng), dy = random_tensor<float>({n, d}, rng), y;
  embedding_forward(ids, table, y);
  for (std::size_t k = 0; k < n; k += 511) EXPECT_EQ(y(k, 9), table(std::size_t(ids(k)), 9));
  Tensor<float> dtable = zeros<float>({vocab, d});
  embedding_backward(ids, dy, &dtable);
  Tensor<double> ref = zeros<double>({vocab, d});
  for (std::size_t k = 0; k < n; ++k)
    for (std::size_t c = 0; c < d; ++c) ref(std::size_t(ids(k)), c) += dy(k, c);
  EXPECT_LT(max_abs_diff(ref, xt::cast<double>(dtable)), 1e-4);
}

TEST(Embedding, OutOfRangeIdsAndBadShapesAreTyped) {
  Tensor<double> table = zeros<double>({3, 2}), y;
  try {
    embedding_forward(Tensor<std::int64_t>{0, 5}, table, y);
    FAIL();
  } catch (const IndexError& e) {
    EXPECT_STREQ(e.what(),
                 "embedding_forward: id 5 at flat index 1 of ids [2] is out of range for a table of V = 3 rows");
  }
  EXPECT_THROW(embedding_forward(Tensor<std::int64_t>{-1}, table, y), IndexError);
  EXPECT_THROW(embedding_forward(Tensor<std::int64_t>{0}, Tensor<double>(zeros<double>({3})), y), ShapeError);
  Tensor<double> dtable = zeros<double>({3, 2});
  try {
    embedding_backward(Tensor<std::int64_t>{0, 1}, Tensor<double>(zeros<double>({2, 3})), &dtable);
    FAIL();
  } catch (const ShapeError& e) {
    EXPECT_STREQ(e.what(), "embedding_backward: dy has shape [2, 3], expected [2, 2]");
  }
  EXPECT_THROW(embedding_backward(Tensor<std::int64_t>{3}, Tensor<double>(zeros<double>({1, 2})), &dtable),
               IndexError);
  EXPECT_EQ(dtable, Tensor<double>(zeros<double>({3, 2})));  // nothing written before the check
}
