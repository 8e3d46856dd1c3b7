"""Turn a study (experiments/study.py) into experiments/RESULTS.md and its plots.

    python experiments/report.py                       # reads experiments/runs, writes experiments/RESULTS.md
    python experiments/report.py --runs experiments/full --output experiments/RESULTS_full.md

Reads <runs>/runs.jsonl (one line per finished run), the hvp runs' metrics.jsonl (the selection
statistics every training run logs: selected-pair vs random-pair loss, crop IoU and crop area, with
histograms) and, when present, <runs>/raw_pixels_knn.json (eval/knn.py --raw_pixels --output ...) and
PNG grids named grid-*.png in the plots folder (experiments/view_grid.py --output ...). Writes, next
to the output document, a folder of PNG plots and a copy of runs.jsonl, so the document and the data
behind it are committed together (the run folders hold checkpoints and stay out of git).

Every verdict in the document is computed here from the numbers: "HVP beat the baseline" means its
mean over seeds is higher; the document also gives the per-seed differences and whether the gap is
larger than the seeds' spread, so a reader can judge a 0.1-point "win" for what it is.
"""
import argparse
import json
import platform
import shutil
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import hvp_utils as hvp  # noqa: E402

VARIANTS = {"hvp": "HVP", "plain": "plain, equal epochs", "plain_eqc": "plain, equal compute"}
METRICS = {"knn_top1": "k-NN top-1", "linear_top1": "linear top-1 (best epoch)", "linear_top1_final": "linear top-1 (last epoch)"}


def mean_std(values):
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def read_metrics(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if "hard_score" in r]


def verdict(rows, baseline, metric):
    """One sentence comparing hvp with a baseline variant on one metric, from per-seed pairs."""
    by_seed = {v: {r["seed"]: r[metric] for r in rows if r["variant"] == v and metric in r} for v in ("hvp", baseline)}
    seeds = sorted(set(by_seed["hvp"]) & set(by_seed[baseline]))
    if not seeds:
        return None
    diffs = [by_seed["hvp"][s] - by_seed[baseline][s] for s in seeds]
    delta = statistics.mean(diffs)
    spread = max(statistics.stdev(by_seed[v][s] for s in seeds) if len(seeds) > 1 else 0.0 for v in ("hvp", baseline))
    wins = sum(d > 0 for d in diffs)
    outcome = "**yes**" if delta > 0 else "**no**"
    noise = (" (gap smaller than the seed-to-seed std " f"{spread:.2f}: not distinguishable from noise)"
             if len(seeds) > 1 and abs(delta) <= spread else "")
    return (f"{outcome}: HVP − baseline = {delta:+.2f} points mean over seeds {seeds} "
            f"(per seed: {', '.join(f'{d:+.2f}' for d in diffs)}; HVP higher in {wins}/{len(seeds)}){noise}")


def plot_selection(runs_dir, methods, out_dir):
    """Selection statistics of the hvp runs over training, and IoU/area distributions by phase."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    records = {m: [read_metrics(d) for d in sorted((runs_dir / m).glob("hvp-seed*"))] for m in methods}
    records = {m: [r for r in runs if r] for m, runs in records.items()}
    methods = [m for m in methods if records[m]]
    if not methods:
        return []
    written = []

    # 1. means over training: loss gap, IoU, area (hard vs random), mean over seeds
    fig, axes = plt.subplots(3, len(methods), figsize=(3.6 * len(methods), 8), squeeze=False)
    for col, m in enumerate(methods):
        length = min(len(run) for run in records[m])
        epoch = np.array([r["epoch"] for r in records[m][0][:length]])

        def curve(key):
            return np.mean([[r[key] for r in run[:length]] for run in records[m]], axis=0)
        ax = axes[0, col]
        ax.plot(epoch, curve("hard_score") - curve("random_score"), color="C3")
        ax.axhline(0, color="gray", lw=0.5)
        ax.set_title(f"{m}: selected − random pair loss")
        for row, key, label in ((1, "iou", "crop IoU"), (2, "area", "crop area (fraction of image)")):
            ax = axes[row, col]
            ax.plot(epoch, curve(f"hard_{key}"), color="C3", label="selected pair")
            ax.plot(epoch, curve(f"random_{key}"), color="C0", label="random pair (0, 1)")
            if key == "area" and "hard_local_area" in records[m][0][0]:  # DINO/iBOT: the kept local crops too
                ax.plot(epoch, curve("hard_local_area"), color="C3", ls=":", label="selected locals")
                ax.plot(epoch, curve("random_local_area"), color="C0", ls=":", label="first L locals")
                ax.legend(loc="upper right", fontsize=7)
            ax.set_title(f"{m}: {label}")
            ax.set_ylim(0, 1)
        axes[2, col].set_xlabel("epoch")
    axes[1, 0].legend(loc="lower left", fontsize=8)
    fig.suptitle(f"Hard-view selection over training (mean of {len(records[methods[0]])} seeds per method)")
    fig.tight_layout()
    path = out_dir / "selection_over_training.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    # 2. distributions (histograms logged per record), early / middle / late third of training
    edges = np.linspace(0, 1, hvp.STATS_BINS + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    fig, axes = plt.subplots(2, len(methods), figsize=(3.6 * len(methods), 5.6), squeeze=False)
    for col, m in enumerate(methods):
        for row, key in enumerate(("iou", "area")):
            ax = axes[row, col]
            for index, (phase, colour) in enumerate(zip(("early", "middle", "late"), ("C2", "C1", "C3"))):
                hist = {"hard": np.zeros(hvp.STATS_BINS), "random": np.zeros(hvp.STATS_BINS)}
                for run in records[m]:
                    for r in run[index * len(run) // 3:(index + 1) * len(run) // 3]:
                        if f"hard_{key}_hist" in r:
                            for kind in hist:
                                hist[kind] += np.array(r[f"{kind}_{key}_hist"])
                if hist["hard"].sum() == 0:
                    continue
                ax.plot(centres, hist["hard"] / hist["hard"].sum(), color=colour, marker="o", ms=3,
                        label=f"selected, {phase}")
                ax.plot(centres, hist["random"] / hist["random"].sum(), color=colour, ls="--", lw=1,
                        label=f"random, {phase}")
            ax.set_title(f"{m}: crop {'IoU' if key == 'iou' else 'area'} distribution")
            ax.set_xlim(0, 1)
        axes[1, col].set_xlabel("value (10 bins)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Selected pair (solid) vs random pair (dashed), by third of training (all seeds)")
    fig.tight_layout()
    path = out_dir / "iou_area_distributions.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="experiments/runs", help="the study's --out folder")
    parser.add_argument("--output", default="experiments/RESULTS.md")
    parser.add_argument("--notes", default="experiments/notes.md",
                        help="Markdown inserted after the tables (setup, timings, discussion), if it exists")
    args = parser.parse_args()
    runs_dir, output = Path(args.runs), Path(args.output)
    if not (runs_dir / "runs.jsonl").exists():
        raise hvp.HVPError(f"{runs_dir / 'runs.jsonl'} not found: run experiments/study.py --out {runs_dir} first")
    rows = [json.loads(line) for line in (runs_dir / "runs.jsonl").read_text().splitlines() if line.strip()]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    assets = output.parent / (output.stem.lower() + "_files")
    assets.mkdir(parents=True, exist_ok=True)
    shutil.copy(runs_dir / "runs.jsonl", assets / "runs.jsonl")

    lines = [f"# {output.stem}: hard-view pretraining vs plain pretraining", "",
             f"Generated by `python experiments/report.py --runs {args.runs} --output {args.output}` from "
             f"[{assets.name}/runs.jsonl]({assets.name}/runs.jsonl) ({len(rows)} runs). Accuracies are % on the "
             "test split, mean ± std over seeds. k-NN: k=20, T=0.07. Linear: eval/linear.py on the exported "
             "backbone (DINO/iBOT: the teacher); \"best epoch\" is the best test accuracy over epochs and learning "
             "rates (as upstream reports it, optimistic), \"last epoch\" the last epoch's best head.", ""]
    raw = runs_dir / "raw_pixels_knn.json"
    if raw.exists():  # eval/knn.py --raw_pixels output
        floor = json.loads(raw.read_text())
        lines += [f"Raw-pixel floor (k-NN on normalised {floor['image_size']} px pixels, k=20, T=0.07): "
                  f"**{floor['knn']['20']['top1']:.2f} %**.", ""]

    lines += ["## Verdicts", ""]
    for m in methods:
        mrows = [r for r in rows if r["method"] == m]
        lines.append(f"**{m}**")
        for baseline, name in (("plain", "equal epochs"), ("plain_eqc", "equal compute")):
            for metric in ("knn_top1", "linear_top1"):
                text = verdict(mrows, baseline, metric)
                if text:
                    lines.append(f"- Did HVP beat plain at {name} ({METRICS[metric]})? {text}")
        lines.append("")

    lines += ["## Numbers", "",
              "| method | variant | seeds | steps | training time (s) | k-NN top-1 | linear top-1 (best) | linear top-1 (last) |",
              "|---|---|---|---|---|---|---|---|"]
    for m in methods:
        for v, name in VARIANTS.items():
            vr = sorted((r for r in rows if r["method"] == m and r["variant"] == v), key=lambda r: r["seed"])
            if not vr:
                continue
            cells = [mean_std([r[k] for r in vr if k in r]) for k in METRICS]
            steps = "/".join(dict.fromkeys(str(r["steps"]) for r in vr))  # per seed, once if all equal
            lines.append(f"| {m} | {name} | {', '.join(str(r['seed']) for r in vr)} | {steps} | "
                         f"{statistics.mean(r['train_s'] for r in vr):.0f} | " + " | ".join(cells) + " |")
    lines += ["", "Training time: data loading + selection + training steps, from each run's metrics.jsonl "
              "(start-up and evaluation excluded). Equal compute: the plain run gets the hvp run's steps × "
              "(hvp time / plain time) of the same seed.", ""]
    lines += ["Flags per method (the scripts' presets for the shipped dataset fill in the rest):", ""]
    for m in methods:
        flags = next(r["flags"] for r in rows if r["method"] == m and r["variant"] == "hvp")
        lines.append(f"- {m}: `{flags}`")
    lines.append("")

    plots = plot_selection(runs_dir, methods, assets)
    if plots:
        lines += ["## What the selection picks", "",
                  "The paper's analysis (its B.3): the selected pair's loss vs the random pair (0, 1) that plain "
                  "training would have used, and the crop IoU and area of both pairs (DINO/iBOT: the two global "
                  "crops; dotted: the area of the L local crops kept vs the first L). Logged by every hvp run on one "
                  "batch every `--log_every` steps.", ""]
        lines += [f"![{p.stem}]({assets.name}/{p.name})" for p in plots] + [""]
    def grid_order(path):  # grid-<method>[-locals].png, in the study's method order
        name = path.stem.removeprefix("grid-").removesuffix("-locals")
        return (methods.index(name) if name in methods else len(methods), name, path.stem.endswith("-locals"))
    grids = sorted(assets.glob("grid-*.png"), key=grid_order)
    if grids:
        lines += ["## Example hard views", "", "Written by `experiments/view_grid.py`: each row is one training "
                  "image's candidate views, the selected ones framed green (DINO/iBOT: global crops, then local "
                  "crops).", ""]
        lines += [f"**{p.stem.removeprefix('grid-')}**\n\n![{p.stem}]({assets.name}/{p.name})\n" for p in grids]
    notes = Path(args.notes)
    if notes.exists():
        lines += [notes.read_text().strip(), ""]
    import torch
    lines += [f"_Report written on: {platform.platform()}, {platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} torch threads; Python {platform.python_version()}, torch {torch.__version__}._", ""]
    output.write_text("\n".join(lines))
    print(f"wrote {output} and {assets}/")


if __name__ == "__main__":
    hvp.run_main(main)
