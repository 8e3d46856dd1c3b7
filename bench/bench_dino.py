"""Step time of DINO with multi-crop hard views (G globals, L_loader = 2L locals) vs plain DINO
(2 globals, L locals), same images, one process.

    python bench/bench_dino.py                       # ViT-S/16, 128 px globals, 64 px locals, batch 16
    python bench/bench_dino.py --image_size 224 --local_size 96 --batch_size 64 --local_crops_number 8 --gpu

Both kinds are one call of train_dino.train_step, the function the training script runs each
step, set up as its main() sets it up (student and teacher from build_model, the teacher a copy of
the student without gradients, AdamW over hvp.adamw_param_groups, accelerator.prepare of the
student, a zero centre) with the schedule hvp.distillation_schedule gives a step from the middle
of a run (past every warm-up and the frozen last layer). Plain is the call with --global_views 2
--local_views L, HVP the call with G and L_loader, once per --hvp_select_res. The batch is made
once by the script's own transform (hvp.multicrop_transform) from random images and reused every
step: uint8 globals and locals plus their parameters as the loader delivers them; the plain batch
holds the first 2 globals and the first L locals of the same images. So a step includes what the
training loop does with a batch: the copy to the device, the photometric augmentation of every
view, the selection (train_dino.select_hard_views: teacher on the G globals, student on all views,
no grad, then the cross-entropy table and the (even, odd) x top-L locals search), the teacher on
the chosen globals where the selection's outputs cannot be reused (reduced resolution; DESIGN.md,
D3 and D6), the student forward/backward, per-parameter clipping, AdamW, teacher EMA and centre.

Plain and HVP steps are interleaved (ABC ABC ...) after warm-up, so slow drifts of a shared
machine hit all alike; the tables report medians, in wall clock and in this process's CPU time
(steadier when others share the CPU), and the ratio HVP / plain. The HVP step is split by
train_step's own timing (select_s, train_s); the scoring + gather part is
train_dino.select_hard_views run again on the selection forward's cached teacher and student
outputs (hvp.teacher_probs, cross_entropy_table, select_multicrop, tuple_score), plus the gathers
of the chosen views.

The photometric step is in the timed step, as in the training scripts on a GPU and in the DINO
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
import train_dino as td  # noqa: E402
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
    parser.add_argument("--out_dim", type=int, default=65536)
    parser.add_argument("--hidden_dim", type=int, default=2048)
    parser.add_argument("--bottleneck_dim", type=int, default=256)
    parser.add_argument("--hvp_select_res", "--select_res", dest="select_res", type=float, nargs="+", default=[1.0, 0.5],
                        help="one HVP kind per value")
    parser.add_argument("--hvp_limit", type=int, default=0, help="score this many random tuples (0: all, exactly)")
    parser.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--device_crops", action="store_true",
                        help="also an HVP kind whose views are cut on the training device (--crops device), from "
                             "source images --source_scale x the global size")
    parser.add_argument("--source_scale", type=float, default=1.5, help="source image size / --image_size")
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
    cfg = replace(td.Config(), arch=args.arch, image_size=args.image_size, local_size=args.local_size,
                  small_stem=args.small_stem, patch_size=args.patch_size, batch_size=args.batch_size, global_views=G,
                  local_views=args.local_views or 2 * L, local_crops_number=L, out_dim=args.out_dim,
                  hidden_dim=args.hidden_dim, bottleneck_dim=args.bottleneck_dim, hvp_limit=args.hvp_limit,
                  channels_last=args.channels_last, mixed_precision=args.mixed_precision, seed=args.seed)
    td.check_config(cfg)

    # as train_dino.main: student, teacher (a copy, no drop-path, no gradients), AdamW groups, prepare, centre
    torch.manual_seed(args.seed)
    student = td.build_model(cfg, cfg.drop_path)
    patch = student.backbone.patch_embed.patch_size[0] if hasattr(student.backbone, "patch_embed") else 1
    teacher = td.build_model(cfg, 0.0)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    teacher.to(device)
    optimizer = torch.optim.AdamW(hvp.adamw_param_groups(student), lr=0.0)
    model, optimizer = accelerator.prepare(student, optimizer)
    model.train()
    teacher.train()
    unwrapped = accelerator.unwrap_model(model)
    center = torch.zeros(cfg.out_dim, device=device)
    total_steps = cfg.epochs * STEPS_PER_EPOCH
    step_index = total_steps // 2
    epoch = step_index // STEPS_PER_EPOCH
    schedule = hvp.distillation_schedule(step_index, cfg, cfg.lr * cfg.batch_size / 256, STEPS_PER_EPOCH, total_steps)

    images = common.random_images(cfg.batch_size, round(cfg.image_size * args.source_scale), args.seed)
    batch = common.make_batch(hvp.multicrop_transform(cfg), images, args.seed, device)
    plain_batch = common.first_views(batch, {"globals": 2, "locals": L})
    global_views = hvp.photometric(batch["globals"].to(device), batch["globals_params"])  # what a selection sees
    local_views = (hvp.photometric(batch["locals"].to(device), batch["locals_params"]) if cfg.local_views
                   else global_views.new_zeros(len(global_views), 0, 3, cfg.local_size, cfg.local_size))

    def step(kind_cfg, micro_batch):
        return lambda: td.train_step(model, teacher, optimizer, center, [micro_batch], schedule, kind_cfg, accelerator,
                                     step_index, epoch, patch, log_now=True)[0]

    def scorer(kind_cfg):
        """train_dino.select_hard_views on replayed outputs of its two forwards, plus train_step's gathers."""
        students, teachers = common.Replay(unwrapped), common.Replay(teacher)
        temp = td.teacher_temperature(epoch, kind_cfg)
        td.select_hard_views(students, teachers, global_views, local_views, center, temp, kind_cfg, accelerator, patch)
        students.replay(), teachers.replay()
        g_in, l_in = common.placeholder(global_views), common.placeholder(local_views)

        def score():
            rng = torch.Generator().manual_seed(0)
            chosen = td.select_hard_views(students, teachers, g_in, l_in, center, temp, kind_cfg, accelerator, patch, rng)
            return hvp.gather_views(global_views, chosen["globals"]), hvp.gather_views(local_views, chosen["locals"])
        return score

    L_loader = cfg.local_views
    kinds = {"plain": common.Kind(f"plain DINO (2 + {L})", step(replace(cfg, global_views=2, local_views=L), plain_batch))}
    for r in args.select_res:
        kind_cfg = replace(cfg, hvp_select_res=r)
        teacher_note = "teacher reused" if r == 1 else "teacher re-run at full res"
        kinds[f"hvp@{r:g}"] = common.Kind(f"HVP G={G}, L_loader={L_loader}, selection at {r:g}x resolution ({teacher_note})",
                                          step(kind_cfg, batch), scorer(kind_cfg))
    if args.device_crops:  # the same images and views; crops, resizes and flips inside train_step
        device_batch = common.make_batch(hvp.multicrop_transform(cfg, "device"), images, args.seed, device)
        kinds["hvp@1-device-crops"] = common.Kind(f"HVP G={G}, L_loader={L_loader}, selection at 1x, views cut on "
                                                  f"the {device.type} (--crops device)", step(cfg, device_batch),
                                                  scorer(cfg))
    med = common.measure(kinds, device, args.warmup, args.steps)
    title = (f"DINO step time (train_dino.train_step), {cfg.arch} {cfg.image_size}/{cfg.local_size}px (patch {patch}), "
             f"batch {cfg.batch_size}, out_dim {cfg.out_dim}, HVP G={G} globals and L_loader={L_loader} locals -> 2 + {L} "
             f"vs plain 2 + {L}, {common.precision_name(accelerator)}")
    return common.finish("dino", title, med, kinds, device, args)


if __name__ == "__main__":
    main()
