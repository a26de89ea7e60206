// mixpeft/models/param_count.hpp — parameter counts computed from configurations, without allocating weights.
//
// Closed forms of what the layers allocate (the tests check each against a constructed model):
//   linear(in, out, bias)        in out + [bias] out
//   lora(in, out, r)             r in + out r                                    (A [r, in], B [out, r])
//   mm_adapter(d, h, g)          h d + h  +  2 (d h/g + d)  +  2 d + 2           (A, a; B, b, D, d; router [2, d], [2])
//   llama(V, D, L, F)            2 V D  +  L (4 D^2 + 3 D F + 2 D)  +  D          (embed, head; q k v o, SwiGLU, 2 norms)
//   clip_vit(C, P, S, D, L, M)   D C P^2 + D + N D + 2 D  +  L (4 (D^2 + D) + 2 M D + M + D + 4 D)  +  2 D
//                                (patch conv without bias, [cls], positions N = (S/P)^2 + 1, pre-LN; per block
//                                 q k v out with biases, fc1, fc2, two LayerNorms; post-LN)
// format_count(n) prints n with thousands separators ("3,781,296").
// The model configs are taken as templates (any struct with the fields of Llama::Config / ClipVit::Config).
#pragma once

#include <cstddef>
#include <string>

namespace mixpeft::param_count {

constexpr std::size_t linear(std::size_t in, std::size_t out, bool bias) { return in * out + (bias ? out : 0); }

constexpr std::size_t lora(std::size_t in, std::size_t out, std::size_t rank) { return rank * (in + out); }

constexpr std::size_t mm_adapter(std::size_t dim, std::size_t hidden, std::size_t groups) {
  return linear(dim, hidden, true) + 2 * (dim * (hidden / groups) + dim) + linear(dim, 2, true);
}

template <class LlamaConfig>
constexpr std::size_t llama(const LlamaConfig& c) {
  const std::size_t d = c.dim;
  return 2 * c.vocab * d + c.n_layers * (4 * d * d + 3 * d * c.ffn_dim + 2 * d) + d;
}

template <class VitConfig>
constexpr std::size_t clip_vit(const VitConfig& c) {
  const std::size_t d = c.dim, side = c.image_size / c.patch, tokens = side * side + 1;
  const std::size_t block = 4 * linear(d, d, true) + linear(d, c.mlp_dim, true) + linear(c.mlp_dim, d, true) + 4 * d;
  return d * c.channels * c.patch * c.patch + d + tokens * d + 2 * d + c.n_layers * block + 2 * d;
}

inline std::string format_count(std::size_t n) {
  std::string digits = std::to_string(n), out;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return out;
}

}  // namespace mixpeft::param_count
