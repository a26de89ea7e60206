// mixpeft/cuda/device_tensor.cuh — row-major tensors in device memory.
//
// DeviceTensor<T> owns size() elements of T in device memory (from the caching allocator) and a Shape.
// Like Tensor<T>, an op sees a tensor of shape [..., C] as rows(t) x cols(t) with cols(t) = C. Element types:
// float, double, __half, __nv_bfloat16 (values), std::int64_t and std::int32_t (ids).
// Differences from Tensor<T> (xt::xarray):
//   - a default-constructed DeviceTensor is empty, shape [0], with no storage (an xarray is a rank-0 scalar);
//   - it is move-only: copies are explicit (t.clone(), assign(dst, src)), because each one costs device time;
//   - elements live on the device: host code moves them with upload / download (download synchronises the
//     current stream), or upload_as / download_as, which also convert (float <-> bf16 / fp16 by a kernel).
// The free functions below carry the names the CPU code uses (resize_to, shape_of, rows, cols, set_zero,
// expect_shape, ...), so backend-generic code calls them unqualified and argument-dependent lookup finds these.
// Contents after construction or a resize that changes the element count are unspecified.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <numeric>
#include <span>
#include <string_view>
#include <type_traits>
#include <utility>

#include "mixpeft/core/tensor.hpp"
#include "mixpeft/cuda/error.cuh"
#include "mixpeft/cuda/kernel_utils.cuh"
#include "mixpeft/cuda/memory.cuh"

namespace mixpeft::cuda {

template <class T>
class DeviceTensor {
 public:
  using value_type = T;

  DeviceTensor() = default;
  explicit DeviceTensor(Shape shape) { resize(std::move(shape)); }
  DeviceTensor(std::initializer_list<std::size_t> shape) : DeviceTensor(Shape(shape)) {}

  DeviceTensor(const DeviceTensor&) = delete;
  DeviceTensor& operator=(const DeviceTensor&) = delete;
  DeviceTensor(DeviceTensor&& other) noexcept
      : shape_(std::exchange(other.shape_, Shape{0})),
        size_(std::exchange(other.size_, 0)),
        data_(std::exchange(other.data_, nullptr)) {}
  DeviceTensor& operator=(DeviceTensor&& other) noexcept {
    if (this != &other) {
      release();
      shape_ = std::exchange(other.shape_, Shape{0});
      size_ = std::exchange(other.size_, 0);
      data_ = std::exchange(other.data_, nullptr);
    }
    return *this;
  }
  ~DeviceTensor() { release(); }

  T* data() { return data_; }
  const T* data() const { return data_; }
  std::size_t size() const { return size_; }
  std::size_t dimension() const { return shape_.size(); }
  const Shape& shape() const { return shape_; }

  // New shape; storage is reallocated only when the element count changes (contents then unspecified).
  void resize(Shape shape) {
    const std::size_t n = std::accumulate(shape.begin(), shape.end(), std::size_t(1), std::multiplies<>());
    if (n != size_) {
      T* fresh = static_cast<T*>(allocator().allocate(n * sizeof(T), current_stream()));
      release();
      data_ = fresh;
      size_ = n;
    }
    shape_ = std::move(shape);
  }

  // Same elements under a new shape with the same element count.
  void reshape(Shape shape) {
    const std::size_t n = std::accumulate(shape.begin(), shape.end(), std::size_t(1), std::multiplies<>());
    require<ShapeError>(n == size_, "DeviceTensor::reshape: cannot view ", shape_string(shape_), " (", size_,
                        " elements) as ", shape_string(shape), " (", n, " elements)");
    shape_ = std::move(shape);
  }

  // A deep copy (device to device, on the current stream).
  DeviceTensor clone() const {
    DeviceTensor copy(shape_);
    if (size_ > 0)
      MIXPEFT_CUDA_CHECK(
          cudaMemcpyAsync(copy.data_, data_, size_ * sizeof(T), cudaMemcpyDeviceToDevice, current_stream()));
    return copy;
  }

 private:
  void release() {
    if (data_) allocator().deallocate(data_);
    data_ = nullptr;
    size_ = 0;
  }

  Shape shape_{0};
  std::size_t size_ = 0;
  T* data_ = nullptr;
};

// ---- shapes (the CPU names) ----------------------------------------------------------------------

template <class T>
Shape shape_of(const DeviceTensor<T>& t) {
  return t.shape();
}

// Product of the leading extents (1 for a rank-0 or rank-1 tensor); well defined when the last extent is 0.
template <class T>
std::size_t rows(const DeviceTensor<T>& t) {
  if (t.dimension() == 0) return 1;
  return std::accumulate(t.shape().begin(), t.shape().end() - 1, std::size_t(1), std::multiplies<>());
}
template <class T>
std::size_t cols(const DeviceTensor<T>& t) {
  return t.dimension() == 0 ? 1 : t.shape().back();
}

template <class T>
void resize_to(DeviceTensor<T>& t, const Shape& shape) {
  if (t.shape() != shape) t.resize(shape);
}

template <class T>
void set_zero(DeviceTensor<T>& t) {
  if (t.size() > 0) MIXPEFT_CUDA_CHECK(cudaMemsetAsync(t.data(), 0, t.size() * sizeof(T), current_stream()));
}

// dst = src (device to device); dst takes src's shape.
template <class T>
void assign(DeviceTensor<T>& dst, const DeviceTensor<T>& src) {
  if (&dst == &src) return;
  resize_to(dst, src.shape());
  if (src.size() > 0)
    MIXPEFT_CUDA_CHECK(
        cudaMemcpyAsync(dst.data(), src.data(), src.size() * sizeof(T), cudaMemcpyDeviceToDevice, current_stream()));
}

template <class T>
bool has_shape(const DeviceTensor<T>& t, std::initializer_list<std::size_t> expected) {
  if (t.dimension() != expected.size()) return false;
  std::size_t i = 0;
  for (auto e : expected) {
    if (e != any_extent && t.shape()[i] != e) return false;
    ++i;
  }
  return true;
}

template <class T>
void expect_shape(std::string_view op, std::string_view name, const DeviceTensor<T>& t,
                  std::initializer_list<std::size_t> expected) {
  require<ShapeError>(has_shape(t, expected), op, ": ", name, " has shape ", shape_string(t.shape()), ", expected ",
                      shape_string(expected));
}

template <class T>
void expect_width(std::string_view op, std::string_view name, const DeviceTensor<T>& t, std::size_t width) {
  require<ShapeError>(t.dimension() >= 1 && t.shape().back() == width, op, ": ", name, " has shape ",
                      shape_string(t.shape()), ", expected [..., ", width, "]");
}

template <class T, class U>
void expect_same_shape(std::string_view op, std::string_view name_a, const DeviceTensor<T>& a,
                       std::string_view name_b, const DeviceTensor<U>& b) {
  require<ShapeError>(a.shape() == b.shape(), op, ": ", name_a, " has shape ", shape_string(a.shape()), " but ",
                      name_b, " has shape ", shape_string(b.shape()));
}

// ---- host <-> device ------------------------------------------------------------------------------

namespace detail {

template <class S, class D>
__global__ void convert_kernel(const S* __restrict__ src, D* __restrict__ dst, std::size_t n) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
       i += std::size_t(gridDim.x) * blockDim.x)
    dst[i] = narrow<D>(static_cast<acc_t<D>>(widen(src[i])));
}

}  // namespace detail

// dst = src converted element by element (round to nearest even); dst takes src's shape.
template <class S, class D>
void convert(const DeviceTensor<S>& src, DeviceTensor<D>& dst) {
  resize_to(dst, src.shape());
  if (src.size() == 0) return;
  constexpr unsigned block = 256;
  detail::convert_kernel<<<grid_size(src.size(), block), block, 0, current_stream()>>>(src.data(), dst.data(),
                                                                                       src.size());
  check_launch("convert");
}

template <class T>
DeviceTensor<T> upload(const Tensor<T>& host) {
  DeviceTensor<T> t(mixpeft::shape_of(host));
  if (t.size() > 0)
    MIXPEFT_CUDA_CHECK(
        cudaMemcpyAsync(t.data(), host.data(), t.size() * sizeof(T), cudaMemcpyHostToDevice, current_stream()));
  return t;
}

// A rank-1 tensor holding a copy of `host` (ids, positions, lengths).
template <class T>
DeviceTensor<T> upload(std::span<const T> host) {
  DeviceTensor<T> t(Shape{host.size()});
  if (t.size() > 0)
    MIXPEFT_CUDA_CHECK(
        cudaMemcpyAsync(t.data(), host.data(), t.size() * sizeof(T), cudaMemcpyHostToDevice, current_stream()));
  return t;
}

// Copies to the host and waits for the copy (synchronises the current stream).
template <class T>
Tensor<T> download(const DeviceTensor<T>& t) {
  static_assert(!is_reduced_float_v<T>, "download: use download_as<float> for __half / __nv_bfloat16 tensors");
  Tensor<T> host = empty<T>(t.shape());
  if (t.size() > 0) {
    MIXPEFT_CUDA_CHECK(
        cudaMemcpyAsync(host.data(), t.data(), t.size() * sizeof(T), cudaMemcpyDeviceToHost, current_stream()));
    synchronize();
  }
  return host;
}

// Uploads a host tensor of S and converts it on the device to D (upload_as<__nv_bfloat16>(float_tensor)).
template <class D, class S>
DeviceTensor<D> upload_as(const Tensor<S>& host) {
  if constexpr (std::is_same_v<D, S>) {
    return upload(host);
  } else {
    DeviceTensor<D> t;
    convert(upload(host), t);
    return t;
  }
}

// Converts on the device to D, then downloads (download_as<float>(bf16_tensor)).
template <class D, class S>
Tensor<D> download_as(const DeviceTensor<S>& t) {
  if constexpr (std::is_same_v<D, S>) {
    return download(t);
  } else {
    DeviceTensor<D> converted;
    convert(t, converted);
    return download(converted);
  }
}

}  // namespace mixpeft::cuda
