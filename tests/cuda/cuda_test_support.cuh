// Shared by the CUDA test programs: the skipping fixture, per-dtype tolerances, and moving test data between
// the host (double, for CPU reference ops) and the device (any storage type).
// Tests live in namespace mixpeft::cuda_test, so unqualified op calls find the CPU op by ordinary lookup and
// the CUDA op by argument-dependent lookup, exactly as layers do. (A `using namespace mixpeft` at file scope
// would make `testing` ambiguous in the host stubs nvcc generates for typed tests.)
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <utility>

#include "mixpeft/core/parameter.hpp"
#include "mixpeft/core/rng.hpp"
#include "mixpeft/core/tensor.hpp"
#include "mixpeft/cuda/backend.cuh"
#include "mixpeft/cuda/device_tensor.cuh"
#include "mixpeft/testing/gradcheck.hpp"

namespace mixpeft::cuda_test {

using cuda::DeviceTensor;

// Every CUDA test skips on a machine without a usable device.
class CudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!cuda::device_available()) GTEST_SKIP() << "no CUDA device";
  }
};

// Norm-wise relative error ||got - want|| / ||got + want|| allowed for a result stored as T, against a double
// CPU reference computed from the very values the device holds (inputs rounded to T first).
template <class T>
constexpr double tolerance = 1e-5;
template <>
constexpr double tolerance<double> = 1e-12;
template <>
constexpr double tolerance<__nv_bfloat16> = 1e-2;
template <>
constexpr double tolerance<__half> = 2e-3;

template <class T>
struct OnDevice {
  DeviceTensor<T> dev;
  Tensor<double> host;  // exactly the values dev holds
};

template <class T>
OnDevice<T> put(const Tensor<double>& values) {
  DeviceTensor<T> dev = cuda::upload_as<T>(values);
  Tensor<double> host = cuda::download_as<double>(dev);
  return {std::move(dev), std::move(host)};
}

template <class T>
OnDevice<T> random_on_device(const Shape& shape, Rng& rng, double scale = 1.0) {
  return put<T>(mixpeft::testing::random_tensor<double>(shape, rng, scale));
}

template <class T>
Tensor<double> get(const DeviceTensor<T>& t) {
  return cuda::download_as<double>(t);
}

inline ::testing::AssertionResult agrees(const Tensor<double>& got, const Tensor<double>& want, double tol) {
  if (mixpeft::shape_of(got) != mixpeft::shape_of(want))
    return ::testing::AssertionFailure() << "shape " << shape_string(got.shape()) << " vs "
                                         << shape_string(want.shape());
  const double err = mixpeft::testing::relative_error(got, want);
  if (err < tol) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "relative error " << err << " >= " << tol << " (max abs diff "
                                       << mixpeft::testing::max_abs_diff(got, want) << ")";
}

// Exact equality of host tensors (same shape, same values).
template <class T>
::testing::AssertionResult exactly_equal(const Tensor<T>& got, const Tensor<T>& want) {
  if (mixpeft::shape_of(got) != mixpeft::shape_of(want))
    return ::testing::AssertionFailure() << "shape " << shape_string(got.shape()) << " vs "
                                         << shape_string(want.shape());
  for (std::size_t i = 0; i < got.size(); ++i)
    if (got.data()[i] != want.data()[i])
      return ::testing::AssertionFailure() << "entry " << i << ": " << got.data()[i] << " vs " << want.data()[i];
  return ::testing::AssertionSuccess();
}

// Exact equality of a device tensor with a host tensor (same shape, same bits).
inline ::testing::AssertionResult same(const DeviceTensor<float>& dev, const Tensor<float>& host) {
  return exactly_equal(cuda::download(dev), host);
}

// A device tensor against a host tensor within float's tolerance (or the one given).
inline ::testing::AssertionResult close(const DeviceTensor<float>& dev, const Tensor<float>& host,
                                        double tol = tolerance<float>) {
  return agrees(get(dev), xt::cast<double>(host), tol);
}

// Exact equality of id tensors (routing choices, counts, offsets, permutations), on the host or the device.
inline ::testing::AssertionResult same_ids(const Tensor<std::int32_t>& got, const Tensor<std::int32_t>& want) {
  return exactly_equal(got, want);
}
inline ::testing::AssertionResult same_ids(const DeviceTensor<std::int32_t>& got, const Tensor<std::int32_t>& want) {
  return exactly_equal(cuda::download(got), want);
}

// A device layer built from the seed of its CPU twin: the same parameters (names, order, trainable flags) with
// the same values, bit for bit.
inline void expect_same_parameters(const ParameterList<float, Cpu>& cpu, const ParameterList<float, Cuda>& gpu) {
  ASSERT_EQ(cpu.size(), gpu.size());
  for (std::size_t i = 0; i < cpu.size(); ++i) {
    EXPECT_EQ(cpu[i].name, gpu[i].name);
    EXPECT_EQ(cpu[i].param->trainable, gpu[i].param->trainable) << cpu[i].name;
    EXPECT_TRUE(same(gpu[i].param->value, cpu[i].param->value)) << cpu[i].name;
  }
}

// Copies the values of a CPU layer's parameters into its device twin (same names, same order).
template <class T>
void mirror_parameters(const ParameterList<T, Cpu>& cpu, const ParameterList<T, Cuda>& gpu) {
  ASSERT_EQ(cpu.size(), gpu.size());
  for (std::size_t i = 0; i < cpu.size(); ++i) {
    ASSERT_EQ(cpu[i].name, gpu[i].name);
    gpu[i].param->value = cuda::upload(cpu[i].param->value);
  }
}

}  // namespace mixpeft::cuda_test
