// mixpeft/cuda/memory.cuh — devices, streams and the caching device allocator.
//
// Streams: every op runs on current_stream(): the stream a StreamGuard installed on this thread, otherwise
// the device's default stream (one non-blocking stream per device, created on first use and kept for the life
// of the process). Ops enqueue work and return; only calls that must hand a value to the host (download, a
// loss) synchronise, and they synchronise the current stream only.
//
// Allocator: cudaMalloc and cudaFree synchronise the device and cost tens of microseconds, so device memory
// is cached. A request is rounded up to a size class (multiples of 512 B up to 1 MiB, of 2 MiB above) and
// served from the free list of its (device, stream) by best fit within 25% of the class, else by cudaMalloc.
// A freed block returns to the free list of the stream it was allocated on: work on that stream is ordered,
// so the next user of the block runs after every earlier kernel that touched it. A block used on another
// stream must be synchronised by the caller before it is freed. When cudaMalloc fails, the cached blocks of
// the device are released and the call is retried once before CudaError is thrown. release_cached() returns
// every cached block to the driver. Plain cudaMalloc only: no managed memory. All members are thread-safe.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <utility>
#include <vector>

#include "mixpeft/cuda/error.cuh"

namespace mixpeft::cuda {

// True when a CUDA device can be used (false without a driver, without a device, or with a broken install).
inline bool device_available() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return count > 0;
}

inline int current_device() {
  int device = 0;
  MIXPEFT_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

namespace detail {

// Per-device values computed once (default stream, multiprocessor count), guarded by one mutex.
struct DeviceRegistry {
  std::mutex mutex;
  std::map<int, cudaStream_t> streams;
  std::map<int, int> sm_counts;
  std::map<int, int> compute_majors;

  static DeviceRegistry& instance() {
    static DeviceRegistry registry;
    return registry;
  }
};

inline std::optional<cudaStream_t>& thread_stream() {
  thread_local std::optional<cudaStream_t> stream;
  return stream;
}

}  // namespace detail

// The default stream of the current device (created on first use, never destroyed).
inline cudaStream_t default_stream() {
  const int device = current_device();
  auto& registry = detail::DeviceRegistry::instance();
  std::lock_guard lock(registry.mutex);
  auto it = registry.streams.find(device);
  if (it == registry.streams.end()) {
    cudaStream_t stream = nullptr;
    MIXPEFT_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    it = registry.streams.emplace(device, stream).first;
  }
  return it->second;
}

// The stream ops launch on: this thread's StreamGuard stream, else the device's default stream.
inline cudaStream_t current_stream() {
  const auto& stream = detail::thread_stream();
  return stream ? *stream : default_stream();
}

// Routes this thread's ops to `stream` until the guard goes out of scope (guards nest).
class StreamGuard {
 public:
  explicit StreamGuard(cudaStream_t stream) : saved_(detail::thread_stream()) { detail::thread_stream() = stream; }
  ~StreamGuard() { detail::thread_stream() = saved_; }
  StreamGuard(const StreamGuard&) = delete;
  StreamGuard& operator=(const StreamGuard&) = delete;

 private:
  std::optional<cudaStream_t> saved_;
};

namespace detail {

// An attribute of the current device, read once per device and kept in `cache` (a map of the registry).
inline int cached_device_attribute(std::map<int, int> DeviceRegistry::*cache, cudaDeviceAttr attribute) {
  const int device = current_device();
  auto& registry = DeviceRegistry::instance();
  std::lock_guard lock(registry.mutex);
  auto& values = registry.*cache;
  auto it = values.find(device);
  if (it == values.end()) {
    int value = 0;
    MIXPEFT_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
    it = values.emplace(device, value).first;
  }
  return it->second;
}

}  // namespace detail

// Multiprocessor count of the current device (sizes grid-stride launches).
inline int sm_count() {
  return detail::cached_device_attribute(&detail::DeviceRegistry::sm_counts, cudaDevAttrMultiProcessorCount);
}

// Major compute capability of the current device (9 on Hopper), for choosing kernels by architecture.
inline int compute_capability_major() {
  return detail::cached_device_attribute(&detail::DeviceRegistry::compute_majors, cudaDevAttrComputeCapabilityMajor);
}

inline void synchronize(cudaStream_t stream = current_stream()) { MIXPEFT_CUDA_CHECK(cudaStreamSynchronize(stream)); }

struct PoolStats {
  std::size_t live_bytes = 0;    // handed out and not yet freed (size-class bytes)
  std::size_t cached_bytes = 0;  // freed and kept for reuse
  std::size_t mallocs = 0;       // cudaMalloc calls made
  std::size_t reuses = 0;        // requests served from a free list
};

class DeviceAllocator {
 public:
  DeviceAllocator() = default;
  DeviceAllocator(const DeviceAllocator&) = delete;
  DeviceAllocator& operator=(const DeviceAllocator&) = delete;
  ~DeviceAllocator() {
    // At process exit the driver may already be shutting down: failures are ignored here.
    for (auto& [key, list] : free_)
      for (auto& [bytes, ptr] : list) (void)cudaFree(ptr);
  }

  static constexpr std::size_t small_granule = 512;
  static constexpr std::size_t small_limit = std::size_t(1) << 20;
  static constexpr std::size_t large_granule = std::size_t(2) << 20;

  static std::size_t size_class(std::size_t bytes) {
    const std::size_t g = bytes <= small_limit ? small_granule : large_granule;
    return (bytes + g - 1) / g * g;
  }

  // `bytes` of device memory on the current device, for use on `stream`; nullptr when bytes == 0.
  void* allocate(std::size_t bytes, cudaStream_t stream) {
    if (bytes == 0) return nullptr;
    const std::size_t cls = size_class(bytes);
    const int device = current_device();
    std::lock_guard lock(mutex_);
    auto& list = free_[{device, stream}];
    if (auto it = list.lower_bound(cls); it != list.end() && it->first <= cls + cls / 4) {
      void* ptr = it->second;
      const std::size_t block = it->first;
      list.erase(it);
      stats_.cached_bytes -= block;
      stats_.live_bytes += block;
      ++stats_.reuses;
      live_.emplace(ptr, Block{block, device, stream});
      return ptr;
    }
    void* ptr = nullptr;
    cudaError_t status = cudaMalloc(&ptr, cls);
    if (status == cudaErrorMemoryAllocation) {
      (void)cudaGetLastError();
      release_device_locked(device);
      status = cudaMalloc(&ptr, cls);
    }
    if (status != cudaSuccess) {
      (void)cudaGetLastError();
      throw CudaError(mixpeft::detail::concat("cudaMalloc of ", cls, " bytes (", bytes, " requested) on device ",
                                              device, " failed: ", cudaGetErrorName(status), " (",
                                              cudaGetErrorString(status), "); the pool holds ", stats_.live_bytes,
                                              " live bytes"));
    }
    ++stats_.mallocs;
    stats_.live_bytes += cls;
    live_.emplace(ptr, Block{cls, device, stream});
    return ptr;
  }

  // Returns a block from allocate() to its stream's free list; nullptr is ignored.
  void deallocate(void* ptr) {
    if (!ptr) return;
    std::lock_guard lock(mutex_);
    const auto it = live_.find(ptr);
    require<CudaError>(it != live_.end(), "DeviceAllocator: deallocate of a pointer it did not allocate");
    const Block block = it->second;
    live_.erase(it);
    free_[{block.device, block.stream}].emplace(block.bytes, ptr);
    stats_.live_bytes -= block.bytes;
    stats_.cached_bytes += block.bytes;
  }

  // cudaFree every cached block on every device (live blocks are untouched).
  void release_cached() {
    std::lock_guard lock(mutex_);
    std::vector<int> devices;
    for (const auto& [key, list] : free_) devices.push_back(key.first);
    for (int device : devices) release_device_locked(device);
  }

  PoolStats stats() const {
    std::lock_guard lock(mutex_);
    return stats_;
  }

 private:
  struct Block {
    std::size_t bytes;
    int device;
    cudaStream_t stream;
  };
  using Key = std::pair<int, cudaStream_t>;

  void release_device_locked(int device) {
    const int saved = current_device();
    MIXPEFT_CUDA_CHECK(cudaSetDevice(device));
    for (auto it = free_.begin(); it != free_.end();) {
      if (it->first.first != device) {
        ++it;
        continue;
      }
      for (auto& [bytes, ptr] : it->second) {
        MIXPEFT_CUDA_CHECK(cudaFree(ptr));
        stats_.cached_bytes -= bytes;
      }
      it = free_.erase(it);
    }
    MIXPEFT_CUDA_CHECK(cudaSetDevice(saved));
  }

  mutable std::mutex mutex_;
  std::unordered_map<void*, Block> live_;
  std::map<Key, std::multimap<std::size_t, void*>> free_;
  PoolStats stats_;
};

// The process-wide allocator.
inline DeviceAllocator& allocator() {
  static DeviceAllocator pool;
  return pool;
}

}  // namespace mixpeft::cuda
