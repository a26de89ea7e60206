// mixpeft/cuda/grouped_projection.cuh — the grouped (block-diagonal) projection of ops/grouped_projection.hpp on
// the device (same names, same argument order, same semantics).
//
//   grouped_projection_forward:   y = beta * y + alpha * (grouped(u, W) + b)        (beta = 0: y is not read)
//   grouped_projection_backward:  du = alpha * grouped^T(dy, W) (written);  dW += alpha * grouped outer(dy, u);
//                                 db += alpha * sum_rows dy     (each skipped when null; u read only for dW)
//   W [d, h/g] shared by all rows, or [S, d, h/g] one per sequence of rows(u) / S consecutive rows (b [d] / [S, d]).
// Every product is a strided-batched cuBLASLt GEMM (cuda/matmul.cuh, fp32 accumulation; double for double) over
// the g groups of one sequence, or over the S sequences of one group, whichever needs fewer launches; a batch entry
// starts at a group's column block (offsets j h/g, j d/g, j d/g h/g) or at a sequence's rows (s T h, s T d,
// s d h/g). cuBLASLt needs 16-byte aligned base pointers, so a decomposition is used only when its base offsets
// are multiples of 16 bytes (always for a shared W, or for g = 1 or S = 1). When neither is (bf16 with h/g = 4
// and T d not a multiple of 8, say) or cuBLASLt has no algorithm for the layout, simple kernels do the same
// work: one thread per output for y and du (an h/g- or d/g-long dot product), and the deterministic two-stage
// column sum of reduce.cuh for dW. The forward's bias is a grid-stride kernel after the GEMM (y += alpha
// b[seq(row)]); db is always the two-stage column sum (per sequence: its columns are the S d entries of db).
// No atomics: same inputs, same bits. Test hook: detail::grouped::ForceKernels makes this thread take the
// kernel path.
// Shapes as on the CPU; y must not alias u or W. Types: float, double, __nv_bfloat16, __half (acc_t<T> arithmetic).
// Caches nothing; the column sums take fp32 (double) scratch from the pool.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <type_traits>
#include <vector>

#include "mixpeft/core/error.hpp"
#include "mixpeft/cuda/device_tensor.cuh"
#include "mixpeft/cuda/error.cuh"
#include "mixpeft/cuda/kernel_utils.cuh"
#include "mixpeft/cuda/matmul.cuh"
#include "mixpeft/cuda/reduce.cuh"
#include "mixpeft/ops/grouped_projection.hpp"

namespace mixpeft::cuda {
namespace detail::grouped {

using Dims = mixpeft::detail::GroupedDims;

inline int& force_kernels_flag() {
  thread_local int on = 0;
  return on;
}

// While alive, the grouped projection ops of this thread skip cuBLASLt and run the fallback kernels.
class ForceKernels {
 public:
  ForceKernels() : saved_(force_kernels_flag()) { force_kernels_flag() = 1; }
  ~ForceKernels() { force_kernels_flag() = saved_; }
  ForceKernels(const ForceKernels&) = delete;
  ForceKernels& operator=(const ForceKernels&) = delete;

 private:
  int saved_;
};

// One strided-batched GEMM: base offsets (in elements) into the [.., h] operand (u, du), the [.., d] operand
// (y, dy) and the weight operand (W, dW), their batch strides, the batch count and the rows of each entry.
struct Piece {
  std::size_t off_h, off_d, off_w;
  std::int64_t stride_h, stride_d, stride_w;
  std::size_t batch, rows;
};

template <class T>
bool aligned_offset(std::size_t elements) {
  return elements * sizeof(T) % 16 == 0;
}

// The GEMM decomposition, or none (empty) when no decomposition has 16-byte aligned bases, a dimension is empty,
// or the kernels are forced.
template <class T>
std::vector<Piece> pieces(const Dims& g) {
  std::vector<Piece> out;
  if (force_kernels_flag() != 0 || g.hg == 0 || g.dg == 0) return out;
  const std::size_t S = g.sequences, nt = g.seq_rows, G = g.groups, h = g.h, d = g.d, hg = g.hg, dg = g.dg;
  const bool by_group = G == 1 || (aligned_offset<T>(hg) && aligned_offset<T>(dg));
  const bool by_sequence = S == 1 || (aligned_offset<T>(nt * h) && aligned_offset<T>(nt * d) &&
                                      aligned_offset<T>(d * hg));
  if (by_sequence && (!by_group || S <= G)) {
    // Sequence s: its rows, batched over the groups (entry j starts at column block j).
    for (std::size_t s = 0; s < S; ++s)
      out.push_back({s * nt * h, s * nt * d, s * d * hg, std::int64_t(hg), std::int64_t(dg), std::int64_t(dg * hg), G,
                     nt});
  } else if (by_group) {
    // Group j: its column blocks, batched over the sequences.
    for (std::size_t j = 0; j < G; ++j)
      out.push_back({j * hg, j * dg, j * dg * hg, std::int64_t(nt * h), std::int64_t(nt * d), std::int64_t(d * hg), S,
                     nt});
  }
  return out;
}

// Runs issue(piece) for every piece; returns false (nothing ran) when there are none or when cuBLASLt has no
// algorithm for the first one (every piece has the same layout, so the first decides; nothing has been enqueued
// when its plan fails).
template <class T, class Issue>
bool run_pieces(const Dims& g, Issue issue) {
  const std::vector<Piece> ps = pieces<T>(g);
  if (ps.empty()) return false;
  try {
    issue(ps.front());
  } catch (const CudaError&) {
    return false;
  }
  for (std::size_t p = 1; p < ps.size(); ++p) issue(ps[p]);
  return true;
}

// Sequence of row r.
__host__ __device__ inline std::size_t sequence_of(std::size_t r, std::size_t seq_rows, bool per_sequence) {
  return per_sequence && seq_rows > 0 ? r / seq_rows : 0;
}

// y[r, i] = beta * y[r, i] + alpha * sum_c u[r, j h/g + c] W[s, i, c]    (j = i / (d/g), s the sequence of r)
template <class T>
__global__ void forward_kernel(const T* __restrict__ u, const T* __restrict__ W, Dims g, acc_t<T> alpha,
                               acc_t<T> beta, T* __restrict__ y) {
  using A = acc_t<T>;
  const std::size_t total = g.rows * g.d;
  for (std::size_t e = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; e < total;
       e += std::size_t(gridDim.x) * blockDim.x) {
    const std::size_t r = e / g.d, i = e % g.d, j = i / g.dg;
    const T* ur = u + r * g.h + j * g.hg;
    const T* wi = W + sequence_of(r, g.seq_rows, g.per_sequence) * g.d * g.hg + i * g.hg;
    A acc = 0;
    for (std::size_t c = 0; c < g.hg; ++c) acc += widen(ur[c]) * widen(wi[c]);
    y[e] = narrow<T>(beta == A(0) ? alpha * acc : alpha * acc + beta * widen(y[e]));
  }
}

// du[r, j h/g + c] = alpha * sum_i dy[r, j d/g + i] W[s, j d/g + i, c]
template <class T>
__global__ void input_kernel(const T* __restrict__ dy, const T* __restrict__ W, Dims g, acc_t<T> alpha,
                             T* __restrict__ du) {
  using A = acc_t<T>;
  const std::size_t total = g.rows * g.h;
  for (std::size_t e = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; e < total;
       e += std::size_t(gridDim.x) * blockDim.x) {
    const std::size_t r = e / g.h, q = e % g.h, j = q / g.hg, c = q % g.hg;
    const T* dyr = dy + r * g.d + j * g.dg;
    const T* wj = W + sequence_of(r, g.seq_rows, g.per_sequence) * g.d * g.hg + j * g.dg * g.hg + c;
    A acc = 0;
    for (std::size_t i = 0; i < g.dg; ++i) acc += widen(dyr[i]) * widen(wj[i * g.hg]);
    du[e] = narrow<T>(alpha * acc);
  }
}

// y[r, :] += alpha * b[s, :]
template <class T>
__global__ void bias_kernel(const T* __restrict__ b, Dims g, acc_t<T> alpha, T* __restrict__ y) {
  const std::size_t total = g.rows * g.d;
  for (std::size_t e = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; e < total;
       e += std::size_t(gridDim.x) * blockDim.x) {
    const std::size_t r = e / g.d, i = e % g.d;
    const std::size_t s = sequence_of(r, g.seq_rows, g.per_sequence);
    y[e] = narrow<T>(widen(y[e]) + alpha * widen(b[s * g.d + i]));
  }
}

// Column sums over the T rows of each sequence: column (s, i) of dy for db [S, d] ...
template <class T>
struct SequenceColumn {
  const T* dy;
  std::size_t seq_rows, d;
  acc_t<T> alpha;
  __device__ acc_t<T> operator()(std::size_t r, std::size_t col) const {
    const std::size_t s = col / d, i = col % d;
    return alpha * widen(dy[(s * seq_rows + r) * d + i]);
  }
};

// ... and column (s, i, c) of the grouped outer product for dW [S, d, h/g].
template <class T>
struct OuterColumn {
  const T* dy;
  const T* u;
  Dims g;
  acc_t<T> alpha;
  __device__ acc_t<T> operator()(std::size_t r, std::size_t col) const {
    const std::size_t w = g.d * g.hg;
    const std::size_t s = col / w, i = (col % w) / g.hg, c = col % g.hg, j = i / g.dg;
    const std::size_t row = s * g.seq_rows + r;
    return alpha * widen(dy[row * g.d + i]) * widen(u[row * g.h + j * g.hg + c]);
  }
};

}  // namespace detail::grouped

template <class T>
void grouped_projection_forward(const DeviceTensor<T>& u, const DeviceTensor<T>& W,
                                const std::type_identity_t<DeviceTensor<T>>* b, std::size_t groups,
                                std::type_identity_t<T> alpha, std::type_identity_t<T> beta, DeviceTensor<T>& y) {
  namespace gp = detail::grouped;
  constexpr std::string_view op = "grouped_projection_forward";
  require<ShapeError>(u.dimension() >= 1, op, ": u has shape ", shape_string(u.shape()), ", expected [..., h]");
  const gp::Dims g = mixpeft::detail::grouped_dims(op, W, groups, rows(u));
  expect_width(op, "u", u, g.h);
  if (b) mixpeft::detail::expect_grouped_bias(op, "b", *b, g);
  require<ConfigError>((u.size() == 0 || y.data() != u.data()) && (W.size() == 0 || y.data() != W.data()), op,
                       ": y must not alias u or W");
  const acc_t<T> a = widen(alpha), be = widen(beta);
  if (be == acc_t<T>(0)) resize_to(y, with_last(shape_of(u), g.d));
  else
    require<ShapeError>(y.dimension() >= 1 && cols(y) == g.d && rows(y) == g.rows, op, ": y has shape ",
                        shape_string(y.shape()), ", expected ", g.rows, " rows of ", g.d, " (beta != 0 adds into y)");
  if (g.rows == 0 || g.d == 0) return;
  const bool done = gp::run_pieces<T>(g, [&](const gp::Piece& p) {
    matmul(MatmulCall<T>{.ta = Trans::No, .tb = Trans::Yes, .m = p.rows, .n = g.dg, .k = g.hg, .alpha = double(a),
                         .a = u.data() + p.off_h, .lda = g.h, .stride_a = p.stride_h,
                         .b = W.data() + p.off_w, .ldb = g.hg, .stride_b = p.stride_w,
                         .beta = double(be), .c = y.data() + p.off_d, .ldc = g.d, .stride_c = p.stride_d,
                         .batch = p.batch});
  });
  constexpr unsigned block = 256;
  const cudaStream_t stream = current_stream();
  if (!done) {
    gp::forward_kernel<<<grid_size(g.rows * g.d, block), block, 0, stream>>>(u.data(), W.data(), g, a, be, y.data());
    check_launch(op.data());
  }
  if (b) {
    gp::bias_kernel<<<grid_size(g.rows * g.d, block), block, 0, stream>>>(b->data(), g, a, y.data());
    check_launch(op.data());
  }
}

template <class T>
void grouped_projection_backward(const DeviceTensor<T>& dy, const DeviceTensor<T>& u, const DeviceTensor<T>& W,
                                 std::size_t groups, std::type_identity_t<T> alpha,
                                 std::type_identity_t<DeviceTensor<T>>* du, std::type_identity_t<DeviceTensor<T>>* dW,
                                 std::type_identity_t<DeviceTensor<T>>* db) {
  namespace gp = detail::grouped;
  constexpr std::string_view op = "grouped_projection_backward";
  require<ShapeError>(dy.dimension() >= 1, op, ": dy has shape ", shape_string(dy.shape()), ", expected [..., d]");
  const gp::Dims g = mixpeft::detail::grouped_dims(op, W, groups, rows(dy));
  expect_width(op, "dy", dy, g.d);
  if (dW) {
    expect_width(op, "u", u, g.h);
    require<ShapeError>(rows(u) == g.rows, op, ": u has shape ", shape_string(u.shape()), " but dy has shape ",
                        shape_string(dy.shape()));
    expect_same_shape(op, "dW", *dW, "W", W);
  }
  if (db) mixpeft::detail::expect_grouped_bias(op, "db", *db, g);
  const acc_t<T> a = widen(alpha);
  constexpr unsigned block = 256;
  const cudaStream_t stream = current_stream();
  if (du) {
    require<ConfigError>(du != &dy && (dy.size() == 0 || du->data() != dy.data()), op, ": du must not alias dy");
    resize_to(*du, with_last(shape_of(dy), g.h));
    if (g.rows > 0 && g.h > 0) {
      const bool done = gp::run_pieces<T>(g, [&](const gp::Piece& p) {
        matmul(MatmulCall<T>{.ta = Trans::No, .tb = Trans::No, .m = p.rows, .n = g.hg, .k = g.dg, .alpha = double(a),
                             .a = dy.data() + p.off_d, .lda = g.d, .stride_a = p.stride_d,
                             .b = W.data() + p.off_w, .ldb = g.hg, .stride_b = p.stride_w,
                             .c = du->data() + p.off_h, .ldc = g.h, .stride_c = p.stride_h, .batch = p.batch});
      });
      if (!done) {
        gp::input_kernel<<<grid_size(g.rows * g.h, block), block, 0, stream>>>(dy.data(), W.data(), g, a,
                                                                               du->data());
        check_launch(op.data());
      }
    }
  }
  if (dW && dW->size() > 0) {
    const bool done = gp::run_pieces<T>(g, [&](const gp::Piece& p) {
      matmul(MatmulCall<T>{.ta = Trans::Yes, .tb = Trans::No, .m = g.dg, .n = g.hg, .k = p.rows, .alpha = double(a),
                           .a = dy.data() + p.off_d, .lda = g.d, .stride_a = p.stride_d,
                           .b = u.data() + p.off_h, .ldb = g.h, .stride_b = p.stride_h,
                           .beta = 1.0, .c = dW->data() + p.off_w, .ldc = g.hg, .stride_c = p.stride_w,
                           .batch = p.batch});
    });
    if (!done)
      column_sum_accumulate("grouped_projection_backward dW", g.seq_rows, dW->size(),
                            gp::OuterColumn<T>{dy.data(), u.data(), g, a}, dW->data());
  }
  if (db && db->size() > 0)
    column_sum_accumulate("grouped_projection_backward db", g.seq_rows, db->size(),
                          gp::SequenceColumn<T>{dy.data(), g.seq_rows, g.d, a}, db->data());
}

}  // namespace mixpeft::cuda
