// bench_ffn — one training step (forward + backward) of a frozen SwiGLU FFN, D = 1024, D_ff = 2752, float.
//
//   ffn_lora/T/r     plain LoRA FFN: LoRAExperts with K = 1 (no router, no gather/scatter)
//   ffn_mole/T/r/K   MoLE FFN, top-1 over K experts of rank r, default (reference) config: no gate scaling,
//                    plus the MoLE balance loss (w = 1e-2), so the router's backward runs too
// Routing is exactly uniform and interleaved (token i -> expert i % K), so grouping really permutes rows.
// LoRA dropout is off in both (its per-element RNG cost would be identical and only dilute the ratio).
// Target: ffn_mole/512/32/4 <= 1.10 x ffn_lora/512/32 (the only extra work is the router and the row moves).
#include <benchmark/benchmark.h>

#include <string>

#include "mixpeft/layers/balance_loss.hpp"
#include "mixpeft/layers/lora_experts.hpp"

namespace {

using namespace mixpeft;

constexpr std::size_t D = 1024, F = 2752;

Tensor<float> random_tensor(const Shape& shape, Rng& rng, double scale) {
  Tensor<float> t = empty<float>(shape);
  for (auto& v : t) v = float(rng.normal(0.0, scale));
  return t;
}

void ffn_step(benchmark::State& state, std::size_t tokens, std::size_t rank, std::size_t experts) {
  Rng rng(1);
  using Layer = LoRAExperts<float>;
  Layer layer({.dim = D, .hidden = F, .experts = experts, .rank = rank, .alpha = 2.0 * double(rank), .dropout = 0.0},
              rng);
  for (auto& ref : parameters_of<float>(layer))
    if (ref.name.find("lora_B") != std::string::npos) ref.param->value = random_tensor(shape_of(ref.param->value), rng, 0.02);
  Tensor<float> x = random_tensor({tokens, D}, rng, 1.0), dy = random_tensor({tokens, D}, rng, 1.0);
  if (Layer::Router* router = layer.router()) {
    // Router logits 8 * x[i, k] on a one-hot code in the first K features: token i -> expert i % K.
    router->weight().value.fill(0.0f);
    router->bias().value.fill(0.0f);
    for (std::size_t k = 0; k < experts; ++k) router->weight().value(k, k) = 8.0f;
    for (std::size_t i = 0; i < tokens; ++i)
      for (std::size_t k = 0; k < experts; ++k) x(i, k) = k == i % experts ? 1.0f : 0.0f;
  }
  BalanceLoss<float> balance({.kind = BalanceKind::MoLE, .weight = 1e-2});
  BalanceTokens<float> ids;
  Layer::Cache cache;
  RouterGrad<float> router_grad;
  RouterGrad<float>* grads[] = {&router_grad};
  for (auto _ : state) {
    Tensor<float> y = layer.forward(x, cache);
    router_grad.clear();
    if (experts > 1) {
      const RoutingResult<float>* routing[] = {&cache.router.routing};
      benchmark::DoNotOptimize(balance.forward(routing, ids));
      balance.backward(routing, ids, grads);
    }
    Tensor<float> dx = layer.backward(cache, dy, router_grad);
    benchmark::DoNotOptimize(y.data());
    benchmark::DoNotOptimize(dx.data());
  }
  if (experts > 1 && cache.router.routing.counts(0) != std::int32_t(tokens / experts))
    state.SkipWithError("routing is not uniform");
  state.counters["tokens/s"] = benchmark::Counter(double(tokens * state.iterations()), benchmark::Counter::kIsRate);
}

void add(const std::string& name, std::size_t tokens, std::size_t rank, std::size_t experts) {
  benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& s) { ffn_step(s, tokens, rank, experts); })
      ->Unit(benchmark::kMillisecond);
}

}  // namespace

int main(int argc, char** argv) {
  for (auto [t, r] : {std::pair{512, 32}, {512, 16}, {2048, 32}})
    add("ffn_lora/" + std::to_string(t) + "/" + std::to_string(r), t, r, 1);
  for (auto [t, r, k] : {std::tuple{512, 32, 4}, {512, 16, 2}, {512, 32, 8}, {2048, 32, 4}})
    add("ffn_mole/" + std::to_string(t) + "/" + std::to_string(r) + "/" + std::to_string(k), t, r, k);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
