// mixpeft/cuda/matmul.cuh — GEMM on row-major device matrices through cuBLASLt, and the linear op.
//
//   matmul:           C[M, N] = alpha * op(A) op(B) + beta * C  (+ epilogue), optionally strided-batched
//   gemm:             the same on whole DeviceTensors, argument order of ops/matmul.hpp
//   linear_forward:   y[..., out] = x[..., in] W[out, in]^T (+ b[out])         (bias fused as an epilogue)
//   linear_backward:  dx[..., in] = dy W                                        (written;     skipped when null)
//                     dW[out, in] += dy^T x                                     (accumulated; skipped when null)
//                     db[out]     += sum_rows dy                                (accumulated; skipped when null)
// Caches nothing: backward needs x and W.
//
// Row-major through column-major cuBLASLt: a row-major [R, C] matrix with leading dimension ld is the
// column-major [C, R] matrix with the same ld, i.e. its transpose. So C = op(A) op(B) is computed as
// C^T = op(B)^T op(A)^T: cuBLASLt's A is our B, its B is our A, its M is our N and its N our M; no data moves.
//
// Types: A and B share TA; C is TA, or float when TA is __half / __nv_bfloat16 (fp32 output of low-precision
// inputs). Compute is CUBLAS_COMPUTE_32F with float alpha / beta (full fp32, no TF32), and CUBLAS_COMPUTE_64F
// for double.
// Epilogues (batch == 1 only), in row-major terms:
//   Bias       C[i, j] += bias[j]                 (bias [N])               cuBLASLt BIAS
//   BiasGradA  bias_grad[i] = sum_k op(A)[i, k]   (bias_grad [M], written) cuBLASLt BGRADB (A is its B)
//   BiasGradB  bias_grad[j] = sum_k op(B)[k, j]   (bias_grad [N], written) cuBLASLt BGRADA
// The bias-gradient epilogues need alpha = 1 (the sums are of the unscaled operand).
// When cuBLASLt cannot fuse the epilogue for a problem (no algorithm, or it rejects the epilogue for these
// types), the plain GEMM runs and a kernel applies the epilogue afterwards; the result is the same either way. (GELU epilogues are not used: the
// models' activations are SiLU and QuickGELU, which cuBLASLt does not provide.)
// Plans: the matmul descriptor, the three layouts and the heuristic's algorithm are built once per
// (shape, leading dimensions, batch strides, types, transposes, epilogue, operand alignments) and device,
// and cached; the alignment preferences given to the heuristic are the largest powers of two dividing each
// operand's base address, row pitch and batch stride. Each (device, stream) gets a 32 MiB workspace
// (cuBLAS's recommendation for Hopper).
// Every base pointer must be 16-byte aligned (AlignmentError otherwise); the pool's buffers always are, an
// offset into one is when the offset is a multiple of 16 bytes.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string_view>
#include <type_traits>

#include "mixpeft/core/error.hpp"
#include "mixpeft/core/tensor.hpp"
#include "mixpeft/cuda/device_tensor.cuh"
#include "mixpeft/cuda/elementwise.cuh"
#include "mixpeft/cuda/error.cuh"
#include "mixpeft/cuda/kernel_utils.cuh"
#include "mixpeft/cuda/memory.cuh"
#include "mixpeft/cuda/reduce.cuh"
#include "mixpeft/ops/matmul.hpp"

namespace mixpeft::cuda {

enum class Epilogue { None, Bias, BiasGradA, BiasGradB };

// One (strided-batched) GEMM on row-major matrices. Entry b of a batch starts stride_* elements after entry b-1.
template <class TA, class TC = TA>
struct MatmulCall {
  Trans ta = Trans::No;
  Trans tb = Trans::No;
  std::size_t m = 0, n = 0, k = 0;
  double alpha = 1.0;
  const TA* a = nullptr;  // [M, K] (ta = No) or [K, M] (ta = Yes), row-major with leading dimension lda
  std::size_t lda = 0;
  std::int64_t stride_a = 0;
  const TA* b = nullptr;  // [K, N] (tb = No) or [N, K] (tb = Yes), leading dimension ldb
  std::size_t ldb = 0;
  std::int64_t stride_b = 0;
  double beta = 0.0;
  TC* c = nullptr;  // [M, N], leading dimension ldc
  std::size_t ldc = 0;
  std::int64_t stride_c = 0;
  std::size_t batch = 1;
  Epilogue epilogue = Epilogue::None;
  const TC* bias = nullptr;  // Bias: [N]
  TC* bias_grad = nullptr;   // BiasGradA: [M], BiasGradB: [N]
};

namespace detail {

inline constexpr std::size_t lt_workspace_bytes = std::size_t(32) << 20;

template <class T>
constexpr cudaDataType_t cuda_data_type() {
  if constexpr (std::is_same_v<T, float>) return CUDA_R_32F;
  else if constexpr (std::is_same_v<T, double>) return CUDA_R_64F;
  else if constexpr (std::is_same_v<T, __half>) return CUDA_R_16F;
  else {
    static_assert(std::is_same_v<T, __nv_bfloat16>, "matmul: element type must be float, double, __half or bf16");
    return CUDA_R_16BF;
  }
}

// The alignment cuBLASLt may assume for an operand: the largest power of two <= 256 dividing the base
// address, the row pitch ld and (in a batch) the batch stride, all in bytes. Conservative by construction:
// every row of every batch entry starts at a multiple of it.
template <class T>
std::uint32_t operand_alignment(const T* p, std::size_t ld, std::int64_t stride, std::size_t batch) {
  std::uint64_t bits = reinterpret_cast<std::uintptr_t>(p) | (ld * sizeof(T));
  if (batch > 1) bits |= std::uint64_t(stride) * sizeof(T);
  std::uint32_t alignment = 256;
  while (alignment > 1 && bits % alignment != 0) alignment /= 2;
  return alignment;
}

// Descriptors and the chosen algorithm for one problem.
struct LtPlan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool fused_epilogue = false;

  LtPlan() = default;
  LtPlan(const LtPlan&) = delete;
  LtPlan& operator=(const LtPlan&) = delete;
  ~LtPlan() {
    if (c) (void)cublasLtMatrixLayoutDestroy(c);
    if (b) (void)cublasLtMatrixLayoutDestroy(b);
    if (a) (void)cublasLtMatrixLayoutDestroy(a);
    if (desc) (void)cublasLtMatmulDescDestroy(desc);
  }
};

using LtKey = std::array<std::int64_t, 18>;

// One per device: the cuBLASLt handle, a workspace per stream and the plan cache. Callers hold `mutex`
// while they look up a plan and enqueue the matmul (the bias pointer lives in the shared descriptor).
struct LtContext {
  std::mutex mutex;
  cublasLtHandle_t handle = nullptr;
  std::map<cudaStream_t, void*> workspaces;
  std::map<LtKey, std::unique_ptr<LtPlan>> plans;

  LtContext() { MIXPEFT_CUBLAS_CHECK(cublasLtCreate(&handle)); }
  LtContext(const LtContext&) = delete;
  LtContext& operator=(const LtContext&) = delete;
  ~LtContext() {
    plans.clear();
    for (auto& [stream, ptr] : workspaces) (void)cudaFree(ptr);
    (void)cublasLtDestroy(handle);
  }

  void* workspace(cudaStream_t stream) {
    auto it = workspaces.find(stream);
    if (it == workspaces.end()) {
      void* ptr = nullptr;
      MIXPEFT_CUDA_CHECK(cudaMalloc(&ptr, lt_workspace_bytes));
      it = workspaces.emplace(stream, ptr).first;
    }
    return it->second;
  }
};

inline LtContext& lt_context() {
  static std::mutex mutex;
  static std::map<int, std::unique_ptr<LtContext>> contexts;
  const int device = current_device();
  std::lock_guard lock(mutex);
  auto& context = contexts[device];
  if (!context) context = std::make_unique<LtContext>();
  return *context;
}

template <class T>
void set_attribute(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attribute, const T& value) {
  MIXPEFT_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, attribute, &value, sizeof(value)));
}
template <class T>
void set_attribute(cublasLtMatrixLayout_t layout, cublasLtMatrixLayoutAttribute_t attribute, const T& value) {
  MIXPEFT_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout, attribute, &value, sizeof(value)));
}
template <class T>
void set_attribute(cublasLtMatmulPreference_t pref, cublasLtMatmulPreferenceAttributes_t attribute, const T& value) {
  MIXPEFT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attribute, &value, sizeof(value)));
}

inline cublasLtEpilogue_t lt_epilogue(Epilogue e) {
  switch (e) {
    case Epilogue::Bias: return CUBLASLT_EPILOGUE_BIAS;
    case Epilogue::BiasGradA: return CUBLASLT_EPILOGUE_BGRADB;  // our A is cuBLASLt's B
    case Epilogue::BiasGradB: return CUBLASLT_EPILOGUE_BGRADA;
    case Epilogue::None: break;
  }
  return CUBLASLT_EPILOGUE_DEFAULT;
}

template <class TA, class TC>
std::array<std::uint32_t, 3> alignments(const MatmulCall<TA, TC>& call) {
  return {operand_alignment(call.a, call.lda, call.stride_a, call.batch),
          operand_alignment(call.b, call.ldb, call.stride_b, call.batch),
          operand_alignment(call.c, call.ldc, call.stride_c, call.batch)};
}

// Builds the plan for `call` with (fuse = true) or without its epilogue; nullptr when cuBLASLt has no algorithm.
template <class TA, class TC>
std::unique_ptr<LtPlan> build_plan(cublasLtHandle_t handle, const MatmulCall<TA, TC>& call, bool fuse) {
  constexpr bool is_double = std::is_same_v<TA, double>;
  const cublasComputeType_t compute = is_double ? CUBLAS_COMPUTE_64F : CUBLAS_COMPUTE_32F;
  const cudaDataType_t scale_type = is_double ? CUDA_R_64F : CUDA_R_32F;
  auto plan = std::make_unique<LtPlan>();
  MIXPEFT_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan->desc, compute, scale_type));
  // cuBLASLt computes C^T = op(B)^T op(A)^T: its A is our B (transposed as tb says), its B is our A.
  const cublasOperation_t lt_ta = call.tb == Trans::Yes ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t lt_tb = call.ta == Trans::Yes ? CUBLAS_OP_T : CUBLAS_OP_N;
  set_attribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, lt_ta);
  set_attribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, lt_tb);
  if (fuse && call.epilogue != Epilogue::None) {
    set_attribute(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, lt_epilogue(call.epilogue));
    set_attribute(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, std::int32_t(cuda_data_type<TC>()));
    const void* bias = call.epilogue == Epilogue::Bias ? static_cast<const void*>(call.bias) : call.bias_grad;
    set_attribute(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias);
    plan->fused_epilogue = true;
  }
  // Column-major shapes (rows, cols) of cuBLASLt's A = our B, B = our A, and C = our C^T.
  const auto n = std::uint64_t(call.n), m = std::uint64_t(call.m), k = std::uint64_t(call.k);
  const bool b_plain = call.tb == Trans::No, a_plain = call.ta == Trans::No;
  MIXPEFT_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->a, cuda_data_type<TA>(), b_plain ? n : k, b_plain ? k : n,
                                                  std::int64_t(call.ldb)));
  MIXPEFT_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->b, cuda_data_type<TA>(), a_plain ? k : m, a_plain ? m : k,
                                                  std::int64_t(call.lda)));
  MIXPEFT_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->c, cuda_data_type<TC>(), n, m, std::int64_t(call.ldc)));
  if (call.batch > 1) {
    const auto count = std::int32_t(call.batch);
    for (auto* layout : {plan->a, plan->b, plan->c}) set_attribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, count);
    set_attribute(plan->a, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, call.stride_b);
    set_attribute(plan->b, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, call.stride_a);
    set_attribute(plan->c, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, call.stride_c);
  }

  cublasLtMatmulPreference_t pref = nullptr;
  MIXPEFT_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  cublasStatus_t status = CUBLAS_STATUS_SUCCESS;
  try {
    set_attribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, std::uint64_t(lt_workspace_bytes));
    const auto [align_a, align_b, align_c] = alignments(call);
    set_attribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_b);  // cuBLASLt's A is our B
    set_attribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_a);
    set_attribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_c);
    set_attribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_c);
    status = cublasLtMatmulAlgoGetHeuristic(handle, plan->desc, plan->a, plan->b, plan->c, plan->c, pref, 1, &result,
                                            &found);
  } catch (...) {
    (void)cublasLtMatmulPreferenceDestroy(pref);
    throw;
  }
  (void)cublasLtMatmulPreferenceDestroy(pref);
  if (status == CUBLAS_STATUS_NOT_SUPPORTED || (status == CUBLAS_STATUS_SUCCESS && found == 0)) return nullptr;
  MIXPEFT_CUBLAS_CHECK(status);
  plan->algo = result.algo;
  return plan;
}

template <class TA, class TC>
LtKey plan_key(const MatmulCall<TA, TC>& call) {
  const auto align = alignments(call);
  return {std::int64_t(call.ta), std::int64_t(call.tb), std::int64_t(call.m), std::int64_t(call.n),
          std::int64_t(call.k), std::int64_t(call.lda), std::int64_t(call.ldb), std::int64_t(call.ldc),
          call.stride_a, call.stride_b, call.stride_c, std::int64_t(call.batch),
          std::int64_t(cuda_data_type<TA>()), std::int64_t(cuda_data_type<TC>()), std::int64_t(call.epilogue),
          std::int64_t(align[0]), std::int64_t(align[1]), std::int64_t(align[2])};
}

// Runs the GEMM through cuBLASLt; returns whether the epilogue was fused. A fused plan that cuBLASLt refuses
// (no algorithm, an attribute it rejects for these types, or a failing launch check) is replaced by the plain
// plan, and the caller then applies the epilogue itself.
template <class TA, class TC>
bool run_lt(const MatmulCall<TA, TC>& call) {
  LtContext& context = lt_context();
  const cudaStream_t stream = current_stream();
  const LtKey key = plan_key(call);
  std::lock_guard lock(context.mutex);
  auto& plan = context.plans[key];
  const auto plain_plan = [&] {
    auto fresh = build_plan(context.handle, call, false);
    if (!fresh) {
      context.plans.erase(key);
      throw CudaError(mixpeft::detail::concat("matmul: cuBLASLt has no algorithm for M = ", call.m, ", N = ", call.n,
                                              ", K = ", call.k, ", batch = ", call.batch, " (lda ", call.lda, ", ldb ",
                                              call.ldb, ", ldc ", call.ldc, ")"));
    }
    return fresh;
  };
  if (!plan && call.epilogue != Epilogue::None) {
    try {
      plan = build_plan(context.handle, call, true);
    } catch (const CudaError&) {
      plan = nullptr;  // this problem has no fused epilogue: the plain plan below serves it
    }
  }
  if (!plan) plan = plain_plan();
  using Scale = std::conditional_t<std::is_same_v<TA, double>, double, float>;
  const Scale alpha = Scale(call.alpha), beta = Scale(call.beta);
  const auto launch = [&] {
    if (plan->fused_epilogue) {
      const void* bias = call.epilogue == Epilogue::Bias ? static_cast<const void*>(call.bias) : call.bias_grad;
      set_attribute(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias);
    }
    return cublasLtMatmul(context.handle, plan->desc, &alpha, call.b, plan->a, call.a, plan->b, &beta, call.c, plan->c,
                          call.c, plan->c, &plan->algo, context.workspace(stream), lt_workspace_bytes, stream);
  };
  cublasStatus_t status = launch();
  if (status != CUBLAS_STATUS_SUCCESS && plan->fused_epilogue) {
    plan = plain_plan();
    status = launch();
  }
  if (status != CUBLAS_STATUS_SUCCESS) throw_cublas_error(status, "cublasLtMatmul", __FILE__, __LINE__);
  return plan->fused_epilogue;
}

// C = beta * C (+ bias) for K = 0, where the product is empty.
template <class TC>
__global__ void scale_matrix_kernel(TC* c, std::size_t m, std::size_t n, std::size_t ldc, std::int64_t stride,
                                    std::size_t batch, acc_t<TC> beta) {
  const std::size_t total = batch * m * n;
  for (std::size_t e = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; e < total;
       e += std::size_t(gridDim.x) * blockDim.x) {
    const std::size_t j = e % n, i = (e / n) % m, b = e / (m * n);
    TC& v = c[std::int64_t(b) * stride + std::int64_t(i * ldc + j)];
    v = beta == acc_t<TC>(0) ? narrow<TC>(acc_t<TC>(0)) : narrow<TC>(beta * widen(v));
  }
}

template <class TC>
__global__ void add_bias_kernel(TC* c, std::size_t m, std::size_t n, std::size_t ldc, const TC* bias) {
  for (std::size_t e = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; e < m * n;
       e += std::size_t(gridDim.x) * blockDim.x) {
    const std::size_t j = e % n, i = e / n;
    c[i * ldc + j] = narrow<TC>(widen(c[i * ldc + j]) + widen(bias[j]));
  }
}

template <class TIn, class TOut>
struct MatrixEntry {
  const TIn* m;
  std::size_t ld;
  __device__ acc_t<TOut> operator()(std::size_t r, std::size_t c) const { return acc_t<TOut>(widen(m[r * ld + c])); }
};

// dst = sums over K of op(X), X stored row-major as [outer, K] (transposed = false) or [K, outer].
template <class TIn, class TOut>
void sum_over_k(const TIn* x, std::size_t ld, std::size_t outer, std::size_t k, bool transposed, TOut* dst) {
  if (outer == 0) return;
  if (transposed) {
    MIXPEFT_CUDA_CHECK(cudaMemsetAsync(dst, 0, outer * sizeof(TOut), current_stream()));
    column_sum_accumulate("matmul bias gradient", k, outer, MatrixEntry<TIn, TOut>{x, ld}, dst);
  } else if (k == 0) {
    MIXPEFT_CUDA_CHECK(cudaMemsetAsync(dst, 0, outer * sizeof(TOut), current_stream()));
  } else {
    row_sum("matmul bias gradient", x, outer, k, ld, dst);
  }
}

template <class TA, class TC>
void validate(const MatmulCall<TA, TC>& call) {
  constexpr std::string_view op = "matmul";
  static_assert(std::is_same_v<TA, TC> || (is_reduced_float_v<TA> && std::is_same_v<TC, float>),
                "matmul: C must have A's type, or be float for __half / __nv_bfloat16 inputs");
  const std::size_t a_cols = call.ta == Trans::No ? call.k : call.m;
  const std::size_t b_cols = call.tb == Trans::No ? call.n : call.k;
  require<ShapeError>(call.lda >= std::max<std::size_t>(a_cols, 1) && call.ldb >= std::max<std::size_t>(b_cols, 1) &&
                          call.ldc >= std::max<std::size_t>(call.n, 1),
                      op, ": leading dimensions lda = ", call.lda, ", ldb = ", call.ldb, ", ldc = ", call.ldc,
                      " are smaller than the rows they hold (", a_cols, ", ", b_cols, ", ", call.n, ")");
  const bool c_used = call.m > 0 && call.n > 0 && call.batch > 0;
  require<ConfigError>((call.c != nullptr || !c_used) && (call.a != nullptr || call.m * call.k == 0) &&
                           (call.b != nullptr || call.k * call.n == 0),
                       op, ": null pointer for a non-empty matrix");
  require<ConfigError>(call.c == nullptr || (static_cast<const void*>(call.c) != static_cast<const void*>(call.a) &&
                                             static_cast<const void*>(call.c) != static_cast<const void*>(call.b)),
                       op, ": C must not alias A or B");
  const auto check_alignment = [&](const char* name, const void* p) {
    require<AlignmentError>(p == nullptr || is_aligned(p, 16), op, ": ", name, " (", p,
                            ") is not 16-byte aligned; cuBLASLt needs 16-byte aligned matrices (offsets into a "
                            "tensor must be multiples of 16 bytes)");
  };
  check_alignment("A", call.a);
  check_alignment("B", call.b);
  check_alignment("C", call.c);
  check_alignment("bias", call.epilogue == Epilogue::Bias ? static_cast<const void*>(call.bias) : call.bias_grad);
  require<ConfigError>(call.epilogue == Epilogue::None || call.batch == 1, op,
                       ": epilogues need batch = 1 (got ", call.batch, ")");
  require<ConfigError>(call.epilogue != Epilogue::Bias || call.bias != nullptr || call.n == 0, op,
                       ": Bias epilogue without bias");
  const bool bias_grad = call.epilogue == Epilogue::BiasGradA || call.epilogue == Epilogue::BiasGradB;
  const std::size_t bias_grad_size = call.epilogue == Epilogue::BiasGradA ? call.m : call.n;
  require<ConfigError>(!bias_grad || call.bias_grad != nullptr || bias_grad_size == 0, op,
                       ": bias-gradient epilogue without bias_grad");
  require<ConfigError>(!bias_grad || call.alpha == 1.0, op, ": bias-gradient epilogues need alpha = 1 (got ",
                       call.alpha, ")");
  require<ConfigError>(call.batch <= std::size_t(INT32_MAX), op, ": batch ", call.batch, " is too large");
}

}  // namespace detail

template <class TA, class TC>
void matmul(const MatmulCall<TA, TC>& call) {
  detail::validate(call);
  const bool nonempty = call.m > 0 && call.n > 0 && call.batch > 0;
  bool fused = false;
  if (nonempty && call.k > 0) {
    fused = detail::run_lt(call);
  } else if (nonempty) {
    constexpr unsigned block = 256;
    detail::scale_matrix_kernel<<<grid_size(call.batch * call.m * call.n, block), block, 0, current_stream()>>>(
        call.c, call.m, call.n, call.ldc, call.stride_c, call.batch, acc_t<TC>(call.beta));
    check_launch("matmul (K = 0)");
  }
  if (fused) return;
  switch (call.epilogue) {
    case Epilogue::None: break;
    case Epilogue::Bias:
      if (nonempty) {
        constexpr unsigned block = 256;
        detail::add_bias_kernel<<<grid_size(call.m * call.n, block), block, 0, current_stream()>>>(
            call.c, call.m, call.n, call.ldc, call.bias);
        check_launch("matmul bias epilogue");
      }
      break;
    case Epilogue::BiasGradA:
      detail::sum_over_k(call.a, call.lda, call.m, call.k, call.ta == Trans::Yes, call.bias_grad);
      break;
    case Epilogue::BiasGradB:
      detail::sum_over_k(call.b, call.ldb, call.n, call.k, call.tb == Trans::No, call.bias_grad);
      break;
  }
}

// ---- the ops/matmul.hpp interface on DeviceTensors ------------------------------------------------


// C[m, n] = alpha * op(A) op(B) + beta * C on whole tensors holding exactly m*k, k*n and m*n elements.
template <class T>
void gemm(Trans ta, Trans tb, std::size_t m, std::size_t n, std::size_t k, std::type_identity_t<T> alpha,
          const DeviceTensor<T>& a, const DeviceTensor<T>& b, std::type_identity_t<T> beta, DeviceTensor<T>& c) {
  mixpeft::detail::expect_gemm_sizes(a, b, c, m, n, k);
  matmul(MatmulCall<T>{.ta = ta, .tb = tb, .m = m, .n = n, .k = k, .alpha = double(widen(alpha)),
                       .a = a.data(), .lda = ta == Trans::No ? k : m, .b = b.data(), .ldb = tb == Trans::No ? n : k,
                       .beta = double(widen(beta)), .c = c.data(), .ldc = n});
}

template <class T>
void linear_forward(const DeviceTensor<T>& x, const DeviceTensor<T>& W, const std::type_identity_t<DeviceTensor<T>>* b,
                    DeviceTensor<T>& y) {
  constexpr std::string_view op = "linear_forward";
  expect_shape(op, "W", W, {any_extent, any_extent});
  const std::size_t out = W.shape()[0], in = W.shape()[1];
  expect_width(op, "x", x, in);
  if (b) expect_shape(op, "b", *b, {out});
  resize_to(y, with_last(shape_of(x), out));
  const std::size_t n = rows(x);
  matmul(MatmulCall<T>{.ta = Trans::No, .tb = Trans::Yes, .m = n, .n = out, .k = in, .a = x.data(), .lda = in,
                       .b = W.data(), .ldb = in, .c = y.data(), .ldc = out,
                       .epilogue = b ? Epilogue::Bias : Epilogue::None, .bias = b ? b->data() : nullptr});
}

template <class T>
void linear_backward(const DeviceTensor<T>& x, const DeviceTensor<T>& W, const DeviceTensor<T>& dy,
                     std::type_identity_t<DeviceTensor<T>>* dx, std::type_identity_t<DeviceTensor<T>>* dW,
                     std::type_identity_t<DeviceTensor<T>>* db) {
  constexpr std::string_view op = "linear_backward";
  expect_shape(op, "W", W, {any_extent, any_extent});
  const std::size_t out = W.shape()[0], in = W.shape()[1];
  expect_width(op, "x", x, in);
  expect_width(op, "dy", dy, out);
  const std::size_t n = rows(x);
  require<ShapeError>(rows(dy) == n, op, ": dy has shape ", shape_string(dy.shape()), " but x has shape ",
                      shape_string(x.shape()));
  if (dW) expect_same_shape(op, "dW", *dW, "W", W);
  if (db) expect_shape(op, "db", *db, {out});
  if (dx) {
    resize_to(*dx, shape_of(x));
    matmul(MatmulCall<T>{.ta = Trans::No, .tb = Trans::No, .m = n, .n = in, .k = out, .a = dy.data(), .lda = out,
                         .b = W.data(), .ldb = in, .c = dx->data(), .ldc = in});
  }
  if (dW) {
    // dW += dy^T x; with db, the same GEMM reduces dy over its rows into a scratch vector (BiasGradA).
    DeviceTensor<T> bias_grad(Shape{db ? out : 0});
    matmul(MatmulCall<T>{.ta = Trans::Yes, .tb = Trans::No, .m = out, .n = in, .k = n, .a = dy.data(), .lda = out,
                         .b = x.data(), .ldb = in, .beta = 1.0, .c = dW->data(), .ldc = in,
                         .epilogue = db ? Epilogue::BiasGradA : Epilogue::None,
                         .bias_grad = db ? bias_grad.data() : nullptr});
    if (db)
      detail::map_elements<T, 2, 1>("linear_backward db", out, detail::AddInto{}, {db->data(), bias_grad.data()},
                                    {db->data()});
  } else if (db) {
    column_sum_accumulate("linear_backward db", n, out, detail::MatrixEntry<T, T>{dy.data(), out}, db->data());
  }
}

}  // namespace mixpeft::cuda
