#!/usr/bin/env python3
"""Figures of examples/mole_ablation (LLaVA-MoLE's ablations at toy scale) from the CSV files it writes.

Reads from --in (the program's --out): accuracy.csv, rank_sweep.csv, expert_sweep.csv, usage.csv, routing_mi.csv.
Writes PNGs into --docs with the prefix mole_:
  mole_accuracy.png      per-domain test accuracy of every model of the main table (bars; error bars = sd over seeds)
  mole_rank_sweep.png    LoRA on the mixture against its trainable parameters, with the MoLE and single-domain rows
  mole_expert_sweep.png  accuracy against the number of experts K, and how much the routing knows of the domain
  mole_usage.png         expert usage heat maps of the MoLE row: rows = token kinds, columns = layers,
                         each map = fraction of a domain's tokens (rows) routed to each expert (columns)
  mole_usage_gate.png    the same for the gate-scaled MoLE row, when the table has it
Usage: python3 tools/plot_mole.py [--in out/mole_ablation] [--docs docs]
"""
import argparse
import csv
import os
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DOMAINS = ["general", "document", "medical"]
COLUMNS = DOMAINS + ["average"]
COLOURS = {"general": "#4c72b0", "document": "#dd8452", "medical": "#55a868", "average": "#333333"}
KINDS = ["all", "image", "text", "decision"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def count(text):
    """'3 x 7,392' or '7,392' -> the number of parameters of one model."""
    return int(text.split("x")[-1].replace(",", "").strip())


def plot_accuracy(rows, path):
    fig, ax = plt.subplots(figsize=(11, 4.6))
    width = 0.8 / len(COLUMNS)
    for j, col in enumerate(COLUMNS):
        xs = [i + (j - (len(COLUMNS) - 1) / 2) * width for i in range(len(rows))]
        ys = [float(r[col]) for r in rows]
        sd = [float(r[col + "_sd"]) for r in rows]
        ax.bar(xs, ys, width, yerr=sd if any(sd) else None, capsize=2, label=col, color=COLOURS[col],
               alpha=0.6 if col == "average" else 0.9)
    labels = [textwrap.fill(r["model"], 18) + f"\n{r['trained on']}, r={r['rank']}, K={r['K']}\n{r['trainable']} params"
              for r in rows]
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(ncol=4, fontsize=8, loc="upper left")
    ax.set_title("Per-domain test accuracy (rows of the main table)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_rank_sweep(sweep, table, path):
    fig, ax = plt.subplots(figsize=(10.5, 4.6))
    params = [count(r["trainable"]) for r in sweep]
    for col in COLUMNS:
        ys = [float(r[col]) for r in sweep]
        sd = [float(r[col + "_sd"]) for r in sweep]
        ax.errorbar(params, ys, yerr=sd if any(sd) else None, marker="o", capsize=2, color=COLOURS[col],
                    lw=2.2 if col == "average" else 1.2, label=f"LoRA on mixture: {col}")
    for r, p in zip(sweep, params):
        ax.annotate(f"r={r['rank']}", (p, float(r["average"])), textcoords="offset points", xytext=(4, -12),
                    fontsize=8)
    if sweep and "single-domain average" in sweep[0]:
        ax.plot(params, [float(r["single-domain average"]) for r in sweep], "k--", marker="s", lw=1.2,
                label="single-domain LoRAs (own domain), average")
    for r in table:
        if r["model"].startswith("MoLE"):
            ax.plot([count(r["trainable"])], [float(r["average"])], marker="*", ms=14, ls="none",
                    label=f"{r['model']}: average (r={r['rank']}, K={r['K']})")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("LoRA-rank sweep on the mixture")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_expert_sweep(sweep, mi, rank, path):
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    ks = [int(r["K"]) for r in sweep]
    for col in COLUMNS:
        ys = [float(r[col]) for r in sweep]
        sd = [float(r[col + "_sd"]) for r in sweep]
        ax.errorbar(ks, ys, yerr=sd if any(sd) else None, marker="o", capsize=2, color=COLOURS[col],
                    lw=2.2 if col == "average" else 1.2, label=col)
    ax.set_xticks(ks)
    ax.set_xlabel("experts K (top-1; K = 1 is plain LoRA)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Expert-count sweep on the mixture (rank {rank})")
    # routing information: mean over seeds and layers of I(domain; expert) / H(domain), per token kind
    names = {int(r["K"]): f"MoLE K{r['K']} r{rank} on mixture" for r in sweep if int(r["K"]) > 1}
    for kind in KINDS:
        xs, ys = [], []
        for k, name in sorted(names.items()):
            vals = [float(m["normalised_mi"]) for m in mi if m["run"] == name and m["tokens"] == kind]
            if vals:
                xs.append(k)
                ys.append(sum(vals) / len(vals))
        bx.plot(xs, ys, marker="o", label=f"{kind} tokens")
    shares = []
    for k, name in sorted(names.items()):
        vals = [float(m["min_expert_share"]) for m in mi if m["run"] == name and m["tokens"] == "all"]
        if vals:
            shares.append((k, sum(vals) / len(vals)))
    if shares:
        bx.plot([k for k, _ in shares], [v for _, v in shares], "k:", marker="x", label="smallest expert's token share")
    bx.set_xticks(ks[1:] if len(ks) > 1 else ks)
    bx.set_xlabel("experts K")
    bx.set_ylabel("I(domain; expert) / H(domain), mean over layers")
    bx.set_ylim(0, 1)
    bx.grid(alpha=0.3)
    bx.legend(fontsize=8)
    bx.set_title("How much the routing knows of the domain")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_usage(usage, mi, run, path):
    rows = [u for u in usage if u["run"] == run]
    if not rows:
        return False
    seed = min(int(u["seed"]) for u in rows)
    rows = [u for u in rows if int(u["seed"]) == seed]
    layers = sorted({int(u["layer"]) for u in rows})
    experts = sorted({int(u["expert"]) for u in rows})
    fig, axes = plt.subplots(len(KINDS), len(layers), figsize=(2.3 + 1.0 * len(experts) * len(layers), 1.6 * len(KINDS) + 0.9),
                             squeeze=False)
    for i, kind in enumerate(KINDS):
        for j, layer in enumerate(layers):
            grid = [[0.0] * len(experts) for _ in DOMAINS]
            for u in rows:
                if u["tokens"] == kind and int(u["layer"]) == layer:
                    grid[DOMAINS.index(u["domain"])][int(u["expert"])] = float(u["fraction"])
            ax = axes[i][j]
            ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            for d in range(len(DOMAINS)):
                for e in range(len(experts)):
                    ax.text(e, d, f"{grid[d][e]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if grid[d][e] < 0.6 else "black")
            nmi = [float(m["normalised_mi"]) for m in mi
                   if m["run"] == run and int(m["seed"]) == seed and m["tokens"] == kind and int(m["layer"]) == layer]
            ax.set_title(f"layer {layer}, {kind} tokens\nI/H = {nmi[0]:.2f}" if nmi else f"layer {layer}, {kind}",
                         fontsize=8)
            ax.set_xticks(range(len(experts)))
            ax.set_xticklabels([f"e{e}" for e in experts], fontsize=7)
            ax.set_yticks(range(len(DOMAINS)))
            ax.set_yticklabels(DOMAINS if j == 0 else [""] * len(DOMAINS), fontsize=7)
    fig.suptitle(f"Expert usage of {run} (seed {seed}): fraction of each domain's test tokens per expert", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in", dest="indir", default="out/mole_ablation", help="mole_ablation's --out directory")
    parser.add_argument("--docs", default="docs", help="where the PNGs go")
    args = parser.parse_args()
    os.makedirs(args.docs, exist_ok=True)
    src = lambda name: os.path.join(args.indir, name)  # noqa: E731
    out = lambda name: os.path.join(args.docs, name)  # noqa: E731

    table = read_csv(src("accuracy.csv"))
    usage = read_csv(src("usage.csv"))
    mi = read_csv(src("routing_mi.csv"))
    written = []
    plot_accuracy(table, out("mole_accuracy.png"))
    written.append("mole_accuracy.png")
    rank_sweep = read_csv(src("rank_sweep.csv"))
    if rank_sweep:
        plot_rank_sweep(rank_sweep, table, out("mole_rank_sweep.png"))
        written.append("mole_rank_sweep.png")
    expert_sweep = read_csv(src("expert_sweep.csv"))
    rank = next(r["rank"] for r in table if r["model"] == "MoLE (mixture)")
    if expert_sweep:
        plot_expert_sweep(expert_sweep, mi, rank, out("mole_expert_sweep.png"))
        written.append("mole_expert_sweep.png")
    for model, name, suffix in [("MoLE (mixture)", "", "mole_usage.png"),
                                ("MoLE, gate scaling (mixture)", " gate-scaled", "mole_usage_gate.png")]:
        row = next((r for r in table if r["model"] == model), None)
        if row and plot_usage(usage, mi, f"MoLE K{row['K']} r{row['rank']}{name} on mixture", out(suffix)):
            written.append(suffix)
    print("wrote " + ", ".join(os.path.join(args.docs, w) for w in written))


if __name__ == "__main__":
    main()
