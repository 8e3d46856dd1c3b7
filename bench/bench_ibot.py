"""Step time of iBOT with hard views (G masked candidate globals, L_loader = 2L locals) vs plain iBOT
(2 masked globals, L locals), same batch, one process.

    python bench/bench_ibot.py                       # ViT-S/16, 128 px globals, 64 px locals, batch 16, bf16
    python bench/bench_ibot.py --image_size 224 --local_size 96 --batch_size 64 --local_crops_number 10

A plain step is: teacher forward on globals 0 and 1 ([CLS] and patch outputs), student forward on
them (masked) and the first L locals, the iBOT loss ([CLS] + masked patches), backward,
per-parameter clipping, AdamW, teacher EMA, both centre updates. An HVP step is the same, preceded
by the selection forward (teacher on the G unmasked candidate globals, student on the G masked
globals and all L_loader locals; no grad, train mode), the scoring ([CLS] cross-entropy table +
per-global masked-patch loss, (even, odd) pairs x top-L locals) and the gathers of views and masks;
at full resolution the step reuses the selection's teacher outputs (DESIGN.md, D3), at reduced
resolution (masks resized too) it re-runs the teacher on the selected full-resolution globals
(DESIGN.md, D6). Plain and HVP steps are interleaved after warm-up, so slow drifts of a shared
machine hit all alike; the table reports medians and the ratio HVP / plain. Inputs are random
tensors and block masks of 30 %.
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
import train_ibot as ti  # noqa: E402


class SingleProcess:
    """What hvp.clip_each_gradient and hvp.update_center ask of an Accelerator."""
    scaler = None
    num_processes = 1

    def __init__(self, autocast):
        self.autocast = autocast


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--local_size", type=int, default=64)
    parser.add_argument("--small_stem", action="store_true")
    parser.add_argument("--patch_size", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--global_views", type=int, default=4)
    parser.add_argument("--local_crops_number", type=int, default=4, help="L; the HVP steps draw 2L candidate locals")
    parser.add_argument("--out_dim", type=int, default=8192, help="[CLS] and patch prototypes")
    parser.add_argument("--select_res", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--mixed_precision", default="bf16", choices=["no", "bf16"])
    parser.add_argument("--steps", type=int, default=10, help="measured steps of each kind")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--output", default="", help="also write the Markdown table to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.mixed_precision == "bf16" else None
    G, L = args.global_views, args.local_crops_number
    cfg = replace(ti.Config(), arch=args.arch, image_size=args.image_size, local_size=args.local_size,
                  small_stem=args.small_stem, patch_size=args.patch_size, out_dim=args.out_dim,
                  patch_out_dim=args.out_dim, global_views=G, local_views=2 * L, local_crops_number=L,
                  channels_last=device.type == "cpu" or dtype is not None)
    student = ti.build_model(cfg, cfg.drop_path).to(device).train()
    teacher = ti.build_model(cfg, 0.0).to(device).train()
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    patch = student.backbone.patch_embed.patch_size[0]
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.04)
    centers = (torch.zeros(cfg.out_dim, device=device), torch.zeros(cfg.patch_out_dim, device=device))
    temps = (0.04, 0.07)
    grid = cfg.image_size // patch
    gen = torch.Generator().manual_seed(0)
    global_views = torch.randn(args.batch_size, G, 3, cfg.image_size, cfg.image_size, device=device)
    local_views = torch.randn(args.batch_size, 2 * L, 3, cfg.local_size, cfg.local_size, device=device)
    masks = torch.stack([torch.stack([ti.block_mask(grid, grid, 0.3, cfg.pred_aspect, gen) for _ in range(G)])
                         for _ in range(args.batch_size)]).to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    accelerator = SingleProcess(autocast)

    def train_step(x_globals, x_masks, x_locals, teacher_out=None):
        # the training step of train_ibot.main, without the loader and logging
        if teacher_out is None:
            with torch.no_grad(), autocast():
                teacher_out = tuple(t.float() for t in teacher(x_globals))
        with autocast():
            student_out = student(x_globals, x_masks, x_locals)
        loss = ti.ibot_loss(student_out, teacher_out, x_masks, centers, temps, cfg)[0].mean()
        loss.backward()
        hvp.clip_each_gradient(student, 3.0, accelerator, opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
        hvp.ema_update(teacher, student, 0.996)
        count = torch.tensor([2.0 * len(x_globals)], device=device)
        hvp.update_center(centers[0], teacher_out[0].sum((0, 1)), count, 0.9, accelerator)
        hvp.update_center(centers[1], teacher_out[1].mean(2).sum((0, 1)), count, 0.9, accelerator)

    def plain():
        t0 = sync()
        train_step(global_views[:, :2], masks[:, :2], local_views[:, :L])
        return {"step": sync() - t0}

    def hard(select_res):
        # the calls of train_ibot.select_hard_views and its training loop, timed part by part
        t0 = sync()
        with torch.no_grad():
            size = hvp.selection_size(cfg.image_size, select_res, patch)
            g_in = hvp.resize_views(global_views, size / cfg.image_size)
            l_in = hvp.resize_views(local_views, hvp.selection_size(cfg.local_size, select_res, patch) / cfg.local_size)
            m_in = ti.resize_masks(masks, (size // patch, size // patch))
            with autocast():
                t_cls, t_patches = teacher(g_in)
                s_cls, s_patches = student(g_in, m_in, l_in)
            t1 = sync()
            t_cls, t_patches = t_cls.float(), t_patches.float()
            cost = hvp.cross_entropy_table(s_cls, hvp.teacher_probs(t_cls, centers[0], temps[0]), cfg.student_temp)
            cost = cost * (cfg.lambda1 / (2 * (L + 1)))
            per_global = ti.masked_patch_loss(s_patches, t_patches, m_in, centers[1], temps[1], cfg.student_temp)
            pair, locals_, _ = hvp.select_multicrop(cost, L, extra=per_global * (cfg.lambda2 / 2))
            x_globals, x_masks = hvp.gather_views(global_views, pair), hvp.gather_views(masks, pair)
            x_locals = hvp.gather_views(local_views, locals_ - G)
            reused = (hvp.gather_views(t_cls, pair), hvp.gather_views(t_patches, pair)) if select_res == 1 else None
        t2 = sync()
        train_step(x_globals, x_masks, x_locals, reused)
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
    lines = [f"iBOT step time, {args.arch} {cfg.image_size}/{cfg.local_size}px (patch {patch}), batch {args.batch_size}, "
             f"out_dim = patch_out_dim = {cfg.out_dim}, mask ratio 0.3, HVP G={G} globals and L_loader={2 * L} locals "
             f"-> 2 + {L} vs plain 2 + {L}, {args.mixed_precision}, {where}, "
             f"median of {args.steps} interleaved steps",
             "", "| step | total (s) | / plain | selection forward (s) | scoring + gather (s) | scoring + gather % of step "
             "| train step (s) |", "|---|---|---|---|---|---|---|",
             f"| plain iBOT (2 + {L}) | {base:.4f} | 1.00 | - | - | - | {base:.4f} |"]
    labels = {"plain": f"plain iBOT (2 + {L})"}
    for name in kinds:
        if name == "plain":
            continue
        m = med[name]
        teacher_note = "teacher reused" if name == "hvp@1" else "teacher re-run at full res"
        labels[name] = f"HVP G={G}, L_loader={2 * L}, selection at {name.split('@')[1]}x resolution ({teacher_note})"
        lines.append(f"| {labels[name]} | {m['step']:.4f} | {m['step'] / base:.2f} | {m['select_forward']:.4f} | "
                     f"{m['score_gather']:.5f} | {100 * m['score_gather'] / m['step']:.2f} % | {m['train']:.4f} |")
    memory_lines, peaks = common.memory_table(kinds, device, labels)
    summary = {"bench": "ibot", "machine": where, "args": vars(args),
               "step_ratio": {k: med[k]["step"] / base for k in kinds}, "peak_memory_mib": peaks}
    common.write(args.output, "\n".join(lines + memory_lines), summary)


if __name__ == "__main__":
    main()
