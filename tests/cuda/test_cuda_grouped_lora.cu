// The grouped LoRA ops (cuda/grouped_lora.cuh) against plain-loop CPU references in double, computed from the
// very values the device holds: shrink, expand (gates on / off, overwrite / accumulate), expand_backward (gates,
// the gate dot), shrink_backward, and the per-expert weight gradients, for float, double, bf16 and fp16 (on tensor
// cores where the GPU has them) and bf16 on the CUDA-core kernels, over empty
// experts (first, middle, last), uneven blocks, M not a multiple of any tile, r = 8, 32 and wider, aligned
// (16-byte vector loads) and unaligned (element loads) row pitches, with and without split-K. Plus bf16 inputs
// with fp32 outputs, no rows at all, agreement with the CPU ops of ops/grouped_lora.hpp, and typed
// shape errors. Every test skips when no CUDA device is present.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "mixpeft/cuda/grouped_lora.cuh"
#include "mixpeft/ops/grouped_lora.hpp"
#include "cuda_test_support.cuh"

namespace mixpeft::cuda_test {
namespace {

// bf16 on the CUDA-core kernels (the tensor-core ones switched off), so both paths are checked on a GPU that has
// tensor cores. bf16 and fp16 themselves run on tensor cores there.
struct SimtBf16 {};
template <class P>
struct Storage {
  using type = P;
};
template <>
struct Storage<SimtBf16> {
  using type = __nv_bfloat16;
};

template <class P>
class CudaGroupedLoraTest : public CudaTest {
 protected:
  void SetUp() override {
    CudaTest::SetUp();
    if constexpr (std::is_same_v<P, SimtBf16>) simt_.emplace(false);
  }
  void TearDown() override { simt_.reset(); }
  std::optional<cuda::detail::GroupedTensorCoreOverride> simt_;
};
using GroupedLoraTypes = ::testing::Types<float, double, __nv_bfloat16, SimtBf16, __half>;
TYPED_TEST_SUITE(CudaGroupedLoraTest, GroupedLoraTypes);

template <class T>
using Acc = cuda::acc_t<T>;

// Row blocks from expert counts: offsets [K + 1] on the host and the device, the expert of every row.
struct Blocks {
  std::vector<std::int32_t> offsets;
  std::vector<std::size_t> expert_of;  // [M]
  DeviceTensor<std::int32_t> dev;

  explicit Blocks(const std::vector<int>& counts) : offsets{0} {
    for (std::size_t e = 0; e < counts.size(); ++e) {
      offsets.push_back(offsets.back() + counts[e]);
      expert_of.insert(expert_of.end(), std::size_t(counts[e]), e);
    }
    dev = cuda::upload(std::span<const std::int32_t>(offsets));
  }
  std::size_t experts() const { return offsets.size() - 1; }
  std::size_t rows() const { return std::size_t(offsets.back()); }
  bool empty(std::size_t e) const { return offsets[e] == offsets[e + 1]; }
};

struct Case {
  std::vector<int> counts;
  std::size_t in, out;
};

// Empty experts first, in the middle and last; uneven blocks; M = 259 (no tile multiple); row pitches that allow
// 16-byte loads (96, 1040) and some that do not (69, 33 and 40 for bf16); long reductions (1040) that split.
const std::vector<Case>& cases() {
  static const std::vector<Case> all = {
      {{0, 37, 0, 130, 1, 91}, 96, 69},
      {{0, 37, 0, 130, 1, 91}, 69, 1040},
      {{259}, 1040, 96},
      {{3, 0, 0, 0}, 33, 40},
  };
  return all;
}

std::string describe(const Case& c, std::size_t r) {
  std::string s = "counts {";
  for (int n : c.counts) s += std::to_string(n) + " ";
  return s + "} in " + std::to_string(c.in) + " out " + std::to_string(c.out) + " r " + std::to_string(r);
}

// ---- CPU references (double, plain loops) -----------------------------------------------------------------

// out[j, n] (=|+=) alpha g[j] sum_k a[j, k] w_e(k, n), w_e(k, n) = w[e][n][k] (wt) or w[e][k][n].
Tensor<double> ref_rows(const Blocks& b, const Tensor<double>& a, std::size_t kdim, const Tensor<double>& w, bool wt,
                        std::size_t n, double alpha, const Tensor<double>* g, const Tensor<double>* init) {
  const std::size_t m = b.rows();
  Tensor<double> out = init ? *init : zeros<double>({m, n});
  for (std::size_t j = 0; j < m; ++j) {
    const std::size_t e = b.expert_of[j];
    const double* we = w.data() + e * kdim * n;
    for (std::size_t q = 0; q < n; ++q) {
      double s = 0;
      for (std::size_t k = 0; k < kdim; ++k) s += a.data()[j * kdim + k] * (wt ? we[q * kdim + k] : we[k * n + q]);
      out.data()[j * n + q] += alpha * (g ? g->data()[j] : 1.0) * s;
    }
  }
  return out;
}

// dw[e] (+)= alpha sum_{j in e} g[j] u[j, :]^T v[j, :], stored [K, cols(u), cols(v)] (or transposed per expert).
Tensor<double> ref_wgrad(const Blocks& b, const Tensor<double>& u, const Tensor<double>& v, double alpha,
                         const Tensor<double>* g, bool transposed, const Tensor<double>& init) {
  Tensor<double> out = init;
  const std::size_t mu = cols(u), nv = cols(v);
  for (std::size_t j = 0; j < b.rows(); ++j) {
    const std::size_t e = b.expert_of[j];
    const double gj = alpha * (g ? g->data()[j] : 1.0);
    for (std::size_t p = 0; p < mu; ++p)
      for (std::size_t q = 0; q < nv; ++q) {
        const std::size_t at = transposed ? (e * nv + q) * mu + p : (e * mu + p) * nv + q;
        out.data()[at] += gj * u.data()[j * mu + p] * v.data()[j * nv + q];
      }
  }
  return out;
}

// Expert e's [d1, d2] slab of a stacked [K, d1, d2] tensor.
Tensor<double> slab(const Tensor<double>& w, std::size_t e) {
  const std::size_t d1 = w.shape()[1], d2 = w.shape()[2];
  Tensor<double> s = empty<double>({d1, d2});
  std::copy(w.data() + e * d1 * d2, w.data() + (e + 1) * d1 * d2, s.data());
  return s;
}

// Weight gradients of empty experts must come back bit for bit.
::testing::AssertionResult empty_experts_untouched(const Blocks& b, const Tensor<double>& got,
                                                    const Tensor<double>& init) {
  for (std::size_t e = 0; e < b.experts(); ++e) {
    if (!b.empty(e)) continue;
    const Tensor<double> g = slab(got, e), i = slab(init, e);
    for (std::size_t q = 0; q < g.size(); ++q)
      if (g.data()[q] != i.data()[q]) return ::testing::AssertionFailure() << "expert " << e << " changed at " << q;
  }
  return ::testing::AssertionSuccess();
}

// ---- forward ------------------------------------------------------------------------------------------------

TYPED_TEST(CudaGroupedLoraTest, ShrinkMatchesCpu) {
  using T = typename Storage<TypeParam>::type;
  Rng rng(100);
  for (const Case& c : cases())
    for (std::size_t r : {8, 32, 48, 128})
      for (int splits : {0, 1, 3}) {
        cuda::detail::GroupedSplitOverride force(splits);
        const Blocks b(c.counts);
        const std::size_t m = b.rows(), K = b.experts();
        auto x = random_on_device<T>({m, c.in}, rng);
        auto A = random_on_device<T>({K, r, c.in}, rng);
        DeviceTensor<T> t;
        cuda::grouped_lora_shrink(x.dev, A.dev, b.dev, t);
        const Tensor<double> want = ref_rows(b, x.host, c.in, A.host, true, r, 1.0, nullptr, nullptr);
        EXPECT_TRUE(agrees(get(t), want, tolerance<T>)) << describe(c, r) << " splits " << splits;
      }
}

TYPED_TEST(CudaGroupedLoraTest, ExpandMatchesCpuWithAndWithoutGatesAndAccumulation) {
  using T = typename Storage<TypeParam>::type;
  Rng rng(101);
  const double s = 2.0;
  for (const Case& c : cases())
    for (std::size_t r : {8, 32, 128})
      for (bool gated : {false, true})
        for (bool accumulate : {false, true}) {
          const Blocks b(c.counts);
          const std::size_t m = b.rows(), K = b.experts();
          auto t = random_on_device<T>({m, r}, rng);
          auto B = random_on_device<T>({K, c.out, r}, rng);
          auto g = random_on_device<Acc<T>>({m}, rng);
          auto y0 = random_on_device<T>({m, c.out}, rng);
          DeviceTensor<T> y;
          if (accumulate) y = y0.dev.clone();
          cuda::grouped_lora_expand(t.dev, B.dev, b.dev, s, gated ? &g.dev : nullptr, accumulate, y);
          const Tensor<double> want =
              ref_rows(b, t.host, r, B.host, true, c.out, s, gated ? &g.host : nullptr, accumulate ? &y0.host : nullptr);
          EXPECT_TRUE(agrees(get(y), want, tolerance<T>))
              << describe(c, r) << " gated " << gated << " accumulate " << accumulate;
        }
}

// ---- backward -----------------------------------------------------------------------------------------------

TYPED_TEST(CudaGroupedLoraTest, ExpandBackwardMatchesCpuWithGatesAndGateGradient) {
  using T = typename Storage<TypeParam>::type;
  Rng rng(102);
  const double s = 0.5;
  // r = 136 spans two 128-wide column tiles: the gate dot then goes through the row-wise finalize kernel.
  for (const Case& c : cases())
    for (std::size_t r : {8, 32, 136})
      for (int splits : {0, 1, 3})
        for (bool gated : {false, true})
          for (bool with_dgates : {false, true}) {
            cuda::detail::GroupedSplitOverride force(splits);
            const Blocks b(c.counts);
            const std::size_t m = b.rows(), K = b.experts();
            auto dy = random_on_device<T>({m, c.out}, rng);
            auto B = random_on_device<T>({K, c.out, r}, rng);
            auto g = random_on_device<Acc<T>>({m}, rng);
            auto h = random_on_device<T>({m, r}, rng);
            auto dg0 = random_on_device<Acc<T>>({m}, rng);
            DeviceTensor<Acc<T>> dg = dg0.dev.clone();
            DeviceTensor<T> dt;
            cuda::grouped_lora_expand_backward(dy.dev, B.dev, b.dev, s, gated ? &g.dev : nullptr, dt,
                                               with_dgates ? &h.dev : nullptr, with_dgates ? &dg : nullptr);
            // u = s dy B_e; dt = c u; dgates += rowsum(u * h)
            const Tensor<double> u = ref_rows(b, dy.host, c.out, B.host, false, r, s, nullptr, nullptr);
            Tensor<double> want_dt = u, want_dg = dg0.host;
            for (std::size_t j = 0; j < m; ++j)
              for (std::size_t q = 0; q < r; ++q) {
                if (gated) want_dt.data()[j * r + q] *= g.host.data()[j];
                want_dg.data()[j] += u.data()[j * r + q] * h.host.data()[j * r + q];
              }
            const std::string what = describe(c, r) + " splits " + std::to_string(splits) + " gated " +
                                     std::to_string(gated) + " dgates " + std::to_string(with_dgates);
            EXPECT_TRUE(agrees(get(dt), want_dt, tolerance<T>)) << what;
            if (with_dgates) EXPECT_TRUE(agrees(get(dg), want_dg, tolerance<Acc<T>>)) << what;
            else EXPECT_EQ(testing::max_abs_diff(get(dg), dg0.host), 0.0) << what;  // untouched
          }
}

TYPED_TEST(CudaGroupedLoraTest, ShrinkBackwardMatchesCpu) {
  using T = typename Storage<TypeParam>::type;
  Rng rng(103);
  for (const Case& c : cases())
    for (std::size_t r : {8, 32, 128})
      for (bool accumulate : {false, true}) {
        const Blocks b(c.counts);
        const std::size_t m = b.rows(), K = b.experts();
        auto dt = random_on_device<T>({m, r}, rng);
        auto A = random_on_device<T>({K, r, c.in}, rng);
        auto dx0 = random_on_device<T>({m, c.in}, rng);
        DeviceTensor<T> dx;
        if (accumulate) dx = dx0.dev.clone();
        cuda::grouped_lora_shrink_backward(dt.dev, A.dev, b.dev, accumulate, dx);
        const Tensor<double> want =
            ref_rows(b, dt.host, r, A.host, false, c.in, 1.0, nullptr, accumulate ? &dx0.host : nullptr);
        EXPECT_TRUE(agrees(get(dx), want, tolerance<T>)) << describe(c, r) << " accumulate " << accumulate;
      }
}

TYPED_TEST(CudaGroupedLoraTest, WeightGradientsAccumulatePerExpert) {
  using T = typename Storage<TypeParam>::type;
  Rng rng(104);
  const double s = 1.5;
  for (const Case& c : cases())
    for (std::size_t r : {8, 32, 128})
      for (int splits : {0, 1, 4})
        for (bool gated : {false, true}) {
          cuda::detail::GroupedSplitOverride force(splits);
          const Blocks b(c.counts);
          const std::size_t m = b.rows(), K = b.experts();
          auto x = random_on_device<T>({m, c.in}, rng);
          auto t = random_on_device<T>({m, r}, rng);
          auto dy = random_on_device<T>({m, c.out}, rng);
          auto dt = random_on_device<T>({m, r}, rng);
          auto g = random_on_device<Acc<T>>({m}, rng);
          auto dB0 = random_on_device<T>({K, c.out, r}, rng);
          auto dA0 = random_on_device<T>({K, r, c.in}, rng);
          DeviceTensor<T> dB = dB0.dev.clone(), dA = dA0.dev.clone();
          cuda::grouped_lora_grad_B(dy.dev, t.dev, b.dev, s, gated ? &g.dev : nullptr, dB);
          cuda::grouped_lora_grad_A(dt.dev, x.dev, b.dev, dA);
          const std::string what =
              describe(c, r) + " splits " + std::to_string(splits) + " gated " + std::to_string(gated);
          const Tensor<double> got_dB = get(dB), got_dA = get(dA);
          EXPECT_TRUE(agrees(got_dB, ref_wgrad(b, dy.host, t.host, s, gated ? &g.host : nullptr, false, dB0.host),
                             tolerance<T>))
              << what;
          EXPECT_TRUE(agrees(got_dA, ref_wgrad(b, x.host, dt.host, 1.0, nullptr, true, dA0.host), tolerance<T>)) << what;
          EXPECT_TRUE(empty_experts_untouched(b, got_dB, dB0.host)) << what;
          EXPECT_TRUE(empty_experts_untouched(b, got_dA, dA0.host)) << what;
        }
}

// ---- edge cases ---------------------------------------------------------------------------------------------

TYPED_TEST(CudaGroupedLoraTest, NoRowsAtAllAndAllRowsInTheLastExpert) {
  using T = typename Storage<TypeParam>::type;
  Rng rng(105);
  const std::size_t in = 40, out = 24, r = 8;
  for (const std::vector<int>& counts : {std::vector<int>{0, 0, 0}, std::vector<int>{0, 0, 77}}) {
    const Blocks b(counts);
    const std::size_t m = b.rows(), K = b.experts();
    auto x = random_on_device<T>({m, in}, rng);
    auto A = random_on_device<T>({K, r, in}, rng);
    auto B = random_on_device<T>({K, out, r}, rng);
    auto dy = random_on_device<T>({m, out}, rng);
    auto g = random_on_device<Acc<T>>({m}, rng);
    auto dA0 = random_on_device<T>({K, r, in}, rng);
    auto dB0 = random_on_device<T>({K, out, r}, rng);
    DeviceTensor<T> t, y, dt, dx;
    cuda::grouped_lora_shrink(x.dev, A.dev, b.dev, t);
    cuda::grouped_lora_expand(t, B.dev, b.dev, 1.0, &g.dev, false, y);
    cuda::grouped_lora_expand_backward(dy.dev, B.dev, b.dev, 1.0, &g.dev, dt);
    cuda::grouped_lora_shrink_backward(dt, A.dev, b.dev, false, dx);
    DeviceTensor<T> dA = dA0.dev.clone(), dB = dB0.dev.clone();
    cuda::grouped_lora_grad_B(dy.dev, t, b.dev, 1.0, &g.dev, dB);
    cuda::grouped_lora_grad_A(dt, x.dev, b.dev, dA);
    EXPECT_EQ(t.shape(), (Shape{m, r}));
    EXPECT_EQ(y.shape(), (Shape{m, out}));
    EXPECT_EQ(dt.shape(), (Shape{m, r}));
    EXPECT_EQ(dx.shape(), (Shape{m, in}));
    const Tensor<double> t_want = ref_rows(b, x.host, in, A.host, true, r, 1.0, nullptr, nullptr);
    EXPECT_TRUE(agrees(get(t), t_want, tolerance<T>));
    const Tensor<double> dx_want = ref_rows(b, get(dt), r, A.host, false, in, 1.0, nullptr, nullptr);
    EXPECT_TRUE(agrees(get(dx), dx_want, tolerance<T>));
    const Tensor<double> got_dB = get(dB), got_dA = get(dA);
    EXPECT_TRUE(agrees(got_dB, ref_wgrad(b, dy.host, get(t), 1.0, &g.host, false, dB0.host), tolerance<T>));
    EXPECT_TRUE(agrees(got_dA, ref_wgrad(b, x.host, get(dt), 1.0, nullptr, true, dA0.host), tolerance<T>));
    EXPECT_TRUE(empty_experts_untouched(b, got_dB, dB0.host));
    EXPECT_TRUE(empty_experts_untouched(b, got_dA, dA0.host));
  }
}

// bf16 storage with fp32 activations and outputs: every product of bf16 values is exact in fp32, so the results
// match the double reference to fp32 accuracy.
TEST_F(CudaTest, GroupedLoraBf16InputsWithFloatOutputs) {
  using B16 = __nv_bfloat16;
  Rng rng(106);
  const Blocks b({5, 0, 120, 64});
  const std::size_t m = b.rows(), K = b.experts(), in = 200, out = 136, r = 16;
  const double s = 2.0;
  auto x = random_on_device<B16>({m, in}, rng);
  auto A = random_on_device<B16>({K, r, in}, rng);
  auto B = random_on_device<B16>({K, out, r}, rng);
  auto dy = random_on_device<B16>({m, out}, rng);
  auto g = random_on_device<float>({m}, rng);

  DeviceTensor<float> t, y, dt, dx, dB(Shape{K, out, r}), dA(Shape{K, r, in});
  set_zero(dB);
  set_zero(dA);
  DeviceTensor<float> dg(Shape{m});
  set_zero(dg);
  cuda::grouped_lora_shrink(x.dev, A.dev, b.dev, t);
  const Tensor<double> t_host = get(t);
  EXPECT_TRUE(agrees(t_host, ref_rows(b, x.host, in, A.host, true, r, 1.0, nullptr, nullptr), tolerance<float>));
  cuda::grouped_lora_expand(t, B.dev, b.dev, s, &g.dev, false, y);
  EXPECT_TRUE(agrees(get(y), ref_rows(b, t_host, r, B.host, true, out, s, &g.host, nullptr), tolerance<float>));

  cuda::grouped_lora_expand_backward(dy.dev, B.dev, b.dev, s, &g.dev, dt, &t, &dg);
  const Tensor<double> u = ref_rows(b, dy.host, out, B.host, false, r, s, nullptr, nullptr);
  Tensor<double> dt_want = u, dg_want = zeros<double>({m});
  for (std::size_t j = 0; j < m; ++j)
    for (std::size_t q = 0; q < r; ++q) {
      dt_want.data()[j * r + q] *= g.host.data()[j];
      dg_want.data()[j] += u.data()[j * r + q] * t_host.data()[j * r + q];
    }
  const Tensor<double> dt_host = get(dt);
  EXPECT_TRUE(agrees(dt_host, dt_want, tolerance<float>));
  EXPECT_TRUE(agrees(get(dg), dg_want, tolerance<float>));

  cuda::grouped_lora_shrink_backward(dt, A.dev, b.dev, false, dx);
  EXPECT_TRUE(agrees(get(dx), ref_rows(b, dt_host, r, A.host, false, in, 1.0, nullptr, nullptr), tolerance<float>));
  cuda::grouped_lora_grad_B(dy.dev, t, b.dev, s, &g.dev, dB);
  EXPECT_TRUE(agrees(get(dB), ref_wgrad(b, dy.host, t_host, s, &g.host, false, zeros<double>({K, out, r})),
                     tolerance<float>));
  cuda::grouped_lora_grad_A(dt, x.dev, b.dev, dA);
  EXPECT_TRUE(agrees(get(dA), ref_wgrad(b, x.host, dt_host, 1.0, nullptr, true, zeros<double>({K, r, in})),
                     tolerance<float>));
  // bf16 weight gradients from fp32 activations (rounded once, at the end).
  auto dB16_0 = random_on_device<B16>({K, out, r}, rng);
  DeviceTensor<B16> dB16 = dB16_0.dev.clone();
  cuda::grouped_lora_grad_B(dy.dev, t, b.dev, s, &g.dev, dB16);
  EXPECT_TRUE(agrees(get(dB16), ref_wgrad(b, dy.host, t_host, s, &g.host, false, dB16_0.host),
                     tolerance<__nv_bfloat16>));
}

// Every device op against the CPU op of the same name (ops/grouped_lora.hpp) on the same inputs, forward and
// backward, with Switch-style gates, plus 2-D weights as one expert over one_block_offsets.
TEST_F(CudaTest, GroupedLoraMatchesTheCpuGroupedOps) {
  Rng rng(107);
  const Blocks b({40, 0, 75, 13});
  const std::size_t m = b.rows(), K = b.experts(), in = 48, out = 56, r = 8;
  const double s = 4.0;
  auto x = random_on_device<double>({m, in}, rng);
  auto A = random_on_device<double>({K, r, in}, rng);
  auto B = random_on_device<double>({K, out, r}, rng);
  auto dy = random_on_device<double>({m, out}, rng);
  auto g = random_on_device<double>({m, 1}, rng);
  Tensor<std::int32_t> offsets = empty<std::int32_t>({K + 1});
  std::copy(b.offsets.begin(), b.offsets.end(), offsets.data());

  Tensor<double> t_cpu, y_cpu, dt_cpu, dx_cpu, dg_cpu = zeros<double>({m, 1}), dA_cpu = zeros<double>({K, r, in}),
                 dB_cpu = zeros<double>({K, out, r});
  grouped_lora_shrink(x.host, A.host, offsets, t_cpu);
  grouped_lora_expand(t_cpu, B.host, offsets, s, &g.host, false, y_cpu);
  grouped_lora_expand_backward(dy.host, B.host, offsets, s, &g.host, dt_cpu, &t_cpu, &dg_cpu);
  grouped_lora_grad_B(dy.host, t_cpu, offsets, s, &g.host, dB_cpu);
  grouped_lora_grad_A(dt_cpu, x.host, offsets, dA_cpu);
  grouped_lora_shrink_backward(dt_cpu, A.host, offsets, false, dx_cpu);

  DeviceTensor<double> t, y, dt, dx, dA(Shape{K, r, in}), dB(Shape{K, out, r}), dg(Shape{m, 1});
  set_zero(dA);
  set_zero(dB);
  set_zero(dg);
  cuda::grouped_lora_shrink(x.dev, A.dev, b.dev, t);
  cuda::grouped_lora_expand(t, B.dev, b.dev, s, &g.dev, false, y);
  cuda::grouped_lora_expand_backward(dy.dev, B.dev, b.dev, s, &g.dev, dt, &t, &dg);
  cuda::grouped_lora_grad_B(dy.dev, t, b.dev, s, &g.dev, dB);
  cuda::grouped_lora_grad_A(dt, x.dev, b.dev, dA);
  cuda::grouped_lora_shrink_backward(dt, A.dev, b.dev, false, dx);

  EXPECT_TRUE(agrees(get(t), t_cpu, tolerance<double>));
  EXPECT_TRUE(agrees(get(y), y_cpu, tolerance<double>));
  EXPECT_TRUE(agrees(get(dt), dt_cpu, tolerance<double>));
  EXPECT_TRUE(agrees(get(dg), dg_cpu, tolerance<double>));
  EXPECT_TRUE(agrees(get(dx), dx_cpu, tolerance<double>));
  EXPECT_TRUE(agrees(get(dA), dA_cpu, tolerance<double>));
  EXPECT_TRUE(agrees(get(dB), dB_cpu, tolerance<double>));

  // One expert with PEFT-shaped (2-D) factors.
  DeviceTensor<std::int32_t> one_dev;
  Tensor<std::int32_t> one;
  cuda::one_block_offsets(m, one_dev);
  one_block_offsets(m, one);
  EXPECT_EQ(cuda::download(one_dev), one);
  const Tensor<double> a0 = slab(A.host, 0), b0 = slab(B.host, 0);
  const DeviceTensor<double> a0_dev = cuda::upload(a0), b0_dev = cuda::upload(b0);
  Tensor<double> t1, y1;
  grouped_lora_shrink(x.host, a0, one, t1);
  grouped_lora_expand(t1, b0, one, s, nullptr, false, y1);
  DeviceTensor<double> t1_dev, y1_dev;
  cuda::grouped_lora_shrink(x.dev, a0_dev, one_dev, t1_dev);
  cuda::grouped_lora_expand(t1_dev, b0_dev, one_dev, s, nullptr, false, y1_dev);
  EXPECT_TRUE(agrees(get(y1_dev), y1, tolerance<double>));
}

TEST_F(CudaTest, GroupedLoraShapeErrorsAreTyped) {
  const Blocks b({3, 5});
  DeviceTensor<float> x(Shape{8, 16}), A(Shape{2, 4, 16}), B(Shape{2, 12, 4}), t(Shape{8, 4}), y, dy(Shape{8, 12});
  set_zero(x), set_zero(A), set_zero(B), set_zero(t), set_zero(dy);
  const Blocks three({3, 5, 0});
  EXPECT_THROW(cuda::grouped_lora_shrink(x, A, three.dev, y), ShapeError);  // offsets [4] for 2 experts
  DeviceTensor<float> x_wide(Shape{8, 17});
  EXPECT_THROW(cuda::grouped_lora_shrink(x_wide, A, b.dev, y), ShapeError);
  DeviceTensor<float> A2(Shape{4, 16});
  EXPECT_THROW(cuda::grouped_lora_shrink(x, A2, b.dev, y), ShapeError);
  DeviceTensor<float> y_bad(Shape{8, 11});
  EXPECT_THROW(cuda::grouped_lora_expand(t, B, b.dev, 1.0, nullptr, true, y_bad), ShapeError);
  DeviceTensor<float> g_bad(Shape{7});
  EXPECT_THROW(cuda::grouped_lora_expand(t, B, b.dev, 1.0, &g_bad, false, y), ShapeError);
  DeviceTensor<float> dt, dg(Shape{8});
  EXPECT_THROW(cuda::grouped_lora_expand_backward(dy, B, b.dev, 1.0, nullptr, dt, nullptr, &dg), ShapeError);
  DeviceTensor<float> dB_bad(Shape{2, 12, 5});
  EXPECT_THROW(cuda::grouped_lora_grad_B(dy, t, b.dev, 1.0, nullptr, dB_bad), ShapeError);
  DeviceTensor<float> dA_bad(Shape{3, 4, 16});
  EXPECT_THROW(cuda::grouped_lora_grad_A(t, x, b.dev, dA_bad), ShapeError);
  DeviceTensor<float> no_experts(Shape{0, 4, 16});
  const Blocks none(std::vector<int>{});
  EXPECT_THROW(cuda::grouped_lora_shrink(x, no_experts, none.dev, y), ShapeError);  // 8 rows, no expert
  EXPECT_NO_THROW(cuda::grouped_lora_shrink(x, A, b.dev, y));
  EXPECT_NO_THROW(cuda::synchronize());
}

}  // namespace
}  // namespace mixpeft::cuda_test
