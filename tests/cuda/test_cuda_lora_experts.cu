// The MoLE building blocks on the CUDA backend against the same blocks on the CPU: TopKRouter, LoRAExperts (one
// expert, sparse top-1, gate scaling, dense mixture, dropout, balance-loss gradients), BalanceLoss and RouterStats,
// built from the same seed on both backends (so they hold the same weights and draw the same dropout masks) and
// run on the same inputs. Routing ids, counts and permutations must agree exactly; values within float tolerance.
// LoRAExperts<__nv_bfloat16, Cuda> runs against a double CPU layer holding its bf16-rounded weights. Every test
// skips when no CUDA device is present.
#include <gtest/gtest.h>

#include <cstdint>
#include <map>
#include <string>

#include "mixpeft/cuda/backend.cuh"
#include "mixpeft/layers/balance_loss.hpp"
#include "mixpeft/layers/lora_experts.hpp"
#include "mixpeft/layers/router.hpp"
#include "mixpeft/layers/router_stats.hpp"
#include "cuda_test_support.cuh"

namespace mixpeft::cuda_test {
namespace {

using CpuLayer = LoRAExperts<float, Cpu>;
using GpuLayer = LoRAExperts<float, Cuda>;

constexpr std::size_t D = 48, F = 80;

CpuLayer::Config config(std::size_t experts, double dropout = 0.0) {
  return {.dim = D, .hidden = F, .experts = experts, .rank = 4, .alpha = 8.0, .dropout = dropout};
}

template <class Layer>
Layer build(const CpuLayer::Config& c, std::uint64_t seed) {
  Rng rng(seed);
  return Layer(c, rng);
}

// The same random B factors on both layers and a sharper router (a fresh B is zero and would hide the LoRA paths;
// a sharp router keeps float rounding from flipping a token's expert).
void randomise(CpuLayer& cpu, GpuLayer& gpu, std::uint64_t seed) {
  Rng rng(seed);
  for (auto& ref : parameters_of<float, Cpu>(cpu)) {
    if (ref.name.find("lora_B") != std::string::npos)
      ref.param->value = mixpeft::testing::random_tensor<float>(mixpeft::shape_of(ref.param->value), rng, 0.3);
    if (ref.name == "router.weight") ref.param->value *= 4.0f;
  }
  mirror_parameters(parameters_of<float, Cpu>(cpu), parameters_of<float, Cuda>(gpu));
}

void expect_same_routing(const RoutingResult<float, Cuda>& g, const RoutingResult<float, Cpu>& c,
                         const std::string& what) {
  EXPECT_TRUE(same_ids(g.experts, c.experts)) << what << ": experts";
  EXPECT_TRUE(same_ids(g.counts, c.counts)) << what << ": counts";
  EXPECT_TRUE(same_ids(g.offsets, c.offsets)) << what << ": offsets";
  EXPECT_TRUE(same_ids(g.perm, c.perm)) << what << ": perm";
  EXPECT_TRUE(close(g.probs, c.probs)) << what << ": probs";
  EXPECT_TRUE(close(g.gates, c.gates)) << what << ": gates";
}

void expect_same_grads(CpuLayer& cpu, GpuLayer& gpu, const std::string& what) {
  auto cp = parameters_of<float, Cpu>(cpu);
  auto gp = parameters_of<float, Cuda>(gpu);
  for (std::size_t i = 0; i < cp.size(); ++i) {
    if (!cp[i].param->trainable) continue;
    EXPECT_TRUE(close(gp[i].param->grad, cp[i].param->grad, 1e-4)) << what << ": " << cp[i].name;
  }
}

// One forward and backward (with the balance loss's router gradients when `balance`) on both layers.
void step_and_compare(CpuLayer& cpu, GpuLayer& gpu, const Shape& x_shape, bool balance, const std::string& what) {
  Rng rng(7);
  const Tensor<float> x = mixpeft::testing::random_tensor<float>(x_shape, rng);
  const Tensor<float> dy = mixpeft::testing::random_tensor<float>(x_shape, rng);
  const DeviceTensor<float> x_dev = cuda::upload(x), dy_dev = cuda::upload(dy);
  CpuLayer::Cache cc;
  GpuLayer::Cache gc;
  const Tensor<float> y = cpu.forward(x, cc);
  const DeviceTensor<float> y_dev = gpu.forward(x_dev, gc);
  if (cpu.router()) expect_same_routing(gc.router.routing, cc.router.routing, what);
  EXPECT_TRUE(close(y_dev, y)) << what << ": y";

  RouterGrad<float, Cpu> cg;
  RouterGrad<float, Cuda> gg;
  if (balance && cpu.router()) {
    const BalanceLoss<float, Cpu> cpu_loss({.kind = BalanceKind::MoLE, .weight = 0.5});
    const BalanceLoss<float, Cuda> gpu_loss({.kind = BalanceKind::MoLE, .weight = 0.5});
    const RoutingResult<float, Cpu>* cr[] = {&cc.router.routing};
    const RoutingResult<float, Cuda>* gr[] = {&gc.router.routing};
    RouterGrad<float, Cpu>* cgs[] = {&cg};
    RouterGrad<float, Cuda>* ggs[] = {&gg};
    BalanceTokens<float, Cpu> ct;
    BalanceTokens<float, Cuda> gt;
    EXPECT_NEAR(gpu_loss.forward(gr, gt), cpu_loss.forward(cr, ct), 1e-5) << what;
    cpu_loss.backward(cr, ct, cgs);
    gpu_loss.backward(gr, gt, ggs);
    EXPECT_TRUE(close(gg.dprobs, cg.dprobs)) << what << ": balance dprobs";
  }
  const Tensor<float> dx = cpu.backward(cc, dy, cg);
  const DeviceTensor<float> dx_dev = gpu.backward(gc, dy_dev, gg);
  EXPECT_TRUE(close(dx_dev, dx, 1e-4)) << what << ": dx";
  expect_same_grads(cpu, gpu, what);
}

TEST_F(CudaTest, LoRAExpertsBuiltFromOneSeedHoldTheSameWeights) {
  CpuLayer cpu = build<CpuLayer>(config(3), 1);
  GpuLayer gpu = build<GpuLayer>(config(3), 1);
  expect_same_parameters(parameters_of<float, Cpu>(cpu), parameters_of<float, Cuda>(gpu));
}

TEST_F(CudaTest, LoRAExpertsMatchCpuInEveryMode) {
  struct Case {
    const char* what;
    std::size_t experts;
    double dropout;
    bool gate_scaling, dense, balance;
    Shape x_shape;
  };
  for (const Case& c : {Case{"one expert", 1, 0.0, false, false, false, {2, 9, D}},
                        Case{"one expert, dropout", 1, 0.2, false, false, false, {2, 9, D}},
                        Case{"sparse", 4, 0.0, false, false, false, {37, D}},
                        Case{"sparse, dropout", 4, 0.1, false, false, false, {3, 13, D}},
                        Case{"sparse, balance", 3, 0.0, false, false, true, {40, D}},
                        Case{"gate scaling, balance", 3, 0.0, true, false, true, {40, D}},
                        Case{"dense, dropout", 3, 0.1, false, true, true, {21, D}}}) {
    CpuLayer::Config cfg = config(c.experts, c.dropout);
    cfg.gate_scaling = c.gate_scaling;
    cfg.dense = c.dense;
    CpuLayer cpu = build<CpuLayer>(cfg, 2);
    GpuLayer gpu = build<GpuLayer>(cfg, 2);
    randomise(cpu, gpu, 3);
    step_and_compare(cpu, gpu, c.x_shape, c.balance, c.what);
    // A second step reuses the caches (and draws new dropout masks on both).
    step_and_compare(cpu, gpu, c.x_shape, c.balance, std::string(c.what) + ", second step");
  }
}

TEST_F(CudaTest, LoRAExpertsInEvalModeMatchCpu) {
  CpuLayer cpu = build<CpuLayer>(config(3, 0.3), 4);
  GpuLayer gpu = build<GpuLayer>(config(3, 0.3), 4);
  randomise(cpu, gpu, 5);
  cpu.set_training(false);
  gpu.set_training(false);
  Rng rng(6);
  const Tensor<float> x = mixpeft::testing::random_tensor<float>({25, D}, rng);
  CpuLayer::Cache cc;
  GpuLayer::Cache gc;
  EXPECT_TRUE(close(gpu.forward(cuda::upload(x), gc), cpu.forward(x, cc)));
}

TEST_F(CudaTest, BalanceLossesAndRouterStatsMatchCpuWithMaskAndSamples) {
  const std::size_t batch = 3, seq = 11, n = batch * seq, K = 4;
  Rng rng(8);
  Rng r1(9), r2(9);
  TopKRouter<float, Cpu> cpu_router({.in = D, .experts = K, .k = 2}, r1);
  TopKRouter<float, Cuda> gpu_router({.in = D, .experts = K, .k = 2}, r2);
  const Tensor<float> x = mixpeft::testing::random_tensor<float>({batch, seq, D}, rng);
  TopKRouter<float, Cpu>::Cache cc;
  TopKRouter<float, Cuda>::Cache gc;
  const auto& cr = cpu_router.forward(x, cc);
  const auto& gr = gpu_router.forward(cuda::upload(x), gc);
  expect_same_routing(gr, cr, "top-2 router");

  Tensor<float> mask = mixpeft::zeros<float>({n});
  mask.fill(1.0f);
  for (std::size_t i = 0; i < n; i += 5) mask(i) = 0.0f;
  Tensor<std::int32_t> ids;
  batch_sample_ids(batch, seq, ids);
  BalanceTokens<float, Cpu> ct{mask, ids, batch};
  BalanceTokens<float, Cuda> gt{cuda::upload(mask), cuda::upload(ids), batch};
  const RoutingResult<float, Cpu>* cl[] = {&cr, &cr};
  const RoutingResult<float, Cuda>* gl[] = {&gr, &gr};
  for (BalanceKind kind : {BalanceKind::MoLE, BalanceKind::Switch, BalanceKind::GShard, BalanceKind::ZLoss}) {
    for (BalanceScope scope : {BalanceScope::PerLayer, BalanceScope::AcrossLayers}) {
      const BalanceLoss<float, Cpu> cpu_loss({.kind = kind, .weight = 0.1, .scope = scope});
      const BalanceLoss<float, Cuda> gpu_loss({.kind = kind, .weight = 0.1, .scope = scope});
      EXPECT_NEAR(gpu_loss.forward(gl, gt), cpu_loss.forward(cl, ct), 1e-6) << int(kind) << int(scope);
      RouterGrad<float, Cpu> c0, c1;
      RouterGrad<float, Cuda> g0, g1;
      RouterGrad<float, Cpu>* cg[] = {&c0, &c1};
      RouterGrad<float, Cuda>* gg[] = {&g0, &g1};
      cpu_loss.backward(cl, ct, cg, 2.0f);
      gpu_loss.backward(gl, gt, gg, 2.0f);
      for (int l = 0; l < 2; ++l) {
        if (kind == BalanceKind::ZLoss) EXPECT_TRUE(close(gg[l]->dlogits, cg[l]->dlogits)) << int(kind) << l;
        else EXPECT_TRUE(close(gg[l]->dprobs, cg[l]->dprobs)) << int(kind) << l;
      }
    }
  }

  RouterStats<float, Cpu> cpu_stats(K, batch);
  RouterStats<float, Cuda> gpu_stats(K, batch);
  cpu_stats.record(0, cr, ids, mask);
  gpu_stats.record(0, gr, gt.sample_ids, gt.mask);
  EXPECT_EQ(gpu_stats.tokens(0), cpu_stats.tokens(0));
  for (std::size_t g = 0; g < batch; ++g) {
    EXPECT_EQ(gpu_stats.usage(0, g), cpu_stats.usage(0, g)) << g;
    const auto pg = gpu_stats.mean_probs(0, g), pc = cpu_stats.mean_probs(0, g);
    for (std::size_t j = 0; j < K; ++j) EXPECT_NEAR(pg[j], pc[j], 1e-6);
  }
}

TEST_F(CudaTest, TopKRouterBackwardMatchesCpu) {
  Rng r1(10), r2(10), rng(11);
  TopKRouter<float, Cpu> cpu({.in = D, .experts = 5, .k = 2, .temperature = 0.7}, r1);
  TopKRouter<float, Cuda> gpu({.in = D, .experts = 5, .k = 2, .temperature = 0.7}, r2);
  const Tensor<float> x = mixpeft::testing::random_tensor<float>({2, 9, D}, rng);
  const Tensor<float> dp = mixpeft::testing::random_tensor<float>({18, 5}, rng);
  const Tensor<float> dl = mixpeft::testing::random_tensor<float>({18, 5}, rng);
  TopKRouter<float, Cpu>::Cache cc;
  TopKRouter<float, Cuda>::Cache gc;
  expect_same_routing(gpu.forward(cuda::upload(x), gc), cpu.forward(x, cc), "router");
  const Tensor<float> dx = cpu.backward(cc, dp, dl);
  EXPECT_TRUE(close(gpu.backward(gc, cuda::upload(dp), cuda::upload(dl)), dx));
  EXPECT_TRUE(close(gpu.weight().grad, cpu.weight().grad));
  EXPECT_TRUE(close(gpu.bias().grad, cpu.bias().grad));
}

// bf16 storage: the device layer against a double CPU layer holding the device's (rounded) weights and inputs.
TEST_F(CudaTest, Bf16LoRAExpertsMatchDoubleCpuOnTheRoundedWeights) {
  using Bf16Layer = LoRAExperts<__nv_bfloat16, Cuda>;
  using Ref = LoRAExperts<double, Cpu>;
  const LoRAExpertsConfig cfg{.dim = D, .hidden = F, .experts = 3, .rank = 4, .alpha = 8.0, .dropout = 0.0,
                              .gate_scaling = true};
  Rng r1(12), r2(12), rng(13);
  Bf16Layer gpu(cfg, r1);
  Ref cpu(cfg, r2);
  auto gp = parameters_of<__nv_bfloat16, Cuda>(gpu);
  auto cp = parameters_of<double, Cpu>(cpu);
  ASSERT_EQ(gp.size(), cp.size());
  for (std::size_t i = 0; i < gp.size(); ++i) {
    if (gp[i].name.find("lora_B") != std::string::npos)
      gp[i].param->value = cuda::upload_as<__nv_bfloat16>(
          mixpeft::testing::random_tensor<double>(mixpeft::shape_of(cp[i].param->value), rng, 0.3));
    if (gp[i].name == "router.weight") {
      Tensor<double> w = get(gp[i].param->value) * 4.0;
      gp[i].param->value = cuda::upload_as<__nv_bfloat16>(w);
    }
    cp[i].param->value = get(gp[i].param->value);
  }
  auto x = put<__nv_bfloat16>(mixpeft::testing::random_tensor<double>({30, D}, rng));
  auto dy = put<__nv_bfloat16>(mixpeft::testing::random_tensor<double>({30, D}, rng));
  Bf16Layer::Cache gc;
  Ref::Cache cc;
  const DeviceTensor<__nv_bfloat16> y = gpu.forward(x.dev, gc);
  const Tensor<double> y_ref = cpu.forward(x.host, cc);
  EXPECT_TRUE(same_ids(gc.router.routing.experts, cc.router.routing.experts));
  EXPECT_TRUE(agrees(get(y), y_ref, 3e-2));
  const DeviceTensor<__nv_bfloat16> dx = gpu.backward(gc, dy.dev);
  EXPECT_TRUE(agrees(get(dx), cpu.backward(cc, dy.host), 3e-2));
  for (std::size_t i = 0; i < gp.size(); ++i)
    if (cp[i].param->trainable) EXPECT_TRUE(agrees(get(gp[i].param->grad), cp[i].param->grad, 5e-2)) << cp[i].name;
}

}  // namespace
}  // namespace mixpeft::cuda_test
