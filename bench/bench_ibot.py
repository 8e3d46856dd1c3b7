"""Step time of iBOT with hard views (G masked candidate globals, L_loader = 2L locals) vs plain iBOT
(2 masked globals, L locals), same images, one process.

    python bench/bench_ibot.py                       # ViT-S/16, 128 px globals, 64 px locals, batch 16
    python bench/bench_ibot.py --image_size 224 --local_size 96 --batch_size 64 --local_crops_number 10 --gpu

Both kinds are one call of train_ibot.train_step, the function the training script runs each
step, set up as its main() sets it up (student from build_model, teacher from build_teacher and
copy_student_into, no gradients, AdamW over hvp.adamw_param_groups, accelerator.prepare of the
student, zero [CLS] and patch centres) with the schedule hvp.distillation_schedule gives a step
from the middle of a run (past every warm-up and the frozen last layers). Plain is the call with
--global_views 2 --local_views L, HVP the call with G and L_loader, once per --hvp_select_res. The
batch is made once by the script's own transform (train_ibot.MaskedMultiCrop over
hvp.multicrop_transform: uint8 crops, their parameters and one block mask per global, drawn by
train_ibot.mask_ratios / block_masks) from random images and reused every step; the plain batch
holds the first 2 globals (and their masks) and the first L locals of the same images. So a step
includes what the training loop does with a batch: the copy to the device, the photometric
augmentation of every view, the selection (train_ibot.select_hard_views: teacher on the G unmasked
globals, student on the G masked globals and all locals, no grad, then the [CLS] cross-entropy
table, the masked-patch loss per global and the (even, odd) x top-L locals search), the teacher on
the chosen globals where the selection's outputs cannot be reused (reduced resolution, masks
resized; DESIGN.md, D3 and D6), the iBOT loss, backward, per-parameter clipping, AdamW, teacher
EMA and both centres.

Plain and HVP steps are interleaved (ABC ABC ...) after warm-up, so slow drifts of a shared
machine hit all alike; the tables report medians, in wall clock and in this process's CPU time,
and the ratio HVP / plain. The HVP step is split by train_step's own timing (select_s, train_s);
the scoring + gather part is train_ibot.select_hard_views run again on the selection forward's
cached teacher and student outputs (hvp.cross_entropy_table, masked_patch_loss, select_multicrop,
tuple_score), plus the gathers of the chosen views and masks.

The photometric step is in the timed step, as in the training scripts on a GPU and in the iBOT
CPU preset, which has no loader workers (with workers, a CPU run applies it in them instead:
hvp_run.Run.photometric).
"""
import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hvp_utils as hvp  # noqa: E402
import train_ibot as ti  # noqa: E402
from bench import common  # noqa: E402

STEPS_PER_EPOCH = 100  # a nominal run: --epochs x this many steps; the bench times the middle one


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--local_size", type=int, default=64)
    parser.add_argument("--small_stem", action="store_true")
    parser.add_argument("--patch_size", type=int, default=0, help="ViT patch size (0: the model's own)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--global_views", type=int, default=4, help="G of the HVP steps (plain: 2)")
    parser.add_argument("--local_crops_number", type=int, default=4, help="L, the locals trained per image")
    parser.add_argument("--local_views", type=int, default=0, help="L_loader of the HVP steps (0: 2L; plain: L)")
    parser.add_argument("--out_dim", type=int, default=8192, help="[CLS] and patch prototypes")
    parser.add_argument("--hidden_dim", type=int, default=2048)
    parser.add_argument("--bottleneck_dim", type=int, default=256)
    parser.add_argument("--pred_ratio", type=float, default=0.3, help="masked fraction of every global's patches")
    parser.add_argument("--hvp_select_res", "--select_res", dest="select_res", type=float, nargs="+", default=[1.0, 0.5],
                        help="one HVP kind per value")
    parser.add_argument("--hvp_limit", type=int, default=0, help="score this many random tuples (0: all, exactly)")
    parser.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--steps", type=common.positive_int, default=10, help="measured steps of each kind")
    parser.add_argument("--warmup", type=common.non_negative_int, default=2)
    parser.add_argument("--output", default="", help="also write the Markdown table (and a .json summary) here")
    common.add_device_flags(parser, precisions=("auto", "no", "bf16"))
    return parser.parse_args(argv)


def main(argv=None):
    """Run the bench (argv: its command-line flags; None = sys.argv) and return the summary dict."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.pick_device(args.device)
    accelerator = common.make_accelerator(device, args.mixed_precision)
    G, L = args.global_views, args.local_crops_number
    cfg = replace(ti.Config(), arch=args.arch, image_size=args.image_size, local_size=args.local_size,
                  small_stem=args.small_stem, patch_size=args.patch_size, batch_size=args.batch_size, global_views=G,
                  local_views=args.local_views or 2 * L, local_crops_number=L, out_dim=args.out_dim,
                  patch_out_dim=args.out_dim, hidden_dim=args.hidden_dim, bottleneck_dim=args.bottleneck_dim,
                  pred_ratio=(args.pred_ratio,), pred_ratio_var=(0.0,), hvp_limit=args.hvp_limit,
                  channels_last=args.channels_last, mixed_precision=args.mixed_precision, seed=args.seed)
    ti.check_config(cfg)

    # as train_ibot.main: student, teacher (build_teacher + copy_student_into, no gradients), AdamW groups,
    # prepare, the two centres
    torch.manual_seed(args.seed)
    student = ti.build_model(cfg, cfg.drop_path)
    patch = student.backbone.patch_embed.patch_size[0]
    grid = (cfg.image_size // patch, cfg.image_size // patch)
    teacher = ti.build_teacher(cfg)
    ti.copy_student_into(teacher, student)
    teacher.requires_grad_(False)
    teacher.to(device)
    optimizer = torch.optim.AdamW(hvp.adamw_param_groups(student), lr=0.0)
    model, optimizer = accelerator.prepare(student, optimizer)
    model.train()
    teacher.train()
    unwrapped = accelerator.unwrap_model(model)
    centers = (torch.zeros(cfg.out_dim, device=device), torch.zeros(cfg.patch_out_dim, device=device))
    total_steps = cfg.epochs * STEPS_PER_EPOCH
    step_index = total_steps // 2
    epoch = step_index // STEPS_PER_EPOCH
    schedule = hvp.distillation_schedule(step_index, cfg, cfg.lr * cfg.batch_size / 256, STEPS_PER_EPOCH, total_steps)

    transform = ti.MaskedMultiCrop(hvp.multicrop_transform(cfg), grid, cfg.pred_ratio, cfg.pred_aspect, cfg.pred_ratio_var)
    batch = common.make_batch(transform, common.random_images(cfg.batch_size, cfg.image_size, args.seed), args.seed, device)
    plain_batch = common.first_views(batch, {"globals": 2, "locals": L})
    global_views = hvp.photometric(batch["globals"].to(device), batch["globals_params"])  # what a selection sees
    local_views = (hvp.photometric(batch["locals"].to(device), batch["locals_params"]) if cfg.local_views
                   else global_views.new_zeros(len(global_views), 0, 3, cfg.local_size, cfg.local_size))
    masks = ti.masks_for_epoch(batch["masks"], epoch, cfg).to(device)

    def step(kind_cfg, micro_batch):
        return lambda: ti.train_step(model, teacher, optimizer, centers, [micro_batch], schedule, kind_cfg, accelerator,
                                     step_index, epoch, patch, log_now=True)[0]

    def scorer(kind_cfg):
        """train_ibot.select_hard_views on replayed outputs of its two forwards, plus train_step's gathers."""
        students, teachers = common.Replay(unwrapped), common.Replay(teacher)
        temps = ti.teacher_temperatures(epoch, kind_cfg)
        ti.select_hard_views(students, teachers, global_views, masks, local_views, centers, temps, kind_cfg, accelerator,
                             patch)
        students.replay(), teachers.replay()
        g_in, l_in = common.placeholder(global_views), common.placeholder(local_views)
        # the masks at the selection's patch grid, as select_hard_views resizes them (it keeps masks already that size)
        size = hvp.selection_size(cfg.image_size, kind_cfg.hvp_select_res, patch)
        m_in = ti.resize_masks(masks, (size // patch, size // patch))

        def score():
            rng = torch.Generator().manual_seed(0)
            chosen = ti.select_hard_views(students, teachers, g_in, m_in, l_in, centers, temps, kind_cfg, accelerator,
                                          patch, rng)
            return (hvp.gather_views(global_views, chosen["globals"]), hvp.gather_views(masks, chosen["globals"]),
                    hvp.gather_views(local_views, chosen["locals"]))
        return score

    L_loader = cfg.local_views
    kinds = {"plain": common.Kind(f"plain iBOT (2 + {L})", step(replace(cfg, global_views=2, local_views=L), plain_batch))}
    for r in args.select_res:
        kind_cfg = replace(cfg, hvp_select_res=r)
        teacher_note = "teacher reused" if r == 1 else "teacher re-run at full res"
        kinds[f"hvp@{r:g}"] = common.Kind(f"HVP G={G}, L_loader={L_loader}, selection at {r:g}x resolution ({teacher_note})",
                                          step(kind_cfg, batch), scorer(kind_cfg))
    med = common.measure(kinds, device, args.warmup, args.steps)
    title = (f"iBOT step time (train_ibot.train_step), {cfg.arch} {cfg.image_size}/{cfg.local_size}px (patch {patch}), "
             f"batch {cfg.batch_size}, out_dim = patch_out_dim = {cfg.out_dim}, mask ratio {args.pred_ratio:g}, HVP G={G} "
             f"globals and L_loader={L_loader} locals -> 2 + {L} vs plain 2 + {L}, {common.precision_name(accelerator)}")
    return common.finish("ibot", title, med, kinds, device, args)


if __name__ == "__main__":
    main()
