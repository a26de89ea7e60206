#!/usr/bin/env python3
"""Summarises the GPU benchmark results that scripts/gpu_checks collects (standard library only).

Usage: gpu_summary.py DIR   reads DIR/bench_cuda_ops.json, DIR/bench_cuda_mole.json (Google Benchmark JSON),
                            DIR/torch_peer.json and DIR/torch_peer_compile.json (benchmarks/peers/mole_ffn_torch.py),
                            whichever exist, and prints one table per file plus the target ratios of DESIGN.md:
  ffn_mole / ffn_lora time                          <= 1.10 (MoLE costs what plain LoRA costs)
  ffn_layer_mole / ffn_layer_lora time              <= 1.10 (the same through LoRAExperts<bf16, Cuda>)
  expert_gemm / dense_gemm_same_flops TFLOP/s       >= 0.90 at >= 1k tokens per expert
  PyTorch expert loop / ffn_mole time               > 1 (ours faster than the MixLoRA-style loop)
Google Benchmark cases are read from their median aggregate when repetitions ran, else from the single run.
"""

import json
import os
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        if os.path.exists(path):
            print(f"(could not read {path}: {exc})")
        return None


def gbench_cases(doc):
    """name -> {ms, tflops, error}; name without '/manual_time'."""
    runs, medians = {}, {}
    for b in doc.get("benchmarks", []):
        name = b.get("run_name", b.get("name", "?")).replace("/manual_time", "")
        scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}.get(b.get("time_unit", "ms"), 1.0)
        entry = {"ms": b.get("real_time", 0.0) * scale, "tflops": b.get("TFLOP/s"),
                 "error": b.get("error_message") if b.get("error_occurred") else None}
        if b.get("run_type") == "aggregate":
            if b.get("aggregate_name") == "median":
                medians[name] = entry
        else:
            runs.setdefault(name, []).append(entry)
    out = {}
    for name, entries in runs.items():
        if name in medians:
            out[name] = medians[name]
        else:
            ok = [e for e in entries if not e["error"]]
            out[name] = ok[len(ok) // 2] if ok else entries[0]
    return out


def print_gbench(title, cases):
    print(f"\n{title}")
    print(f"  {'case':<40} {'median ms':>10} {'TFLOP/s':>9}")
    for name, e in cases.items():
        if e["error"]:
            print(f"  {name:<40} ERROR {e['error']}")
        else:
            tf = f"{e['tflops']:.1f}" if e["tflops"] is not None else "-"
            print(f"  {name:<40} {e['ms']:>10.3f} {tf:>9}")


def ok(cases, name):
    e = cases.get(name)
    return e if e and not e["error"] and e["ms"] > 0 else None


def main(argv):
    d = argv[1] if len(argv) > 1 else "."
    ours = {}
    for f in ("bench_cuda_ops.json", "bench_cuda_mole.json"):
        doc = load(os.path.join(d, f))
        if doc:
            cases = gbench_cases(doc)
            print_gbench(f"{f} ({doc.get('context', {}).get('date', '?')})", cases)
            ours.update(cases)
    peer = {}
    for f in ("torch_peer.json", "torch_peer_compile.json"):
        doc = load(os.path.join(d, f))
        if doc:
            print(f"\n{f}: PyTorch {doc.get('torch')} on {doc.get('device')}")
            print(f"  {'case':<40} {'median ms':>10} {'TFLOP/s':>9}")
            for r in doc.get("results", []):
                peer[r["name"]] = r
                print(f"  {r['name']:<40} {r['median_ms']:>10.3f} {r['tflops']:>9.1f}")
            for e in doc.get("errors", []):
                print(f"  {e['name']:<40} FAILED {e['error']}")

    lines = []
    for name in sorted(ours):
        parts = name.split("/")
        if parts[0] == "ffn_mole" and len(parts) == 4:
            t, r, k = parts[1:]
            lora = ok(ours, f"ffn_lora/{t}/{r}")
            if ok(ours, name) and lora:
                ratio = ours[name]["ms"] / lora["ms"]
                lines.append((f"{name} / ffn_lora/{t}/{r} (time, <= 1.10)", ratio, ratio <= 1.10))
        if parts[0] in ("ffn_layer_mole", "ffn_layer_mole_balance") and len(parts) == 4:
            t, r, k = parts[1:]
            lora = ok(ours, f"ffn_layer_lora/{t}/{r}")
            if ok(ours, name) and lora:
                ratio = ours[name]["ms"] / lora["ms"]
                lines.append((f"{name} / ffn_layer_lora/{t}/{r} (the layers, time, <= 1.10)", ratio, ratio <= 1.10))
        if parts[0] == "ffn_lora" and len(parts) == 3:
            frozen = ok(ours, f"ffn_frozen/{parts[1]}")
            if ok(ours, name) and frozen:
                lines.append((f"{name} / ffn_frozen/{parts[1]} (time)", ours[name]["ms"] / frozen["ms"], None))
        if parts[0] == "expert_gemm" and len(parts) == 4:
            t, r, k = parts[1:]
            dense = ok(ours, f"dense_gemm_same_flops/{t}/{r}")
            if ok(ours, name) and dense:
                ratio = dense["ms"] / ours[name]["ms"]  # same FLOPs: the throughput ratio
                per_expert = int(t) // int(k)
                target = ratio >= 0.90 if per_expert >= 1024 else None
                lines.append((f"{name} vs dense_gemm_same_flops/{t}/{r} (throughput, {per_expert} tok/expert"
                              f"{', >= 0.90' if per_expert >= 1024 else ''})", ratio, target))
        if parts[0] == "expert_gemm_cuda_cores" and len(parts) == 4:
            tc = ok(ours, "/".join(["expert_gemm"] + parts[1:]))
            if ok(ours, name) and tc:
                lines.append((f"expert_gemm/{'/'.join(parts[1:])} vs {name} (tensor-core speed-up)",
                              ours[name]["ms"] / tc["ms"], None))
        if parts[0] == "expert_gemm_op" and len(parts) == 5:
            op, t, r = parts[1], parts[2], parts[3]
            dense = ok(ours, f"dense_gemm_op/{op}/{t}/{r}")
            if ok(ours, name) and dense:
                lines.append((f"{name} vs dense_gemm_op/{op}/{t}/{r} (throughput)", dense["ms"] / ours[name]["ms"],
                              None))
    for name, r in sorted(peer.items()):
        parts = name.split("/")
        mine = {"torch_mole_loop": "ffn_mole", "torch_mole_compiled": "ffn_mole", "torch_lora_ffn": "ffn_lora",
                "torch_frozen_ffn": "ffn_frozen"}.get(parts[0])
        if not mine:
            continue
        theirs = ok(ours, "/".join([mine] + parts[1:]))
        if theirs:
            speedup = r["median_ms"] / theirs["ms"]
            target = speedup > 1.0 if parts[0].startswith("torch_mole") else None
            lines.append((f"{name} / {'/'.join([mine] + parts[1:])} (speed-up of ours{', > 1' if target is not None else ''})",
                          speedup, target))

    print("\nRatios")
    if not lines:
        print("  (none: results missing)")
    for label, value, target in lines:
        verdict = "" if target is None else ("  MET" if target else "  MISSED")
        print(f"  {label:<96} {value:7.3f}{verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
