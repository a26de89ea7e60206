// mixpeft/layers/lora_experts.hpp — LLaVA-MoLE's FFN: a frozen SwiGLU with K LoRA experts and a top-1 router.
//
// Shapes: N tokens (leading axes of x, flattened), D model width, F hidden width (D_ff), K experts, r rank,
// s = alpha / r, M rows of a grouped block list (N when sparse, N K when dense).
//
// Sparse (default):                 p = softmax((W_r x + b_r) / tau),  k* = argmax_k p_k  // router, [N, K] (tau = 1, optional noise)
//   h = W_g x + c s B^g_k* A^g_k* drop(x)        u = W_u x + c s B^u_k* A^u_k* drop(x)   // [N, F]
//   z = SiLU(h) * u                              y = W_d z + c s B^d_k* A^d_k* drop(z)   // [N, D]
//   c = 1 by default, as in the reference code: the router then learns only from the balance losses.
//   gate_scaling = true sets c = p_k* (Switch-style), so the router also learns from the task loss.
// Dense (dense = true): every expert on every token, each projection adds sum_k p_k s B_k A_k drop(input).
//
// Execution. Sparse: the FFN is row-wise, so it runs in expert-grouped row order. x is gathered once into
// blocks of rows per expert, the frozen base GEMMs run once on all N rows, each expert's LoRA shrink/expand
// GEMMs run on its contiguous block (an expert with no tokens does no work), and y is scattered back to token
// order once; backward gathers dy, runs the same blocks and scatters dx. Active compute is a plain rank-r LoRA
// FFN plus the router. Dense: the FFN runs in token order; each projection gathers its input K times (one
// block per expert), runs the grouped LoRA with gates p and sums the blocks back: K x the LoRA compute.
//
// One LoRA'd projection on the blocks of all experts is two grouped ops forward and four backward (ops/grouped_lora.hpp,
// one launch each on a GPU). On the block of expert k (X_d = drop(X), H = X_d A_k^T, the gate c folded in):
//   forward:   H = shrink(X_d);   Y += expand(H) = c s H B_k^T
//   backward:  U = s dY B_k, dc += rowsum(U * H), dH = c U   (expand_backward);   dB_k += s dY^T (c H)   (grad_B)
//              dA_k += dH^T X_d   (grad_A);   dX += drop_backward(dH A_k)   (shrink_backward)
//   base: dX += dY W  (the frozen W gets no gradient work)
// Router: dp = dp_balance + top_k_backward(dc) (gate scaling, dense), dl = dl_balance (z-loss). Without any
// of these the router receives no gradient and backward skips it (the reference, sparse path, no balance term).
// Parameter gradients accumulate, dx is written.
// Cache: input rows in execution order, h, u, z; per LoRA the dropout mask and dropped input, and H;
// the router cache, whose RoutingResult (cache.router.routing) feeds the balance losses and RouterStats.
//
// K = 1 is a plain LoRA SwiGLU FFN: no router and no "router.*" parameters, no gather or scatter;
// cache.router.routing stays empty and balance losses do not apply (gate_scaling and dense change nothing).
// Parameters (under the layer prefix; the base is frozen, everything else trainable):
//   gate_proj.weight [F, D], up_proj.weight [F, D], down_proj.weight [D, F]         Hugging Face names
//   gate_proj.lora_A.weight [K, r, D], gate_proj.lora_B.weight [K, F, r]            the K experts' factors,
//   up_proj.lora_A.weight [K, r, D],   up_proj.lora_B.weight [K, F, r]              stacked (one GEMM launch
//   down_proj.lora_A.weight [K, r, F], down_proj.lora_B.weight [K, D, r]            per projection on a GPU)
//   router.weight [K, D], router.bias [K]                                             K > 1 only
// With K = 1 the factors are PEFT's [r, in] and [out, r].
// Init: base and router as nn.Linear, A_k kaiming-uniform(a = sqrt 5) expert by expert, B zeros (a fresh layer
// equals its base).
//
// Backends: device-generic. Every computation is an unqualified op call: the grouped LoRA ops
// (ops/grouped_lora.hpp, cuda/grouped_lora.cuh), the routing ops, linear_*, swiglu_*, dropout_*, gemm, assign,
// add_to. Weights are drawn on the host in accumulator_t<T> with the CPU's Rng sequence and handed over with
// Backend::from_host, so LoRAExperts<T, Cuda> built from Rng(s) holds the weights of LoRAExperts<T, Cpu>. The
// gates c and their gradients are kept in accumulator_t<T> (float for a 16-bit T).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "mixpeft/core/backend.hpp"
#include "mixpeft/core/error.hpp"
#include "mixpeft/core/init.hpp"
#include "mixpeft/core/parallel.hpp"
#include "mixpeft/core/parameter.hpp"
#include "mixpeft/core/rng.hpp"
#include "mixpeft/core/tensor.hpp"
#include "mixpeft/layers/router.hpp"
#include "mixpeft/ops/activations.hpp"
#include "mixpeft/ops/dropout.hpp"
#include "mixpeft/ops/elementwise.hpp"
#include "mixpeft/ops/grouped_lora.hpp"
#include "mixpeft/ops/matmul.hpp"

namespace mixpeft {

// ================================ layers ================================

// K LoRA experts on one projection, applied to rows grouped by expert (one block per expert, see offsets):
//   y[block k] += c * s * drop(x[block k]) A_k^T B_k^T,  c = per-row gate (or 1).
// A helper of LoRAExperts; parameters "<name>.lora_A.weight" [K, r, in], "<name>.lora_B.weight" [K, out, r]
// ([r, in] and [out, r] when K = 1).
template <class T, class Backend = Cpu>
class ExpertLoRA {
 public:
  using Tensor = typename Backend::template tensor<T>;
  using IndexTensor = typename Backend::template tensor<std::int32_t>;
  using Gate = accumulator_t<T>;
  using GateTensor = typename Backend::template tensor<Gate>;

  struct Cache {
    Tensor mask, xd;        // dropout mask and dropped input ([M, in]); mask absent without dropout
    Tensor t;               // [M, r]  drop(x) A^T (ungated)
    Tensor dt, dxd, dxm;    // backward workspaces
  };

  ExpertLoRA(const std::string& name, std::size_t in, std::size_t out, std::size_t experts, std::size_t rank,
             double alpha, double dropout, Rng& rng)
      : scale_(alpha / double(rank)), dropout_(dropout) {
    const Shape a_shape = experts == 1 ? Shape{rank, in} : Shape{experts, rank, in};
    const Shape b_shape = experts == 1 ? Shape{out, rank} : Shape{experts, out, rank};
    ::mixpeft::Tensor<Gate> a = empty<Gate>(a_shape);
    for (std::size_t k = 0; k < experts; ++k) {  // expert by expert: fan-in `in`, the Rng sequence of K matrices
      ::mixpeft::Tensor<Gate> ak = empty<Gate>({rank, in});
      init::kaiming_uniform(ak, rng);
      std::copy(ak.data(), ak.data() + ak.size(), a.data() + k * rank * in);
    }
    A_ = Parameter<T, Backend>(name + ".lora_A.weight", Backend::template from_host<T>(std::move(a)), true);
    B_ = Parameter<T, Backend>(name + ".lora_B.weight", Backend::template zeros<T>(b_shape), true);
  }

  // y (+)= the experts' LoRA outputs on x's row blocks; gates: [M, 1] or null (c = 1).
  void forward(const Tensor& x, const IndexTensor& offsets, const GateTensor* gates, bool training, Rng& rng,
               Tensor& y, bool accumulate, Cache& c) {
    const bool drop = training && dropout_ > 0;
    if (drop) {
      // Kept as rows [M, in] so the backward's row-shaped gradients line up with the mask for any x rank.
      dropout_forward(x, dropout_, true, rng, c.xd, c.mask);
      c.xd.reshape({rows(x), x.shape().back()});
      c.mask.reshape({rows(x), x.shape().back()});
    } else {
      resize_to(c.mask, Shape{0});
    }
    grouped_lora_shrink(drop ? c.xd : x, A_.value, offsets, c.t);
    grouped_lora_expand(c.t, B_.value, offsets, scale_, gates, accumulate, y);
  }

  // dx += the LoRA part of the input gradient; dgates += dL/dc (when both gates and dgates are given).
  // x, offsets and gates are those of the forward.
  void backward(Cache& c, const Tensor& x, const IndexTensor& offsets, const GateTensor* gates, const Tensor& dy,
                Tensor& dx, GateTensor* dgates) {
    const bool drop = detail::present(c.mask);
    grouped_lora_expand_backward(dy, B_.value, offsets, scale_, gates, c.dt, dgates ? &c.t : nullptr, dgates);
    if (B_.trainable) grouped_lora_grad_B(dy, c.t, offsets, scale_, gates, B_.grad);
    if (A_.trainable) grouped_lora_grad_A(c.dt, drop ? c.xd : x, offsets, A_.grad);
    if (drop) {
      grouped_lora_shrink_backward(c.dt, A_.value, offsets, false, c.dxd);
      dropout_backward(c.dxd, c.mask, c.dxm);
      add_to(dx, c.dxm);
    } else {
      grouped_lora_shrink_backward(c.dt, A_.value, offsets, true, dx);
    }
  }

  void collect_parameters(ParameterList<T, Backend>& list, const std::string& prefix) {
    add_parameter(list, prefix, A_);
    add_parameter(list, prefix, B_);
  }

  Parameter<T, Backend>& lora_A() { return A_; }  // [K, r, in] ([r, in] when K = 1)
  Parameter<T, Backend>& lora_B() { return B_; }  // [K, out, r] ([out, r] when K = 1)
  double scale() const { return scale_; }

 private:
  Parameter<T, Backend> A_, B_;
  double scale_;
  double dropout_;
};

// The configuration of LoRAExperts<T, Backend> (LoRAExperts<T, Backend>::Config), shared by every T and backend.
struct LoRAExpertsConfig {
  std::size_t dim = 0;     // D
  std::size_t hidden = 0;  // F
  std::size_t experts = 3;
  std::size_t rank = 32;
  double alpha = 64.0;    // LoRA scale s = alpha / rank
  double dropout = 0.05;  // LoRA dropout, on each LoRA's input
  bool gate_scaling = false;  // c = p_k* (Switch-style); off matches the reference code
  bool dense = false;         // every expert on every token, weighted by p_k
  double router_temperature = 1.0;
  bool router_bias = true;
  RouterNoise router_noise = RouterNoise::None;  // applied in training only
  double router_noise_level = 0.0;
};

template <class T, class Backend = Cpu>
class LoRAExperts {
 public:
  using Tensor = typename Backend::template tensor<T>;
  using IndexTensor = typename Backend::template tensor<std::int32_t>;
  using Router = TopKRouter<T, Backend>;
  using Routing = RoutingResult<T, Backend>;
  using Gate = accumulator_t<T>;
  using GateTensor = typename Backend::template tensor<Gate>;

  using Config = LoRAExpertsConfig;  // one type for every T and backend

  struct Projection {  // one LoRA'd projection; xr .. dxr are the K-fold blocks of dense mode
    typename ExpertLoRA<T, Backend>::Cache lora;
    Tensor xr, yr, dyr, dxr;
  };

  struct Cache {
    typename Router::Cache router;  // router.routing: the RoutingResult of the last forward (K > 1)
    Shape x_shape;
    Tensor x;           // [N, D] input rows in execution order (grouped by expert when sparse)
    IndexTensor one_block;  // [2] = {0, N}: the offsets of K = 1
    std::size_t one_block_rows = std::size_t(-1);  // the N that one_block holds (rewritten, one upload, when N changes)
    GateTensor gates;   // [M, 1] gate values c per grouped row (gate scaling, dense)
    IndexTensor dense_experts, dense_counts, dense_offsets, dense_perm;
    Tensor dense_gates;  // [N K, 1]
    Tensor h, u, z;      // [N, F] in execution order
    Tensor y;            // [N, D] grouped output (sparse)
    Projection gate, up, down;
    GateTensor dgates_rows;                        // [M, 1] dL/dc per grouped row
    Tensor dy, dz, dh, du, dx, dgates, dprobs;     // backward workspaces
  };

  LoRAExperts(const Config& config, Rng& rng)
      : config_(validated(config)),
        gate_w_("gate_proj.weight", base_weight(config.hidden, config.dim, rng), false),
        up_w_("up_proj.weight", base_weight(config.hidden, config.dim, rng), false),
        down_w_("down_proj.weight", base_weight(config.dim, config.hidden, rng), false),
        gate_("gate_proj", config.dim, config.hidden, config.experts, config.rank, config.alpha, config.dropout, rng),
        up_("up_proj", config.dim, config.hidden, config.experts, config.rank, config.alpha, config.dropout, rng),
        down_("down_proj", config.hidden, config.dim, config.experts, config.rank, config.alpha, config.dropout,
              rng) {
    if (config.experts > 1)
      router_.emplace(typename Router::Config{.in = config.dim,
                                              .experts = config.experts,
                                              .k = 1,
                                              .temperature = config.router_temperature,
                                              .bias = config.router_bias,
                                              .noise = config.router_noise,
                                              .noise_level = config.router_noise_level},
                      rng);
    dropout_rng_ = rng.split();
  }

  // x [..., D] -> y [..., D].
  Tensor forward(const Tensor& x, Cache& c) {
    expect_width("LoRAExperts", "x", x, config_.dim);
    c.x_shape = shape_of(x);
    Tensor y;
    if (!router_) {
      assign(c.x, x);
      if (c.one_block_rows != rows(x)) {
        one_block_offsets(rows(x), c.one_block);
        c.one_block_rows = rows(x);
      }
      body_forward(c, y);
      return y;
    }
    const Routing& r = router_->forward(x, c.router);
    if (config_.dense) {
      const std::size_t n = rows(x), K = config_.experts;
      top_k_forward(r.probs, K, c.dense_experts, c.dense_gates);
      group_by_expert(c.dense_experts, K, c.dense_counts, c.dense_offsets, c.dense_perm);
      c.dense_gates.reshape({n * K, 1});
      store_gates(c.dense_gates, c.dense_perm, c.gates);
      assign(c.x, x);
      body_forward(c, y);
      return y;
    }
    gather_rows(x, r.perm, 1, c.x);
    if (config_.gate_scaling) store_gates(r.gates, r.perm, c.gates);
    body_forward(c, c.y);
    resize_to(y, c.x_shape);
    set_zero(y);
    scatter_add_rows(c.y, r.perm, 1, y);
    return y;
  }

  Tensor backward(Cache& c, const Tensor& dy) { return backward(c, dy, RouterGrad<T, Backend>{}); }

  // dy [..., D] -> dx [..., D]; `balance` carries extra router gradients (dprobs, dlogits) from balance losses.
  Tensor backward(Cache& c, const Tensor& dy, const RouterGrad<T, Backend>& balance) {
    require<ShapeError>(std::equal(c.x_shape.begin(), c.x_shape.end(), dy.shape().begin(), dy.shape().end()),
                        "LoRAExperts::backward: dy has shape ", shape_string(dy.shape()), ", expected ",
                        shape_string(c.x_shape));
    const bool gate_grad = router_ && (config_.dense || config_.gate_scaling);
    if (gate_grad) {
      resize_to(c.dgates_rows, shape_of(c.gates));
      set_zero(c.dgates_rows);
    }
    GateTensor* dgates = gate_grad ? &c.dgates_rows : nullptr;
    const bool router_grad =
        router_ && (gate_grad || detail::present(balance.dprobs) || detail::present(balance.dlogits));
    Tensor dx;
    if (router_ && !config_.dense) {
      const Routing& r = c.router.routing;
      gather_rows(dy, r.perm, 1, c.dy);
      body_backward(c, c.dy, c.dx, dgates);
      if (router_grad) {
        dx = router_backward(c, balance);  // the router's part, in token order
      } else {
        resize_to(dx, c.x_shape);
        set_zero(dx);
      }
      scatter_add_rows(c.dx, r.perm, 1, dx);
      return dx;
    }
    body_backward(c, dy, dx, dgates);
    if (router_grad) add_to(dx, router_backward(c, balance));
    return dx;
  }

  void collect_parameters(ParameterList<T, Backend>& list, const std::string& prefix = "") {
    add_parameter(list, prefix, gate_w_);
    add_parameter(list, prefix, up_w_);
    add_parameter(list, prefix, down_w_);
    gate_.collect_parameters(list, prefix);
    up_.collect_parameters(list, prefix);
    down_.collect_parameters(list, prefix);
    if (router_) router_->collect_parameters(list, join_name(prefix, "router"));
  }
  // The dropout stream shared by the three ExpertLoRAs, and the router's noise stream.
  void collect_rngs(NamedRngs& list, const std::string& prefix = "") {
    list.emplace_back(join_name(prefix, "dropout_rng"), &dropout_rng_);
    if (router_) router_->collect_rngs(list, join_name(prefix, "router"));
  }

  void set_training(bool on) {
    training_ = on;
    if (router_) router_->set_training(on);
  }
  bool training() const { return training_; }

  const Config& config() const { return config_; }
  Router* router() { return router_ ? &*router_ : nullptr; }
  ExpertLoRA<T, Backend>& gate_lora() { return gate_; }
  ExpertLoRA<T, Backend>& up_lora() { return up_; }
  ExpertLoRA<T, Backend>& down_lora() { return down_; }
  Parameter<T, Backend>& gate_weight() { return gate_w_; }
  Parameter<T, Backend>& up_weight() { return up_w_; }
  Parameter<T, Backend>& down_weight() { return down_w_; }

 private:
  static const Config& validated(const Config& c) {
    require<ConfigError>(c.dim > 0 && c.hidden > 0, "LoRAExperts: dim and hidden must be > 0 (got dim = ", c.dim,
                         ", hidden = ", c.hidden, ")");
    require<ConfigError>(c.experts > 0, "LoRAExperts: number of experts must be > 0 (got ", c.experts, ")");
    require<ConfigError>(c.rank > 0, "LoRAExperts: rank r must be > 0 (got ", c.rank, ")");
    require<ConfigError>(std::isfinite(c.alpha) && c.alpha > 0, "LoRAExperts: alpha must be > 0 (got ", c.alpha,
                         ")");
    require<ConfigError>(c.dropout >= 0 && c.dropout < 1, "LoRAExperts: dropout must be in [0, 1) (got ",
                         c.dropout, ")");
    require<ConfigError>(!(c.dense && c.gate_scaling),
                         "LoRAExperts: dense and gate_scaling are exclusive (dense always weights experts by p)");
    return c;
  }

  static Tensor base_weight(std::size_t out, std::size_t in, Rng& rng) {
    ::mixpeft::Tensor<Gate> w = empty<Gate>({out, in});
    init::kaiming_uniform(w, rng);
    return Backend::template from_host<T>(std::move(w));
  }

  // gates[j] = values[perm[j]] in the gates' type (a 16-bit T is widened).
  static void store_gates(const Tensor& values, const IndexTensor& perm, GateTensor& gates) {
    if constexpr (std::is_same_v<Gate, T>) {
      gather_rows(values, perm, 1, gates);
    } else {
      Tensor grouped;
      gather_rows(values, perm, 1, grouped);
      convert(grouped, gates);
    }
  }

  const IndexTensor& offsets(const Cache& c) const {
    return router_ ? (config_.dense ? c.dense_offsets : c.router.routing.offsets) : c.one_block;
  }
  const GateTensor* gates(const Cache& c) const {
    return router_ && (config_.dense || config_.gate_scaling) ? &c.gates : nullptr;
  }

  // y (+)= the LoRA outputs of one projection on its input rows x (execution order).
  void lora_forward(ExpertLoRA<T, Backend>& lora, Projection& p, const Tensor& x, Tensor& y, Cache& c) {
    if (router_ && config_.dense) {
      gather_rows(x, c.dense_perm, config_.experts, p.xr);
      lora.forward(p.xr, offsets(c), gates(c), training_, dropout_rng_, p.yr, false, p.lora);
      scatter_add_rows(p.yr, c.dense_perm, config_.experts, y);
    } else {
      lora.forward(x, offsets(c), gates(c), training_, dropout_rng_, y, true, p.lora);
    }
  }

  void lora_backward(ExpertLoRA<T, Backend>& lora, Projection& p, const Tensor& x, const Tensor& dy, Tensor& dx,
                     GateTensor* dgates, Cache& c) {
    if (router_ && config_.dense) {
      gather_rows(dy, c.dense_perm, config_.experts, p.dyr);
      resize_to(p.dxr, shape_of(p.xr));
      set_zero(p.dxr);
      lora.backward(p.lora, p.xr, offsets(c), gates(c), p.dyr, p.dxr, dgates);
      scatter_add_rows(p.dxr, c.dense_perm, config_.experts, dx);
    } else {
      lora.backward(p.lora, x, offsets(c), gates(c), dy, dx, dgates);
    }
  }

  void body_forward(Cache& c, Tensor& y) {
    linear_forward(c.x, gate_w_.value, nullptr, c.h);
    lora_forward(gate_, c.gate, c.x, c.h, c);
    linear_forward(c.x, up_w_.value, nullptr, c.u);
    lora_forward(up_, c.up, c.x, c.u, c);
    swiglu_forward(c.h, c.u, c.z);
    linear_forward(c.z, down_w_.value, nullptr, y);
    lora_forward(down_, c.down, c.z, y, c);
  }

  // dx written (shape of c.x); dgates accumulated.
  void body_backward(Cache& c, const Tensor& dy, Tensor& dx, GateTensor* dgates) {
    linear_backward(c.z, down_w_.value, dy, &c.dz, grad_of(down_w_), nullptr);
    lora_backward(down_, c.down, c.z, dy, c.dz, dgates, c);
    swiglu_backward(c.h, c.u, c.dz, c.dh, c.du);
    linear_backward(c.x, gate_w_.value, c.dh, &dx, grad_of(gate_w_), nullptr);
    lora_backward(gate_, c.gate, c.x, c.dh, dx, dgates, c);
    gemm(Trans::No, Trans::No, rows(c.x), config_.dim, config_.hidden, T(1), c.du, up_w_.value, T(1), dx);
    if (up_w_.trainable) linear_backward(c.x, up_w_.value, c.du, nullptr, &up_w_.grad, nullptr);
    lora_backward(up_, c.up, c.x, c.du, dx, dgates, c);
  }

  // Router gradient: balance-loss terms plus, with gate scaling or dense mixing, the gate gradient.
  Tensor router_backward(Cache& c, const RouterGrad<T, Backend>& balance) {
    if (!(config_.dense || config_.gate_scaling)) return router_->backward(c.router, balance.dprobs, balance.dlogits);
    const Routing& r = c.router.routing;
    const std::size_t n = r.tokens(), k = config_.dense ? config_.experts : 1;
    const IndexTensor& perm = config_.dense ? c.dense_perm : r.perm;
    resize_to(c.dgates, {n * k, 1});
    set_zero(c.dgates);
    if constexpr (std::is_same_v<Gate, T>) {
      scatter_add_rows(c.dgates_rows, perm, 1, c.dgates);
    } else {
      Tensor rows_t;
      convert(c.dgates_rows, rows_t);
      scatter_add_rows(rows_t, perm, 1, c.dgates);
    }
    c.dgates.reshape({n, k});
    if (detail::present(balance.dprobs)) {
      expect_same_shape("LoRAExperts::backward", "balance.dprobs", balance.dprobs, "probs", r.probs);
      assign(c.dprobs, balance.dprobs);
    } else {
      resize_to(c.dprobs, shape_of(r.probs));
      set_zero(c.dprobs);
    }
    top_k_backward(config_.dense ? c.dense_experts : r.experts, c.dgates, c.dprobs);
    return router_->backward(c.router, c.dprobs, balance.dlogits);
  }

  static Tensor* grad_of(Parameter<T, Backend>& p) { return p.trainable ? &p.grad : nullptr; }

  Config config_;
  Parameter<T, Backend> gate_w_, up_w_, down_w_;
  ExpertLoRA<T, Backend> gate_, up_, down_;
  std::optional<Router> router_;
  Rng dropout_rng_;
  bool training_ = true;
};

}  // namespace mixpeft
