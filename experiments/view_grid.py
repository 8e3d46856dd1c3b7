"""PNG grid of images with their hard (selected) and rejected views, from any training checkpoint.

    python experiments/view_grid.py --run outputs/simsiam                   # latest checkpoint of a run
    python experiments/view_grid.py --run outputs/dino/checkpoint-00000156 --num_images 12 --zoom 3 --output dino.png

The method (SimSiam, SimCLR, DINO or iBOT) and its settings come from the checkpoint. The first
--num_images images of the split (unshuffled) get the run's own multi-view augmentation, the trained
model scores every candidate exactly as in training (train mode, the script's own selection
function) and each row of the grid shows one image's candidate views with the selected pair framed
green. DINO/iBOT write a second grid for the local crops (the kept top-L framed). Training runs also
write such grids on their own (<output_dir>/grids/), from the batch they train on.
"""
import argparse
import dataclasses
import importlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import hvp_utils as hvp  # noqa: E402
import hvp_run  # noqa: E402

# training script -> a config field only its checkpoints have (iBOT is tried before DINO: both have out_dim)
SCRIPTS = {"train_simsiam": "proj_layers", "train_simclr": "temperature", "train_ibot": "patch_out_dim",
           "train_dino": "out_dim"}


def load_run(path):
    """(training script module, its Config, the checkpoint state) for a run folder or checkpoint folder."""
    path = Path(path)
    checkpoint = path if (path / "state.json").exists() else hvp_run.latest_checkpoint(path)
    if checkpoint is None:
        raise hvp_run.HVPError(f"{path} holds no training checkpoint (checkpoint-*/state.json)")
    state = hvp_run.load_checkpoint(checkpoint)
    config = state.get("config") or {}
    name = next((script for script, key in SCRIPTS.items() if key in config), None)
    if name is None:
        raise hvp_run.HVPError(f"{checkpoint} was not written by train_simsiam/simclr/dino/ibot.py")
    module = importlib.import_module(name)
    fields = {f.name: f for f in dataclasses.fields(module.Config)}
    values = {k: tuple(v) if isinstance(fields[k].default, tuple) else v for k, v in config.items() if k in fields}
    return module, module.Config(**values), state, checkpoint


def enlarge(views, factor):
    """Views (B, N, C, H, W) scaled by an integer factor (nearest), so small crops stay visible."""
    if factor <= 1:
        return views
    return F.interpolate(views.flatten(0, 1), scale_factor=factor, mode="nearest").unflatten(0, views.shape[:2])


def first_batch(cfg, transform, num_images, dataset, split):
    """The run's views of the first `num_images` decodable images of the split, in order, as one
    batch (epoch 0 of the run's seed; images that cannot be decoded are passed over)."""
    source = hvp_run.open_source(dataset or cfg.dataset, split or cfg.split, cfg.image_column, cfg.label_column)
    stream = hvp_run.BatchStream(source, transform, num_images, seed=cfg.seed)  # evaluation mode: every row once, in order
    parts, count = [], 0
    for batch in hvp_run.make_loader(stream, 0):
        parts.append(batch)
        count += len(batch["label"])
        if count >= num_images:
            break
    if not count:
        raise hvp_run.HVPError(f"none of the images of {source.name!r} [{source.split}] can be decoded")
    return {key: (sum(p[key] for p in parts) if parts[0][key].dim() == 0 else
                  torch.cat([p[key] for p in parts])[:num_images]) for key in parts[0]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="training output folder (latest checkpoint) or a checkpoint folder")
    parser.add_argument("--num_images", type=int, default=8)
    parser.add_argument("--dataset", default="", help="images to show (default: the run's training data)")
    parser.add_argument("--split", default="")
    parser.add_argument("--zoom", type=int, default=1, help="enlarge every view this many times (small images)")
    parser.add_argument("--output", default="", help="PNG path (default <run>/grids/<checkpoint>.png)")
    args = parser.parse_args()
    module, cfg, state, checkpoint = load_run(args.run)
    output = Path(args.output or checkpoint.parent / "grids" / f"{checkpoint.name}.png")
    output.parent.mkdir(parents=True, exist_ok=True)
    accelerator = hvp_run.make_accelerator("no", 1, "none", output.parent)
    torch.manual_seed(cfg.seed)
    method = module.__name__.removeprefix("train_")

    if method in ("simsiam", "simclr"):
        aug = module.simsiam_aug(cfg) if method == "simsiam" else module.simclr_aug(cfg)
        batch = first_batch(cfg, hvp.MultiViewTransform({"views": [aug] * max(cfg.num_views, 2)}), args.num_images,
                            args.dataset, args.split)
        backbone = hvp_run.create_backbone(cfg.arch, cfg.image_size, cfg.small_stem)
        model = (module.SimSiam(backbone, cfg.proj_dim, cfg.pred_dim, cfg.proj_layers) if method == "simsiam"
                 else module.SimCLR(backbone, cfg.proj_hidden_dim, cfg.proj_dim))
        model.load_state_dict(state["model"])
        model.train()  # as in training: BatchNorm on the batch
        views = hvp.photometric(batch["views"], batch["views_params"])
        with torch.no_grad():
            pair, _, scores = module.select_hard_pair(model, views, cfg, accelerator)
        hvp_run.save_view_grid(output, enlarge(views, args.zoom), pair, max_images=args.num_images)
        written = [output]
        summary = f"selected pair loss {scores.max(1).values.mean():.3f} vs pair (0, 1) {scores[:, 0].mean():.3f}"
    else:
        cfg.drop_path = 0.0
        student = module.build_model(cfg, 0.0)
        teacher = module.build_teacher(cfg) if method == "ibot" else module.build_model(cfg, 0.0)  # iBOT: shared head
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        student.train(), teacher.train()
        patch = student.backbone.patch_embed.patch_size[0] if hasattr(student.backbone, "patch_embed") else 1
        if method == "dino":
            transform = hvp.multicrop_transform(cfg)
        else:
            transform = module.MaskedMultiCrop(hvp.multicrop_transform(cfg), (cfg.image_size // patch,) * 2,
                                               cfg.pred_ratio, cfg.pred_aspect, cfg.pred_ratio_var)
        batch = first_batch(cfg, transform, args.num_images, args.dataset, args.split)
        global_views = hvp.photometric(batch["globals"], batch["globals_params"])
        local_views = (hvp.photometric(batch["locals"], batch["locals_params"]) if cfg.local_views else
                       global_views.new_zeros(len(global_views), 0, 3, cfg.local_size, cfg.local_size))
        if method == "dino":
            chosen = module.select_hard_views(student, teacher, global_views, local_views, state["center"],
                                              cfg.teacher_temp, cfg, accelerator, patch)
        else:
            chosen = module.select_hard_views(student, teacher, global_views, batch["masks"], local_views,
                                              (state["center"], state["patch_center"]),
                                              (cfg.teacher_temp, cfg.teacher_patch_temp), cfg, accelerator, patch)
        hvp_run.save_view_grid(output, enlarge(global_views, args.zoom), chosen["globals"], max_images=args.num_images)
        written = [output]
        if cfg.local_views:
            local_output = output.with_name(output.stem + "-locals.png")
            hvp_run.save_view_grid(local_output, enlarge(local_views, args.zoom), chosen["locals"], max_images=args.num_images)
            written.append(local_output)
        summary = (f"selected tuple loss {chosen['score'].mean():.3f} vs plain tuple "
                   f"{chosen['plain_score'].mean():.3f}")
    print(f"{method} {checkpoint}: {summary}; wrote {', '.join(map(str, written))}")


if __name__ == "__main__":
    hvp_run.run_main(main)
