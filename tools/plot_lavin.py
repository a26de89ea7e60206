#!/usr/bin/env python3
"""Figures of the LaVIN ablation (examples/lavin_ablation.cpp).

Reads lavin_runs.csv, lavin_tasks.csv and lavin_results.json from the program's --out directory and writes
  lavin_ladder.png     test accuracy (IMG, TXT, Avg) of the ladder's rows, and per-task accuracy
  lavin_sweeps.png     accuracy against the adapter width h and the router temperature tau
  lavin_retention.png  text-only ability (multiple choice and cloze) and the routing weights by modality
  lavin_losses.png     training loss curves
into the output directory (default docs/). With several seeds, bars and points are means and the error bars
span one standard deviation.

usage: python3 tools/plot_lavin.py RESULTS_DIR [--docs DOCS_DIR]
"""
import argparse
import csv
import json
import os
import statistics
from collections import OrderedDict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

COLOURS = {"IMG": "#4c72b0", "TXT": "#dd8452", "Avg": "#55a868", "cloze": "#8172b3"}


def read_runs(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for key in ("image_acc", "text_acc", "overall_acc", "cloze_acc", "w0_text", "w0_image", "routing_gap", "tau",
                    "final_loss", "image_fraction"):
            r[key] = float(r[key])
        for key in ("hidden", "trainable", "steps", "seed"):
            r[key] = int(r[key])
        for key in ("vision", "joint", "routing"):
            r[key] = r[key] == "1"
    return rows


def by_name(rows):
    """Runs grouped by name (over seeds), in first-seen order."""
    groups = OrderedDict()
    for r in rows:
        groups.setdefault(r["name"], []).append(r)
    return groups


def stats(values):
    values = [v for v in values if v == v]  # drop NaN
    if not values:
        return float("nan"), 0.0
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def bars(ax, labels, series, ylabel, title):
    """Grouped bars: series = {legend: [(mean, sd) per label]}."""
    width = 0.8 / len(series)
    for i, (legend, values) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        means = [m for m, _ in values]
        sds = [s for _, s in values]
        ax.bar(xs, means, width, yerr=sds if any(sds) else None, capsize=3, label=legend,
               color=COLOURS.get(legend))
        for x, m in zip(xs, means):
            if m == m:
                ax.text(x, m + 1, f"{m:.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)


def ladder_figure(groups, tasks, out):
    ladder = [(n, rs) for n, rs in groups.items() if rs[0]["group"] == "ladder"]
    if not ladder:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 1.2]})
    labels = [n.replace(" (", "\n(").replace("+ ", "+\n", 1) for n, _ in ladder]
    series = {
        "IMG": [stats([100 * r["image_acc"] for r in rs]) for _, rs in ladder],
        "TXT": [stats([100 * r["text_acc"] for r in rs]) for _, rs in ladder],
        "Avg": [stats([100 * r["overall_acc"] for r in rs]) for _, rs in ladder],
    }
    bars(ax1, labels, series, "test accuracy (%)", "LaVIN ablation ladder")

    names = [n for n, _ in ladder]
    task_names = list(OrderedDict((t["task"], t["image_task"] == "1") for t in tasks).items())
    grid = []
    for task, _ in task_names:
        row = []
        for n in names:
            row.append(100 * statistics.mean(float(t["accuracy"]) for t in tasks if t["name"] == n and t["task"] == task))
        grid.append(row)
    im = ax2.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax2.set_xticks(range(len(names)))
    ax2.set_xticklabels([n[:3] for n in names])
    ax2.set_yticks(range(len(task_names)))
    ax2.set_yticklabels([f"{t} {'(img)' if img else ''}" for t, img in task_names], fontsize=8)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax2.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="white" if v < 60 else "black")
    ax2.set_title("per-task accuracy (%)", fontsize=10)
    fig.colorbar(im, ax=ax2, fraction=0.04)
    fig.tight_layout()
    path = os.path.join(out, "lavin_ladder.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sweeps_figure(groups, out):
    full = next((rs for n, rs in groups.items() if n.startswith("(d) + MM-Adapter")), None)

    def points(group, key):
        found = [rs for rs in groups.values() if rs[0]["group"] == group]
        if not found:
            return []
        if full:
            found.append(full)
        return sorted(found, key=lambda rs: rs[0][key])

    panels = [("width", "hidden", "adapter width h", True), ("tau", "tau", "router temperature tau", False)]
    panels = [(g, k, label, log) for g, k, label, log in panels if points(g, k)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (group, key, label, log) in zip(axes[0], panels):
        runs = points(group, key)
        xs = [rs[0][key] for rs in runs]
        for legend, metric in (("IMG", "image_acc"), ("TXT", "text_acc"), ("Avg", "overall_acc"), ("cloze", "cloze_acc")):
            ms = [stats([100 * r[metric] for r in rs]) for rs in runs]
            ax.errorbar(xs, [m for m, _ in ms], yerr=[s for _, s in ms], marker="o", capsize=3, label=legend,
                        color=COLOURS[legend])
        if log:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:g}" for x in xs])
        if key == "hidden":
            for x, rs in zip(xs, runs):
                ax.annotate(f"{rs[0]['trainable']:,}", (x, 3), ha="center", fontsize=7, color="grey")
        ax.set_xlabel(label + (" (grey: trainable parameters)" if key == "hidden" else ""))
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center right")
    fig.suptitle("row (d), one setting changed at a time", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out, "lavin_sweeps.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def retention_figure(groups, results, out):
    rows = [(n, rs) for n, rs in groups.items()
            if rs[0]["group"] == "retention" or n.startswith("(c) + joint") or n.startswith("(d) + MM-Adapter")]
    if not rows:
        return None
    untuned = results["untuned"]
    labels = ["pre-trained\n(untuned)"] + [
        f"{n[:3]} {'no ' if not rs[0]['routing'] else ''}routing\n"
        f"{'image-only tuning' if rs[0]['image_fraction'] == 1.0 else 'mixed tuning'}" for n, rs in rows]
    series = {
        "TXT": [(100 * untuned["text_accuracy"], 0.0)] + [stats([100 * r["text_acc"] for r in rs]) for _, rs in rows],
        "cloze": [(100 * untuned["cloze_accuracy"], 0.0)] + [stats([100 * r["cloze_acc"] for r in rs]) for _, rs in rows],
    }
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1.3, 1]})
    bars(ax1, labels, series, "accuracy on held-out text facts (%)", "text-only ability before and after tuning")

    routed = [(n, rs) for n, rs in rows if rs[0]["routing"]]
    runs = {r["name"]: r for r in results["runs"] if r["seed"] == results["seed"]}
    for n, _ in routed:
        run = runs.get(n)
        if not run:
            continue
        layers = range(1, len(run["w0_text"]) + 1)
        short = n.split(" tuned")[0] if "tuned" in n else n[:3]
        tag = "image-only tuning" if "image questions only" in n else "mixed tuning"
        ax2.plot(layers, run["w0_text"], marker="o", label=f"{short} {tag}: text rows")
        ax2.plot(layers, run["w0_image"], marker="s", linestyle="--", label=f"{short} {tag}: image rows")
    ax2.axhline(0.5, color="grey", linewidth=0.8)
    ax2.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax2.set_xlabel("LLM layer")
    ax2.set_ylabel("routing weight w0 (branch 0)")
    ax2.set_ylim(0, 1)
    ax2.set_title(f"MM-Adapter routing by modality (seed {results['seed']})", fontsize=10)
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out, "lavin_retention.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def losses_figure(results, out):
    runs = [r for r in results["runs"] if r["seed"] == results["seed"]]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in runs:
        losses = r["losses"]
        k = max(1, len(losses) // 50)  # moving average over about 2% of the run
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
        ax.plot(range(1, len(losses) + 1), smooth, label=r["name"], linewidth=1.2 if r["group"] == "ladder" else 0.7,
                linestyle="-" if r["group"] == "ladder" else ":")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (answer tokens)")
    ax.set_title(f"tuning loss (seed {results['seed']})", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out, "lavin_losses.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in", dest="results", default="out/lavin_ablation",
                        help="the --out directory of lavin_ablation (default: out/lavin_ablation)")
    parser.add_argument("--docs", default="docs", help="where to write the PNGs (default: docs)")
    args = parser.parse_args()
    rows = read_runs(os.path.join(args.results, "lavin_runs.csv"))
    with open(os.path.join(args.results, "lavin_tasks.csv"), newline="") as f:
        tasks = list(csv.DictReader(f))
    with open(os.path.join(args.results, "lavin_results.json")) as f:
        results = json.load(f)
    os.makedirs(args.docs, exist_ok=True)
    groups = by_name(rows)
    for path in (ladder_figure(groups, tasks, args.docs), sweeps_figure(groups, args.docs),
                 retention_figure(groups, results, args.docs), losses_figure(results, args.docs)):
        if path:
            print("wrote", path)


if __name__ == "__main__":
    main()
