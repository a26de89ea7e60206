// bench_cuda_mole — one training step (forward + backward) of a frozen SwiGLU FFN on the GPU, LLaMA-7B shapes
// (D = 4096, D_ff = 11008), bf16 storage everywhere with fp32 accumulation, composed from the device ops exactly
// as a layer would call them. Each iteration is timed with CUDA events on the current stream (UseManualTime).
//
//   ffn_frozen/T            the frozen base alone: 3 forward GEMMs, 3 input-gradient GEMMs, SwiGLU fwd / bwd
//   ffn_lora/T/r            + one LoRA (alpha = 2r) on gate, up and down, dense cuBLASLt GEMMs (gemm on tensors),
//                           factor gradients accumulated, base frozen (input gradients only)
//   ffn_mole/T/r/K          + K rank-r experts, top-1: router_linear_forward, softmax, top_k_forward,
//                           group_by_expert, gather_rows(x); the base GEMMs and the grouped LoRA shrink / expand of
//                           the three projections on the expert-sorted rows; scatter_add_rows(y). Backward:
//                           gather_rows(dy), grouped expand_backward / grad_B / grad_A / shrink_backward per
//                           projection, base input gradients, scatter_add_rows(dx). No gate scaling (the reference
//                           default), so the router gets no gradient (its balance loss is not on the device yet).
//   ffn_layer_lora/T/r      the library's layer: LoRAExperts<bf16, Cuda> with one expert (a plain LoRA FFN, PEFT
//                           dropout 0.05 on each LoRA input), forward + backward, caches reused across steps
//   ffn_layer_mole/T/r/K    LoRAExperts<bf16, Cuda> with K experts and its top-1 router (dropout 0.05), the same
//                           uniform routing code; ffn_layer_mole_balance adds the MoLE balance loss (forward and
//                           backward, BalanceLoss<bf16, Cuda>: one stream sync per step for its tally, which the
//                           backward reuses) and so the
//                           router's backward
//   expert_gemm/T/r/K       only the 18 grouped LoRA launches of that step (6 per projection), on ready inputs with
//                           uniform expert blocks of T/K rows
//   expert_gemm_cuda_cores/T/r/K   expert_gemm with the tensor-core kernels switched off (what mma.sync buys)
//   dense_gemm_same_flops/T/r   the same 18 LoRA GEMMs as dense cuBLASLt calls over all T rows (one adapter):
//                           exactly the FLOPs of expert_gemm (top-1: every row meets one expert). The DESIGN target
//                           is expert_gemm >= 90% of this throughput at >= 1k tokens per expert.
//   expert_gemm_op/<op>/T/r/K, dense_gemm_op/<op>/T/r   one op of the gate projection (D -> D_ff), 20 launches per
//                           timed iteration: shrink, expand, expand_bwd, grad_B, grad_A, shrink_bwd
// Routing is exactly uniform and interleaved: the first K features of x are a one-hot code (token i -> expert
// i % K, value 8) and the router weight is the identity on them, so grouping really permutes rows; the counts are
// checked after the warm-up steps. Counters: TFLOP/s over the GEMM FLOPs of the case (base 12 T D D_ff, LoRA
// 18 T r (D + D_ff); the router's 2 T D K is not counted), tokens/s. Every case reports an error without a device.
#include <benchmark/benchmark.h>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <exception>
#include <initializer_list>
#include <span>
#include <string>
#include <vector>

#include "mixpeft/cuda/backend.cuh"
#include "mixpeft/cuda/dropout.cuh"
#include "mixpeft/layers/balance_loss.hpp"
#include "mixpeft/layers/lora_experts.hpp"
#include "bench_support.cuh"

namespace mixpeft::cuda_bench {
namespace {

using cuda::DeviceTensor;
using bf16 = __nv_bfloat16;

constexpr std::size_t width = 4096, ffn_width = 11008;

// ---- device data (random_device and EventTimer: bench_support.cuh) -----------------------------------------

// x[i, e] = (e == i % K) ? 8 : 0 for e < K: the routing code in the first K features.
__global__ void routing_code_kernel(bf16* x, std::size_t tokens, std::size_t cols, std::size_t experts) {
  for (std::size_t p = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; p < tokens * experts;
       p += std::size_t(gridDim.x) * blockDim.x) {
    const std::size_t i = p / experts, e = p % experts;
    x[i * cols + e] = cuda::narrow<bf16>(e == i % experts ? 8.0f : 0.0f);
  }
}

// W[e, d] = (d == e): the router reads the code.
__global__ void identity_router_kernel(bf16* w, std::size_t experts, std::size_t cols) {
  for (std::size_t p = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; p < experts * cols;
       p += std::size_t(gridDim.x) * blockDim.x)
    w[p] = cuda::narrow<bf16>(p % cols == p / cols ? 1.0f : 0.0f);
}

// Uniform contiguous expert blocks of tokens / K rows (the last takes the remainder), on the device.
DeviceTensor<std::int32_t> uniform_offsets(std::size_t tokens, std::size_t experts) {
  std::vector<std::int32_t> offsets(experts + 1);
  for (std::size_t e = 0; e <= experts; ++e) offsets[e] = std::int32_t(e == experts ? tokens : e * (tokens / experts));
  auto dev = cuda::upload(std::span<const std::int32_t>(offsets));
  cuda::synchronize();  // the host vector goes out of scope
  return dev;
}

DeviceTensor<bf16> zeros(const Shape& shape) {
  DeviceTensor<bf16> t(shape);
  cuda::set_zero(t);
  return t;
}

// ---- timing -----------------------------------------------------------------------------------------------

// Runs `step` twice untimed (plans, pool, clocks), then `reps` times per timed iteration; sets the counters.
template <class Step>
void run_timed(benchmark::State& state, Step&& step, int reps, double flops, std::size_t tokens) {
  step();
  step();
  cuda::synchronize();
  EventTimer timer;
  for (auto _ : state) {
    timer.start();
    for (int i = 0; i < reps; ++i) step();
    state.SetIterationTime(timer.stop() / reps);
  }
  state.counters["TFLOP/s"] = benchmark::Counter(flops * 1e-12, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["tokens/s"] = benchmark::Counter(double(tokens), benchmark::Counter::kIsIterationInvariantRate);
}

bool no_device(benchmark::State& state) {
  if (cuda::device_available()) return false;
  state.SkipWithError("no CUDA device");
  return true;
}

// The LoRA GEMM FLOPs of one projection in -> out over `tokens` rows, forward + backward: 6 T r (in + out).
double lora_flops(std::size_t tokens, std::size_t rank, std::size_t in, std::size_t out) {
  return 6.0 * double(tokens) * double(rank) * double(in + out);
}
double base_flops(std::size_t tokens) { return 12.0 * double(tokens) * double(width) * double(ffn_width); }
double ffn_lora_flops(std::size_t tokens, std::size_t rank) {
  return 3.0 * lora_flops(tokens, rank, width, ffn_width);  // gate and up D -> F, down F -> D: the same sum
}

// ---- dense LoRA (one adapter) -------------------------------------------------------------------------------

// The LoRA of one projection in -> out: A [r, in], B [out, r], their gradients, and the [T, r] activations.
struct DenseLora {
  DeviceTensor<bf16> A, B, dA, dB, t, v;
  std::size_t in = 0, out = 0, rank = 0;

  DenseLora(std::size_t tokens, std::size_t r, std::size_t in_, std::size_t out_, std::uint64_t seed)
      : A(random_device<bf16>({r, in_}, seed, 1.0f / 64.0f)),
        B(random_device<bf16>({out_, r}, seed + 1, 0.02f)),
        dA(zeros({r, in_})),
        dB(zeros({out_, r})),
        t(zeros({tokens, r})),
        v(zeros({tokens, r})),
        in(in_),
        out(out_),
        rank(r) {}

  // t = x A^T;  y += s t B^T.
  void forward(const DeviceTensor<bf16>& x, double s, DeviceTensor<bf16>& y) {
    const std::size_t n = rows(x);
    cuda::gemm<bf16>(Trans::No, Trans::Yes, n, rank, in, cuda::narrow<bf16>(1.0f), x, A, cuda::narrow<bf16>(0.0f), t);
    cuda::gemm<bf16>(Trans::No, Trans::Yes, n, out, rank, cuda::narrow<bf16>(float(s)), t, B,
                     cuda::narrow<bf16>(1.0f), y);
  }
  // v = s dy B;  dB += s dy^T t;  dA += v^T x;  dx += v A.
  void backward(const DeviceTensor<bf16>& x, const DeviceTensor<bf16>& dy, double s, DeviceTensor<bf16>& dx) {
    const std::size_t n = rows(x);
    const bf16 one = cuda::narrow<bf16>(1.0f), zero = cuda::narrow<bf16>(0.0f), sb = cuda::narrow<bf16>(float(s));
    cuda::gemm<bf16>(Trans::No, Trans::No, n, rank, out, sb, dy, B, zero, v);
    cuda::gemm<bf16>(Trans::Yes, Trans::No, out, rank, n, sb, dy, t, one, dB);
    cuda::gemm<bf16>(Trans::Yes, Trans::No, rank, in, n, one, v, x, one, dA);
    cuda::gemm<bf16>(Trans::No, Trans::No, n, in, rank, one, v, A, one, dx);
  }
};

// ---- grouped LoRA (K experts, stacked factors) -----------------------------------------------------------------

struct GroupedLora {
  DeviceTensor<bf16> A, B, dA, dB, t, v;  // A [K, r, in], B [K, out, r]

  GroupedLora(std::size_t tokens, std::size_t r, std::size_t experts, std::size_t in, std::size_t out,
              std::uint64_t seed)
      : A(random_device<bf16>({experts, r, in}, seed, 1.0f / 64.0f)),
        B(random_device<bf16>({experts, out, r}, seed + 1, 0.02f)),
        dA(zeros({experts, r, in})),
        dB(zeros({experts, out, r})),
        t(zeros({tokens, r})),
        v(zeros({tokens, r})) {}

  // t = shrink(x);  y += s expand(t).
  void forward(const DeviceTensor<bf16>& x, const DeviceTensor<std::int32_t>& offsets, double s, DeviceTensor<bf16>& y) {
    cuda::grouped_lora_shrink(x, A, offsets, t);
    cuda::grouped_lora_expand(t, B, offsets, s, nullptr, true, y);
  }
  // v = expand_backward(dy);  dB += grad_B(dy, t);  dA += grad_A(v, x);  dx += shrink_backward(v).
  void backward(const DeviceTensor<bf16>& x, const DeviceTensor<bf16>& dy, const DeviceTensor<std::int32_t>& offsets,
                double s, DeviceTensor<bf16>& dx) {
    cuda::grouped_lora_expand_backward(dy, B, offsets, s, nullptr, v);
    cuda::grouped_lora_grad_B(dy, t, offsets, s, nullptr, dB);
    cuda::grouped_lora_grad_A(v, x, offsets, dA);
    cuda::grouped_lora_shrink_backward(v, A, offsets, true, dx);
  }
};

// ---- the FFN --------------------------------------------------------------------------------------------------

// Frozen base weights, the input, the upstream gradient and every activation of one step (rows in the order the
// step computes them: token order for the dense cases, expert order for MoLE).
struct Ffn {
  std::size_t tokens;
  DeviceTensor<bf16> Wg, Wu, Wd;       // [F, D], [F, D], [D, F]
  DeviceTensor<bf16> x, dy;            // [T, D]
  DeviceTensor<bf16> g, u, z, y;       // [T, F] x3, [T, D]
  DeviceTensor<bf16> dz, dg, du, dx;   // [T, F] x3, [T, D]

  explicit Ffn(std::size_t t)
      : tokens(t),
        Wg(random_device<bf16>({ffn_width, width}, 11, 1.0f / 64.0f)),
        Wu(random_device<bf16>({ffn_width, width}, 12, 1.0f / 64.0f)),
        Wd(random_device<bf16>({width, ffn_width}, 13, 1.0f / 105.0f)),
        x(random_device<bf16>({t, width}, 14, 1.0f)),
        dy(random_device<bf16>({t, width}, 15, 1.0f)),
        g(zeros({t, ffn_width})),
        u(zeros({t, ffn_width})),
        z(zeros({t, ffn_width})),
        y(zeros({t, width})),
        dz(zeros({t, ffn_width})),
        dg(zeros({t, ffn_width})),
        du(zeros({t, ffn_width})),
        dx(zeros({t, width})) {}

  // g = x Wg^T, u = x Wu^T (x: the rows this step works on).
  void gate_up(const DeviceTensor<bf16>& in) {
    const bf16 one = cuda::narrow<bf16>(1.0f), zero = cuda::narrow<bf16>(0.0f);
    cuda::gemm<bf16>(Trans::No, Trans::Yes, tokens, ffn_width, width, one, in, Wg, zero, g);
    cuda::gemm<bf16>(Trans::No, Trans::Yes, tokens, ffn_width, width, one, in, Wu, zero, u);
  }
  // z = SiLU(g) u;  out = z Wd^T.
  void down(DeviceTensor<bf16>& out) {
    cuda::swiglu_forward(g, u, z);
    cuda::gemm<bf16>(Trans::No, Trans::Yes, tokens, width, ffn_width, cuda::narrow<bf16>(1.0f), z, Wd,
                     cuda::narrow<bf16>(0.0f), out);
  }
  // dz = d_out Wd.
  void down_backward(const DeviceTensor<bf16>& d_out) {
    cuda::gemm<bf16>(Trans::No, Trans::No, tokens, ffn_width, width, cuda::narrow<bf16>(1.0f), d_out, Wd,
                     cuda::narrow<bf16>(0.0f), dz);
  }
  // dg, du = SwiGLU'(dz);  d_in = dg Wg + du Wu.
  void gate_up_backward(DeviceTensor<bf16>& d_in) {
    const bf16 one = cuda::narrow<bf16>(1.0f), zero = cuda::narrow<bf16>(0.0f);
    cuda::swiglu_backward(g, u, dz, dg, du);
    cuda::gemm<bf16>(Trans::No, Trans::No, tokens, width, ffn_width, one, dg, Wg, zero, d_in);
    cuda::gemm<bf16>(Trans::No, Trans::No, tokens, width, ffn_width, one, du, Wu, one, d_in);
  }
};

void ffn_frozen(benchmark::State& state, std::size_t tokens) {
  if (no_device(state)) return;
  Ffn f(tokens);
  const auto step = [&] {
    f.gate_up(f.x);
    f.down(f.y);
    f.down_backward(f.dy);
    f.gate_up_backward(f.dx);
  };
  run_timed(state, step, 1, base_flops(tokens), tokens);
}

void ffn_lora(benchmark::State& state, std::size_t tokens, std::size_t rank) {
  if (no_device(state)) return;
  Ffn f(tokens);
  DenseLora lg(tokens, rank, width, ffn_width, 21), lu(tokens, rank, width, ffn_width, 23),
      ld(tokens, rank, ffn_width, width, 25);
  const double s = 2.0;  // alpha = 2r
  const auto step = [&] {
    f.gate_up(f.x);
    lg.forward(f.x, s, f.g);
    lu.forward(f.x, s, f.u);
    f.down(f.y);
    ld.forward(f.z, s, f.y);
    f.down_backward(f.dy);
    ld.backward(f.z, f.dy, s, f.dz);
    f.gate_up_backward(f.dx);
    lg.backward(f.x, f.dg, s, f.dx);
    lu.backward(f.x, f.du, s, f.dx);
  };
  run_timed(state, step, 1, base_flops(tokens) + ffn_lora_flops(tokens, rank), tokens);
}

void ffn_mole(benchmark::State& state, std::size_t tokens, std::size_t rank, std::size_t experts) {
  if (no_device(state)) return;
  Ffn f(tokens);
  const dim3 grid(cuda::grid_size(tokens * experts, 256));
  routing_code_kernel<<<grid, 256, 0, cuda::current_stream()>>>(f.x.data(), tokens, width, experts);
  cuda::check_launch("routing code");
  DeviceTensor<bf16> Wr({experts, width}), br = zeros({experts});
  identity_router_kernel<<<cuda::grid_size(Wr.size(), 256), 256, 0, cuda::current_stream()>>>(Wr.data(), experts,
                                                                                               width);
  cuda::check_launch("router weight");
  GroupedLora lg(tokens, rank, experts, width, ffn_width, 31), lu(tokens, rank, experts, width, ffn_width, 33),
      ld(tokens, rank, experts, ffn_width, width, 35);
  DeviceTensor<bf16> logits, probs, gates;
  DeviceTensor<std::int32_t> choice, counts, offsets, perm;
  DeviceTensor<bf16> xs = zeros({tokens, width}), ys = zeros({tokens, width}), dys = zeros({tokens, width}),
                     dxs = zeros({tokens, width});
  const double s = 2.0;
  const auto step = [&] {
    // routing: logits, probabilities, top-1, the expert permutation, the rows in expert order
    cuda::router_linear_forward(f.x, Wr, &br, cuda::narrow<bf16>(1.0f), logits);
    cuda::softmax_forward(logits, probs);
    cuda::top_k_forward(probs, 1, choice, gates);
    cuda::group_by_expert(choice, experts, counts, offsets, perm);
    cuda::gather_rows(f.x, perm, 1, xs);
    // forward on the sorted rows
    f.gate_up(xs);
    lg.forward(xs, offsets, s, f.g);
    lu.forward(xs, offsets, s, f.u);
    f.down(ys);
    ld.forward(f.z, offsets, s, ys);
    cuda::set_zero(f.y);
    cuda::scatter_add_rows(ys, perm, 1, f.y);
    // backward on the sorted rows
    cuda::gather_rows(f.dy, perm, 1, dys);
    f.down_backward(dys);
    ld.backward(f.z, dys, offsets, s, f.dz);
    f.gate_up_backward(dxs);
    lg.backward(xs, f.dg, offsets, s, dxs);
    lu.backward(xs, f.du, offsets, s, dxs);
    cuda::set_zero(f.dx);
    cuda::scatter_add_rows(dxs, perm, 1, f.dx);
  };
  step();
  const Tensor<std::int32_t> got = cuda::download(counts);
  for (std::size_t e = 0; e < experts; ++e) {
    const std::size_t want = tokens / experts + (e < tokens % experts ? 1 : 0);
    if (std::size_t(got(e)) != want) {
      state.SkipWithError(("routing is not uniform: expert " + std::to_string(e) + " got " +
                           std::to_string(got(e)) + " tokens, expected " + std::to_string(want))
                              .c_str());
      return;
    }
  }
  cuda::check_routing_errors();
  run_timed(state, step, 1, base_flops(tokens) + ffn_lora_flops(tokens, rank), tokens);
}

// ---- the layer ------------------------------------------------------------------------------------------------

void ffn_layer(benchmark::State& state, std::size_t tokens, std::size_t rank, std::size_t experts, bool balance) {
  if (no_device(state)) return;
  using Layer = LoRAExperts<bf16, Cuda>;
  Rng rng(71);
  Layer layer({.dim = width, .hidden = ffn_width, .experts = experts, .rank = rank, .alpha = 2.0 * double(rank),
               .dropout = 0.05},
              rng);
  DeviceTensor<bf16> x = random_device<bf16>({tokens, width}, 72, 1.0f);
  const DeviceTensor<bf16> dy = random_device<bf16>({tokens, width}, 73, 1.0f);
  if (experts > 1) {
    routing_code_kernel<<<cuda::grid_size(tokens * experts, 256), 256, 0, cuda::current_stream()>>>(
        x.data(), tokens, width, experts);
    cuda::check_launch("routing code");
    DeviceTensor<bf16>& w = layer.router()->weight().value;
    identity_router_kernel<<<cuda::grid_size(w.size(), 256), 256, 0, cuda::current_stream()>>>(w.data(), experts,
                                                                                              width);
    cuda::check_launch("router weight");
    cuda::set_zero(layer.router()->bias().value);
  }
  const BalanceLoss<bf16, Cuda> loss({.kind = BalanceKind::MoLE, .weight = 1e-2});
  const BalanceTokens<bf16, Cuda> all_tokens;
  Layer::Cache cache;
  RouterGrad<bf16, Cuda> grad;
  BalanceLoss<bf16, Cuda>::Counts counts;
  const auto step = [&] {
    const DeviceTensor<bf16> y = layer.forward(x, cache);
    grad.clear();
    if (balance) {
      const RoutingResult<bf16, Cuda>* routing[] = {&cache.router.routing};
      RouterGrad<bf16, Cuda>* grads[] = {&grad};
      benchmark::DoNotOptimize(loss.forward(routing, all_tokens, &counts));
      loss.backward(routing, all_tokens, grads, cuda::narrow<bf16>(1.0f), &counts);
    }
    const DeviceTensor<bf16> dx = layer.backward(cache, dy, grad);
  };
  step();
  if (experts > 1) {
    const Tensor<std::int32_t> got = cuda::download(cache.router.routing.counts);
    for (std::size_t e = 0; e < experts; ++e)
      if (std::size_t(got(e)) != tokens / experts + (e < tokens % experts ? 1 : 0)) {
        state.SkipWithError("routing is not uniform");
        return;
      }
    cuda::check_routing_errors();
  }
  run_timed(state, step, 1, base_flops(tokens) + ffn_lora_flops(tokens, rank), tokens);
}

// ---- the expert GEMMs alone, and their dense counterparts ------------------------------------------------------

// Inputs and outputs of the LoRA GEMMs of the three projections (the activations they read are random).
struct LoraOperands {
  DeviceTensor<bf16> x, z, dy;  // [T, D], [T, F], [T, D]: inputs of gate / up, of down, upstream gradient of down
  DeviceTensor<bf16> dg, du;    // [T, F]: upstream gradients of gate and up
  DeviceTensor<bf16> g, u, y;   // outputs of the expands (accumulated)
  DeviceTensor<bf16> dz, dx;    // outputs of the shrink backwards (accumulated)

  explicit LoraOperands(std::size_t t)
      : x(random_device<bf16>({t, width}, 41, 1.0f)),
        z(random_device<bf16>({t, ffn_width}, 42, 1.0f)),
        dy(random_device<bf16>({t, width}, 43, 1.0f)),
        dg(random_device<bf16>({t, ffn_width}, 44, 1.0f)),
        du(random_device<bf16>({t, ffn_width}, 45, 1.0f)),
        g(zeros({t, ffn_width})),
        u(zeros({t, ffn_width})),
        y(zeros({t, width})),
        dz(zeros({t, ffn_width})),
        dx(zeros({t, width})) {}
};

void expert_gemm(benchmark::State& state, std::size_t tokens, std::size_t rank, std::size_t experts,
                 bool tensor_cores = true) {
  if (no_device(state)) return;
  const cuda::detail::GroupedTensorCoreOverride cores(tensor_cores);
  LoraOperands o(tokens);
  const auto offsets = uniform_offsets(tokens, experts);
  GroupedLora lg(tokens, rank, experts, width, ffn_width, 51), lu(tokens, rank, experts, width, ffn_width, 53),
      ld(tokens, rank, experts, ffn_width, width, 55);
  const double s = 2.0;
  const auto step = [&] {
    lg.forward(o.x, offsets, s, o.g);
    lu.forward(o.x, offsets, s, o.u);
    ld.forward(o.z, offsets, s, o.y);
    ld.backward(o.z, o.dy, offsets, s, o.dz);
    lg.backward(o.x, o.dg, offsets, s, o.dx);
    lu.backward(o.x, o.du, offsets, s, o.dx);
  };
  run_timed(state, step, 1, ffn_lora_flops(tokens, rank), tokens);
}

void dense_gemm_same_flops(benchmark::State& state, std::size_t tokens, std::size_t rank) {
  if (no_device(state)) return;
  LoraOperands o(tokens);
  DenseLora lg(tokens, rank, width, ffn_width, 51), lu(tokens, rank, width, ffn_width, 53),
      ld(tokens, rank, ffn_width, width, 55);
  const double s = 2.0;
  const auto step = [&] {
    lg.forward(o.x, s, o.g);
    lu.forward(o.x, s, o.u);
    ld.forward(o.z, s, o.y);
    ld.backward(o.z, o.dy, s, o.dz);
    lg.backward(o.x, o.dg, s, o.dx);
    lu.backward(o.x, o.du, s, o.dx);
  };
  run_timed(state, step, 1, ffn_lora_flops(tokens, rank), tokens);
}

// One LoRA op of the gate projection (D -> F), grouped or dense; FLOPs 2 T r D (shrink side) or 2 T r F.
enum class Op { Shrink, Expand, ExpandBackward, GradB, GradA, ShrinkBackward };
constexpr Op all_ops[] = {Op::Shrink, Op::Expand, Op::ExpandBackward, Op::GradB, Op::GradA, Op::ShrinkBackward};

const char* op_name(Op op) {
  switch (op) {
    case Op::Shrink: return "shrink";
    case Op::Expand: return "expand";
    case Op::ExpandBackward: return "expand_bwd";
    case Op::GradB: return "grad_B";
    case Op::GradA: return "grad_A";
    case Op::ShrinkBackward: return "shrink_bwd";
  }
  return "?";
}

double op_flops(Op op, std::size_t tokens, std::size_t rank) {
  const bool in_side = op == Op::Shrink || op == Op::GradA || op == Op::ShrinkBackward;
  return 2.0 * double(tokens) * double(rank) * double(in_side ? width : ffn_width);
}

constexpr int op_reps = 20;

void expert_gemm_op(benchmark::State& state, Op op, std::size_t tokens, std::size_t rank, std::size_t experts) {
  if (no_device(state)) return;
  LoraOperands o(tokens);
  const auto offsets = uniform_offsets(tokens, experts);
  GroupedLora l(tokens, rank, experts, width, ffn_width, 61);
  const double s = 2.0;
  cuda::grouped_lora_shrink(o.x, l.A, offsets, l.t);  // t and v hold values for the ops that read them
  cuda::grouped_lora_expand_backward(o.dg, l.B, offsets, s, nullptr, l.v);
  const auto step = [&] {
    switch (op) {
      case Op::Shrink: cuda::grouped_lora_shrink(o.x, l.A, offsets, l.t); break;
      case Op::Expand: cuda::grouped_lora_expand(l.t, l.B, offsets, s, nullptr, true, o.g); break;
      case Op::ExpandBackward: cuda::grouped_lora_expand_backward(o.dg, l.B, offsets, s, nullptr, l.v); break;
      case Op::GradB: cuda::grouped_lora_grad_B(o.dg, l.t, offsets, s, nullptr, l.dB); break;
      case Op::GradA: cuda::grouped_lora_grad_A(l.v, o.x, offsets, l.dA); break;
      case Op::ShrinkBackward: cuda::grouped_lora_shrink_backward(l.v, l.A, offsets, true, o.dx); break;
    }
  };
  run_timed(state, step, op_reps, op_flops(op, tokens, rank), tokens);
}

void dense_gemm_op(benchmark::State& state, Op op, std::size_t tokens, std::size_t rank) {
  if (no_device(state)) return;
  LoraOperands o(tokens);
  DenseLora l(tokens, rank, width, ffn_width, 61);
  const std::size_t n = tokens, in = width, out = ffn_width, r = rank;
  const bf16 one = cuda::narrow<bf16>(1.0f), zero = cuda::narrow<bf16>(0.0f), sb = cuda::narrow<bf16>(2.0f);
  const auto step = [&] {
    switch (op) {
      case Op::Shrink: cuda::gemm<bf16>(Trans::No, Trans::Yes, n, r, in, one, o.x, l.A, zero, l.t); break;
      case Op::Expand: cuda::gemm<bf16>(Trans::No, Trans::Yes, n, out, r, sb, l.t, l.B, one, o.g); break;
      case Op::ExpandBackward: cuda::gemm<bf16>(Trans::No, Trans::No, n, r, out, sb, o.dg, l.B, zero, l.v); break;
      case Op::GradB: cuda::gemm<bf16>(Trans::Yes, Trans::No, out, r, n, sb, o.dg, l.t, one, l.dB); break;
      case Op::GradA: cuda::gemm<bf16>(Trans::Yes, Trans::No, r, in, n, one, l.v, o.x, one, l.dA); break;
      case Op::ShrinkBackward: cuda::gemm<bf16>(Trans::No, Trans::No, n, in, r, one, l.v, l.A, one, o.dx); break;
    }
  };
  run_timed(state, step, op_reps, op_flops(op, tokens, rank), tokens);
}

// ---- registration ---------------------------------------------------------------------------------------------

// A case that throws (a CUDA or cuBLASLt error, a shape error) reports the error instead of ending the program.
template <class F>
void add(const std::string& name, F f) {
  benchmark::RegisterBenchmark(name.c_str(),
                               [f](benchmark::State& state) {
                                 try {
                                   f(state);
                                 } catch (const std::exception& e) {
                                   state.SkipWithError(e.what());
                                 }
                               })
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
}

std::string join(std::initializer_list<std::string> parts) {
  std::string s;
  for (const auto& p : parts) s += (s.empty() ? "" : "/") + p;
  return s;
}
std::string str(std::size_t v) { return std::to_string(v); }

void register_all() {
  constexpr std::size_t r = 32;
  for (std::size_t t : {4096, 1024}) {
    add(join({"ffn_frozen", str(t)}), [=](benchmark::State& s) { ffn_frozen(s, t); });
    add(join({"ffn_lora", str(t), str(r)}), [=](benchmark::State& s) { ffn_lora(s, t, r); });
    for (std::size_t k : {4, 8})
      add(join({"ffn_mole", str(t), str(r), str(k)}), [=](benchmark::State& s) { ffn_mole(s, t, r, k); });
    add(join({"ffn_layer_lora", str(t), str(r)}), [=](benchmark::State& s) { ffn_layer(s, t, r, 1, false); });
    add(join({"ffn_layer_mole", str(t), str(r), "4"}), [=](benchmark::State& s) { ffn_layer(s, t, r, 4, false); });
    add(join({"ffn_layer_mole_balance", str(t), str(r), "4"}),
        [=](benchmark::State& s) { ffn_layer(s, t, r, 4, true); });
  }
  for (std::size_t t : {4096, 1024, 8192}) {
    add(join({"dense_gemm_same_flops", str(t), str(r)}), [=](benchmark::State& s) { dense_gemm_same_flops(s, t, r); });
    for (std::size_t k : {4, 8}) {
      if (t == 8192 && k == 4) continue;  // 8192 tokens serve K = 8 at 1k tokens per expert
      add(join({"expert_gemm", str(t), str(r), str(k)}), [=](benchmark::State& s) { expert_gemm(s, t, r, k); });
    }
  }
  add(join({"expert_gemm_cuda_cores", "4096", str(r), "4"}),
      [=](benchmark::State& s) { expert_gemm(s, 4096, r, 4, false); });
  for (Op op : all_ops) {
    add(join({"expert_gemm_op", op_name(op), "4096", str(r), "4"}),
        [=](benchmark::State& s) { expert_gemm_op(s, op, 4096, r, 4); });
    add(join({"dense_gemm_op", op_name(op), "4096", str(r)}),
        [=](benchmark::State& s) { dense_gemm_op(s, op, 4096, r); });
  }
}

}  // namespace
}  // namespace mixpeft::cuda_bench

int main(int argc, char** argv) {
  mixpeft::cuda_bench::register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
