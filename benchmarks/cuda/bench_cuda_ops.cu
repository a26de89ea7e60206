// The cuBLASLt matmul wrapper at the LLaMA-7B FFN shapes (T = 4096 tokens, D = 4096, D_ff = 11008), bf16 inputs
// and outputs with fp32 compute, plus one fp32 case for comparison. Each iteration is timed with CUDA events
// around the one GEMM on the current stream (UseManualTime); TFLOP/s = 2 M N K / time. Plans are built before
// timing starts, so the numbers are steady-state. Every case reports an error without a CUDA device.
#include <benchmark/benchmark.h>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "mixpeft/cuda/backend.cuh"
#include "mixpeft/cuda/dropout.cuh"
#include "bench_support.cuh"

namespace mixpeft::cuda_bench {
namespace {

using cuda::DeviceTensor;

constexpr std::size_t tokens = 4096, width = 4096, ffn_width = 11008;

// C[m, n] = op(A) op(B) (+ beta C) (+ bias), A stored [m, k] or [k, m], B stored [k, n] or [n, k].
template <class T>
void bench_matmul(benchmark::State& state, Trans ta, Trans tb, std::size_t m, std::size_t n, std::size_t k,
                  double beta, bool bias) {
  if (!cuda::device_available()) {
    state.SkipWithError("no CUDA device");
    return;
  }
  const auto a = random_device<T>(ta == Trans::No ? Shape{m, k} : Shape{k, m}, 1);
  const auto b = random_device<T>(tb == Trans::No ? Shape{k, n} : Shape{n, k}, 2);
  auto c = random_device<T>({m, n}, 3);
  const auto bias_vector = random_device<T>({n}, 4);
  const cuda::MatmulCall<T> call{.ta = ta, .tb = tb, .m = m, .n = n, .k = k, .a = a.data(),
                                 .lda = ta == Trans::No ? k : m, .b = b.data(), .ldb = tb == Trans::No ? n : k,
                                 .beta = beta, .c = c.data(), .ldc = n,
                                 .epilogue = bias ? cuda::Epilogue::Bias : cuda::Epilogue::None,
                                 .bias = bias ? bias_vector.data() : nullptr};
  cuda::matmul(call);  // builds and caches the plan
  cuda::synchronize();
  EventTimer timer;
  for (auto _ : state) {
    timer.start();
    cuda::matmul(call);
    state.SetIterationTime(timer.stop());
  }
  const double tflop = 2.0 * double(m) * double(n) * double(k) * 1e-12;
  state.counters["TFLOP/s"] = benchmark::Counter(tflop, benchmark::Counter::kIsIterationInvariantRate);
}

void bf16(benchmark::State& state, Trans ta, Trans tb, std::size_t m, std::size_t n, std::size_t k, double beta,
          bool bias) {
  bench_matmul<__nv_bfloat16>(state, ta, tb, m, n, k, beta, bias);
}
void fp32(benchmark::State& state, Trans ta, Trans tb, std::size_t m, std::size_t n, std::size_t k, double beta,
          bool bias) {
  bench_matmul<float>(state, ta, tb, m, n, k, beta, bias);
}

// Forward: gate / up projection y[T, F] = x[T, D] W[F, D]^T, and down projection [T, D] = z[T, F] W[D, F]^T.
BENCHMARK_CAPTURE(bf16, ffn_gate_up_forward, Trans::No, Trans::Yes, tokens, ffn_width, width,
                  0.0, false)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(bf16, ffn_gate_up_forward_bias, Trans::No, Trans::Yes, tokens, ffn_width,
                  width, 0.0, true)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(bf16, ffn_down_forward, Trans::No, Trans::Yes, tokens, width, ffn_width, 0.0,
                  false)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);
// Backward: input gradient dz[T, F] = dy[T, D] W[D, F]; weight gradient dW[F, D] += dy[T, F]^T x[T, D].
BENCHMARK_CAPTURE(bf16, ffn_down_backward_input, Trans::No, Trans::No, tokens, ffn_width,
                  width, 0.0, false)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(bf16, ffn_gate_up_backward_weight, Trans::Yes, Trans::No, ffn_width, width,
                  tokens, 1.0, false)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);
// fp32 inputs with full fp32 compute (no TF32), for scale.
BENCHMARK_CAPTURE(fp32, ffn_gate_up_forward, Trans::No, Trans::Yes, tokens, ffn_width, width, 0.0,
                  false)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace mixpeft::cuda_bench

BENCHMARK_MAIN();
