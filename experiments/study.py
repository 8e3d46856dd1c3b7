"""HVP vs plain pretraining on the same data: several seeds, at equal epochs and at equal compute.

For every method and seed this runs three pretrainings and evaluates each:

    hvp        the method with hard views (N = 4 candidate views; DINO/iBOT: 4 globals, locals
               selected top-L from a larger pool), E epochs
    plain      the same run without hard views (N = 2; DINO/iBOT: 2 globals, L locals), E epochs:
               the equal-epochs baseline
    plain_eqc  the plain run given the training time the hvp run took: its step count is the hvp
               run's steps x (hvp training time / plain training time) of this seed's two runs,
               measured from their own metrics.jsonl (the schedules span the longer run). This is
               the equal-compute baseline.

Each run is evaluated by k-NN (k=20, T=0.07, written by the training script) and by a linear probe
(eval/linear.py on the exported backbone; DINO/iBOT: the teacher). Every finished run appends one
line to <out>/runs.jsonl, and a study that is stopped and started again skips what is there and
resumes an interrupted pretraining from its checkpoint. experiments/report.py turns runs.jsonl and
the runs' metrics into experiments/RESULTS.md and the plots.

    python experiments/study.py                                   # all 4 methods, seeds 0 1 2, 2 CPU cores
    python experiments/study.py --methods simsiam --seeds 0 1 2 3 4
    # all of Fashion-MNIST (60k/10k, 6x the time): apt-get install dataset-fashion-mnist, then
    python data/build_fashion_mnist.py --train 60000 --test 10000 --out data/fashion_mnist_full
    python experiments/study.py --dataset data/fashion_mnist_full --out experiments/full
    # on GPUs: drop the CPU settings, give ImageNet-scale ones, launch through accelerate
    python experiments/study.py --no-cpu_budget --dataset ILSVRC/imagenet-1k \\
        --launch "accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16" \\
        --train_args simsiam="--arch resnet50 --epochs 100 --batch_size 64" \\
        --linear_args="--epochs 90 --lr 0.1 --optimizer lars --no-head_batchnorm --cache_views 0"

The CPU budget (--cpu_budget, the default) sizes the runs for 2 CPU cores on the shipped 10k-image
Fashion-MNIST subset (the sizes below on top of each script's preset for that dataset, which the
study also passes explicitly with --dataset); experiments/RESULTS.md records the measured time.
"""
import argparse
import importlib
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import hvp_run  # noqa: E402

# script, flags of the hvp run, flags that turn it into the plain run
METHODS = {
    "simsiam": ("train_simsiam.py", "--num_views 4", "--num_views 2"),
    "simclr": ("train_simclr.py", "--num_views 4", "--num_views 2"),
    "dino": ("train_dino.py", "--global_views 4", "--global_views 2 --local_views {local}"),
    "ibot": ("train_ibot.py", "--global_views 4", "--global_views 2 --local_views {local}"),
}
# Sizes for 2 CPU cores (about 1-2 minutes per hvp run on the shipped data). The scripts' own
# presets for the shipped dataset fill in everything else (lr, batch, augmentations, precision).
CPU_BUDGET = {
    "simsiam": "--arch resnet18 --image_size 32 --epochs 2 --batch_size 128 --lr 1.6",  # the preset of the published study
    "simclr": "--arch resnet18 --image_size 32 --epochs 2 --warmup_epochs 0.25",  # 1/8 of the run, as published
    "dino": "--arch vit_tiny --out_dim 1024 --image_size 24 --epochs 1 --max_steps 80 --local_views 4 --local_crops_number 2",
    "ibot": "--arch vit_tiny --out_dim 1024 --patch_out_dim 1024 --epochs 1 --max_steps 80 --local_views 4 --local_crops_number 2",
}
CPU_LINEAR = "--epochs 20 --cache_views 1"


def script_module(path):
    return importlib.import_module(path.removesuffix(".py").replace("/", "."))


def resolved_config(method, flags):
    """The training config these flags give (the script's defaults and dataset preset included)."""
    module = script_module(METHODS[method][0])
    return hvp_run.parse_config(module.Config, flags, presets=module.PRESETS)[0]


def preset_flags(script):
    """A script's preset for the shipped dataset as flags: with --dataset, the CPU budget then means
    the same settings on other data (the scripts apply presets to the shipped dataset only)."""
    flags = []
    for key, value in script_module(script).PRESETS[hvp_run.DEFAULT_DATASET].items():
        if isinstance(value, bool):
            flags.append(f"--{key}" if value else f"--no-{key}")
        elif isinstance(value, tuple):
            flags += [f"--{key}", *map(str, value)]
        else:
            flags += [f"--{key}", str(value)]
    return flags


def training_time(run_dir):
    """Seconds of training (data + selection + step, excluding start-up and k-NN) from metrics.jsonl:
    each record holds the throughput over the steps since the previous one."""
    info = json.loads((run_dir / "config.json").read_text())
    global_batch = info["config"]["batch_size"] * info["config"]["grad_accum"] * info.get("processes", 1)
    seconds, last = 0.0, 0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "images_per_s" in record:
            seconds += (record["step"] - last) * global_batch / record["images_per_s"]
            last = record["step"]
    return seconds, last


def run(command, log_path):
    """Run a command, output to a log file; a failure stops the study with the log's last lines."""
    print("  $ " + " ".join(shlex.quote(c) for c in command), flush=True)
    start = time.perf_counter()
    with open(log_path, "a") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if code:
        tail = Path(log_path).read_text(errors="replace").replace("\r", "\n").strip().splitlines()[-5:]
        raise hvp_run.HVPError(f"command failed (exit {code}), log {log_path}:\n" + "\n".join(tail))
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="experiments/runs", help="run folders and runs.jsonl")
    parser.add_argument("--dataset", default="", help="passed to training and evaluation (default: the shipped subset)")
    parser.add_argument("--cpu_budget", action=argparse.BooleanOptionalAction, default=True,
                        help="use the 2-CPU-core sizes above (turn off to give your own with --train_args)")
    parser.add_argument("--train_args", nargs="*", default=[], metavar="METHOD=FLAGS",
                        help="extra training flags per method, after the CPU budget's")
    parser.add_argument("--linear_args", default=None, help=f"eval/linear.py flags (CPU budget: {CPU_LINEAR!r})")
    parser.add_argument("--no_linear", action="store_true", help="k-NN only")
    parser.add_argument("--launch", default=f"{sys.executable}", help="launcher for the training script")
    args = parser.parse_args()

    extra = {m: "" for m in METHODS}
    for item in args.train_args:
        method, _, flags = item.partition("=")
        if method not in METHODS:
            raise hvp_run.HVPError(f"--train_args: unknown method {method!r} (choose from {', '.join(METHODS)})")
        extra[method] += " " + flags
    linear_args = args.linear_args if args.linear_args is not None else (CPU_LINEAR if args.cpu_budget else "")
    data = ["--dataset", args.dataset] if args.dataset else []
    linear_preset = preset_flags("eval/linear.py") if args.dataset and args.cpu_budget else []
    out = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "runs.jsonl"
    done = {}
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            r = json.loads(line)
            done[r["method"], r["variant"], r["seed"]] = r

    def pretrain_and_eval(method, variant, seed, flags):
        key = (method, variant, seed)
        if key in done:
            return done[key]
        run_dir = out / method / f"{variant}-seed{seed}"
        command = [*shlex.split(args.launch), METHODS[method][0], *flags, "--seed", str(seed),
                   "--output_dir", str(run_dir), "--report_to", "none", *data]
        if hvp_run.latest_checkpoint(run_dir) is not None:
            command.append("--resume")
        if not (run_dir / "knn.json").exists():
            run(command, out / f"{method}-{variant}-seed{seed}.log")
        seconds, steps = training_time(run_dir)
        row = {"method": method, "variant": variant, "seed": seed, "steps": steps, "train_s": round(seconds, 1),
               "flags": " ".join(flags), **json.loads((run_dir / "knn.json").read_text())}
        if not args.no_linear:
            linear_json = run_dir / "linear.json"
            if not linear_json.exists():
                run([sys.executable, "eval/linear.py", "--backbone", str(run_dir / "backbone"), "--seed", str(seed),
                     "--output", str(linear_json), *linear_preset, *shlex.split(linear_args), *data],
                    out / f"{method}-{variant}-seed{seed}-linear.log")
            linear = json.loads(linear_json.read_text())
            row.update(linear_top1=linear["best_top1"], linear_top1_final=linear["final_top1"])
        with open(results_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        done[key] = row
        print(f"  {method} {variant} seed {seed}: {steps} steps, {seconds:.0f} s training, k-NN {row['knn_top1']:.2f} %"
              + (f", linear {row['linear_top1']:.2f} %" if "linear_top1" in row else ""), flush=True)
        return row

    start = time.perf_counter()
    for seed in args.seeds:
        for method in args.methods:
            script, hvp_flags, plain_flags = METHODS[method]
            base = [*(preset_flags(script) if args.dataset and args.cpu_budget else []),
                    *shlex.split((CPU_BUDGET[method] if args.cpu_budget else "") + extra[method])]
            local = getattr(resolved_config(method, [*base, *data]), "local_crops_number", 0)
            plain = [*base, *shlex.split(plain_flags.format(local=local))]
            print(f"{method}, seed {seed}", flush=True)
            hard = pretrain_and_eval(method, "hvp", seed, [*base, *shlex.split(hvp_flags)])
            equal_epochs = pretrain_and_eval(method, "plain", seed, plain)
            ratio = hard["train_s"] / equal_epochs["train_s"]
            steps = max(1, round(equal_epochs["steps"] * ratio))
            pretrain_and_eval(method, "plain_eqc", seed, [*plain, "--max_steps", str(steps)])
    print(f"study done in {(time.perf_counter() - start) / 60:.1f} min; results in {results_path}")


if __name__ == "__main__":
    hvp_run.run_main(main)
