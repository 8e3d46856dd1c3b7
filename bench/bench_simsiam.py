"""Step time of SimSiam with hard views (N = 4) vs plain SimSiam (N = 2), same images, one process.

    python bench/bench_simsiam.py                                   # ResNet-18, 32 px, batch 128 (2 CPU cores)
    python bench/bench_simsiam.py --arch resnet50 --image_size 224 --batch_size 64 --gpu

Both kinds are one call of train_simsiam.train_step, the function the training script runs each
step, set up as its main() sets it up (SimSiam model, SGD groups, accelerator.prepare): plain is
the call with --num_views 2, HVP the call with N views, once per --hvp_select_res. The batch is
made once by the script's own transform (hvp.MultiViewTransform of simsiam_aug) from random images
and reused every step, uint8 views plus their parameters as the loader delivers them; the plain
batch holds the first 2 views of the same images. So a step includes what the training loop does
with a batch: the copy to the device, the photometric augmentation of every view, the selection
(train_simsiam.select_hard_pair, HVP only), the SimSiam forward/backward and SGD.

Plain and HVP steps are interleaved (ABC ABC ...) after warm-up, so slow drifts of a shared
machine hit all alike; the tables report medians, in wall clock and in this process's CPU time,
and the ratio HVP / plain. The HVP step is split by train_step's own timing (select_s, train_s);
the scoring + gather part is train_simsiam.select_hard_pair (hvp.select_hard_pairs with pair_loss)
run again on the selection forward's cached outputs, plus the gathers of the chosen views.

On a CPU with loader workers (as the SimSiam preset has) the training scripts apply the photometric
step in the workers, beside the training process (hvp_run.Run.photometric: "worker"); this bench
keeps it in the timed step, as on a GPU, so its CPU step times are what the training process would
spend if it did that work itself.
"""
import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hvp_utils as hvp  # noqa: E402
import hvp_run  # noqa: E402
import train_simsiam as ts  # noqa: E402
from bench import common  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--small_stem", action="store_true")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--num_views", type=int, default=4, help="N of the HVP steps (plain: 2)")
    parser.add_argument("--proj_dim", type=int, default=2048)
    parser.add_argument("--pred_dim", type=int, default=512)
    parser.add_argument("--hvp_select_res", "--select_res", dest="select_res", type=float, nargs="+", default=[1.0, 0.5],
                        help="one HVP kind per value")
    parser.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--steps", type=common.positive_int, default=10, help="measured steps of each kind")
    parser.add_argument("--warmup", type=common.non_negative_int, default=3)
    parser.add_argument("--output", default="", help="also write the Markdown table (and a .json summary) here")
    common.add_device_flags(parser)
    return parser.parse_args(argv)


def main(argv=None):
    """Run the bench (argv: its command-line flags; None = sys.argv) and return the summary dict."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.pick_device(args.device)
    accelerator = common.make_accelerator(device, args.mixed_precision)
    cfg = replace(ts.Config(), arch=args.arch, image_size=args.image_size, small_stem=args.small_stem,
                  batch_size=args.batch_size, num_views=args.num_views, proj_dim=args.proj_dim, pred_dim=args.pred_dim,
                  channels_last=args.channels_last, mixed_precision=args.mixed_precision, seed=args.seed)
    ts.check_config(cfg)

    # as train_simsiam.main: model, memory format, SGD groups (lr scaled by batch / 256), prepare
    torch.manual_seed(args.seed)
    model = ts.SimSiam(hvp_run.create_backbone(cfg.arch, cfg.image_size, cfg.small_stem), cfg.proj_dim, cfg.pred_dim,
                       cfg.proj_layers)
    model = model.to(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    init_lr = cfg.lr * cfg.batch_size / 256
    optimizer = torch.optim.SGD(
        [{"params": [*model.backbone.parameters(), *model.projector.parameters()], "fix_lr": False},
         {"params": model.predictor.parameters(), "fix_lr": cfg.fix_pred_lr}],
        lr=init_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    unwrapped = accelerator.unwrap_model(model)

    transform = hvp.MultiViewTransform({"views": [ts.simsiam_aug(cfg)] * cfg.num_views})
    batch = common.make_batch(transform, common.random_images(cfg.batch_size, cfg.image_size, args.seed), args.seed, device)
    plain_batch = common.first_views(batch, {"views": 2})
    views = hvp.photometric(batch["views"].to(device), batch["views_params"])  # the views a selection sees

    def step(kind_cfg, micro_batch):
        return lambda: ts.train_step(model, optimizer, [micro_batch], kind_cfg, accelerator, 0, 0, log_now=True)[0]

    def scorer(kind_cfg):
        """train_simsiam.select_hard_pair on replayed outputs of its forward, plus train_step's gathers."""
        recorded = common.Replay(unwrapped)
        ts.select_hard_pair(recorded, views, kind_cfg, accelerator)
        replay, stand_in = recorded.replay(), common.placeholder(views)

        def score():
            pair, _, _ = ts.select_hard_pair(replay, stand_in, kind_cfg, accelerator)
            return hvp.gather_views(views, pair[:, 0]), hvp.gather_views(views, pair[:, 1])
        return score

    kinds = {"plain": common.Kind("plain SimSiam (N=2)", step(replace(cfg, num_views=2), plain_batch))}
    for r in args.select_res:
        kind_cfg = replace(cfg, hvp_select_res=r)
        kinds[f"hvp@{r:g}"] = common.Kind(f"HVP N={cfg.num_views}, selection at {r:g}x resolution",
                                          step(kind_cfg, batch), scorer(kind_cfg))
    med = common.measure(kinds, device, args.warmup, args.steps)
    title = (f"SimSiam step time (train_simsiam.train_step), {cfg.arch} {cfg.image_size}px"
             f"{' small stem' if cfg.small_stem else ''}, batch {cfg.batch_size}, N={cfg.num_views} vs 2, "
             f"{common.precision_name(accelerator)}{', channels_last' if cfg.channels_last else ''}")
    return common.finish("simsiam", title, med, kinds, device, args)


if __name__ == "__main__":
    main()
