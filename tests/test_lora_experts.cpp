#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <numeric>

#include <xtensor/xview.hpp>

#include "mixpeft/layers/lora_experts.hpp"
#include "mixpeft/layers/lora_linear.hpp"
#include "mixpeft/testing/gradcheck.hpp"

using namespace mixpeft;
using namespace mixpeft::testing;

namespace {

using Layer = LoRAExperts<double>;
using Config = Layer::Config;

constexpr std::size_t D = 6, F = 10, R = 2;

Config small(std::size_t experts, double dropout = 0.0) {
  return {.dim = D, .hidden = F, .experts = experts, .rank = R, .alpha = 4.0, .dropout = dropout};
}

std::map<std::string, Parameter<double>*> by_name(Layer& layer) {
  std::map<std::string, Parameter<double>*> m;
  for (auto& ref : parameters_of<double>(layer)) m[ref.name] = ref.param;
  return m;
}

// Random B (a fresh B is zero, which would make the LoRA gradients of A vanish) and a sharper router, so
// finite-difference steps cannot flip a token's top-1 expert.
void randomise(Layer& layer, Rng& rng) {
  for (auto& ref : parameters_of<double>(layer)) {
    if (ref.name.find("lora_B") != std::string::npos) ref.param->value = random_tensor<double>(shape_of(ref.param->value), rng, 0.5);
    if (ref.name == "router.weight") ref.param->value *= 4.0;
  }
}

// Expert k's factor [r, in] or [out, r] of a stacked [K, ...] one (a 2-D factor is the only expert).
Tensor<double> expert(const Tensor<double>& w, std::size_t k) {
  if (w.dimension() == 2) return w;
  return xt::view(w, k, xt::all(), xt::all());
}

double min_top1_gap(const Tensor<double>& p) {
  double gap = INFINITY;
  for (std::size_t i = 0; i < p.shape()[0]; ++i) {
    std::vector<double> row(p.data() + i * p.shape()[1], p.data() + (i + 1) * p.shape()[1]);
    std::sort(row.rbegin(), row.rend());
    gap = std::min(gap, row[0] - row[1]);
  }
  return gap;
}

// Checks dL/dx and every trainable parameter of `layer` for L = <y, R> + <probs, Rp> + <logits, Rl>, where the
// last two terms (a stand-in for balance losses) enter backward as extra router gradients. `make` rebuilds the
// layer from the same seed so dropout masks and router noise are the same in every evaluation.
template <class Make>
void gradient_check(Layer& layer, const Make& make, Tensor<double>& x, bool balance_terms, const char* what) {
  Rng rng(99);
  const std::size_t n = rows(x), K = layer.config().experts;
  const Tensor<double> Ry = random_tensor<double>(shape_of(x), rng);
  RouterGrad<double> extra;
  if (balance_terms) {
    extra.dprobs = random_tensor<double>({n, K}, rng);
    extra.dlogits = random_tensor<double>({n, K}, rng);
  }
  auto list = parameters_of<double>(layer);
  auto loss = [&] {
    Layer fresh = make();
    auto fl = parameters_of<double>(fresh);
    for (std::size_t i = 0; i < list.size(); ++i) fl[i].param->value = list[i].param->value;
    Layer::Cache c;
    double l = dot(fresh.forward(x, c), Ry);
    if (balance_terms) l += dot(c.router.routing.probs, extra.dprobs) + dot(c.router.routing.logits, extra.dlogits);
    return l;
  };
  Layer::Cache cache;
  layer.forward(x, cache);
  if (K > 1) {
    ASSERT_GT(min_top1_gap(cache.router.routing.probs), 1e-3) << what;
  }
  const Tensor<double> dx = layer.backward(cache, Ry, extra);
  EXPECT_LT(gradient_error(loss, x, dx), 1e-6) << what << ": x";
  for (auto& ref : list) {
    if (!ref.param->trainable) continue;
    EXPECT_LT(gradient_error(loss, ref.param->value, ref.param->grad), 1e-6) << what << ": " << ref.name;
  }
}

// ---- a per-token reference: one LoRA'd projection on a single row, with ops ----
struct TokenLoRA {
  Tensor<double> W;
  Tensor<double> A;
  Tensor<double> B;
  double s, c;

  Tensor<double> forward(const Tensor<double>& x) const {
    Tensor<double> y, t, d;
    linear_forward(x, W, nullptr, y);
    linear_forward(x, A, nullptr, t);
    linear_forward(t, B, nullptr, d);
    return y + c * s * d;
  }
  // Returns dx; accumulates dA, dB and dc.
  Tensor<double> backward(const Tensor<double>& x, const Tensor<double>& dy, Tensor<double>& dA, Tensor<double>& dB,
                          double& dc) const {
    Tensor<double> t, dx, dt, dxa;
    linear_forward(x, A, nullptr, t);
    linear_backward(x, W, dy, &dx, nullptr, nullptr);
    const Tensor<double> dd = c * s * dy;
    linear_backward(t, B, dd, &dt, &dB, nullptr);
    linear_backward(x, A, dt, &dxa, &dA, nullptr);
    Tensor<double> d;
    linear_forward(t, B, nullptr, d);
    dc += s * dot(d, dy);
    return dx + dxa;
  }
};

}  // namespace

TEST(LoRAExperts, ParameterNamesShapesAndCounts) {
  Rng rng(1);
  Layer layer(small(3), rng);
  auto list = parameters_of<double>(layer, "mlp");
  std::vector<std::string> names;
  for (auto& ref : list) names.push_back(ref.name);
  const std::vector<std::string> expected_head = {"mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                                                  "mlp.gate_proj.lora_A.weight", "mlp.gate_proj.lora_B.weight",
                                                  "mlp.up_proj.lora_A.weight"};
  EXPECT_TRUE(std::equal(expected_head.begin(), expected_head.end(), names.begin()));
  EXPECT_EQ(names.size(), 11u);
  EXPECT_EQ(names[names.size() - 3], "mlp.down_proj.lora_B.weight");
  EXPECT_EQ(names[names.size() - 2], "mlp.router.weight");
  EXPECT_EQ(names.back(), "mlp.router.bias");
  auto m = by_name(layer);
  EXPECT_FALSE(m["gate_proj.weight"]->trainable);
  EXPECT_EQ(shape_of(m["down_proj.weight"]->value), (Shape{D, F}));
  EXPECT_EQ(shape_of(m["down_proj.lora_A.weight"]->value), (Shape{3, R, F}));
  EXPECT_EQ(shape_of(m["down_proj.lora_B.weight"]->value), (Shape{3, D, R}));
  EXPECT_EQ(shape_of(m["router.weight"]->value), (Shape{3, D}));
  // 3 experts x (gate + up + down) x (r in + out r) + router (K D + K)
  EXPECT_EQ(count_parameters(list, true), 3 * 3 * (R * D + F * R) + 3 * D + 3);
  EXPECT_EQ(count_parameters(list, false), count_parameters(list, true) + 3 * D * F);

  Layer single(small(1), rng);
  auto m1 = by_name(single);
  EXPECT_EQ(m1.count("router.weight"), 0u);
  EXPECT_EQ(shape_of(m1["gate_proj.lora_A.weight"]->value), (Shape{R, D}));  // one expert: PEFT's shapes
  EXPECT_EQ(shape_of(m1["gate_proj.lora_B.weight"]->value), (Shape{F, R}));
  EXPECT_EQ(single.router(), nullptr);
}

TEST(LoRAExperts, FreshLayerIsTheFrozenBaseFFN) {
  Rng rng(2);
  Layer layer(small(3, 0.1), rng);
  Tensor<double> x = random_tensor<double>({2, 5, D}, rng);
  Layer::Cache cache;
  const Tensor<double> y = layer.forward(x, cache);
  Tensor<double> g, u, z, ref;
  linear_forward(x, layer.gate_weight().value, nullptr, g);
  linear_forward(x, layer.up_weight().value, nullptr, u);
  swiglu_forward(g, u, z);
  linear_forward(z, layer.down_weight().value, nullptr, ref);
  ASSERT_EQ(shape_of(y), (Shape{2, 5, D}));
  EXPECT_LT(max_abs_diff(y, ref), 1e-12);
}

TEST(LoRAExperts, OneExpertIsPlainLoRAOnEachProjection) {
  Rng rng(3);
  Layer layer(small(1), rng);
  randomise(layer, rng);
  auto m = by_name(layer);
  const double s = 4.0 / R;
  auto make = [&](const std::string& proj, std::size_t in, std::size_t out) {
    Rng r0(0);
    LoRALinear<double> lin({.in = in, .out = out, .bias = false, .lora = {.rank = R, .alpha = 4.0, .dropout = 0.0}},
                           r0);
    lin.weight().value = m[proj + ".weight"]->value;
    lin.lora_A().value = m[proj + ".lora_A.weight"]->value;
    lin.lora_B().value = m[proj + ".lora_B.weight"]->value;
    EXPECT_DOUBLE_EQ(lin.scale(), s);
    return lin;
  };
  LoRALinear<double> gate = make("gate_proj", D, F), up = make("up_proj", D, F), down = make("down_proj", F, D);
  Tensor<double> x = random_tensor<double>({7, D}, rng), dy = random_tensor<double>({7, D}, rng);

  LoRALinear<double>::Cache cg, cu, cd;
  Tensor<double> h = gate.forward(x, cg), u = up.forward(x, cu), z;
  swiglu_forward(h, u, z);
  const Tensor<double> y_ref = down.forward(z, cd);
  Tensor<double> dh, du;
  swiglu_backward(h, u, down.backward(cd, dy), dh, du);
  const Tensor<double> dx_ref = gate.backward(cg, dh) + up.backward(cu, du);

  Layer::Cache cache;
  EXPECT_LT(max_abs_diff(layer.forward(x, cache), y_ref), 1e-12);
  EXPECT_LT(max_abs_diff(layer.backward(cache, dy), dx_ref), 1e-12);
  EXPECT_LT(max_abs_diff(m["gate_proj.lora_A.weight"]->grad, gate.lora_A().grad), 1e-12);
  EXPECT_LT(max_abs_diff(m["up_proj.lora_B.weight"]->grad, up.lora_B().grad), 1e-12);
  EXPECT_LT(max_abs_diff(m["down_proj.lora_A.weight"]->grad, down.lora_A().grad), 1e-12);
  EXPECT_EQ(cache.router.routing.tokens(), 0u);  // no router, no routing
}

TEST(LoRAExperts, GroupedForwardBackwardEqualsPerTokenLoop) {
  for (bool gate_scaling : {false, true}) {
    Rng rng(4);
    Config cfg = small(3);
    cfg.gate_scaling = gate_scaling;
    Layer layer(cfg, rng);
    randomise(layer, rng);
    auto m = by_name(layer);
    const std::size_t n = 11;
    Tensor<double> x = random_tensor<double>({n, D}, rng), dy = random_tensor<double>({n, D}, rng);
    Layer::Cache cache;
    const Tensor<double> y = layer.forward(x, cache);
    const Tensor<double> dx = layer.backward(cache, dy);

    // Reference: each token on its own, through its expert, with the router recomputed by ops.
    const double s = cfg.alpha / double(cfg.rank);
    Tensor<double> logits, probs;
    linear_forward(x, m["router.weight"]->value, &m["router.bias"]->value, logits);
    softmax_forward(logits, probs);
    std::map<std::string, Tensor<double>> grads;  // stacked factors per expert, as "<name>.<k>"
    for (auto& [name, p] : m) {
      if (!p->trainable) continue;
      if (p->value.dimension() == 3) {
        for (std::size_t k = 0; k < 3; ++k) grads[name + "." + std::to_string(k)] = zeros<double>(shape_of(expert(p->value, k)));
      } else {
        grads[name] = zeros<double>(shape_of(p->value));
      }
    }
    Tensor<double> dprobs = zeros<double>({n, 3});
    std::vector<std::size_t> used(3, 0);
    for (std::size_t i = 0; i < n; ++i) {
      const Tensor<double> xi = xt::view(x, xt::range(i, i + 1), xt::all());
      const Tensor<double> dyi = xt::view(dy, xt::range(i, i + 1), xt::all());
      std::size_t k = 0;
      for (std::size_t j = 1; j < 3; ++j) k = probs(i, j) > probs(i, k) ? j : k;
      ++used[k];
      const double c = gate_scaling ? probs(i, k) : 1.0;
      auto lora = [&](const std::string& proj) {
        return TokenLoRA{m[proj + ".weight"]->value, expert(m[proj + ".lora_A.weight"]->value, k),
                         expert(m[proj + ".lora_B.weight"]->value, k), s, c};
      };
      const TokenLoRA G = lora("gate_proj"), U = lora("up_proj"), Dn = lora("down_proj");
      const Tensor<double> h = G.forward(xi), u = U.forward(xi);
      Tensor<double> z, dh, du;
      swiglu_forward(h, u, z);
      const Tensor<double> yi = Dn.forward(z);
      for (std::size_t q = 0; q < D; ++q) EXPECT_NEAR(y(i, q), yi(0, q), 1e-12);

      auto g = [&](const std::string& proj, const char* ab) {
        return &grads[proj + ".lora_" + ab + ".weight." + std::to_string(k)];
      };
      double dc = 0;
      const Tensor<double> dz = Dn.backward(z, dyi, *g("down_proj", "A"), *g("down_proj", "B"), dc);
      swiglu_backward(h, u, dz, dh, du);
      const Tensor<double> dxi = G.backward(xi, dh, *g("gate_proj", "A"), *g("gate_proj", "B"), dc) +
                                 U.backward(xi, du, *g("up_proj", "A"), *g("up_proj", "B"), dc);
      if (gate_scaling) dprobs(i, k) += dc;
      if (!gate_scaling) {
        for (std::size_t q = 0; q < D; ++q) EXPECT_NEAR(dx(i, q), dxi(0, q), 1e-12);
      } else {
        // dx also carries the router's input gradient.
        Tensor<double> dlogits, dxr;
        const Tensor<double> pi = xt::view(probs, xt::range(i, i + 1), xt::all());
        const Tensor<double> dpi = xt::view(dprobs, xt::range(i, i + 1), xt::all());
        softmax_backward(pi, dpi, dlogits);
        linear_backward(xi, m["router.weight"]->value, dlogits, &dxr, &grads["router.weight"], &grads["router.bias"]);
        for (std::size_t q = 0; q < D; ++q) EXPECT_NEAR(dx(i, q), dxi(0, q) + dxr(0, q), 1e-12);
      }
    }
    EXPECT_GT(*std::min_element(used.begin(), used.end()), 0u);  // every expert saw tokens
    for (auto& [name, p] : m) {
      if (!p->trainable) continue;
      if (p->value.dimension() == 3) {
        for (std::size_t k = 0; k < 3; ++k)
          EXPECT_LT(max_abs_diff(expert(p->grad, k), grads[name + "." + std::to_string(k)]), 1e-12) << name << k;
      } else {
        EXPECT_LT(max_abs_diff(p->grad, grads[name]), 1e-12) << name;
      }
    }
  }
}

TEST(LoRAExperts, PermutingTokensPermutesOutputs) {
  Rng rng(5);
  Layer layer(small(4), rng);
  randomise(layer, rng);
  const std::size_t n = 13;
  Tensor<double> x = random_tensor<double>({n, D}, rng), xp = empty<double>({n, D});
  std::vector<std::size_t> perm(n);
  std::iota(perm.begin(), perm.end(), 0);
  std::reverse(perm.begin(), perm.end());
  std::swap(perm[2], perm[7]);
  for (std::size_t i = 0; i < n; ++i) xt::view(xp, i, xt::all()) = xt::view(x, perm[i], xt::all());
  Layer::Cache c1, c2;
  const Tensor<double> y = layer.forward(x, c1), yp = layer.forward(xp, c2);
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t q = 0; q < D; ++q) EXPECT_NEAR(yp(i, q), y(perm[i], q), 1e-12);

  // Backward: permuting dy the same way permutes dx and leaves the parameter gradients unchanged.
  const Tensor<double> dy = random_tensor<double>({n, D}, rng);
  Tensor<double> dyp = empty<double>({n, D});
  for (std::size_t i = 0; i < n; ++i) xt::view(dyp, i, xt::all()) = xt::view(dy, perm[i], xt::all());
  const auto params = parameters_of<double>(layer);
  zero_grads(params);
  const Tensor<double> dx = layer.backward(c1, dy);
  std::map<std::string, Tensor<double>> grads;
  for (const auto& ref : params)
    if (ref.param->trainable) grads[ref.name] = ref.param->grad;
  zero_grads(params);
  const Tensor<double> dxp = layer.backward(c2, dyp);
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t q = 0; q < D; ++q) EXPECT_NEAR(dxp(i, q), dx(perm[i], q), 1e-12);
  ASSERT_FALSE(grads.empty());
  for (const auto& ref : params) {
    if (!ref.param->trainable) continue;
    EXPECT_LT(xt::amax(xt::abs(ref.param->grad - grads.at(ref.name)))(), 1e-12) << ref.name;
  }
}

TEST(LoRAExperts, ExpertWithNoTokensDoesNoWork) {
  Rng rng(6);
  Layer layer(small(3), rng);
  randomise(layer, rng);
  by_name(layer)["router.bias"]->value(1) = -100.0;  // expert 1 never wins
  Layer::Cache cache;
  Tensor<double> x = random_tensor<double>({9, D}, rng);
  layer.forward(x, cache);
  EXPECT_EQ(cache.router.routing.counts(1), 0);
  auto make = [] {
    Rng r(6);
    return Layer(small(3), r);
  };
  gradient_check(layer, make, x, false, "empty expert");
  auto m = by_name(layer);
  for (const char* p : {"gate_proj", "up_proj", "down_proj"}) {
    EXPECT_EQ(xt::amax(xt::abs(expert(m[std::string(p) + ".lora_A.weight"]->grad, 1)))(), 0.0);
    EXPECT_EQ(xt::amax(xt::abs(expert(m[std::string(p) + ".lora_B.weight"]->grad, 1)))(), 0.0);
    EXPECT_GT(xt::amax(xt::abs(expert(m[std::string(p) + ".lora_B.weight"]->grad, 0)))(), 0.0);
  }
}

TEST(LoRAExperts, GradientCheckSparseReferenceRouting) {
  // No gate scaling: the router gets no gradient from the task loss.
  for (double dropout : {0.0, 0.3}) {
    Rng rng(7);
    Layer layer(small(3, dropout), rng);
    randomise(layer, rng);
    auto make = [dropout] {
      Rng r(7);
      return Layer(small(3, dropout), r);
    };
    Tensor<double> x = random_tensor<double>({2, 5, D}, rng);
    gradient_check(layer, make, x, false, dropout > 0 ? "sparse, dropout" : "sparse");
    EXPECT_EQ(xt::amax(xt::abs(layer.router()->weight().grad))(), 0.0);
  }
}

TEST(LoRAExperts, GradientCheckOneExpertWithDropoutOnBatchedInput) {
  // K = 1 keeps the [B, T, D] input as is (no router permutation); the dropout mask must still line up.
  Rng rng(17);
  Layer layer(small(1, 0.3), rng);
  randomise(layer, rng);
  auto make = [] {
    Rng r(17);
    return Layer(small(1, 0.3), r);
  };
  Tensor<double> x = random_tensor<double>({2, 4, D}, rng);
  gradient_check(layer, make, x, false, "one expert, dropout, [B, T, D]");
}

TEST(LoRAExperts, GradientCheckRoutingThroughGateScaling) {
  Rng rng(8);
  Config cfg = small(3);
  cfg.gate_scaling = true;
  Layer layer(cfg, rng);
  randomise(layer, rng);
  auto make = [cfg] {
    Rng r(8);
    return Layer(cfg, r);
  };
  Tensor<double> x = random_tensor<double>({10, D}, rng);
  gradient_check(layer, make, x, false, "gate scaling");
  EXPECT_GT(xt::amax(xt::abs(layer.router()->weight().grad))(), 1e-6);
}

TEST(LoRAExperts, GradientCheckWithBalanceGradients) {
  for (bool gate_scaling : {false, true}) {
    Rng rng(9);
    Config cfg = small(3);
    cfg.gate_scaling = gate_scaling;
    Layer layer(cfg, rng);
    randomise(layer, rng);
    auto make = [cfg] {
      Rng r(9);
      return Layer(cfg, r);
    };
    Tensor<double> x = random_tensor<double>({10, D}, rng);
    gradient_check(layer, make, x, true, gate_scaling ? "balance + gate scaling" : "balance only");
  }
}

TEST(LoRAExperts, GradientCheckDenseMixtureWithDropoutAndNoise) {
  Rng rng(10);
  Config cfg = small(3, 0.2);
  cfg.dense = true;
  cfg.router_noise = RouterNoise::InputJitter;
  cfg.router_noise_level = 0.05;
  Layer layer(cfg, rng);
  randomise(layer, rng);
  auto make = [cfg] {
    Rng r(10);
    return Layer(cfg, r);
  };
  Tensor<double> x = random_tensor<double>({7, D}, rng);
  gradient_check(layer, make, x, true, "dense");
}

TEST(LoRAExperts, DenseEqualsWeightedSumOfExperts) {
  Rng rng(11);
  Config cfg = small(2);
  cfg.dense = true;
  Layer layer(cfg, rng);
  randomise(layer, rng);
  auto m = by_name(layer);
  Tensor<double> x = random_tensor<double>({4, D}, rng);
  Layer::Cache cache;
  const Tensor<double> y = layer.forward(x, cache);
  const Tensor<double>& p = cache.router.routing.probs;
  const double s = cfg.alpha / double(cfg.rank);
  auto proj = [&](const std::string& name, const Tensor<double>& in) {
    Tensor<double> out;
    linear_forward(in, m[name + ".weight"]->value, nullptr, out);
    for (std::size_t k = 0; k < 2; ++k) {
      Tensor<double> t, d;
      linear_forward(in, expert(m[name + ".lora_A.weight"]->value, k), nullptr, t);
      linear_forward(t, expert(m[name + ".lora_B.weight"]->value, k), nullptr, d);
      for (std::size_t i = 0; i < rows(in); ++i) xt::view(out, i, xt::all()) += s * p(i, k) * xt::view(d, i, xt::all());
    }
    return out;
  };
  Tensor<double> z;
  swiglu_forward(proj("gate_proj", x), proj("up_proj", x), z);
  EXPECT_LT(max_abs_diff(y, proj("down_proj", z)), 1e-12);
}

TEST(LoRAExperts, FrozenPartsGetNoGradientAndTrainableBaseDoes) {
  Rng rng(12);
  Layer layer(small(2), rng);
  randomise(layer, rng);
  auto m = by_name(layer);
  m["gate_proj.lora_A.weight"]->set_trainable(false);
  m["down_proj.lora_B.weight"]->set_trainable(false);
  m["up_proj.weight"]->set_trainable(true);
  auto make = [] {
    Rng r(12);
    return Layer(small(2), r);
  };
  Tensor<double> x = random_tensor<double>({8, D}, rng);
  gradient_check(layer, make, x, false, "partly frozen");
  EXPECT_EQ(m["gate_proj.lora_A.weight"]->grad.size(), 0u);
  EXPECT_EQ(m["down_proj.lora_B.weight"]->grad.size(), 0u);
  EXPECT_EQ(m["gate_proj.weight"]->grad.size(), 0u);
}

TEST(LoRAExperts, CacheIsReusedAcrossTokenCounts) {
  Rng rng(13);
  Layer layer(small(3), rng);
  randomise(layer, rng);
  Layer::Cache shared;
  for (std::size_t n : {9, 4, 12}) {
    Tensor<double> x = random_tensor<double>({n, D}, rng), dy = random_tensor<double>({n, D}, rng);
    Layer::Cache fresh;
    const Tensor<double> y1 = layer.forward(x, shared), y2 = layer.forward(x, fresh);
    EXPECT_EQ(y1, y2);
    layer.forward(x, shared);
    EXPECT_EQ(layer.backward(shared, dy), layer.backward(fresh, dy));
  }
}

TEST(LoRAExperts, FloatMatchesDouble) {
  Rng rd(14), rf(14);
  Layer ld(small(4), rd);
  LoRAExperts<float> lf({.dim = D, .hidden = F, .experts = 4, .rank = R, .alpha = 4.0, .dropout = 0.0}, rf);
  randomise(ld, rd);
  auto pd = parameters_of<double>(ld);
  auto pf = parameters_of<float>(lf);
  for (std::size_t i = 0; i < pd.size(); ++i) pf[i].param->value = xt::cast<float>(pd[i].param->value);
  Tensor<double> x = random_tensor<double>({16, D}, rd);
  Layer::Cache cd;
  LoRAExperts<float>::Cache cf;
  const Tensor<double> yd = ld.forward(x, cd);
  const Tensor<double> yf = xt::cast<double>(lf.forward(xt::cast<float>(x), cf));
  EXPECT_LT(max_abs_diff(yd, yf), 1e-4);
}

TEST(LoRAExperts, BadConfigAndShapesAreTyped) {
  Rng rng(15);
  auto bad = [&](auto edit) {
    Config c = small(3);
    edit(c);
    return Layer(c, rng);
  };
  EXPECT_THROW(bad([](Config& c) { c.rank = 0; }), ConfigError);
  EXPECT_THROW(bad([](Config& c) { c.experts = 0; }), ConfigError);
  EXPECT_THROW(bad([](Config& c) { c.dim = 0; }), ConfigError);
  EXPECT_THROW(bad([](Config& c) { c.dropout = 1.0; }), ConfigError);
  EXPECT_THROW(bad([](Config& c) { c.alpha = 0.0; }), ConfigError);
  EXPECT_THROW(bad([](Config& c) { c.router_temperature = 0.0; }), ConfigError);
  try {
    bad([](Config& c) { c.dense = c.gate_scaling = true; });
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_STREQ(e.what(), "LoRAExperts: dense and gate_scaling are exclusive (dense always weights experts by p)");
  }
  Layer layer(small(3), rng);
  Layer::Cache cache;
  try {
    layer.forward(zeros<double>({4, D + 1}), cache);
    FAIL();
  } catch (const ShapeError& e) {
    EXPECT_STREQ(e.what(), "LoRAExperts: x has shape [4, 7], expected [..., 6]");
  }
  layer.forward(zeros<double>({4, D}), cache);
  EXPECT_THROW(layer.backward(cache, zeros<double>({5, D})), ShapeError);
  RouterGrad<double> wrong;
  wrong.dprobs = zeros<double>({3, 3});
  EXPECT_THROW(layer.backward(cache, zeros<double>({4, D}), wrong), ShapeError);
}

