// mixpeft/cuda/error.cuh — CUDA runtime and cuBLASLt failures as typed errors.
//
// Every CUDA runtime or cuBLASLt call goes through a check macro; a failure throws cuda::CudaError
// (a mixpeft::Error) whose message names the call, the file and line, and the library's error name
// and text:
//   "cudaMalloc(&p, bytes) failed at .../memory.cuh:120: cudaErrorMemoryAllocation (out of memory)"
// Kernel launches are checked right after the launch with check_launch("op name"), which reports
// launch-configuration errors; faults inside a kernel surface at the next synchronising call.
// AlignmentError (a CudaError) reports a pointer that cuBLASLt or a vectorised kernel cannot take.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include "mixpeft/core/error.hpp"

namespace mixpeft::cuda {

class CudaError : public Error {
 public:
  using Error::Error;
};
class AlignmentError : public CudaError {
 public:
  using CudaError::CudaError;
};

namespace detail {

[[noreturn]] inline void throw_cuda_error(cudaError_t status, const char* call, const char* file, int line) {
  (void)cudaGetLastError();  // clear a non-sticky error so that the next check does not report it again
  throw CudaError(mixpeft::detail::concat(call, " failed at ", file, ":", line, ": ", cudaGetErrorName(status),
                                          " (", cudaGetErrorString(status), ")"));
}

[[noreturn]] inline void throw_cublas_error(cublasStatus_t status, const char* call, const char* file, int line) {
  throw CudaError(mixpeft::detail::concat(call, " failed at ", file, ":", line, ": ", cublasLtGetStatusName(status),
                                          " (", cublasLtGetStatusString(status), ")"));
}

}  // namespace detail

// After a kernel launch: throws CudaError naming `op` when the launch failed.
inline void check_launch(const char* op) {
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess)
    throw CudaError(mixpeft::detail::concat(op, ": kernel launch failed: ", cudaGetErrorName(status), " (",
                                            cudaGetErrorString(status), ")"));
}

}  // namespace mixpeft::cuda

#define MIXPEFT_CUDA_CHECK(call)                                                        \
  do {                                                                                  \
    const cudaError_t mixpeft_cuda_status_ = (call);                                    \
    if (mixpeft_cuda_status_ != cudaSuccess)                                            \
      ::mixpeft::cuda::detail::throw_cuda_error(mixpeft_cuda_status_, #call, __FILE__, __LINE__); \
  } while (0)

#define MIXPEFT_CUBLAS_CHECK(call)                                                      \
  do {                                                                                  \
    const cublasStatus_t mixpeft_cublas_status_ = (call);                               \
    if (mixpeft_cublas_status_ != CUBLAS_STATUS_SUCCESS)                                \
      ::mixpeft::cuda::detail::throw_cublas_error(mixpeft_cublas_status_, #call, __FILE__, __LINE__); \
  } while (0)
