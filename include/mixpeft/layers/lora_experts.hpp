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
// Backward of one LoRA'd projection on the block of expert k (X_d = drop(X), H = X_d A_k^T, H_c = c H):
//   dH_c = s dY B_k;   dB_k += s dY^T H_c;   dc += rowsum(dH_c * H);   dH = c dH_c;   dA_k += dH^T X_d
//   dX += drop_backward(dH A_k);   base: dX += dY W  (the frozen W gets no gradient work)
// Router: dp = dp_balance + top_k_backward(dc) (gate scaling, dense), dl = dl_balance (z-loss). Without any
// of these the router receives no gradient and backward skips it (the reference, sparse path, no balance term).
// Parameter gradients accumulate, dx is written.
// Cache: input rows in execution order, h, u, z; per LoRA the dropout mask and dropped input, H and c H;
// the router cache, whose RoutingResult (cache.router.routing) feeds the balance losses and RouterStats.
//
// K = 1 is a plain LoRA SwiGLU FFN: no router and no "router.*" parameters, no gather or scatter;
// cache.router.routing stays empty and balance losses do not apply (gate_scaling and dense change nothing).
// Parameters (under the layer prefix; the base is frozen, everything else trainable):
//   gate_proj.weight [F, D], up_proj.weight [F, D], down_proj.weight [D, F]         Hugging Face names
//   gate_proj.lora_A.<k>.weight [r, D], gate_proj.lora_B.<k>.weight [F, r]          k = 0 .. K-1 (PEFT's
//   up_proj.lora_A.<k>.weight [r, D],   up_proj.lora_B.<k>.weight [F, r]            in-model naming with the
//   down_proj.lora_A.<k>.weight [r, F], down_proj.lora_B.<k>.weight [D, r]          expert index as adapter)
//   router.weight [K, D], router.bias [K]                                             K > 1 only
// Init: base and router as nn.Linear, A kaiming-uniform(a = sqrt 5), B zeros (a fresh layer equals its base).
//
// Grouped ops (free functions; a device backend provides them as grouped GEMMs over the same offsets). On the
// CPU each call is one parallel region: threads take equal row slices across all blocks (balanced whatever the
// routing; as many regions for K experts as for one), and weight gradients split dW's wider axis.
//   grouped_linear_forward    y_g (=|+=) alpha x_g W_g^T        on row block g = offsets[g] .. offsets[g + 1]
//   grouped_linear_backward   dx_g (=|+=) alpha dy_g W_g;  dW_g += alpha dy_g^T x_g
//   scale_rows_forward / scale_rows_backward     y = diag(c) h;  dh = diag(c) dy,  dc += rowsum(dy * h)
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
#include "mixpeft/ops/matmul.hpp"

namespace mixpeft {

// ================================ grouped ops (CPU) ================================

namespace detail {

// Row range of block g: offsets[g] .. offsets[g + 1], or all m rows when offsets is absent (one block).
inline std::pair<std::size_t, std::size_t> block_rows(const Tensor<std::int32_t>& offsets, std::size_t g,
                                                      std::size_t m) {
  if (!present(offsets)) return {0, m};
  return {std::size_t(offsets.data()[g]), std::size_t(offsets.data()[g + 1])};
}

// Calls f(g, begin, end) on the rows of every block, in one parallel region: threads take equal slices of
// all m rows (whatever the routing) and run serial GEMMs on the parts of the blocks inside their slice.
template <class F>
void for_block_rows(const Tensor<std::int32_t>& offsets, std::size_t blocks, std::size_t m, std::size_t work_per_row,
                    F&& f) {
  parallel_ranges(m, work_per_row, [&](std::size_t r0, std::size_t r1) {
    for (std::size_t g = 0; g < blocks; ++g) {
      const auto [b, e] = block_rows(offsets, g, m);
      const std::size_t lo = std::max(b, r0), hi = std::min(e, r1);
      if (lo < hi) f(g, lo, hi);
    }
  });
}

inline void check_blocks(std::string_view op, const Tensor<std::int32_t>& offsets, std::size_t blocks,
                         std::size_t m) {
  if (!present(offsets)) {
    require<ShapeError>(blocks == 1, op, ": ", blocks, " weights need offsets of shape [", blocks + 1, "]");
    return;
  }
  expect_shape(op, "offsets", offsets, {blocks + 1});
  bool ok = offsets.data()[0] == 0 && std::size_t(offsets.data()[blocks]) == m;
  for (std::size_t g = 0; g < blocks; ++g) ok = ok && offsets.data()[g] <= offsets.data()[g + 1];
  require<ShapeError>(ok, op, ": offsets must rise from 0 to the ", m, " rows of x");
}

template <class T>
void check_weights(std::string_view op, std::span<const Tensor<T>* const> W) {
  require<ShapeError>(!W.empty(), op, ": needs at least one weight");
  expect_shape(op, "W[0]", *W[0], {any_extent, any_extent});
  for (const auto* w : W) expect_same_shape(op, "W[g]", *w, "W[0]", *W[0]);
}

}  // namespace detail

// y[block g] = alpha * x[block g] W_g^T (+ y[block g] when accumulate). x [M, in], W_g [out, in], y [M, out].
template <class T>
void grouped_linear_forward(const Tensor<T>& x, std::type_identity_t<std::span<const Tensor<T>* const>> W,
                            const Tensor<std::int32_t>& offsets, T alpha, bool accumulate, Tensor<T>& y) {
  constexpr std::string_view op = "grouped_linear_forward";
  detail::check_weights(op, W);
  const std::size_t out = W[0]->shape()[0], in = W[0]->shape()[1];
  expect_width(op, "x", x, in);
  const std::size_t m = rows(x);
  detail::check_blocks(op, offsets, W.size(), m);
  if (accumulate) {
    require<ShapeError>(y.dimension() >= 1 && rows(y) == m && cols(y) == out, op, ": y has shape ",
                        shape_string(y.shape()), ", expected [", m, ", ", out, "]");
  } else {
    resize_to(y, {m, out});
  }
  detail::for_block_rows(offsets, W.size(), m, in * out, [&](std::size_t g, std::size_t b, std::size_t e) {
    auto Y = matrix_view(y.data() + b * out, e - b, out);
    const auto X = matrix_view(x.data() + b * in, e - b, in);
    const auto Wg = matrix_view(W[g]->data(), out, in);
    if (accumulate) Y.noalias() += alpha * (X * Wg.transpose());
    else Y.noalias() = alpha * (X * Wg.transpose());
  });
}

// dx[block g] (=|+=) alpha * dy[block g] W_g   (skipped when dx is null);
// dW_g += alpha * dy[block g]^T x[block g]      (skipped when dW is empty or dW[g] is null: frozen).
template <class T>
void grouped_linear_backward(const Tensor<T>& x, std::type_identity_t<std::span<const Tensor<T>* const>> W,
                             const Tensor<T>& dy, const Tensor<std::int32_t>& offsets, T alpha,
                             std::type_identity_t<Tensor<T>>* dx, bool accumulate_dx,
                             std::type_identity_t<std::span<Tensor<T>* const>> dW) {
  constexpr std::string_view op = "grouped_linear_backward";
  detail::check_weights(op, W);
  const std::size_t out = W[0]->shape()[0], in = W[0]->shape()[1];
  expect_width(op, "x", x, in);
  expect_width(op, "dy", dy, out);
  const std::size_t m = rows(x);
  require<ShapeError>(rows(dy) == m, op, ": dy has shape ", shape_string(dy.shape()), " but x has shape ",
                      shape_string(x.shape()));
  detail::check_blocks(op, offsets, W.size(), m);
  require<ShapeError>(dW.empty() || dW.size() == W.size(), op, ": ", dW.size(), " weight gradients for ",
                      W.size(), " weights");
  if (dx) {
    if (accumulate_dx) {
      require<ShapeError>(dx->dimension() >= 1 && rows(*dx) == m && cols(*dx) == in, op, ": dx has shape ",
                          shape_string(dx->shape()), ", expected [", m, ", ", in, "]");
    } else {
      resize_to(*dx, {m, in});
    }
  }
  if (dx) {
    detail::for_block_rows(offsets, W.size(), m, in * out, [&](std::size_t g, std::size_t b, std::size_t e) {
      auto dX = matrix_view(dx->data() + b * in, e - b, in);
      const auto dY = matrix_view(dy.data() + b * out, e - b, out);
      const auto Wg = matrix_view(W[g]->data(), out, in);
      if (accumulate_dx) dX.noalias() += alpha * (dY * Wg);
      else dX.noalias() = alpha * (dY * Wg);
    });
  }
  bool any_dW = false;
  for (std::size_t g = 0; g < dW.size(); ++g) {
    if (!dW[g]) continue;
    expect_same_shape(op, "dW[g]", *dW[g], "W[g]", *W[g]);
    any_dW = true;
  }
  if (!any_dW) return;
  // dW_g is a sum over rows: threads split its wider axis instead (out rows of dW, or its in columns).
  const bool split_out = out >= in;
  parallel_ranges(split_out ? out : in, m * (split_out ? in : out), [&](std::size_t c0, std::size_t c1) {
    for (std::size_t g = 0; g < W.size(); ++g) {
      const auto [b, e] = detail::block_rows(offsets, g, m);
      if (b == e || !dW[g]) continue;
      const auto dY = matrix_view(dy.data() + b * out, e - b, out);
      const auto X = matrix_view(x.data() + b * in, e - b, in);
      auto dWg = matrix_view(dW[g]->data(), out, in);
      if (split_out) dWg.middleRows(c0, c1 - c0).noalias() += alpha * (dY.middleCols(c0, c1 - c0).transpose() * X);
      else dWg.middleCols(c0, c1 - c0).noalias() += alpha * (dY.transpose() * X.middleCols(c0, c1 - c0));
    }
  });
}

// y[i, :] = c[i] * h[i, :]; c holds one value per row ([M] or [M, 1]).
template <class T>
void scale_rows_forward(const Tensor<T>& h, const Tensor<T>& c, Tensor<T>& y) {
  require<ShapeError>(c.size() == rows(h) && cols(c) == (c.dimension() == 1 ? c.size() : 1),
                      "scale_rows_forward: c has shape ", shape_string(c.shape()), " but h has shape ",
                      shape_string(h.shape()));
  resize_to(y, shape_of(h));
  const std::size_t m = rows(h), w = cols(h);
  const auto C = Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, 1>>(c.data(), Eigen::Index(m));
  matrix_view(y.data(), m, w).noalias() = C.asDiagonal() * matrix_view(h.data(), m, w);
}

// dh = diag(c) dy (written); dc[i] += <dy_i, h_i> (accumulated, skipped when dc is null).
template <class T>
void scale_rows_backward(const Tensor<T>& h, const Tensor<T>& c, const Tensor<T>& dy, Tensor<T>& dh,
                         std::type_identity_t<Tensor<T>>* dc) {
  expect_same_shape("scale_rows_backward", "dy", dy, "h", h);
  require<ShapeError>(c.size() == rows(h), "scale_rows_backward: c has shape ", shape_string(c.shape()),
                      " but h has shape ", shape_string(h.shape()));
  resize_to(dh, shape_of(h));
  const std::size_t m = rows(h), w = cols(h);
  const auto C = Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, 1>>(c.data(), Eigen::Index(m));
  const auto dY = matrix_view(dy.data(), m, w);
  matrix_view(dh.data(), m, w).noalias() = C.asDiagonal() * dY;
  if (dc) {
    require<ShapeError>(dc->size() == m, "scale_rows_backward: dc has shape ", shape_string(dc->shape()),
                        ", expected ", m, " values");
    Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, 1>>(dc->data(), Eigen::Index(m)) +=
        dY.cwiseProduct(matrix_view(h.data(), m, w)).rowwise().sum();
  }
}

// ================================ layers ================================

// K LoRA experts on one projection, applied to rows grouped by expert (one block per expert, see offsets):
//   y[block k] += c * s * drop(x[block k]) A_k^T B_k^T,  c = per-row gate (or 1).
// A helper of LoRAExperts; parameters "<name>.lora_A.<k>.weight" [r, in], "<name>.lora_B.<k>.weight" [out, r].
template <class T, class Backend = Cpu>
class ExpertLoRA {
 public:
  using Tensor = typename Backend::template tensor<T>;
  using IndexTensor = typename Backend::template tensor<std::int32_t>;

  struct Cache {
    Tensor mask, xd;           // dropout mask and dropped input ([M, in]); mask absent without dropout
    Tensor h, hc;              // [M, r]  drop(x) A^T, and c * h with gates
    Tensor dhc, dh, dxd, dxm;  // backward workspaces
    std::vector<const Tensor*> a, b;
    std::vector<Tensor*> da, db;
  };

  ExpertLoRA(const std::string& name, std::size_t in, std::size_t out, std::size_t experts, std::size_t rank,
             double alpha, double dropout, Rng& rng)
      : scale_(T(alpha / double(rank))), dropout_(dropout) {
    for (std::size_t k = 0; k < experts; ++k) {
      Tensor a = empty<T>({rank, in});
      init::kaiming_uniform(a, rng);
      A_.emplace_back(name + ".lora_A." + std::to_string(k) + ".weight", std::move(a), true);
      B_.emplace_back(name + ".lora_B." + std::to_string(k) + ".weight", zeros<T>({out, rank}), true);
    }
  }

  // y (+)= the experts' LoRA outputs on x's row blocks; gates: [M, 1] or null (c = 1).
  void forward(const Tensor& x, const IndexTensor& offsets, const Tensor* gates, bool training, Rng& rng,
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
    bind(c);
    grouped_linear_forward(drop ? c.xd : x, c.a, offsets, T(1), false, c.h);
    if (gates) scale_rows_forward(c.h, *gates, c.hc);
    grouped_linear_forward(gates ? c.hc : c.h, c.b, offsets, scale_, accumulate, y);
  }

  // dx += the LoRA part of the input gradient; dgates += dL/dc (when both gates and dgates are given).
  // x, offsets and gates are those of the forward.
  void backward(Cache& c, const Tensor& x, const IndexTensor& offsets, const Tensor* gates, const Tensor& dy,
                Tensor& dx, Tensor* dgates) {
    bind(c);
    grouped_linear_backward(gates ? c.hc : c.h, c.b, dy, offsets, scale_, &c.dhc, false, c.db);
    if (gates) scale_rows_backward(c.h, *gates, c.dhc, c.dh, dgates);
    const Tensor& dh = gates ? c.dh : c.dhc;
    if (detail::present(c.mask)) {
      grouped_linear_backward(c.xd, c.a, dh, offsets, T(1), &c.dxd, false, c.da);
      dropout_backward(c.dxd, c.mask, c.dxm);
      add_to(dx, c.dxm);
    } else {
      grouped_linear_backward(x, c.a, dh, offsets, T(1), &dx, true, c.da);
    }
  }

  void collect_parameters(ParameterList<T, Backend>& list, const std::string& prefix) {
    for (std::size_t k = 0; k < A_.size(); ++k) {
      add_parameter(list, prefix, A_[k]);
      add_parameter(list, prefix, B_[k]);
    }
  }

  Parameter<T, Backend>& lora_A(std::size_t k) { return A_.at(k); }
  Parameter<T, Backend>& lora_B(std::size_t k) { return B_.at(k); }
  T scale() const { return scale_; }

 private:
  // Points the cache's weight lists at the current values and trainable gradients (null: frozen).
  void bind(Cache& c) {
    c.a.clear(), c.b.clear(), c.da.clear(), c.db.clear();
    for (std::size_t k = 0; k < A_.size(); ++k) {
      c.a.push_back(&A_[k].value);
      c.b.push_back(&B_[k].value);
      c.da.push_back(A_[k].trainable ? &A_[k].grad : nullptr);
      c.db.push_back(B_[k].trainable ? &B_[k].grad : nullptr);
    }
  }

  std::vector<Parameter<T, Backend>> A_, B_;
  T scale_;
  double dropout_;
};

template <class T, class Backend = Cpu>
class LoRAExperts {
 public:
  using Tensor = typename Backend::template tensor<T>;
  using IndexTensor = typename Backend::template tensor<std::int32_t>;
  using Router = TopKRouter<T, Backend>;
  using Routing = RoutingResult<T, Backend>;

  struct Config {
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

  struct Projection {  // one LoRA'd projection; xr .. dxr are the K-fold blocks of dense mode
    typename ExpertLoRA<T, Backend>::Cache lora;
    Tensor xr, yr, dyr, dxr;
  };

  struct Cache {
    typename Router::Cache router;  // router.routing: the RoutingResult of the last forward (K > 1)
    Shape x_shape;
    Tensor x;      // [N, D] input rows in execution order (grouped by expert when sparse)
    Tensor gates;  // [M, 1] gate values c per grouped row (gate scaling, dense)
    IndexTensor dense_experts, dense_counts, dense_offsets, dense_perm;
    Tensor dense_gates;  // [N K, 1]
    Tensor h, u, z;      // [N, F] in execution order
    Tensor y;            // [N, D] grouped output (sparse)
    Projection gate, up, down;
    Tensor dy, dz, dh, du, dx, dgates_rows, dgates, dprobs;  // backward workspaces
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
    resize_to(one_block_, Shape{0});
  }

  // x [..., D] -> y [..., D].
  Tensor forward(const Tensor& x, Cache& c) {
    expect_width("LoRAExperts", "x", x, config_.dim);
    c.x_shape = shape_of(x);
    Tensor y;
    if (!router_) {
      c.x = x;
      body_forward(c, y);
      return y;
    }
    const Routing& r = router_->forward(x, c.router);
    if (config_.dense) {
      const std::size_t n = rows(x), K = config_.experts;
      top_k_forward(r.probs, K, c.dense_experts, c.dense_gates);
      group_by_expert(c.dense_experts, K, c.dense_counts, c.dense_offsets, c.dense_perm);
      c.dense_gates.reshape({n * K, 1});
      gather_rows(c.dense_gates, c.dense_perm, 1, c.gates);
      c.x = x;
      body_forward(c, y);
      return y;
    }
    gather_rows(x, r.perm, 1, c.x);
    if (config_.gate_scaling) gather_rows(r.gates, r.perm, 1, c.gates);
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
    Tensor* dgates = gate_grad ? &c.dgates_rows : nullptr;
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
    Tensor w = empty<T>({out, in});
    init::kaiming_uniform(w, rng);
    return w;
  }

  const IndexTensor& offsets(const Cache& c) const {
    return router_ ? (config_.dense ? c.dense_offsets : c.router.routing.offsets) : one_block_;
  }
  const Tensor* gates(const Cache& c) const {
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
                     Tensor* dgates, Cache& c) {
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
  void body_backward(Cache& c, const Tensor& dy, Tensor& dx, Tensor* dgates) {
    linear_backward(c.z, down_w_.value, dy, &c.dz, grad_of(down_w_), nullptr);
    lora_backward(down_, c.down, c.z, dy, c.dz, dgates, c);
    swiglu_backward(c.h, c.u, c.dz, c.dh, c.du);
    linear_backward(c.x, gate_w_.value, c.dh, &dx, grad_of(gate_w_), nullptr);
    lora_backward(gate_, c.gate, c.x, c.dh, dx, dgates, c);
    gemm(Trans::No, Trans::No, rows(c.x), config_.dim, config_.hidden, T(1), c.du.data(), up_w_.value.data(), T(1),
         dx.data());
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
    scatter_add_rows(c.dgates_rows, perm, 1, c.dgates);
    c.dgates.reshape({n, k});
    if (detail::present(balance.dprobs)) {
      expect_same_shape("LoRAExperts::backward", "balance.dprobs", balance.dprobs, "probs", r.probs);
      c.dprobs = balance.dprobs;
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
  IndexTensor one_block_;  // absent offsets: all rows form one block (K = 1)
  bool training_ = true;
};

}  // namespace mixpeft
