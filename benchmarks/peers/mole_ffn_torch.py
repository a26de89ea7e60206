#!/usr/bin/env python3
"""The PyTorch peer of benchmarks/cuda/bench_cuda_mole.cu: one training step (forward + backward) of a frozen
SwiGLU FFN with LoRA, written the way PyTorch PEFT / MixLoRA-style code writes it.

Cases (bf16 weights and activations, frozen base, LoRA alpha = 2r, no dropout, dx computed):
  torch_frozen_ffn/T          the base FFN alone
  torch_lora_ffn/T/r          one LoRA (A, B as nn.Linear) on gate, up and down
  torch_mole_loop/T/r/K       K experts, top-1 router (softmax, argmax; no gate scaling, as the reference default),
                              then a Python loop over the experts: index_select the expert's tokens, the base FFN
                              plus the expert's LoRA on gate / up / down, index_add back (MixLoRA / PEFT style)
  torch_mole_compiled/T/r/K   torch.compile of that module (graph breaks at the data-dependent expert sizes)
Routing is exactly uniform and interleaved as in the C++ benchmark: the first K features of x carry a one-hot
code (token i -> expert i % K) and the router weight is the identity on them.

Timing: CUDA events around each step after warm-up steps, median of --iters steps (perf_counter on the CPU).
TFLOP/s counts the GEMM FLOPs only: base 12 T D F, LoRA 18 T r (D + F) (the C++ benchmark's counting).
Usage:  python3 mole_ffn_torch.py [--tokens 4096 1024] [--experts 4 8] [--out results.json]
        python3 mole_ffn_torch.py --device cpu --tokens 64 --dim 64 --ffn 128 --rank 4 --iters 3 --no-compile
"""

import argparse
import json
import math
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

CASES = ("frozen", "lora", "mole", "mole_compile")


class FrozenFFN(nn.Module):
    """SwiGLU FFN with frozen bias-free projections: y = W_d (SiLU(W_g x) * W_u x)."""

    def __init__(self, dim, ffn):
        super().__init__()
        self.gate = nn.Linear(dim, ffn, bias=False)
        self.up = nn.Linear(dim, ffn, bias=False)
        self.down = nn.Linear(ffn, dim, bias=False)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Lora(nn.Module):
    """PEFT's LoRA branch: s * B(A(x)), A [r, in], B [out, r] as linear layers."""

    def __init__(self, fin, fout, rank, alpha):
        super().__init__()
        self.lora_A = nn.Linear(fin, rank, bias=False)
        self.lora_B = nn.Linear(rank, fout, bias=False)
        self.scaling = alpha / rank
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.normal_(self.lora_B.weight, std=0.02)  # not zero: no shortcut anywhere

    def forward(self, x):
        return self.lora_B(self.lora_A(x)) * self.scaling


class LoraFFN(nn.Module):
    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base = base
        dim, ffn = base.gate.in_features, base.gate.out_features
        self.lora_gate = Lora(dim, ffn, rank, alpha)
        self.lora_up = Lora(dim, ffn, rank, alpha)
        self.lora_down = Lora(ffn, dim, rank, alpha)

    def forward(self, x):
        b = self.base
        z = F.silu(b.gate(x) + self.lora_gate(x)) * (b.up(x) + self.lora_up(x))
        return b.down(z) + self.lora_down(z)


class MoleLoopFFN(nn.Module):
    """MixLoRA-style MoLE FFN: a frozen router picks one expert per token, then a loop over the experts."""

    def __init__(self, base, rank, alpha, experts):
        super().__init__()
        self.base = base
        dim, ffn = base.gate.in_features, base.gate.out_features
        self.experts = experts
        self.router = nn.Linear(dim, experts, bias=False)
        self.router.weight.requires_grad_(False)  # no gate scaling: the router gets no gradient (reference default)
        self.lora_gate = nn.ModuleList(Lora(dim, ffn, rank, alpha) for _ in range(experts))
        self.lora_up = nn.ModuleList(Lora(dim, ffn, rank, alpha) for _ in range(experts))
        self.lora_down = nn.ModuleList(Lora(ffn, dim, rank, alpha) for _ in range(experts))

    def forward(self, x):
        b = self.base
        probs = torch.softmax(self.router(x).float(), dim=-1)
        choice = probs.argmax(dim=-1)
        out = torch.zeros_like(x)
        for e in range(self.experts):
            idx = torch.nonzero(choice == e, as_tuple=True)[0]  # a device-to-host sync per expert, as in MixLoRA
            xe = x.index_select(0, idx)
            z = F.silu(b.gate(xe) + self.lora_gate[e](xe)) * (b.up(xe) + self.lora_up[e](xe))
            ye = b.down(z) + self.lora_down[e](z)
            out.index_add_(0, idx, ye)
        return out


def routing_input(tokens, dim, experts, device, dtype, generator):
    x = torch.randn(tokens, dim, device=device, dtype=torch.float32, generator=generator)
    code = torch.zeros(tokens, experts, device=device)
    code[torch.arange(tokens, device=device), torch.arange(tokens, device=device) % experts] = 8.0
    x[:, :experts] = code
    return x.to(dtype)


def identity_router(module, dim, experts):
    with torch.no_grad():
        w = torch.zeros(experts, dim, device=module.router.weight.device, dtype=module.router.weight.dtype)
        w[torch.arange(experts), torch.arange(experts)] = 1.0
        module.router.weight.copy_(w)


def gemm_flops(tokens, dim, ffn, rank, lora):
    base = 12.0 * tokens * dim * ffn
    return base + (18.0 * tokens * rank * (dim + ffn) if lora else 0.0)


def time_steps(step, device, iters, warmup):
    for _ in range(warmup):
        step()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(iters):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) * 1e-3)
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return times


def make_step(module, x, dy):
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        y = module(x)
        y.backward(dy)

    return step


def run_case(name, module, x, dy, args, device, flops, tokens, warmup):
    step = make_step(module, x, dy)
    t0 = time.perf_counter()
    times = time_steps(step, device, args.iters, warmup)
    wall = time.perf_counter() - t0
    med = statistics.median(times)
    return {
        "name": name,
        "median_ms": med * 1e3,
        "min_ms": min(times) * 1e3,
        "max_ms": max(times) * 1e3,
        "iters": len(times),
        "warmup": warmup,
        "tokens_per_s": tokens / med,
        "tflops": flops / med * 1e-12,
        "wall_s": wall,
    }


def check_uniform(module, x, experts):
    with torch.no_grad():
        choice = torch.softmax(module.router(x).float(), dim=-1).argmax(dim=-1)
        counts = torch.bincount(choice, minlength=experts).tolist()
    want = [x.shape[0] // experts + (1 if e < x.shape[0] % experts else 0) for e in range(experts)]
    if counts != want:
        raise RuntimeError(f"routing is not uniform: counts {counts}, expected {want}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 1024])
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=11008)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--experts", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--iters", type=int, default=30, help="timed steps per case (median reported)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per case (compiled cases: at least 3)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile case")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
    ap.add_argument("--out", help="write the results as JSON here (rewritten after every case)")
    args = ap.parse_args(argv)

    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        ap.error(f"unknown cases {sorted(unknown)}; choose from {CASES}")
    if args.no_compile:
        cases = [c for c in cases if c != "mole_compile"]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("mole_ffn_torch: no CUDA device", file=sys.stderr)
        return 2
    dtype = torch.bfloat16
    torch.manual_seed(0)
    gen = torch.Generator(device=device).manual_seed(0)
    alpha = 2.0 * args.rank

    report = {
        "peer": "pytorch",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": "bfloat16",
        "dim": args.dim, "ffn": args.ffn, "rank": args.rank, "alpha": alpha,
        "iters": args.iters, "timer": "cuda events" if device.type == "cuda" else "perf_counter",
        "results": [], "errors": [],
    }

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)

    def attempt(name, fn):
        print(f"  {name} ...", file=sys.stderr, flush=True)
        try:
            r = fn()
            report["results"].append(r)
            print(f"  {name}: {r['median_ms']:.3f} ms", file=sys.stderr, flush=True)
        except Exception as exc:  # keep going: one failing case must not lose the others
            report["errors"].append({"name": name, "error": f"{type(exc).__name__}: {exc}"})
            print(f"  {name}: FAILED {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        save()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    D, Fw, r = args.dim, args.ffn, args.rank
    for T in args.tokens:
        base = FrozenFFN(D, Fw).to(device=device, dtype=dtype)
        dy = torch.randn(T, D, device=device, dtype=dtype, generator=gen)
        if "frozen" in cases:
            x = torch.randn(T, D, device=device, dtype=dtype, generator=gen).requires_grad_(True)
            attempt(f"torch_frozen_ffn/{T}",
                    lambda: run_case(f"torch_frozen_ffn/{T}", base, x, dy, args, device,
                                     gemm_flops(T, D, Fw, r, False), T, args.warmup))
        if "lora" in cases:
            x = torch.randn(T, D, device=device, dtype=dtype, generator=gen).requires_grad_(True)
            lora = LoraFFN(base, r, alpha).to(device=device, dtype=dtype)
            attempt(f"torch_lora_ffn/{T}/{r}",
                    lambda: run_case(f"torch_lora_ffn/{T}/{r}", lora, x, dy, args, device,
                                     gemm_flops(T, D, Fw, r, True), T, args.warmup))
            del lora
        for K in args.experts:
            if not ({"mole", "mole_compile"} & set(cases)):
                break
            x = routing_input(T, D, K, device, dtype, gen).requires_grad_(True)
            mole = MoleLoopFFN(base, r, alpha, K).to(device=device, dtype=dtype)
            identity_router(mole, D, K)
            check_uniform(mole, x, K)
            flops = gemm_flops(T, D, Fw, r, True)
            if "mole" in cases:
                attempt(f"torch_mole_loop/{T}/{r}/{K}",
                        lambda: run_case(f"torch_mole_loop/{T}/{r}/{K}", mole, x, dy, args, device, flops, T,
                                         args.warmup))
            if "mole_compile" in cases:
                def compiled_case():
                    t0 = time.perf_counter()
                    compiled = torch.compile(mole)
                    res = run_case(f"torch_mole_compiled/{T}/{r}/{K}", compiled, x, dy, args, device, flops, T,
                                   max(args.warmup, 3))
                    res["compile_and_warmup_wall_s"] = time.perf_counter() - t0 - res["wall_s"]
                    return res
                attempt(f"torch_mole_compiled/{T}/{r}/{K}", compiled_case)
            del mole

    print(f"\nPyTorch {report['torch']} on {report['device']}, bf16, D = {D}, D_ff = {Fw}, r = {r}, "
          f"fwd+bwd, median of {args.iters}")
    print(f"{'case':<34} {'median ms':>10} {'min ms':>10} {'TFLOP/s':>9} {'Mtok/s':>8}")
    for res in report["results"]:
        print(f"{res['name']:<34} {res['median_ms']:>10.3f} {res['min_ms']:>10.3f} {res['tflops']:>9.1f} "
              f"{res['tokens_per_s'] * 1e-6:>8.3f}")
    for err in report["errors"]:
        print(f"{err['name']:<34} FAILED {err['error']}")
    save()
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
