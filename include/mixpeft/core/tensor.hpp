// mixpeft/core/tensor.hpp — CPU tensors: xtensor storage, Eigen views for GEMM.
//
// Tensor<T> is a row-major, dynamically ranked xt::xarray. Ops treat a tensor of shape [..., C] as a
// matrix of rows(t) = prod(leading extents) rows and cols(t) = C columns, and hand it to Eigen through
// a zero-copy row-major Eigen::Map (matrix_view). Element-wise loops run over t.data() directly.
//
// Shape checks name the op, the tensor and both shapes; `any_extent` is a wildcard:
//   expect_shape("linear", "x", x, {any_extent, 512});   // throws ShapeError on mismatch
#pragma once

#include <Eigen/Core>
#include <xtensor/xarray.hpp>

#include <array>
#include <cstddef>
#include <initializer_list>
#include <limits>
#include <new>
#include <numeric>
#include <ostream>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "mixpeft/core/error.hpp"

namespace mixpeft {

// Storage is 64-byte aligned (a cache line, an AVX-512 vector): Eigen then takes the same vectorised path
// through every buffer, so results do not depend on where malloc happened to put them, and a resumed run
// repeats an uninterrupted one bit for bit.
template <class T>
struct AlignedAllocator {
  using value_type = T;
  static constexpr std::align_val_t alignment{64};
  AlignedAllocator() noexcept = default;
  template <class U>
  AlignedAllocator(const AlignedAllocator<U>&) noexcept {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), alignment)); }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, alignment); }
  template <class U>
  struct rebind {
    using other = AlignedAllocator<U>;
  };
  friend bool operator==(const AlignedAllocator&, const AlignedAllocator&) noexcept { return true; }
};

template <class T>
using Tensor = xt::xarray<T, xt::layout_type::row_major, AlignedAllocator<T>>;

using Shape = std::vector<std::size_t>;

template <class T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using MatrixView = Eigen::Map<RowMatrix<T>>;
template <class T>
using ConstMatrixView = Eigen::Map<const RowMatrix<T>>;

inline constexpr std::size_t any_extent = std::numeric_limits<std::size_t>::max();

// A shape captured for an error message, formatted only when streamed ("[4, *, 512]"). Checks on hot paths pass
// shape_string(...) to require(), which builds its message only on failure: capturing costs no allocation.
class ShapeText {
 public:
  template <class S>
  explicit ShapeText(const S& shape) {
    for (auto e : shape) {
      if (rank_ < extents_.size()) extents_[rank_] = static_cast<std::size_t>(e);
      ++rank_;
    }
  }
  friend std::ostream& operator<<(std::ostream& os, const ShapeText& s) {
    os << '[';
    for (std::size_t i = 0; i < s.rank_; ++i) {
      if (i) os << ", ";
      if (i == s.extents_.size()) {
        os << "...";
        break;
      }
      if (s.extents_[i] == any_extent) os << '*';
      else os << s.extents_[i];
    }
    return os << ']';
  }
  std::string str() const {
    std::ostringstream os;
    os << *this;
    return os.str();
  }
  operator std::string() const { return str(); }

 private:
  std::array<std::size_t, 8> extents_{};
  std::size_t rank_ = 0;
};

template <class S>
ShapeText shape_string(const S& shape) {
  return ShapeText(shape);
}
template <class E>
ShapeText shape_string(std::initializer_list<E> shape) {
  return ShapeText(shape);
}

template <class T>
Shape shape_of(const Tensor<T>& t) {
  return Shape(t.shape().begin(), t.shape().end());
}

// Number of rows when the last axis is the feature axis (1 for a rank-1 tensor).
template <class T>
std::size_t rows(const Tensor<T>& t) {
  if (t.dimension() == 0) return 1;
  return t.size() / t.shape().back();
}
template <class T>
std::size_t cols(const Tensor<T>& t) {
  return t.dimension() == 0 ? 1 : t.shape().back();
}

template <class T>
MatrixView<T> matrix_view(Tensor<T>& t) {
  return MatrixView<T>(t.data(), Eigen::Index(rows(t)), Eigen::Index(cols(t)));
}
template <class T>
ConstMatrixView<T> matrix_view(const Tensor<T>& t) {
  return ConstMatrixView<T>(t.data(), Eigen::Index(rows(t)), Eigen::Index(cols(t)));
}
// A rows x cols view of contiguous storage (rows * cols must not exceed what p points to).
template <class T>
MatrixView<T> matrix_view(T* p, std::size_t r, std::size_t c) {
  return MatrixView<T>(p, Eigen::Index(r), Eigen::Index(c));
}
template <class T>
ConstMatrixView<T> matrix_view(const T* p, std::size_t r, std::size_t c) {
  return ConstMatrixView<T>(p, Eigen::Index(r), Eigen::Index(c));
}

// Uninitialised tensor of the given shape.
template <class T>
Tensor<T> empty(const Shape& shape) {
  Tensor<T> t;
  t.resize(shape);
  return t;
}
template <class T>
Tensor<T> zeros(const Shape& shape) {
  Tensor<T> t = empty<T>(shape);
  t.fill(T(0));
  return t;
}

// Resizes `t` to `shape` unless it already has it (keeps the buffer when reused across steps).
template <class T>
void resize_to(Tensor<T>& t, const Shape& shape) {
  if (t.dimension() != shape.size() || !std::equal(shape.begin(), shape.end(), t.shape().begin()))
    t.resize(shape);
}

// dst = src, a copy that gives dst src's shape. Backend-generic code copies with assign() rather than `=`:
// cuda::DeviceTensor is move-only and has the same function (cuda/device_tensor.cuh).
template <class T>
void assign(Tensor<T>& dst, const Tensor<T>& src) {
  if (&dst != &src) dst = src;
}

// `shape` with its last extent replaced.
inline Shape with_last(Shape shape, std::size_t last) {
  if (shape.empty()) shape.push_back(last);
  else shape.back() = last;
  return shape;
}

template <class T>
bool has_shape(const Tensor<T>& t, std::initializer_list<std::size_t> expected) {
  if (t.dimension() != expected.size()) return false;
  std::size_t i = 0;
  for (auto e : expected) {
    if (e != any_extent && t.shape()[i] != e) return false;
    ++i;
  }
  return true;
}

template <class T>
void expect_shape(std::string_view op, std::string_view name, const Tensor<T>& t,
                  std::initializer_list<std::size_t> expected) {
  if (!has_shape(t, expected))
    throw ShapeError(detail::concat(op, ": ", name, " has shape ", shape_string(t.shape()), ", expected ",
                                    shape_string(expected)));
}

// Checks that a tensor's last axis has `width` entries (any rank >= 1).
template <class T>
void expect_width(std::string_view op, std::string_view name, const Tensor<T>& t, std::size_t width) {
  if (t.dimension() < 1 || t.shape().back() != width)
    throw ShapeError(detail::concat(op, ": ", name, " has shape ", shape_string(t.shape()), ", expected [..., ", width,
                                    "]"));
}

template <class T, class U>
void expect_same_shape(std::string_view op, std::string_view name_a, const Tensor<T>& a,
                       std::string_view name_b, const Tensor<U>& b) {
  if (a.dimension() != b.dimension() || !std::equal(a.shape().begin(), a.shape().end(), b.shape().begin()))
    throw ShapeError(detail::concat(op, ": ", name_a, " has shape ", shape_string(a.shape()), " but ", name_b,
                                    " has shape ", shape_string(b.shape())));
}

}  // namespace mixpeft
