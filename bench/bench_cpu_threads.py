"""The CPU thread rule, measured: a training script's images/s on the shipped dataset under each way
of sharing the cores between the training process and its loader worker, the runs alternated.

    python bench/bench_cpu_threads.py                          # the main job, 3 rounds x 3 rules: ~7 min on 2 cores
    python bench/bench_cpu_threads.py --script train_simclr.py --steps 150 --skip 40
    python bench/bench_cpu_threads.py --rounds 1 --steps 200 --output bench/results_files/cpu_threads.md

Each run is the script's CPU preset (no flags but the rule's, fp32, no k-NN) for --steps optimizer
steps, in a process of its own. Rules:
  auto       the default (hvp_run.torch_threads): the training step on all of the process's cores,
             the selection forward on the cores less the loader workers, the workers at niceness 19
  1 thread   --threads 1 throughout, the worker at normal priority (the rule before 2026-12-05)
  all cores  --threads <cores> throughout, the worker at normal priority
The rules take turns, round by round, so that a slow drift of a shared machine falls on all of them.
Reported per rule: the median over rounds of each run's median images/s (metrics.jsonl: the wall
clock between logged steps, data waits included; steps >= --skip), its median select_s and train_s,
and its images/s relative to auto. Run it with nothing else on the machine: two busy jobs on 2 cores
make both timings meaningless.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.common import cpu_name  # noqa: E402
from hvp_run import usable_cores  # noqa: E402


def run_once(script, flags, steps, skip, output_dir):
    """One training run; (images/s, select ms, train ms), medians over the logged steps >= skip."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the rule decides
    cmd = [sys.executable, script, "--max_steps", str(steps), "--output_dir", str(output_dir), "--eval_split", "",
           "--report_to", "none", "--log_every", "10", "--mixed_precision", "no", *flags]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "images_per_s" in r and r["step"] >= skip]
    if not records:
        raise SystemExit(f"no logged step >= {skip} in {output_dir}: raise --steps")
    return (statistics.median(r["images_per_s"] for r in records),
            1000 * statistics.median(r["select_s"] for r in records),
            1000 * statistics.median(r["train_s"] for r in records))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--script", default="train_simsiam.py", help="a ResNet script with a loader worker preset")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per run")
    parser.add_argument("--skip", type=int, default=100, help="steps left out at the start (start-up, warm caches)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per rule, alternated")
    parser.add_argument("--output", default="", help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    cores = usable_cores()
    rules = {"auto": [], "1 thread": ["--threads", "1"], "all cores": ["--threads", str(cores)]}
    runs = {name: [] for name in rules}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name, flags in rules.items():
                out = Path(tmp) / f"{name.replace(' ', '_')}_{round_}"
                runs[name].append(run_once(args.script, flags, args.steps, args.skip, out))
                ips, sel, train = runs[name][-1]
                print(f"round {round_ + 1}/{args.rounds} {name:9s}: {ips:7.1f} images/s (select {sel:.1f} ms, "
                      f"train {train:.1f} ms)", flush=True)
    median = {name: [statistics.median(r[i] for r in rs) for i in range(3)] for name, rs in runs.items()}
    lines = [f"{args.script}, CPU preset, fp32, {args.steps} steps per run (medians of steps >= {args.skip}), "
             f"{args.rounds} round(s), {cores} cores of {cpu_name()}:", "",
             "| rule | images/s (median of runs) | runs | select ms | train ms | images/s vs auto |",
             "|---|---|---|---|---|---|"]
    for name, (ips, sel, train) in median.items():
        each = ", ".join(f"{r[0]:.0f}" for r in runs[name])
        lines.append(f"| {name} | {ips:.0f} | {each} | {sel:.1f} | {train:.1f} | {ips / median['auto'][0]:.2f} |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.output:
        Path(args.output).write_text(table + "\n")
    return median


if __name__ == "__main__":
    main()
