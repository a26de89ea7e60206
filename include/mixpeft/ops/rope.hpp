// mixpeft/ops/rope.hpp — rotary position embedding, Hugging Face "rotate_half" convention (LLaMA).
//
// Each head of width dh is split into halves; entry i of the first half pairs with entry i + dh/2:
//   theta_i = p * base^(-2i / dh),  i in [0, dh/2),  p = the token's position id
//   forward:   y_i        = x_i cos theta_i - x_{i+dh/2} sin theta_i
//              y_{i+dh/2} = x_{i+dh/2} cos theta_i + x_i sin theta_i
//   i.e. HF's  y = x * cos + rotate_half(x) * sin  with  rotate_half(x) = [-x2, x1],  cos = [cos theta, cos theta].
//   backward:  the inverse rotation (theta -> -theta) applied to dy gives dx (written); nothing is cached.
// Positions are either `position_offset + t` (prefill at 0, KV-cache decoding at the cache length) or an
// explicit list of T position ids shared by every sequence of the batch.
// Shapes: x, y, dy, dx [..., T, H*dh] (heads contiguous in the last axis, usually [B, T, H*dh]);
//         RopeTable cos, sin [P, dh/2] for positions 0 .. P-1.
// y may alias x (the rotation is computed pair by pair).
#pragma once

#include <cmath>
#include <cstdint>
#include <span>
#include <string_view>

#include "mixpeft/core/error.hpp"
#include "mixpeft/core/parallel.hpp"
#include "mixpeft/core/tensor.hpp"

namespace mixpeft {

// cos / sin of every (position, frequency) pair, computed once in double and stored as T.
template <class T>
struct RopeTable {
  std::size_t head_dim;       // dh (even)
  std::size_t max_positions;  // P: positions 0 .. P-1 are covered
  double base;                // theta base (10000 for LLaMA)
  Tensor<T> cos, sin;         // [P, dh/2]

  RopeTable(std::size_t head_dim_, std::size_t max_positions_, double base_ = 10000.0)
      : head_dim(head_dim_), max_positions(max_positions_), base(base_) {
    require<ConfigError>(head_dim > 0 && head_dim % 2 == 0, "rope: head_dim must be even and > 0, got ", head_dim);
    require<ConfigError>(max_positions > 0, "rope: max_positions must be > 0, got ", max_positions);
    require<ConfigError>(base > 0.0 && std::isfinite(base), "rope: theta base must be finite and > 0, got ", base);
    const std::size_t half = head_dim / 2;
    cos = empty<T>({max_positions, half});
    sin = empty<T>({max_positions, half});
    for (std::size_t i = 0; i < half; ++i) {
      const double inv_freq = std::pow(base, -double(2 * i) / double(head_dim));
      for (std::size_t p = 0; p < max_positions; ++p) {
        const double angle = double(p) * inv_freq;
        cos(p, i) = T(std::cos(angle));
        sin(p, i) = T(std::sin(angle));
      }
    }
  }
};

namespace detail {

// Checks the input `name` against the head layout and returns T (the extent of its token axis).
template <class T>
std::size_t rope_tokens(std::string_view op, std::string_view name, const Tensor<T>& x, std::size_t num_heads,
                        const RopeTable<T>& table) {
  require<ConfigError>(num_heads > 0, op, ": num_heads must be > 0");
  require<ShapeError>(x.dimension() >= 2, op, ": ", name, " has shape ", shape_string(x.shape()),
                      ", expected [..., T, ", num_heads * table.head_dim, "]");
  expect_width(op, name, x, num_heads * table.head_dim);
  return x.shape()[x.dimension() - 2];
}

// y = x rotated by +theta (Inverse = false) or -theta (Inverse = true); position(t) is the table row of token t.
template <bool Inverse, class T, class Position>
void rope_rotate(const Tensor<T>& x, std::size_t tokens, const RopeTable<T>& table, Position&& position,
                 Tensor<T>& y) {
  resize_to(y, shape_of(x));
  const std::size_t c = cols(x), dh = table.head_dim, half = dh / 2;
  parallel_rows(rows(x), 3 * c, [&](std::size_t row) {
    const std::size_t p = position(row % tokens);
    const T* cs = table.cos.data() + p * half;
    const T* sn = table.sin.data() + p * half;
    for (std::size_t h0 = row * c; h0 < (row + 1) * c; h0 += dh) {
      const T* a = x.data() + h0;
      const T* b = a + half;
      T* ya = y.data() + h0;
      T* yb = ya + half;
      for (std::size_t i = 0; i < half; ++i) {
        const T u = a[i], v = b[i], s = Inverse ? -sn[i] : sn[i];
        ya[i] = u * cs[i] - v * s;
        yb[i] = v * cs[i] + u * s;
      }
    }
  });
}

template <class T>
void rope_check_offset(std::string_view op, std::size_t offset, std::size_t tokens, const RopeTable<T>& table) {
  require<IndexError>(offset <= table.max_positions && tokens <= table.max_positions - offset, op,
                       ": positions [", offset, ", ", offset + tokens, ") exceed the table's max_positions ",
                       table.max_positions);
}

template <class T>
void rope_check_positions(std::string_view op, std::span<const std::int64_t> positions, std::size_t tokens,
                          const RopeTable<T>& table) {
  require<ShapeError>(positions.size() == tokens, op, ": positions has ", positions.size(),
                      " entries, expected T = ", tokens);
  for (std::size_t t = 0; t < tokens; ++t)
    require<IndexError>(positions[t] >= 0 && std::uint64_t(positions[t]) < table.max_positions, op,
                         ": position ", positions[t], " of token ", t, " is outside the table [0, ",
                         table.max_positions, ")");
}

}  // namespace detail

template <class T>
void rope_forward(const Tensor<T>& x, std::size_t num_heads, const RopeTable<T>& table, std::size_t position_offset,
                  Tensor<T>& y) {
  constexpr std::string_view op = "rope_forward";
  const std::size_t tokens = detail::rope_tokens(op, "x", x, num_heads, table);
  detail::rope_check_offset(op, position_offset, tokens, table);
  detail::rope_rotate<false>(x, tokens, table, [&](std::size_t t) { return position_offset + t; }, y);
}

template <class T>
void rope_forward(const Tensor<T>& x, std::size_t num_heads, const RopeTable<T>& table,
                  std::span<const std::int64_t> positions, Tensor<T>& y) {
  constexpr std::string_view op = "rope_forward";
  const std::size_t tokens = detail::rope_tokens(op, "x", x, num_heads, table);
  detail::rope_check_positions(op, positions, tokens, table);
  detail::rope_rotate<false>(x, tokens, table, [&](std::size_t t) { return std::size_t(positions[t]); }, y);
}

template <class T>
void rope_backward(const Tensor<T>& dy, std::size_t num_heads, const RopeTable<T>& table,
                   std::size_t position_offset, Tensor<T>& dx) {
  constexpr std::string_view op = "rope_backward";
  const std::size_t tokens = detail::rope_tokens(op, "dy", dy, num_heads, table);
  detail::rope_check_offset(op, position_offset, tokens, table);
  detail::rope_rotate<true>(dy, tokens, table, [&](std::size_t t) { return position_offset + t; }, dx);
}

template <class T>
void rope_backward(const Tensor<T>& dy, std::size_t num_heads, const RopeTable<T>& table,
                   std::span<const std::int64_t> positions, Tensor<T>& dx) {
  constexpr std::string_view op = "rope_backward";
  const std::size_t tokens = detail::rope_tokens(op, "dy", dy, num_heads, table);
  detail::rope_check_positions(op, positions, tokens, table);
  detail::rope_rotate<true>(dy, tokens, table, [&](std::size_t t) { return std::size_t(positions[t]); }, dx);
}

}  // namespace mixpeft
