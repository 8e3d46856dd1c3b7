"""Run every benchmark one after the other and write bench/RESULTS.md (summary table + full tables).

    python bench/run_all.py                    # sizes for 2 CPU cores (about 10 minutes)
    python bench/run_all.py --only simsiam data
    python bench/run_all.py --gpu              # ImageNet-sized settings (224 px; DINO/iBOT 224/96)

Nothing else should run on the machine meanwhile: each script compares HVP with plain steps
interleaved in one process, which protects the ratios from slow drifts but not from a busy machine.
Each benchmark runs in a process of its own, so that one benchmark's allocations and caches do not
enter the next one's peak-memory figures (the step benches can also be called in-process:
bench_<name>.main(argv) returns the summary that --output writes as JSON).
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CPU_VIT = ["--steps", "4", "--warmup", "1"]  # the scripts' ViT-S/16 128/64 px default; a step takes seconds on a CPU
GPU_VIT = ["--image_size", "224", "--local_size", "96", "--batch_size", "32", "--local_crops_number", "8"]
GPU_RESNET = ["--arch", "resnet50", "--image_size", "224", "--batch_size", "64"]
SETTINGS = {  # bench: (flags on 2 CPU cores, flags with --gpu)
    "simsiam": ([], GPU_RESNET),
    "simclr": ([], GPU_RESNET),
    "dino": (CPU_VIT + ["--device_crops"], GPU_VIT + ["--device_crops"]),  # + the HVP step with views cut in it
    "ibot": (CPU_VIT, GPU_VIT),
    "data": (["--loader"], ["--loader", "--image_size", "224", "--workers", "0", "4", "8", "--views", "2", "4"]),
}
STEP_BENCHES = ("simsiam", "simclr", "dino", "ibot")


def _ratio(summary, kind):
    """'wall (CPU time cpu)' of one HVP kind, or '-' where the bench did not run it."""
    if kind not in summary["step_ratio"]:
        return "-"
    return f"{summary['step_ratio'][kind]:.2f} (CPU time {summary['step_ratio_cpu'][kind]:.2f})"


def summary_lines(summaries):
    """The Markdown summary table of the step benches' summaries (name -> bench_<name>.main's dict)."""
    lines = ["| method | machine | HVP / plain step time, selection at full res | at 0.5x res | scoring + gather, "
             "% of the full-res step | HVP / plain peak step memory (full res) |", "|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        if name not in STEP_BENCHES:
            continue
        full = s["median_s"]["wall clock"].get("hvp@1", {})
        share = f"{100 * full['score'] / full['total']:.1f} %" if full.get("score") is not None else "-"
        peaks = s["peak_memory_mib"]
        memory = f"{peaks['hvp@1'] / peaks['plain']:.2f}" if peaks.get("plain") and peaks.get("hvp@1") else "n/a"
        lines.append(f"| {name} | {s['machine']} | {_ratio(s, 'hvp@1')} | {_ratio(s, 'hvp@0.5')} | {share} | {memory} |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--gpu", action="store_true", help="ImageNet-sized settings")
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args()
    output = Path(args.output)
    parts = output.parent / (output.stem.lower() + "_files")
    parts.mkdir(parents=True, exist_ok=True)
    tables, summaries = [], {}
    for name in args.only:
        flags = SETTINGS[name][1 if args.gpu else 0]
        command = [sys.executable, str(HERE / f"bench_{name}.py"), *flags, "--output", str(parts / f"{name}.md")]
        print("$ " + " ".join(command), flush=True)
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        print(f"  {time.perf_counter() - start:.0f} s", flush=True)
        tables.append(f"### {name}\n\n`{' '.join([f'python bench/bench_{name}.py', *flags])}`\n\n" + (parts / f"{name}.md").read_text())
        summaries[name] = json.loads((parts / f"{name}.json").read_text())

    lines = ["# Benchmarks", "", f"Written by `python bench/run_all.py{' --gpu' if args.gpu else ''}` on "
             f"{time.strftime('%Y-%m-%d')}. Ratios are taken within one run of one script (steps interleaved), "
             "so they compare like with like; absolute times depend on the machine and its load. Step times are "
             "of the training scripts' own train_step functions, in wall clock (CPU time of the process in "
             "brackets).", ""]
    lines += summary_lines(summaries) + [""] + tables
    output.write_text("\n".join(lines) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
