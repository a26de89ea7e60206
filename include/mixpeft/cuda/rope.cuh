// mixpeft/cuda/rope.cuh — rotary position embedding on the device (ops/rope.hpp, HF "rotate_half").
//
// Each head of width dh is split into halves; entry i of the first half pairs with entry i + dh/2:
//   theta_i = p * base^(-2i / dh),  i in [0, dh/2),  p = the token's position id
//   forward:   y_i        = x_i cos theta_i - x_{i+dh/2} sin theta_i
//              y_{i+dh/2} = x_{i+dh/2} cos theta_i + x_i sin theta_i
//   backward:  the inverse rotation (theta -> -theta) applied to dy gives dx (written); nothing is cached.
// Positions are `position_offset + t` or an explicit host list of T position ids (checked on the host, then
// uploaded). DeviceRopeTable holds cos / sin in acc_t<T> (float for bf16 / fp16 activations), computed in
// double on the host by RopeTable and uploaded once. One thread per rotated pair; y may alias x.
// Shapes: x, y, dy, dx [..., T, H*dh] (heads contiguous in the last axis); table cos, sin [P, dh/2].
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

#include "mixpeft/core/error.hpp"
#include "mixpeft/cuda/device_tensor.cuh"
#include "mixpeft/cuda/error.cuh"
#include "mixpeft/cuda/kernel_utils.cuh"
#include "mixpeft/ops/rope.hpp"

namespace mixpeft::cuda {

template <class T>
struct DeviceRopeTable {
  std::size_t head_dim;        // dh (even)
  std::size_t max_positions;   // P: positions 0 .. P-1 are covered
  double base;                 // theta base (10000 for LLaMA)
  DeviceTensor<acc_t<T>> cos;  // [P, dh/2]
  DeviceTensor<acc_t<T>> sin;  // [P, dh/2]

  explicit DeviceRopeTable(const RopeTable<acc_t<T>>& host)
      : head_dim(host.head_dim),
        max_positions(host.max_positions),
        base(host.base),
        cos(upload(host.cos)),
        sin(upload(host.sin)) {}
  DeviceRopeTable(std::size_t head_dim_, std::size_t max_positions_, double base_ = 10000.0)
      : DeviceRopeTable(RopeTable<acc_t<T>>(head_dim_, max_positions_, base_)) {}
};

namespace detail {

template <class T>
__global__ void rope_kernel(const T* x, T* y, std::size_t rows, std::size_t tokens, std::size_t heads,
                            std::size_t half, const acc_t<T>* __restrict__ cos, const acc_t<T>* __restrict__ sin,
                            std::size_t offset, const std::int64_t* __restrict__ positions, bool inverse) {
  using A = acc_t<T>;
  const std::size_t pairs_per_row = heads * half, total = rows * pairs_per_row;
  for (std::size_t e = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; e < total;
       e += std::size_t(gridDim.x) * blockDim.x) {
    const std::size_t row = e / pairs_per_row, rem = e % pairs_per_row;
    const std::size_t h = rem / half, i = rem % half, t = row % tokens;
    const std::size_t p = positions ? std::size_t(positions[t]) : offset + t;
    const A c = cos[p * half + i], s = inverse ? -sin[p * half + i] : sin[p * half + i];
    const std::size_t a = row * pairs_per_row * 2 + h * half * 2 + i, b = a + half;
    const A u = widen(x[a]), v = widen(x[b]);
    y[a] = narrow<T>(u * c - v * s);
    y[b] = narrow<T>(v * c + u * s);
  }
}

// Checks x against the head layout and returns T (the extent of its token axis).
template <class T>
std::size_t rope_tokens(std::string_view op, std::string_view name, const DeviceTensor<T>& x, std::size_t num_heads,
                        const DeviceRopeTable<T>& table) {
  require<ConfigError>(num_heads > 0, op, ": num_heads must be > 0");
  require<ShapeError>(x.dimension() >= 2, op, ": ", name, " has shape ", shape_string(x.shape()),
                      ", expected [..., T, ", num_heads * table.head_dim, "]");
  expect_width(op, name, x, num_heads * table.head_dim);
  return x.shape()[x.dimension() - 2];
}

template <class T>
void rope_check_offset(std::string_view op, std::size_t offset, std::size_t tokens, const DeviceRopeTable<T>& table) {
  require<IndexError>(offset <= table.max_positions && tokens <= table.max_positions - offset, op, ": positions [",
                      offset, ", ", offset + tokens, ") exceed the table's max_positions ", table.max_positions);
}

template <class T>
void rope_check_positions(std::string_view op, std::span<const std::int64_t> positions, std::size_t tokens,
                          const DeviceRopeTable<T>& table) {
  require<ShapeError>(positions.size() == tokens, op, ": positions has ", positions.size(), " entries, expected T = ",
                      tokens);
  for (std::size_t t = 0; t < tokens; ++t)
    require<IndexError>(positions[t] >= 0 && std::uint64_t(positions[t]) < table.max_positions, op, ": position ",
                        positions[t], " of token ", t, " is outside the table [0, ", table.max_positions, ")");
}

template <class T>
void rope_launch(const char* op, const DeviceTensor<T>& x, std::size_t tokens, std::size_t heads,
                 const DeviceRopeTable<T>& table, std::size_t offset, const std::int64_t* positions, bool inverse,
                 DeviceTensor<T>& y) {
  resize_to(y, shape_of(x));
  const std::size_t half = table.head_dim / 2, total = rows(x) * heads * half;
  if (total == 0) return;
  constexpr unsigned block = 256;
  rope_kernel<<<grid_size(total, block), block, 0, current_stream()>>>(x.data(), y.data(), rows(x), tokens, heads,
                                                                        half, table.cos.data(), table.sin.data(),
                                                                        offset, positions, inverse);
  check_launch(op);
}

}  // namespace detail

template <class T>
void rope_forward(const DeviceTensor<T>& x, std::size_t num_heads, const DeviceRopeTable<T>& table,
                  std::size_t position_offset, DeviceTensor<T>& y) {
  constexpr std::string_view op = "rope_forward";
  const std::size_t tokens = detail::rope_tokens(op, "x", x, num_heads, table);
  detail::rope_check_offset(op, position_offset, tokens, table);
  detail::rope_launch("rope_forward", x, tokens, num_heads, table, position_offset, nullptr, false, y);
}

template <class T>
void rope_forward(const DeviceTensor<T>& x, std::size_t num_heads, const DeviceRopeTable<T>& table,
                  std::span<const std::int64_t> positions, DeviceTensor<T>& y) {
  constexpr std::string_view op = "rope_forward";
  const std::size_t tokens = detail::rope_tokens(op, "x", x, num_heads, table);
  detail::rope_check_positions(op, positions, tokens, table);
  const DeviceTensor<std::int64_t> ids = upload(positions);
  detail::rope_launch("rope_forward", x, tokens, num_heads, table, 0, ids.data(), false, y);
}

template <class T>
void rope_backward(const DeviceTensor<T>& dy, std::size_t num_heads, const DeviceRopeTable<T>& table,
                   std::size_t position_offset, DeviceTensor<T>& dx) {
  constexpr std::string_view op = "rope_backward";
  const std::size_t tokens = detail::rope_tokens(op, "dy", dy, num_heads, table);
  detail::rope_check_offset(op, position_offset, tokens, table);
  detail::rope_launch("rope_backward", dy, tokens, num_heads, table, position_offset, nullptr, true, dx);
}

template <class T>
void rope_backward(const DeviceTensor<T>& dy, std::size_t num_heads, const DeviceRopeTable<T>& table,
                   std::span<const std::int64_t> positions, DeviceTensor<T>& dx) {
  constexpr std::string_view op = "rope_backward";
  const std::size_t tokens = detail::rope_tokens(op, "dy", dy, num_heads, table);
  detail::rope_check_positions(op, positions, tokens, table);
  const DeviceTensor<std::int64_t> ids = upload(positions);
  detail::rope_launch("rope_backward", dy, tokens, num_heads, table, 0, ids.data(), true, dx);
}

}  // namespace mixpeft::cuda
