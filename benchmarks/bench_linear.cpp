// Forward + backward of the linear-family layers (float, training mode) against raw Eigen.
//   frozen_linear/T/D      Linear D -> D, frozen weight, no bias: y = x W^T, dx = dy W
//   eigen_gemm/T/D         the same two GEMMs written directly in Eigen (the ceiling)
//   lora_linear/T/D/r      LoRALinear D -> D over the frozen weight, alpha = 2r, dropout 0.05 (PEFT default)
//   lora_linear_nodrop/T/D/r   the same with dropout 0 (the adapter's GEMMs alone)
//   mm_adapter/T/D         MMAdapter on 2 sequences of T tokens (h = 8, groups = 2, dropout 0.1)
// Targets (ratios in one run): lora_linear/512/1024/16 <= 1.15 x frozen_linear/512/1024;
// frozen_linear within 10% of eigen_gemm.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <vector>

#include "mixpeft/layers/linear.hpp"
#include "mixpeft/layers/lora_linear.hpp"
#include "mixpeft/layers/mm_adapter.hpp"
#include "mixpeft/testing/gradcheck.hpp"

using namespace mixpeft;

namespace {

Tensor<float> random_input(const Shape& shape, std::uint64_t seed) {
  Rng rng(seed);
  return testing::random_tensor<float>(shape, rng);
}

void set_flops(benchmark::State& state, double flops) {
  state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

void eigen_gemm(benchmark::State& state) {
  const auto T = state.range(0), D = state.range(1);
  using M = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const M x = M::Random(T, D), W = M::Random(D, D), dy = M::Random(T, D);
  M y(T, D), dx(T, D);
  for (auto _ : state) {
    y.noalias() = x * W.transpose();
    dx.noalias() = dy * W;
    benchmark::DoNotOptimize(y.data());
    benchmark::DoNotOptimize(dx.data());
  }
  set_flops(state, 4.0 * double(T) * double(D) * double(D));
}

void frozen_linear(benchmark::State& state) {
  const auto T = std::size_t(state.range(0)), D = std::size_t(state.range(1));
  Rng rng(1);
  Linear<float> layer({.in = D, .out = D, .bias = false, .trainable_weight = false}, rng);
  const Tensor<float> x = random_input({T, D}, 2), dy = random_input({T, D}, 3);
  Linear<float>::Cache cache;
  for (auto _ : state) {
    Tensor<float> y = layer.forward(x, cache);
    Tensor<float> dx = layer.backward(cache, dy);
    benchmark::DoNotOptimize(y.data());
    benchmark::DoNotOptimize(dx.data());
  }
  set_flops(state, 4.0 * double(T) * double(D) * double(D));
}

void run_lora(benchmark::State& state, double dropout) {
  const auto T = std::size_t(state.range(0)), D = std::size_t(state.range(1)), r = std::size_t(state.range(2));
  Rng rng(1);
  LoRALinear<float> layer(
      {.in = D, .out = D, .bias = false, .lora = {.rank = r, .alpha = 2.0 * double(r), .dropout = dropout}}, rng);
  const Tensor<float> x = random_input({T, D}, 2), dy = random_input({T, D}, 3);
  LoRALinear<float>::Cache cache;
  for (auto _ : state) {
    Tensor<float> y = layer.forward(x, cache);
    Tensor<float> dx = layer.backward(cache, dy);
    benchmark::DoNotOptimize(y.data());
    benchmark::DoNotOptimize(dx.data());
  }
  set_flops(state, 4.0 * double(T) * double(D) * double(D));  // the base layer's work, for comparison
}
void lora_linear(benchmark::State& state) { run_lora(state, 0.05); }
void lora_linear_nodrop(benchmark::State& state) { run_lora(state, 0.0); }

void mm_adapter(benchmark::State& state) {
  const auto T = std::size_t(state.range(0)), D = std::size_t(state.range(1));
  constexpr std::size_t sequences = 2;
  Rng rng(1);
  MMAdapter<float> layer({.dim = D}, rng);
  for (auto* p : {&layer.B(), &layer.D()}) p->value = random_input(shape_of(p->value), 4);
  const Tensor<float> x = random_input({sequences, T, D}, 2), dy = random_input({sequences, T, D}, 3),
                      route = random_input({sequences, D}, 5);
  MMAdapter<float>::Cache cache;
  for (auto _ : state) {
    Tensor<float> y = layer.forward(x, route, cache);
    auto grads = layer.backward(cache, dy);
    benchmark::DoNotOptimize(y.data());
    benchmark::DoNotOptimize(grads.x.data());
  }
}

// Under a shared CPU the fastest repetition is the most faithful: run with --benchmark_repetitions=N and compare
// the "_min" rows.
double fastest(const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); }

}  // namespace

#define MIXPEFT_BENCH(fn) BENCHMARK(fn)->Unit(benchmark::kMillisecond)->ComputeStatistics("min", fastest)

MIXPEFT_BENCH(eigen_gemm)->Args({512, 1024})->Args({2048, 1024})->Args({512, 2048});
MIXPEFT_BENCH(frozen_linear)->Args({512, 1024})->Args({2048, 1024})->Args({512, 2048});
MIXPEFT_BENCH(lora_linear)
    ->Args({512, 1024, 8})
    ->Args({512, 1024, 16})
    ->Args({512, 1024, 32})
    ->Args({512, 1024, 64})
    ->Args({2048, 1024, 16});
MIXPEFT_BENCH(lora_linear_nodrop)->Args({512, 1024, 16});
MIXPEFT_BENCH(mm_adapter)->Args({512, 1024})->Args({2048, 1024});

BENCHMARK_MAIN();
