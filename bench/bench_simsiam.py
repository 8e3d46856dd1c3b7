"""Step time of SimSiam with hard views (N = 4) vs plain SimSiam (N = 2), same batch, one process.

    python bench/bench_simsiam.py                                   # the CPU preset model
    python bench/bench_simsiam.py --arch resnet50 --image_size 224 --batch_size 64 --mixed_precision bf16

A plain step is forward + backward + SGD on views 0 and 1. An HVP step is the same, preceded by
the selection forward of all N views (no grad, train mode), candidate scoring and the gather. Plain
and HVP steps are interleaved (ABAB...) after warm-up, so slow drifts of a shared machine hit both
alike; the table reports medians and the ratio HVP / plain, with the HVP step split into its parts
(the GPU is synchronised around each part). Inputs are random tensors: the data pipeline is not
part of the step (bench it separately).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hvp_utils as hvp  # noqa: E402
from bench import common  # noqa: E402
from train_simsiam import SimSiam, pair_loss, simsiam_loss  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--small_stem", action="store_true")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--num_views", type=int, default=4)
    parser.add_argument("--select_res", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--mixed_precision", default="bf16", choices=["no", "bf16", "fp16"])
    parser.add_argument("--steps", type=int, default=10, help="measured steps of each kind")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--output", default="", help="also write the Markdown table to this file")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    model = SimSiam(hvp.create_backbone(args.arch, args.image_size, args.small_stem), 2048, 512).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(enabled=args.mixed_precision == "fp16")
    views = torch.randn(args.batch_size, args.num_views, 3, args.image_size, args.image_size, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def train_step(x1, x2):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = simsiam_loss(*model(x1, x2))
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    def plain():
        t0 = sync()
        train_step(views[:, 0], views[:, 1])
        return {"step": sync() - t0}

    def hard(select_res):
        # the calls of train_simsiam.select_hard_pair and its training loop, timed part by part
        t0 = sync()
        B, N = views.shape[:2]
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            p, z = model.embed(hvp.resize_views(views, select_res).flatten(0, 1))
        t1 = sync()
        with torch.no_grad():
            pair, _, _ = hvp.select_hard_pairs((p.float().unflatten(0, (B, N)), z.float().unflatten(0, (B, N))), pair_loss)
            x1, x2 = hvp.gather_views(views, pair[:, 0]), hvp.gather_views(views, pair[:, 1])
        t2 = sync()
        train_step(x1, x2)
        t3 = sync()
        return {"step": t3 - t0, "select_forward": t1 - t0, "score_gather": t2 - t1, "train": t3 - t2}

    kinds = {"plain": plain, **{f"hvp@{r:g}": (lambda r=r: hard(r)) for r in args.select_res}}
    times = {k: [] for k in kinds}
    for i in range(args.warmup + args.steps):
        for name, fn in kinds.items():
            result = fn()
            if i >= args.warmup:
                times[name].append(result)

    med = {k: {part: statistics.median(r[part] for r in v) for part in v[0]} for k, v in times.items()}
    base = med["plain"]["step"]
    where = common.machine(device)
    lines = [f"SimSiam step time, {args.arch} {args.image_size}px{' small stem' if args.small_stem else ''}, batch "
             f"{args.batch_size}, N={args.num_views} vs 2, {args.mixed_precision}, {where}, "
             f"median of {args.steps} interleaved steps",
             "", "| step | total (s) | / plain | selection forward (s) | scoring + gather (s) | scoring + gather % of step | train step (s) |",
             "|---|---|---|---|---|---|---|",
             f"| plain SimSiam (N=2) | {base:.4f} | 1.00 | - | - | - | {base:.4f} |"]
    labels = {"plain": "plain SimSiam (N=2)"}
    for name in kinds:
        if name == "plain":
            continue
        m = med[name]
        labels[name] = f"HVP N={args.num_views}, selection at {name.split('@')[1]}x resolution"
        lines.append(f"| {labels[name]} | {m['step']:.4f} | "
                     f"{m['step'] / base:.2f} | {m['select_forward']:.4f} | {m['score_gather']:.5f} | "
                     f"{100 * m['score_gather'] / m['step']:.2f} % | {m['train']:.4f} |")
    memory_lines, peaks = common.memory_table(kinds, device, labels)
    summary = {"bench": "simsiam", "machine": where, "args": vars(args),
               "step_ratio": {k: med[k]["step"] / base for k in kinds}, "peak_memory_mib": peaks}
    common.write(args.output, "\n".join(lines + memory_lines), summary)


if __name__ == "__main__":
    main()
