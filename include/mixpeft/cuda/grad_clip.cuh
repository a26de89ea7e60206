// mixpeft/cuda/grad_clip.cuh — the per-tensor ops of train/grad_clip.hpp on the device.
//   sum_of_squares(g):          sum_i g_i^2 in double: g seen as [ceil(n / 256), 256] (zero padded), columns
//                               summed by the deterministic two-stage column sum of reduce.cuh, the 256 column
//                               sums by one row sum; the result is copied back (a sync of the current stream)
//   scale_in_place(g, factor):  g <- g * factor, one element-wise kernel (rounded once to T)
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "mixpeft/cuda/device_tensor.cuh"
#include "mixpeft/cuda/elementwise.cuh"
#include "mixpeft/cuda/error.cuh"
#include "mixpeft/cuda/kernel_utils.cuh"
#include "mixpeft/cuda/memory.cuh"
#include "mixpeft/cuda/reduce.cuh"
#include "mixpeft/train/grad_clip.hpp"

namespace mixpeft::cuda {
namespace detail {

inline constexpr std::size_t square_sum_width = 256;

template <class T>
struct SquareTerm {  // g[r * 256 + c]^2 in double, 0 past the end
  const T* g;
  std::size_t n;
  __device__ double operator()(std::size_t r, std::size_t c) const {
    const std::size_t i = r * square_sum_width + c;
    if (i >= n) return 0.0;
    const double v = double(widen(g[i]));
    return v * v;
  }
};

struct ScaleBy {  // y = x * factor
  double factor;
  template <class A>
  __device__ void operator()(std::size_t, const A (&x)[1], A (&y)[1]) const {
    y[0] = A(double(x[0]) * factor);
  }
};

}  // namespace detail

template <class T>
double sum_of_squares(const DeviceTensor<T>& g) {
  const std::size_t n = g.size();
  if (n == 0) return 0.0;
  constexpr std::size_t width = detail::square_sum_width;
  DeviceTensor<double> columns(Shape{width}), total(Shape{1});
  set_zero(columns);
  column_sum_accumulate("sum_of_squares", (n + width - 1) / width, width, detail::SquareTerm<T>{g.data(), n},
                        columns.data());
  row_sum("sum_of_squares", columns.data(), 1, width, width, total.data());
  return download(total).data()[0];
}

template <class T>
void scale_in_place(DeviceTensor<T>& g, double factor) {
  detail::map_elements<T, 1, 1>("scale_in_place", g.size(), detail::ScaleBy{factor}, {g.data()}, {g.data()});
}

}  // namespace mixpeft::cuda
