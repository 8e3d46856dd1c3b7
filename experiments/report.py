"""Turn a study (experiments/study.py) into experiments/RESULTS.md and its plots.

    python experiments/report.py                                   # from a study in experiments/runs
    python experiments/report.py --runs experiments/results_files  # rebuild RESULTS.md from the shipped copies
    python experiments/report.py --runs experiments/full --output experiments/RESULTS_full.md

Inputs, all in the --runs folder (a study's --out folder, or the folder of copies a previous report
wrote next to its document, e.g. experiments/results_files):

    runs.jsonl            one line per finished run (required)
    raw_pixels_knn.json   the raw-pixel k-NN floor (eval/knn.py --raw_pixels --output ...)
    <method>/hvp-seed*/metrics.jsonl   the selection statistics every hvp run logs (selected vs random
                          pair: loss, crop IoU and area, with histograms), or their copy selection.jsonl
    grid-*.png            example hard views (experiments/view_grid.py --output ...)
    the two selection plots, reused as they are only when the statistics behind them are absent

The document goes to --output; next to it, in <output stem>_files/, go the plots and a copy of every
input above, so that folder alone rebuilds the same document (the run folders hold checkpoints and stay
out of git). The document is a function of its inputs only: no date, machine or path of the build in it.
An input that is missing is never skipped silently: each one is named, with what it would take to
supply it, on stderr and in a section of the document, and the rest is still written.

Every verdict in the document is computed here from the numbers: "HVP beat the baseline" means its
mean over seeds is higher; the document also gives the per-seed differences and whether the gap is
larger than the seeds' spread, so a reader can judge a 0.1-point "win" for what it is.
"""
import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import hvp_utils as hvp  # noqa: E402
import hvp_run  # noqa: E402

VARIANTS = {"hvp": "HVP", "plain": "plain, equal epochs", "plain_eqc": "plain, equal compute"}
METRICS = {"knn_top1": "k-NN top-1", "linear_top1": "linear top-1 (best epoch)", "linear_top1_final": "linear top-1 (last epoch)"}
PLOTS = ("selection_over_training.png", "iou_area_distributions.png")
SELECTION_FILE = "selection.jsonl"  # the selection statistics of the hvp runs, copied out of their metrics.jsonl
RAW_PIXELS_FILE = "raw_pixels_knn.json"
MULTICROP = ("dino", "ibot")  # methods whose grids come in two parts (global crops, then local crops)


def mean_std(values):
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def read_metrics(run_dir):
    """The selection records of one run's metrics.jsonl: step, epoch and every hard_*/random_* value."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [{k: v for k, v in r.items() if k in ("step", "epoch") or k.startswith(("hard_", "random_"))}
            for r in map(json.loads, path.read_text().splitlines()) if "hard_score" in r]


def load_selection(runs_dir, methods):
    """Selection records per method, {method: [(run name, [records])]}: from the hvp run folders'
    metrics.jsonl where a method has them, else from the selection.jsonl copy in runs_dir."""
    copied = {}
    if (runs_dir / SELECTION_FILE).exists():
        for line in (runs_dir / SELECTION_FILE).read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                method, run = r.pop("method"), r.pop("run")
                copied.setdefault(method, {}).setdefault(run, []).append(r)
    records = {}
    for m in methods:
        runs = [(d.name, read_metrics(d)) for d in sorted((runs_dir / m).glob("hvp-seed*"))]
        runs = [(name, recs) for name, recs in runs if recs] or list(copied.get(m, {}).items())
        if runs:
            records[m] = runs
    return records


def write_selection(records, path):
    """The selection records as one small file (one line per record), so the plots can be redrawn
    without the run folders."""
    lines = [json.dumps({"method": m, "run": name, **r}) for m, runs in records.items() for name, recs in runs for r in recs]
    path.write_text("\n".join(lines) + "\n")


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


def plot_selection(records, out_dir):
    """Selection statistics of the hvp runs over training, and IoU/area distributions by phase.
    records: {method: [(run name, [records])]} as load_selection gives. Returns the PNG paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = list(records)
    records = {m: [recs for _, recs in runs] for m, runs in records.items()}
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
    path = out_dir / PLOTS[0]
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
    path = out_dir / PLOTS[1]
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="", help="the study's --out folder, or a folder of copies written by an "
                        "earlier report (default: experiments/runs)")
    parser.add_argument("--output", default="", help="the document (default: experiments/RESULTS.md)")
    parser.add_argument("--notes", default="", help="Markdown inserted after the tables (setup, timings, "
                        "discussion; default: experiments/notes.md)")
    args = parser.parse_args()
    runs_dir = Path(args.runs) if args.runs else ROOT / "experiments" / "runs"
    output = Path(args.output) if args.output else ROOT / "experiments" / "RESULTS.md"
    notes = Path(args.notes) if args.notes else ROOT / "experiments" / "notes.md"
    if not (runs_dir / "runs.jsonl").exists():
        raise hvp_run.HVPError(f"{runs_dir / 'runs.jsonl'} not found: run experiments/study.py --out {runs_dir} first, "
                           "or rebuild from the shipped results with --runs experiments/results_files")
    rows = [json.loads(line) for line in (runs_dir / "runs.jsonl").read_text().splitlines() if line.strip()]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    assets = output.parent / (output.stem.lower() + "_files")
    assets.mkdir(parents=True, exist_ok=True)
    missing = []  # (label, what this build left out or did not redraw, what would supply it; {runs} = the runs folder)

    def copy_in(source):
        """An input file from the runs folder, copied next to the document (unless it is that file)."""
        target = assets / source.name
        if not (target.exists() and target.samefile(source)):
            shutil.copyfile(source, target)
        return target

    copy_in(runs_dir / "runs.jsonl")
    lines = [f"# {output.stem}: hard-view pretraining vs plain pretraining", "",
             f"Generated by `experiments/report.py` from [{assets.name}/runs.jsonl]({assets.name}/runs.jsonl) "
             f"({len(rows)} runs); `python experiments/report.py --runs experiments/{assets.name} --output "
             f"experiments/{output.name}` rebuilds this document from the copies in `{assets.name}/`. Accuracies are "
             "% on the test split, mean ± std over seeds. k-NN: k=20, T=0.07. Linear: eval/linear.py on the exported "
             "backbone (DINO/iBOT: the teacher); \"best epoch\" is the best test accuracy over epochs and learning "
             "rates (as upstream reports it, optimistic), \"last epoch\" the last epoch's best head.", ""]
    raw = runs_dir / RAW_PIXELS_FILE
    if raw.exists():  # eval/knn.py --raw_pixels output
        floor = json.loads(copy_in(raw).read_text())
        lines += [f"Raw-pixel floor (k-NN on normalised {floor['image_size']} px pixels, k=20, T=0.07): "
                  f"**{floor['knn']['20']['top1']:.2f} %**.", ""]
    else:
        missing.append(("Left out", "the raw-pixel k-NN floor", f"Needs `{{runs}}/{RAW_PIXELS_FILE}`, written by "
                        f"`python eval/knn.py --raw_pixels --image_size <the runs' image size> --output "
                        f"{{runs}}/{RAW_PIXELS_FILE}`"))
    body = []

    body += ["## Verdicts", ""]
    for m in methods:
        mrows = [r for r in rows if r["method"] == m]
        body.append(f"**{m}**")
        for baseline, name in (("plain", "equal epochs"), ("plain_eqc", "equal compute")):
            for metric in ("knn_top1", "linear_top1"):
                text = verdict(mrows, baseline, metric)
                if text:
                    body.append(f"- Did HVP beat plain at {name} ({METRICS[metric]})? {text}")
        body.append("")

    body += ["## Numbers", "",
             "| method | variant | seeds | steps | training time (s) | k-NN top-1 | linear top-1 (best) | linear top-1 (last) |",
             "|---|---|---|---|---|---|---|---|"]
    for m in methods:
        for v, name in VARIANTS.items():
            vr = sorted((r for r in rows if r["method"] == m and r["variant"] == v), key=lambda r: r["seed"])
            if not vr:
                continue
            cells = [mean_std([r[k] for r in vr if k in r]) for k in METRICS]
            steps = "/".join(dict.fromkeys(str(r["steps"]) for r in vr))  # per seed, once if all equal
            body.append(f"| {m} | {name} | {', '.join(str(r['seed']) for r in vr)} | {steps} | "
                        f"{statistics.mean(r['train_s'] for r in vr):.0f} | " + " | ".join(cells) + " |")
    body += ["", "Training time: data loading + selection + training steps, from each run's metrics.jsonl "
             "(start-up and evaluation excluded). Equal compute: the plain run gets the hvp run's steps × "
             "(hvp time / plain time) of the same seed.", ""]
    body += ["Flags per method (the scripts' presets for the shipped dataset fill in the rest):", ""]
    for m in methods:
        flags = next((r["flags"] for r in rows if r["method"] == m and r["variant"] == "hvp"), None)
        if flags is not None:
            body.append(f"- {m}: `{flags}`")
    body.append("")

    # Selection plots: redrawn from the runs' statistics (or their copy); without any, the PNGs of an
    # earlier build found in the runs folder are shown as they are, and the document says so.
    hvp_methods = [m for m in methods if any(r["method"] == m and r["variant"] == "hvp" for r in rows)]
    records = load_selection(runs_dir, hvp_methods)
    statistics_needed = (f"the hvp runs' selection statistics: their `{{runs}}/<method>/hvp-seed*/metrics.jsonl`, or "
                         f"`{{runs}}/{SELECTION_FILE}`, the copy of them that a report writes next to its document")
    plots, reused = [], False
    if records:
        write_selection(records, assets / SELECTION_FILE)
        plots = plot_selection(records, assets)
        absent = [m for m in hvp_methods if m not in records]
        if absent:
            missing.append(("Left out", f"{', '.join(absent)} in the selection plots", "Needs " + statistics_needed))
    else:
        plots = [copy_in(runs_dir / name) for name in PLOTS if (runs_dir / name).exists()]
        reused = bool(plots)
        if reused:
            missing.append(("Not redrawn", "the two selection plots", "The PNGs shown are the ones found in the runs "
                            "folder, drawn by an earlier build and reused as they are. Redrawing them needs "
                            + statistics_needed))
        elif hvp_methods:
            missing.append(("Left out", "the selection plots (section \"What the selection picks\")",
                            "Needs " + statistics_needed))
    if plots:
        body += ["## What the selection picks", "",
                 "The paper's analysis of what hard-view selection picks: the selected pair's loss vs the random pair "
                 "(0, 1) that plain training would have used, and the crop IoU and area of both pairs (DINO/iBOT: the "
                 "two global crops; dotted: the area of the L local crops kept vs the first L). Logged by every hvp "
                 "run on one batch every `--log_every` steps.", ""]
        if reused:
            body += ["_Not redrawn by this build: the per-step statistics behind these plots are not among its inputs "
                     "(see \"Inputs missing from this build\" above)._", ""]
        body += [f"![{p.stem}]({assets.name}/{p.name})" for p in plots] + [""]

    # Example grids: inputs made by experiments/view_grid.py, in the runs folder or already next to the document.
    found = {p.name: p for p in assets.glob("grid-*.png")}
    found.update({p.name: p for p in runs_dir.glob("grid-*.png")})
    grids = [copy_in(p) for p in found.values()]

    def grid_order(path):  # grid-<method>[-locals].png, in the study's method order
        name = path.stem.removeprefix("grid-").removesuffix("-locals")
        return (methods.index(name) if name in methods else len(methods), name, path.stem.endswith("-locals"))
    grids.sort(key=grid_order)
    for m in hvp_methods:
        if f"grid-{m}.png" not in found:
            missing.append(("Left out", f"the example hard views of {m}", f"Needs `{{runs}}/grid-{m}.png`, written by "
                            f"`python experiments/view_grid.py --run {{runs}}/{m}/hvp-seed0 --zoom 3 --output "
                            f"{{runs}}/grid-{m}.png` from that run's checkpoint"))
    if grids:
        body += ["## Example hard views", "", "Written by `experiments/view_grid.py`: each row is one training "
                 "image's candidate views, the selected ones framed green (DINO/iBOT: global crops, then local "
                 "crops).", ""]
        body += [f"**{p.stem.removeprefix('grid-')}**\n\n![{p.stem}]({assets.name}/{p.name})\n" for p in grids]
    if notes.exists():
        body += [notes.read_text().strip(), ""]
    else:
        missing.append(("Left out", "the setup and discussion section",
                        f"Needs the notes file `{args.notes or 'experiments/notes.md'}`"))

    if missing:
        lines += ["## Inputs missing from this build", "",
                  "This document was built without some of its inputs. What is left out, and what would supply it:", ""]
        lines += [f"- **{label}: {what}.** {needs.format(runs='<runs folder>')}." for label, what, needs in missing] + [""]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines + body))
    for label, what, needs in missing:
        print(f"warning: {label.lower()}: {what}. {needs.format(runs=runs_dir)}.", file=sys.stderr)
    print(f"wrote {output} and {assets}/" + (f" ({len(missing)} input(s) missing: listed above and in the document's "
                                             "section \"Inputs missing from this build\")" if missing else ""))


if __name__ == "__main__":
    hvp_run.run_main(main)
