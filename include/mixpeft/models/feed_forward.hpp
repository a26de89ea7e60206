// mixpeft/models/feed_forward.hpp — LLaMA's SwiGLU feed-forward sub-layer: plain, LoRA or mixture of LoRA experts.
//
//   plain (SwiGLUFeedForward):  h = x Wg^T,  u = x Wu^T,  z = SiLU(h) * u,  y = z Wd^T
//     backward:  dz = dy Wd;  dh, du = swiglu_backward(dz);  dx = dh Wg + du Wu           (written)
//                dW* accumulate only while the base is trainable (full fine-tuning); frozen: dx only.
//     cache:     h, u (for the SwiGLU backward) and each Linear's cache (its input, only while trainable).
//   with experts (LoRAExperts, layers/lora_experts.hpp): K = 1 is a LoRA FFN, K > 1 LLaVA-MoLE's top-1 mixture.
// FeedForward picks one of the two at construction; K = 0 ("none") is the plain SwiGLU.
// Parameter names (Hugging Face): "gate_proj.weight" [F, D], "up_proj.weight" [F, D], "down_proj.weight" [D, F]
// (LoRAExperts adds its stacked "*.lora_A.weight" [K, r, in], "*.lora_B.weight" [K, out, r] and "router.*").
// Shapes: x, y [..., D] (N rows), h, u, z [..., F].
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <variant>

#include "mixpeft/core/backend.hpp"
#include "mixpeft/core/error.hpp"
#include "mixpeft/core/parameter.hpp"
#include "mixpeft/core/rng.hpp"
#include "mixpeft/layers/linear.hpp"
#include "mixpeft/layers/lora_experts.hpp"
#include "mixpeft/ops/activations.hpp"

namespace mixpeft {

template <class T, class Backend = Cpu>
class SwiGLUFeedForward {
 public:
  using Tensor = typename Backend::template tensor<T>;

  struct Cache {
    typename Linear<T, Backend>::Cache gate, up, down;
    Tensor h, u, dh, du;  // [N, F]
  };

  SwiGLUFeedForward(std::size_t dim, std::size_t hidden, bool trainable, Rng& rng)
      : gate_(config(dim, hidden, trainable), rng),
        up_(config(dim, hidden, trainable), rng),
        down_(config(hidden, dim, trainable), rng) {}

  Tensor forward(const Tensor& x, Cache& c) {
    c.h = gate_.forward(x, c.gate);
    c.u = up_.forward(x, c.up);
    Tensor z;
    swiglu_forward(c.h, c.u, z);
    return down_.forward(z, c.down);
  }

  Tensor backward(Cache& c, const Tensor& dy) {
    const Tensor dz = down_.backward(c.down, dy);
    swiglu_backward(c.h, c.u, dz, c.dh, c.du);
    Tensor dx = gate_.backward(c.gate, c.dh);
    add_to(dx, up_.backward(c.up, c.du));
    return dx;
  }

  void collect_parameters(ParameterList<T, Backend>& list, const std::string& prefix) {
    gate_.collect_parameters(list, join_name(prefix, "gate_proj"));
    up_.collect_parameters(list, join_name(prefix, "up_proj"));
    down_.collect_parameters(list, join_name(prefix, "down_proj"));
  }
  void set_training(bool) {}

  Parameter<T, Backend>& gate_weight() { return gate_.weight(); }
  Parameter<T, Backend>& up_weight() { return up_.weight(); }
  Parameter<T, Backend>& down_weight() { return down_.weight(); }

 private:
  static typename Linear<T, Backend>::Config config(std::size_t in, std::size_t out, bool trainable) {
    return {.in = in, .out = out, .bias = false, .trainable_weight = trainable, .trainable_bias = false};
  }

  Linear<T, Backend> gate_, up_, down_;
};

template <class T, class Backend = Cpu>
class FeedForward {
 public:
  using Tensor = typename Backend::template tensor<T>;
  using Plain = SwiGLUFeedForward<T, Backend>;
  using Experts = LoRAExperts<T, Backend>;

  struct Cache {
    typename Plain::Cache plain;
    typename Experts::Cache experts;
  };

  // experts == nullopt or experts->experts == 0: the plain SwiGLU; otherwise a LoRAExperts whose dim and hidden
  // are set here.
  FeedForward(std::size_t dim, std::size_t hidden, std::optional<typename Experts::Config> experts,
              bool trainable_base, Rng& rng)
      : layer_(make(dim, hidden, std::move(experts), trainable_base, rng)) {}

  Tensor forward(const Tensor& x, Cache& c) {
    if (auto* p = std::get_if<Plain>(&layer_)) return p->forward(x, c.plain);
    return std::get<Experts>(layer_).forward(x, c.experts);
  }

  // balance: extra router gradients from balance losses (LoRAExperts with K > 1 only; ignored otherwise).
  Tensor backward(Cache& c, const Tensor& dy, const RouterGrad<T, Backend>& balance) {
    if (auto* p = std::get_if<Plain>(&layer_)) return p->backward(c.plain, dy);
    return std::get<Experts>(layer_).backward(c.experts, dy, balance);
  }

  // The routing of the last forward (K > 1), else null.
  const RoutingResult<T, Backend>* routing(const Cache& c) const {
    const auto* e = std::get_if<Experts>(&layer_);
    return e && e->config().experts > 1 ? &c.experts.router.routing : nullptr;
  }

  void collect_parameters(ParameterList<T, Backend>& list, const std::string& prefix) {
    std::visit([&](auto& layer) { layer.collect_parameters(list, prefix); }, layer_);
  }
  void collect_rngs(NamedRngs& list, const std::string& prefix) {
    if (auto* e = std::get_if<Experts>(&layer_)) e->collect_rngs(list, prefix);
  }
  void collect_base_parameters(ParameterList<T, Backend>& list, const std::string& prefix) {
    if (auto* p = std::get_if<Plain>(&layer_)) return p->collect_parameters(list, prefix);
    auto& e = std::get<Experts>(layer_);
    add_parameter(list, prefix, e.gate_weight());
    add_parameter(list, prefix, e.up_weight());
    add_parameter(list, prefix, e.down_weight());
  }
  void set_training(bool on) {
    std::visit([&](auto& layer) { layer.set_training(on); }, layer_);
  }

  bool has_experts() const { return std::holds_alternative<Experts>(layer_); }
  Experts& experts() { return std::get<Experts>(layer_); }  // only when has_experts()

 private:
  static std::variant<Plain, Experts> make(std::size_t dim, std::size_t hidden,
                                           std::optional<typename Experts::Config> experts, bool trainable_base,
                                           Rng& rng) {
    if (!experts || experts->experts == 0) return Plain(dim, hidden, trainable_base, rng);
    experts->dim = dim;
    experts->hidden = hidden;
    Experts layer(*experts, rng);
    layer.gate_weight().set_trainable(trainable_base);
    layer.up_weight().set_trainable(trainable_base);
    layer.down_weight().set_trainable(trainable_base);
    return layer;
  }

  std::variant<Plain, Experts> layer_;
};

}  // namespace mixpeft
