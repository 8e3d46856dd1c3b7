"""Step time of SimCLR with hard views (N = 4) vs plain SimCLR (N = 2), same batch, one process.

    python bench/bench_simclr.py                                    # the CPU preset model
    python bench/bench_simclr.py --arch resnet50 --image_size 224 --batch_size 256 --mixed_precision bf16

A plain step is forward + backward + LARS on views 0 and 1 (one forward of both, as in
train_simclr.py). An HVP step is the same, preceded by the selection forward of all N views (no
grad, train mode), the NT-Xent scoring of every candidate pair and the gather. Plain and HVP steps
are interleaved (ABAB...) after warm-up, so slow drifts of a shared machine hit both alike; the
table reports medians and the ratio HVP / plain, with the HVP step split into its parts (the GPU is
synchronised around each part). Inputs are random tensors: the data pipeline is not part of the
step (bench it separately).
"""
import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hvp_utils as hvp  # noqa: E402
from bench import common  # noqa: E402
from train_simclr import LARS, SimCLR, lars_param_groups, nt_xent_loss, nt_xent_table, pair_scores  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--small_stem", action="store_true")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--num_views", type=int, default=4)
    parser.add_argument("--select_res", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--mixed_precision", default="bf16", choices=["no", "bf16", "fp16"])
    parser.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--steps", type=int, default=10, help="measured steps of each kind")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--output", default="", help="also write the Markdown table to this file")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = SimCLR(hvp.create_backbone(args.arch, args.image_size, args.small_stem), 2048, 128)
    model = model.to(device, memory_format=memory_format).train()
    opt = LARS(lars_param_groups(model, 1e-4), lr=0.3, momentum=0.9)
    scaler = torch.amp.GradScaler(enabled=args.mixed_precision == "fp16")
    views = torch.randn(args.batch_size, args.num_views, 3, args.image_size, args.image_size, device=device)

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def train_step(x1, x2):
        x = torch.cat([x1, x2]).contiguous(memory_format=memory_format)
        with autocast():
            z1, z2 = model(x).chunk(2)
        loss = nt_xent_loss(z1, z2, 0.1)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    def plain():
        t0 = sync()
        train_step(views[:, 0], views[:, 1])
        return {"step": sync() - t0}

    def hard(select_res):
        # the calls of train_simclr.select_hard_pair and its training loop, timed part by part
        B, N = views.shape[:2]
        t0 = sync()
        with torch.no_grad(), autocast():
            z = model(hvp.resize_views(views, select_res).flatten(0, 1).contiguous(memory_format=memory_format))
        t1 = sync()
        with torch.no_grad():
            pairs = hvp.candidate_pairs(N, device)
            index, _ = hvp.hardest(pair_scores(nt_xent_table(z.unflatten(0, (B, N)), 0.1), pairs))
            x1, x2 = hvp.gather_views(views, pairs[index, 0]), hvp.gather_views(views, pairs[index, 1])
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
    lines = [f"SimCLR step time, {args.arch} {args.image_size}px{' small stem' if args.small_stem else ''}, batch "
             f"{args.batch_size}, N={args.num_views} vs 2, {args.mixed_precision}"
             f"{', channels_last' if args.channels_last else ''}, {where}, "
             f"median of {args.steps} interleaved steps",
             "", "| step | total (s) | / plain | selection forward (s) | scoring + gather (s) | scoring + gather % of step | train step (s) |",
             "|---|---|---|---|---|---|---|",
             f"| plain SimCLR (N=2) | {base:.4f} | 1.00 | - | - | - | {base:.4f} |"]
    labels = {"plain": "plain SimCLR (N=2)"}
    for name in kinds:
        if name == "plain":
            continue
        m = med[name]
        labels[name] = f"HVP N={args.num_views}, selection at {name.split('@')[1]}x resolution"
        lines.append(f"| {labels[name]} | {m['step']:.4f} | "
                     f"{m['step'] / base:.2f} | {m['select_forward']:.4f} | {m['score_gather']:.5f} | "
                     f"{100 * m['score_gather'] / m['step']:.2f} % | {m['train']:.4f} |")
    memory_lines, peaks = common.memory_table(kinds, device, labels)
    summary = {"bench": "simclr", "machine": where, "args": vars(args),
               "step_ratio": {k: med[k]["step"] / base for k in kinds}, "peak_memory_mib": peaks}
    common.write(args.output, "\n".join(lines + memory_lines), summary)


if __name__ == "__main__":
    main()
