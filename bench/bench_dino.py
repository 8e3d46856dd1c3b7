"""Step time of DINO with multi-crop hard views (G globals, L_loader = 2L locals) vs plain DINO
(2 globals, L locals), same batch, one process.

    python bench/bench_dino.py                       # ViT-S/16, 128 px globals, 64 px locals, batch 16, bf16
    python bench/bench_dino.py --image_size 224 --local_size 96 --batch_size 64 --local_crops_number 8

A plain step is: teacher forward on globals 0 and 1, student forward + backward on them and the
first L locals, per-parameter clipping, AdamW, teacher EMA, centre update. An HVP step is the same,
preceded by the selection forward (teacher on the G candidate globals, student on all G + L_loader
views; no grad, train mode), the scoring (cross-entropy table, (even, odd) pairs x top-L locals) and
the gathers; at full resolution the step reuses the selection's teacher outputs (DESIGN.md, D3), at
reduced resolution it re-runs the teacher on the selected full-resolution globals (DESIGN.md, D6).
Plain and HVP steps are interleaved (ABC ABC ...) after warm-up, so slow drifts of a shared machine
hit all alike; the tables report medians and the ratio HVP / plain, with the HVP step split into its
parts, once in wall-clock time and once in this process's CPU time (steadier when others share the
CPU). Inputs are random tensors: the data pipeline is not part of the step.
"""
import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hvp_utils as hvp  # noqa: E402
from bench import common  # noqa: E402
import train_dino as td  # noqa: E402


class SingleProcess:
    """What hvp.clip_each_gradient and hvp.update_center ask of an Accelerator: one process, no fp16 scaler."""
    scaler = None
    num_processes = 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--local_size", type=int, default=64)
    parser.add_argument("--small_stem", action="store_true")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--global_views", type=int, default=4)
    parser.add_argument("--local_crops_number", type=int, default=4, help="L; the HVP steps draw 2L candidate locals")
    parser.add_argument("--out_dim", type=int, default=65536)
    parser.add_argument("--select_res", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--mixed_precision", default="bf16", choices=["no", "bf16"])
    parser.add_argument("--steps", type=int, default=10, help="measured steps of each kind")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--output", default="", help="also write the Markdown table to this file")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.mixed_precision == "bf16" else None
    G, L = args.global_views, args.local_crops_number
    cfg = replace(td.Config(), arch=args.arch, image_size=args.image_size, local_size=args.local_size,
                  small_stem=args.small_stem, out_dim=args.out_dim, global_views=G, local_views=2 * L,
                  local_crops_number=L, channels_last=device.type == "cpu" or dtype is not None)
    student = td.build_model(cfg, cfg.drop_path).to(device).train()
    teacher = td.build_model(cfg, 0.0).to(device).train()
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    patch = student.backbone.patch_embed.patch_size[0] if hasattr(student.backbone, "patch_embed") else 1
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.04)
    center = torch.zeros(cfg.out_dim, device=device)
    global_views = torch.randn(args.batch_size, G, 3, cfg.image_size, cfg.image_size, device=device)
    local_views = torch.randn(args.batch_size, 2 * L, 3, cfg.local_size, cfg.local_size, device=device)

    def sync():
        """(wall clock, this process's CPU time): on a shared CPU the second hardly depends on the load."""
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()

    def spans(*marks):
        return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks, marks[1:])]

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def train_step(x_globals, x_locals, teacher_logits=None):
        # the training step of train_dino.main, without the loader and logging
        if teacher_logits is None:
            with torch.no_grad(), autocast():
                teacher_logits = teacher(x_globals).float()
        with autocast():
            student_logits = student(x_globals, x_locals)
        loss = td.dino_loss(student_logits, teacher_logits, center, 0.04, 0.1).mean()
        loss.backward()
        hvp.clip_each_gradient(student, 3.0, SingleProcess(), opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
        hvp.ema_update(teacher, student, 0.996)
        hvp.update_center(center, teacher_logits.sum((0, 1)), torch.tensor([2.0 * len(teacher_logits)]), 0.9, SingleProcess())

    def plain():
        t0 = sync()
        train_step(global_views[:, :2], local_views[:, :L])
        return {"step": spans(t0, sync())[0]}

    def hard(select_res):
        # the calls of train_dino.select_hard_views and its training loop, timed part by part
        t0 = sync()
        with torch.no_grad():
            g_in = hvp.resize_views(global_views, hvp.selection_size(cfg.image_size, select_res, patch) / cfg.image_size)
            l_in = hvp.resize_views(local_views, hvp.selection_size(cfg.local_size, select_res, patch) / cfg.local_size)
            with autocast():
                teacher_logits = teacher(g_in).float()
                student_logits = student(g_in, l_in)
            t1 = sync()
            cost = hvp.cross_entropy_table(student_logits, hvp.teacher_probs(teacher_logits, center, 0.04), 0.1)
            pair, locals_, _ = hvp.select_multicrop(cost, L)
            x_globals, x_locals = hvp.gather_views(global_views, pair), hvp.gather_views(local_views, locals_ - G)
            reused = hvp.gather_views(teacher_logits, pair) if select_res == 1 else None
        t2 = sync()
        train_step(x_globals, x_locals, reused)
        t3 = sync()
        (step,), parts = spans(t0, t3), spans(t0, t1, t2, t3)
        return {"step": step, "select_forward": parts[0], "score_gather": parts[1], "train": parts[2]}

    kinds = {"plain": plain, **{f"hvp@{r:g}": (lambda r=r: hard(r)) for r in args.select_res}}
    times = {k: [] for k in kinds}
    for i in range(args.warmup + args.steps):
        for name, fn in kinds.items():
            result = fn()
            if i >= args.warmup:
                times[name].append(result)

    where = common.machine(device)
    lines = [f"DINO step time, {args.arch} {cfg.image_size}/{cfg.local_size}px (patch {patch}), batch {args.batch_size}, "
             f"out_dim {cfg.out_dim}, HVP G={G} globals and L_loader={2 * L} locals -> 2 + {L} vs plain 2 + {L}, "
             f"{args.mixed_precision}, {where}, median of {args.steps} interleaved steps"]
    labels, ratios = {"plain": f"plain DINO (2 + {L})"}, {}
    for clock, label in ((0, "wall clock"), (1, "CPU time of this process")):
        med = {k: {part: statistics.median(r[part][clock] for r in v) for part in v[0]} for k, v in times.items()}
        base = med["plain"]["step"]
        lines += ["", f"{label}:", "",
                  "| step | total (s) | / plain | selection forward (s) | scoring + gather (s) | scoring + gather % of step "
                  "| train step (s) |", "|---|---|---|---|---|---|---|",
                  f"| plain DINO (2 + {L}) | {base:.4f} | 1.00 | - | - | - | {base:.4f} |"]
        for name in kinds:
            if name == "plain":
                continue
            m = med[name]
            teacher_note = "teacher reused" if name == "hvp@1" else "teacher re-run at full res"
            labels[name] = f"HVP G={G}, L_loader={2 * L}, selection at {name.split('@')[1]}x resolution ({teacher_note})"
            ratios[f"{name} ({label})"] = m["step"] / base
            lines.append(f"| {labels[name]} | "
                         f"{m['step']:.4f} | {m['step'] / base:.2f} | {m['select_forward']:.4f} | {m['score_gather']:.5f} | "
                         f"{100 * m['score_gather'] / m['step']:.2f} % | {m['train']:.4f} |")
    memory_lines, peaks = common.memory_table(kinds, device, labels)
    summary = {"bench": "dino", "machine": where, "args": vars(args),
               "step_ratio": ratios, "peak_memory_mib": peaks}
    common.write(args.output, "\n".join(lines + memory_lines), summary)


if __name__ == "__main__":
    main()
