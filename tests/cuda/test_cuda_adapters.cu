// The adapters on the CUDA backend against the CPU: the new ops (grouped_projection_forward / _backward over a
// shared or per-sequence weight, on every cuBLASLt decomposition and on the fallback kernels; routed_mix_forward /
// _backward) against the CPU ops in double, and Adapter<float, Cuda> and MMAdapter<float, Cuda> against their Cpu
// twins built from the same seed: the same weights, the same dropout masks (exactly), forward, backward (dx, every
// parameter gradient, the routing-token gradient), frozen parameters, the routing weights, and fold /
// fold_into_linear. Every test skips when no CUDA device is present.
#include <gtest/gtest.h>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "mixpeft/cuda/backend.cuh"
#include "mixpeft/layers/adapter.hpp"
#include "mixpeft/layers/linear.hpp"
#include "mixpeft/layers/mm_adapter.hpp"
#include "mixpeft/ops/grouped_projection.hpp"
#include "mixpeft/ops/routed_mix.hpp"
#include "cuda_test_support.cuh"

namespace mixpeft::cuda_test {
namespace {

template <class T>
class CudaAdapterOpsTest : public CudaTest {};
using AdapterOpTypes = ::testing::Types<float, double, __nv_bfloat16>;
TYPED_TEST_SUITE(CudaAdapterOpsTest, AdapterOpTypes);

// ---- grouped_projection ---------------------------------------------------------------------------------------

struct GroupedCase {
  std::size_t sequences;  // 0: one shared W [d, h/g]; S: W [S, d, h/g]
  std::size_t rows_per_sequence, h, d, groups;
  const char* what;
};

// float decompositions in the comments (bf16 and double take other paths for some of them).
const GroupedCase grouped_cases[] = {
    {0, 37, 8, 12, 2, "shared W: one launch batched over the groups"},
    {0, 20, 12, 16, 4, "shared W, 4 groups"},
    {0, 9, 6, 10, 1, "shared W, one group (a plain GEMM)"},
    {2, 3, 8, 12, 2, "per sequence, sequence-major (d/g = 6 floats: group offsets unaligned)"},
    {3, 5, 8, 16, 2, "per sequence, group-major (3 sequences, 2 groups)"},
    {2, 3, 9, 9, 3, "per sequence, no aligned decomposition: fallback kernels"},
    {4, 6, 8, 8, 1, "per sequence, one group: one launch batched over the sequences"},
    {1, 7, 8, 12, 2, "one sequence"},
};

struct GroupedData {
  Shape W_shape, b_shape;
  std::size_t rows;
};

GroupedData grouped_data(const GroupedCase& c) {
  const std::size_t hg = c.h / c.groups;
  if (c.sequences == 0) return {{c.d, hg}, {c.d}, c.rows_per_sequence};
  return {{c.sequences, c.d, hg}, {c.sequences, c.d}, c.sequences * c.rows_per_sequence};
}

template <class T>
void grouped_forward_case(const GroupedCase& c, double alpha, double beta, bool bias) {
  Rng rng(40);
  const GroupedData g = grouped_data(c);
  auto u = random_on_device<T>({g.rows, c.h}, rng);
  auto W = random_on_device<T>(g.W_shape, rng);
  auto b = random_on_device<T>(g.b_shape, rng);
  auto y = random_on_device<T>({g.rows, c.d}, rng);
  Tensor<double> want = y.host;
  grouped_projection_forward(u.host, W.host, bias ? &b.host : nullptr, c.groups, alpha, beta, want);
  grouped_projection_forward(u.dev, W.dev, bias ? &b.dev : nullptr, c.groups, T(alpha), T(beta), y.dev);
  EXPECT_TRUE(agrees(get(y.dev), want, tolerance<T>)) << c.what << " (alpha " << alpha << ", beta " << beta << ")";
}

TYPED_TEST(CudaAdapterOpsTest, GroupedProjectionForwardMatchesCpu) {
  using T = TypeParam;
  for (const GroupedCase& c : grouped_cases) {
    grouped_forward_case<T>(c, 1.0, 0.0, true);
    grouped_forward_case<T>(c, 0.7, 1.0, true);
    grouped_forward_case<T>(c, -1.5, 0.5, false);
    cuda::detail::grouped::ForceKernels force;
    grouped_forward_case<T>(c, 0.7, 1.0, true);
  }
}

template <class T>
void grouped_backward_case(const GroupedCase& c, double alpha) {
  Rng rng(41);
  const GroupedData g = grouped_data(c);
  auto u = random_on_device<T>({g.rows, c.h}, rng);
  auto W = random_on_device<T>(g.W_shape, rng);
  auto dy = random_on_device<T>({g.rows, c.d}, rng);
  auto dW = random_on_device<T>(g.W_shape, rng);  // accumulated into
  auto db = random_on_device<T>(g.b_shape, rng);
  Tensor<double> du_want, dW_want = dW.host, db_want = db.host;
  grouped_projection_backward(dy.host, u.host, W.host, c.groups, alpha, &du_want, &dW_want, &db_want);
  DeviceTensor<T> du;
  grouped_projection_backward(dy.dev, u.dev, W.dev, c.groups, T(alpha), &du, &dW.dev, &db.dev);
  EXPECT_TRUE(agrees(get(du), du_want, tolerance<T>)) << c.what << ": du";
  EXPECT_TRUE(agrees(get(dW.dev), dW_want, tolerance<T>)) << c.what << ": dW";
  EXPECT_TRUE(agrees(get(db.dev), db_want, tolerance<T>)) << c.what << ": db";
  // du alone: u is not read.
  DeviceTensor<T> du_only, no_u;
  grouped_projection_backward(dy.dev, no_u, W.dev, c.groups, T(alpha), &du_only, nullptr, nullptr);
  EXPECT_TRUE(agrees(get(du_only), du_want, tolerance<T>)) << c.what << ": du alone";
}

TYPED_TEST(CudaAdapterOpsTest, GroupedProjectionBackwardMatchesCpu) {
  using T = TypeParam;
  for (const GroupedCase& c : grouped_cases) {
    grouped_backward_case<T>(c, 0.8);
    cuda::detail::grouped::ForceKernels force;
    grouped_backward_case<T>(c, 0.8);
  }
}

TEST_F(CudaTest, GroupedProjectionErrorsAreTyped) {
  DeviceTensor<float> u(Shape{4, 8}), W(Shape{6, 4}), b(Shape{6}), y;
  set_zero(u);
  set_zero(W);
  set_zero(b);
  EXPECT_THROW(grouped_projection_forward(u, W, &b, 0, 1.0f, 0.0f, y), ConfigError);
  EXPECT_THROW(grouped_projection_forward(u, W, &b, 4, 1.0f, 0.0f, y), ShapeError);
  DeviceTensor<float> W3(Shape{3, 6, 4});
  EXPECT_THROW(grouped_projection_forward(u, W3, nullptr, 2, 1.0f, 0.0f, y), ShapeError);
  EXPECT_THROW(grouped_projection_forward(u, W, &u, 2, 1.0f, 0.0f, y), ShapeError);
  DeviceTensor<float> wrong(Shape{4, 5});
  EXPECT_THROW(grouped_projection_forward(u, W, &b, 2, 1.0f, 1.0f, wrong), ShapeError);
  DeviceTensor<float> dy(Shape{4, 6}), du, dW_bad(Shape{6, 3});
  EXPECT_THROW(grouped_projection_backward(dy, u, W, 2, 1.0f, &du, &dW_bad, nullptr), ShapeError);
}

// ---- routed_mix -----------------------------------------------------------------------------------------------

TYPED_TEST(CudaAdapterOpsTest, RoutedMixMatchesCpu) {
  using T = TypeParam;
  Rng rng(42);
  for (std::size_t B : {1u, 3u, 9u}) {
    auto w = random_on_device<T>({B, 2}, rng);
    auto W0 = random_on_device<T>({40, 4}, rng), W1 = random_on_device<T>({40, 4}, rng);
    auto c0 = random_on_device<T>({40}, rng), c1 = random_on_device<T>({40}, rng);
    const std::array<const Tensor<double>*, 2> Wh{&W0.host, &W1.host}, ch{&c0.host, &c1.host};
    const std::array<const DeviceTensor<T>*, 2> Wd{&W0.dev, &W1.dev}, cd{&c0.dev, &c1.dev};
    Tensor<double> E_want, e_want;
    routed_mix_forward(w.host, 0.8, Wh, ch, E_want, e_want);
    DeviceTensor<T> E, e;
    routed_mix_forward(w.dev, T(0.8), Wd, cd, E, e);
    EXPECT_TRUE(agrees(get(E), E_want, tolerance<T>)) << "E, B = " << B;
    EXPECT_TRUE(agrees(get(e), e_want, tolerance<T>)) << "e, B = " << B;

    auto G = random_on_device<T>({B, 40, 4}, rng);
    auto r = random_on_device<T>({B, 40}, rng);
    auto dW0 = random_on_device<T>({40, 4}, rng), dc1 = random_on_device<T>({40}, rng);
    Tensor<double> dw_want, dW0_want = dW0.host, dc1_want = dc1.host;
    routed_mix_backward(w.host, 0.8, Wh, ch, G.host, r.host, dw_want, {&dW0_want, nullptr}, {nullptr, &dc1_want});
    DeviceTensor<T> dw;
    routed_mix_backward(w.dev, T(0.8), Wd, cd, G.dev, r.dev, dw, {&dW0.dev, nullptr}, {nullptr, &dc1.dev});
    EXPECT_TRUE(agrees(get(dw), dw_want, tolerance<T>)) << "dw, B = " << B;
    EXPECT_TRUE(agrees(get(dW0.dev), dW0_want, tolerance<T>)) << "dW_0, B = " << B;
    EXPECT_TRUE(agrees(get(dc1.dev), dc1_want, tolerance<T>)) << "dc_1, B = " << B;
  }
  // Three sources and a rank-1 w.
  auto w = random_on_device<T>({3}, rng);
  auto a = random_on_device<T>({7}, rng), b = random_on_device<T>({7}, rng), c = random_on_device<T>({7}, rng);
  auto x = random_on_device<T>({2}, rng), y = random_on_device<T>({2}, rng), z = random_on_device<T>({2}, rng);
  Tensor<double> E_want, e_want;
  routed_mix_forward(w.host, -1.25, std::array<const Tensor<double>*, 3>{&a.host, &b.host, &c.host},
                     std::array<const Tensor<double>*, 3>{&x.host, &y.host, &z.host}, E_want, e_want);
  DeviceTensor<T> E, e;
  routed_mix_forward(w.dev, T(-1.25), std::array<const DeviceTensor<T>*, 3>{&a.dev, &b.dev, &c.dev},
                     std::array<const DeviceTensor<T>*, 3>{&x.dev, &y.dev, &z.dev}, E, e);
  EXPECT_TRUE(agrees(get(E), E_want, tolerance<T>)) << "3 sources";
  EXPECT_TRUE(agrees(get(e), e_want, tolerance<T>)) << "3 sources";
}

TEST_F(CudaTest, RoutedMixErrorsAreTyped) {
  DeviceTensor<float> w(Shape{2, 3}), B(Shape{3, 2}), D(Shape{3, 2}), b(Shape{3}), d(Shape{3}), E, e;
  const std::array<const DeviceTensor<float>*, 2> W{&B, &D}, c{&b, &d};
  EXPECT_THROW(routed_mix_forward(w, 1.0f, W, c, E, e), ShapeError);
  DeviceTensor<float> w2(Shape{2, 2}), G(Shape{2, 3, 3}), r(Shape{2, 3}), dw;
  EXPECT_THROW(routed_mix_backward(w2, 1.0f, W, c, G, r, dw, {nullptr, nullptr}, {nullptr, nullptr}), ShapeError);
}

// ---- the layers -----------------------------------------------------------------------------------------------

// Every parameter of the two layers, paired by name.
template <class CpuLayer, class GpuLayer>
std::pair<ParameterList<float, Cpu>, ParameterList<float, Cuda>> params_of(CpuLayer& cpu, GpuLayer& gpu) {
  std::pair<ParameterList<float, Cpu>, ParameterList<float, Cuda>> lists;
  cpu.collect_parameters(lists.first, "");
  gpu.collect_parameters(lists.second, "");
  return lists;
}

// The same random values in every parameter but conv_A.weight (fresh B, D, a, b, d are zero: that would hide paths).
template <class CpuLayer, class GpuLayer>
void randomize(CpuLayer& cpu, GpuLayer& gpu, std::uint64_t seed) {
  auto [cp, gp] = params_of(cpu, gpu);
  ASSERT_EQ(cp.size(), gp.size());
  Rng rng(seed);
  for (std::size_t i = 0; i < cp.size(); ++i) {
    ASSERT_EQ(cp[i].name, gp[i].name);
    if (cp[i].name == "conv_A.weight") continue;
    const Tensor<float> v = mixpeft::testing::random_tensor<float>(mixpeft::shape_of(cp[i].param->value), rng, 0.5);
    cp[i].param->value = v;
    gp[i].param->value = cuda::upload(v);
  }
}

template <class CpuLayer, class GpuLayer>
void expect_same_parameters(CpuLayer& cpu, GpuLayer& gpu, const std::string& what) {
  auto [cp, gp] = params_of(cpu, gpu);
  ASSERT_EQ(cp.size(), gp.size());
  for (std::size_t i = 0; i < cp.size(); ++i) {
    EXPECT_EQ(cp[i].name, gp[i].name);
    EXPECT_TRUE(same(gp[i].param->value, cp[i].param->value)) << what << ": " << cp[i].name;
    EXPECT_EQ(gp[i].param->trainable, cp[i].param->trainable) << cp[i].name;
    EXPECT_EQ(gp[i].param->weight_decay, cp[i].param->weight_decay) << cp[i].name;
  }
}

template <class CpuLayer, class GpuLayer>
void expect_close_gradients(CpuLayer& cpu, GpuLayer& gpu, const std::string& what) {
  auto [cp, gp] = params_of(cpu, gpu);
  for (std::size_t i = 0; i < cp.size(); ++i) {
    if (!cp[i].param->trainable) {
      EXPECT_EQ(gp[i].param->grad.size(), 0u) << what << ": frozen " << cp[i].name;
      continue;
    }
    EXPECT_TRUE(close(gp[i].param->grad, cp[i].param->grad)) << what << ": d" << cp[i].name;
  }
}

Tensor<float> random_host(const Shape& shape, std::uint64_t seed) {
  Rng rng(seed);
  return mixpeft::testing::random_tensor<float>(shape, rng);
}

// ---- Adapter ----

using CpuAdapter = Adapter<float, Cpu>;
using GpuAdapter = Adapter<float, Cuda>;

CpuAdapter::Config adapter_config(double dropout) {
  return {.dim = 48, .hidden = 8, .groups = 2, .scale = 0.7, .dropout = dropout};
}

// Each instantiation has its own Config type: copy the fields.
template <class Layer>
Layer build_adapter(const CpuAdapter::Config& c, std::uint64_t seed) {
  Rng rng(seed);
  return Layer({.dim = c.dim, .hidden = c.hidden, .groups = c.groups, .scale = c.scale, .dropout = c.dropout}, rng);
}

void adapter_step(CpuAdapter& cpu, GpuAdapter& gpu, const Shape& x_shape, std::uint64_t seed, const std::string& what) {
  const Tensor<float> x = random_host(x_shape, seed), dy = random_host(x_shape, seed + 1);
  const DeviceTensor<float> x_dev = cuda::upload(x), dy_dev = cuda::upload(dy);
  CpuAdapter::Cache cc;
  GpuAdapter::Cache gc;
  const Tensor<float> y = cpu.forward(x, cc);
  const DeviceTensor<float> y_dev = gpu.forward(x_dev, gc);
  EXPECT_TRUE(same(gc.mask, cc.mask)) << what << ": dropout mask";
  EXPECT_TRUE(close(y_dev, y)) << what << ": y";
  EXPECT_EQ(gc.x.size() > 0, cpu.A().trainable || cpu.a().trainable) << what << ": x cached only for dA, da";
  EXPECT_TRUE(close(gpu.backward(gc, dy_dev), cpu.backward(cc, dy))) << what << ": dx";
  expect_close_gradients(cpu, gpu, what);
}

TEST_F(CudaTest, AdapterHasTheCpuWeightsForTheSameSeed) {
  auto cpu = build_adapter<CpuAdapter>(adapter_config(0.1), 5);
  auto gpu = build_adapter<GpuAdapter>(adapter_config(0.1), 5);
  expect_same_parameters(cpu, gpu, "fresh");
  // A fresh adapter is exactly the identity on the device too.
  const Tensor<float> x = random_host({3, 48}, 50);
  GpuAdapter::Cache gc;
  EXPECT_TRUE(same(gpu.forward(cuda::upload(x), gc), x));
}

TEST_F(CudaTest, AdapterTrainingWithDropoutMatchesCpu) {
  auto cpu = build_adapter<CpuAdapter>(adapter_config(0.1), 6);
  auto gpu = build_adapter<GpuAdapter>(adapter_config(0.1), 6);
  randomize(cpu, gpu, 60);
  adapter_step(cpu, gpu, {2, 9, 48}, 61, "step 1");
  adapter_step(cpu, gpu, {2, 9, 48}, 61, "step 2 (a fresh mask, accumulated gradients)");
}

TEST_F(CudaTest, AdapterEvalNoDropoutAndFrozenMatchCpu) {
  {
    auto cpu = build_adapter<CpuAdapter>(adapter_config(0.3), 7);
    auto gpu = build_adapter<GpuAdapter>(adapter_config(0.3), 7);
    randomize(cpu, gpu, 70);
    cpu.set_training(false);
    gpu.set_training(false);
    adapter_step(cpu, gpu, {18, 48}, 71, "eval");
  }
  {
    auto cpu = build_adapter<CpuAdapter>({.dim = 36, .hidden = 12, .groups = 3, .scale = 1.3, .dropout = 0.0}, 8);
    auto gpu = build_adapter<GpuAdapter>({.dim = 36, .hidden = 12, .groups = 3, .scale = 1.3, .dropout = 0.0}, 8);
    randomize(cpu, gpu, 80);
    adapter_step(cpu, gpu, {5, 36}, 81, "no dropout, 3 groups");
  }
  {
    auto cpu = build_adapter<CpuAdapter>(adapter_config(0.1), 9);
    auto gpu = build_adapter<GpuAdapter>(adapter_config(0.1), 9);
    randomize(cpu, gpu, 90);
    for (auto* p : {&cpu.A(), &cpu.a(), &cpu.b()}) p->set_trainable(false);
    for (auto* p : {&gpu.A(), &gpu.a(), &gpu.b()}) p->set_trainable(false);
    adapter_step(cpu, gpu, {2, 4, 48}, 91, "frozen A, a, b");
  }
}

TEST_F(CudaTest, AdapterFoldMatchesCpu) {
  auto cpu = build_adapter<CpuAdapter>(adapter_config(0.1), 10);
  auto gpu = build_adapter<GpuAdapter>(adapter_config(0.1), 10);
  randomize(cpu, gpu, 100);
  cpu.set_training(false);
  gpu.set_training(false);
  const auto cf = cpu.fold();
  const auto gf = gpu.fold();
  EXPECT_TRUE(close(gf.M, cf.M)) << "M";
  EXPECT_TRUE(close(gf.c, cf.c)) << "c";
  Rng rc(101), rg(101);
  Linear<float, Cpu> q_cpu({.in = 48, .out = 20, .bias = true}, rc);
  Linear<float, Cuda> q_gpu({.in = 48, .out = 20, .bias = true}, rg);
  const auto fc = fold_into_linear(cf, q_cpu.weight().value, &q_cpu.bias().value);
  const auto fg = fold_into_linear(gf, q_gpu.weight().value, &q_gpu.bias().value);
  EXPECT_TRUE(close(fg.weight, fc.weight)) << "folded weight";
  EXPECT_TRUE(close(fg.bias, fc.bias)) << "folded bias";
  // The folded map is the eval forward, on the device.
  const Tensor<float> x = random_host({6, 48}, 102);
  GpuAdapter::Cache gc;
  DeviceTensor<float> affine;
  linear_forward(cuda::upload(x), gf.M, &gf.c, affine);
  EXPECT_TRUE(agrees(get(affine), get(gpu.forward(cuda::upload(x), gc)), 1e-5));
}

TEST_F(CudaTest, AdapterShapeErrorsAreTyped) {
  auto gpu = build_adapter<GpuAdapter>(adapter_config(0.1), 11);
  GpuAdapter::Cache gc;
  DeviceTensor<float> bad(Shape{4, 47});
  EXPECT_THROW(gpu.forward(bad, gc), ShapeError);
  DeviceTensor<float> x(Shape{4, 48});
  set_zero(x);
  gpu.forward(x, gc);
  DeviceTensor<float> dy(Shape{5, 48});
  EXPECT_THROW(gpu.backward(gc, dy), ShapeError);
}

// ---- MMAdapter ----

using CpuMMA = MMAdapter<float, Cpu>;
using GpuMMA = MMAdapter<float, Cuda>;

CpuMMA::Config mm_config(double dropout) {
  return {.dim = 48, .hidden = 8, .groups = 2, .scale = 0.8, .dropout = dropout, .temperature = 2.0};
}

template <class Layer>
Layer build_mm(const CpuMMA::Config& c, std::uint64_t seed) {
  Rng rng(seed);
  return Layer({.dim = c.dim, .hidden = c.hidden, .groups = c.groups, .scale = c.scale, .dropout = c.dropout,
                .temperature = c.temperature},
               rng);
}

void mm_step(CpuMMA& cpu, GpuMMA& gpu, std::size_t nb, std::size_t nt, std::uint64_t seed, const std::string& what) {
  const std::size_t d = cpu.config().dim;
  const Tensor<float> x = random_host({nb, nt, d}, seed), dy = random_host({nb, nt, d}, seed + 1),
                      t = random_host({nb, d}, seed + 2);
  const DeviceTensor<float> x_dev = cuda::upload(x), dy_dev = cuda::upload(dy), t_dev = cuda::upload(t);
  CpuMMA::Cache cc;
  GpuMMA::Cache gc;
  const Tensor<float> y = cpu.forward(x, t, cc);
  const DeviceTensor<float> y_dev = gpu.forward(x_dev, t_dev, gc);
  EXPECT_TRUE(same(gc.mask, cc.mask)) << what << ": dropout mask";
  EXPECT_TRUE(close(gc.weights, cc.weights)) << what << ": routing weights";
  EXPECT_TRUE(close(y_dev, y)) << what << ": y";
  const CpuMMA::Grads g = cpu.backward(cc, dy);
  const GpuMMA::Grads gg = gpu.backward(gc, dy_dev);
  EXPECT_TRUE(close(gg.x, g.x)) << what << ": dx";
  EXPECT_TRUE(close(gg.route_tokens, g.route_tokens)) << what << ": d route_tokens";
  expect_close_gradients(cpu, gpu, what);
}

TEST_F(CudaTest, MMAdapterHasTheCpuWeightsForTheSameSeed) {
  auto cpu = build_mm<CpuMMA>(mm_config(0.1), 20);
  auto gpu = build_mm<GpuMMA>(mm_config(0.1), 20);
  expect_same_parameters(cpu, gpu, "fresh");  // router weight and bias included
  const Tensor<float> x = random_host({2, 5, 48}, 200), t = random_host({2, 48}, 201);
  GpuMMA::Cache gc;
  EXPECT_TRUE(same(gpu.forward(cuda::upload(x), cuda::upload(t), gc), x));  // a fresh block is the identity
}

TEST_F(CudaTest, MMAdapterTrainingWithDropoutMatchesCpu) {
  auto cpu = build_mm<CpuMMA>(mm_config(0.1), 21);
  auto gpu = build_mm<GpuMMA>(mm_config(0.1), 21);
  randomize(cpu, gpu, 210);
  mm_step(cpu, gpu, 3, 7, 211, "step 1");
  mm_step(cpu, gpu, 3, 7, 211, "step 2 (a fresh mask, accumulated gradients)");
}

TEST_F(CudaTest, MMAdapterEvalShapesAndFrozenMatchCpu) {
  {
    auto cpu = build_mm<CpuMMA>(mm_config(0.3), 22);
    auto gpu = build_mm<GpuMMA>(mm_config(0.3), 22);
    randomize(cpu, gpu, 220);
    cpu.set_training(false);
    gpu.set_training(false);
    mm_step(cpu, gpu, 2, 9, 221, "eval");
  }
  {
    // Per-sequence weights whose group offsets are not 16-byte aligned (d/g = 9 floats) and odd T.
    const CpuMMA::Config c{.dim = 27, .hidden = 6, .groups = 3, .scale = 1.1, .dropout = 0.2, .temperature = 5.0};
    auto cpu = build_mm<CpuMMA>(c, 23);
    auto gpu = build_mm<GpuMMA>(c, 23);
    randomize(cpu, gpu, 230);
    mm_step(cpu, gpu, 4, 5, 231, "d = 27, 3 groups");
  }
  {
    auto cpu = build_mm<CpuMMA>(mm_config(0.1), 24);
    auto gpu = build_mm<GpuMMA>(mm_config(0.1), 24);
    randomize(cpu, gpu, 240);
    auto [cp, gp] = params_of(cpu, gpu);
    for (std::size_t i = 0; i < cp.size(); ++i)
      if (cp[i].name.rfind("conv_B.", 0) != 0) {
        cp[i].param->set_trainable(false);
        gp[i].param->set_trainable(false);
      }
    mm_step(cpu, gpu, 2, 6, 241, "only conv_B trains (frozen router still passes d route_tokens)");
  }
}

TEST_F(CudaTest, MMAdapterRoutingWeightsAndFoldMatchCpu) {
  auto cpu = build_mm<CpuMMA>(mm_config(0.1), 25);
  auto gpu = build_mm<GpuMMA>(mm_config(0.1), 25);
  randomize(cpu, gpu, 250);
  cpu.set_training(false);
  gpu.set_training(false);
  const Tensor<float> t = random_host({1, 48}, 251);
  const Tensor<float> w = cpu.routing_weights(t);
  const DeviceTensor<float> w_dev = gpu.routing_weights(cuda::upload(t));  // [1, 2], stays on the device
  EXPECT_TRUE(close(w_dev, w)) << "routing weights";
  const auto cf = cpu.fold(w);
  const auto gf = gpu.fold(w_dev);
  EXPECT_TRUE(close(gf.M, cf.M)) << "M";
  EXPECT_TRUE(close(gf.c, cf.c)) << "c";
  // The folded map is the eval forward of a sequence routed by t.
  const Tensor<float> x = random_host({1, 6, 48}, 252);
  GpuMMA::Cache gc;
  const DeviceTensor<float> y = gpu.forward(cuda::upload(x), cuda::upload(t), gc);
  DeviceTensor<float> affine;
  linear_forward(cuda::upload(x), gf.M, &gf.c, affine);
  EXPECT_TRUE(agrees(get(affine), get(y), 1e-5));
  Rng rc(253), rg(253);
  Linear<float, Cpu> v_cpu({.in = 48, .out = 16, .bias = false}, rc);
  Linear<float, Cuda> v_gpu({.in = 48, .out = 16, .bias = false}, rg);
  const auto fc = fold_into_linear(cf, v_cpu.weight().value, static_cast<const Tensor<float>*>(nullptr));
  const auto fg = fold_into_linear(gf, v_gpu.weight().value, static_cast<const DeviceTensor<float>*>(nullptr));
  EXPECT_TRUE(close(fg.weight, fc.weight)) << "folded weight";
  EXPECT_TRUE(close(fg.bias, fc.bias)) << "folded bias";
}

TEST_F(CudaTest, MMAdapterShapeErrorsAreTyped) {
  auto gpu = build_mm<GpuMMA>(mm_config(0.0), 26);
  GpuMMA::Cache gc;
  DeviceTensor<float> x(Shape{2, 3, 48}), t(Shape{2, 48}), bad_t(Shape{3, 48}), flat(Shape{6, 48});
  set_zero(x);
  set_zero(t);
  EXPECT_THROW(gpu.backward(gc, x), ShapeError);  // before forward
  EXPECT_THROW(gpu.forward(flat, t, gc), ShapeError);
  EXPECT_THROW(gpu.forward(x, bad_t, gc), ShapeError);
  gpu.forward(x, t, gc);
  DeviceTensor<float> dy(Shape{2, 4, 48});
  EXPECT_THROW(gpu.backward(gc, dy), ShapeError);
  DeviceTensor<float> w3(Shape{3});
  EXPECT_THROW(gpu.fold(w3), ShapeError);
}

}  // namespace
}  // namespace mixpeft::cuda_test
