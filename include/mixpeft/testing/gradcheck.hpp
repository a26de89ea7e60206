// mixpeft/testing/gradcheck.hpp — finite-difference gradient checks for hand-written backward passes.
//
// The check used throughout the tests (and available to users writing their own modules):
//   1. run forward, draw a random R shaped like the output, take the scalar L = <f(x), R>;
//   2. run backward with d_out = R to get the analytic gradient g of every input and parameter;
//   3. numerical_gradient perturbs each entry of a tensor by +-h and differentiates L centrally;
//   4. relative_error(g, g_fd) = ||g - g_fd|| / ||g + g_fd|| must be < 1e-6 in double precision.
// `loss` must recompute L from the current contents of the tensor being perturbed.
#pragma once

#include <cmath>
#include <cstddef>
#include <functional>

#include "mixpeft/core/rng.hpp"
#include "mixpeft/core/tensor.hpp"

namespace mixpeft::testing {

template <class T>
Tensor<T> random_tensor(const Shape& shape, Rng& rng, double scale = 1.0) {
  Tensor<T> t = empty<T>(shape);
  for (auto& v : t) v = static_cast<T>(rng.normal(0.0, scale));
  return t;
}

template <class T>
double dot(const Tensor<T>& a, const Tensor<T>& b) {
  expect_same_shape("testing::dot", "a", a, "b", b);
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += double(a.data()[i]) * double(b.data()[i]);
  return s;
}

inline Tensor<double> numerical_gradient(const std::function<double()>& loss, Tensor<double>& x, double h = 1e-5) {
  Tensor<double> g = empty<double>(shape_of(x));
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double saved = x.data()[i];
    x.data()[i] = saved + h;
    const double plus = loss();
    x.data()[i] = saved - h;
    const double minus = loss();
    x.data()[i] = saved;
    g.data()[i] = (plus - minus) / (2 * h);
  }
  return g;
}

// ||a - b|| / ||a + b||; 0 when both are zero.
inline double relative_error(const Tensor<double>& a, const Tensor<double>& b) {
  expect_same_shape("testing::relative_error", "a", a, "b", b);
  double diff = 0, sum = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double x = a.data()[i], y = b.data()[i];
    diff += (x - y) * (x - y);
    sum += (x + y) * (x + y);
  }
  if (sum == 0) return diff == 0 ? 0.0 : INFINITY;
  return std::sqrt(diff / sum);
}

inline double max_abs_diff(const Tensor<double>& a, const Tensor<double>& b) {
  expect_same_shape("testing::max_abs_diff", "a", a, "b", b);
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a.data()[i] - b.data()[i]));
  return m;
}

// Relative error of `analytic` against the central-difference gradient of `loss` w.r.t. `x`.
inline double gradient_error(const std::function<double()>& loss, Tensor<double>& x, const Tensor<double>& analytic,
                             double h = 1e-5) {
  return relative_error(analytic, numerical_gradient(loss, x, h));
}

}  // namespace mixpeft::testing
