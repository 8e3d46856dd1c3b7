"""Linear probe of a frozen backbone: one linear layer trained on its features, top-1/top-5 each epoch.

Features (DESIGN.md, evaluation protocols): ViTs with a class token give the final-norm [CLS] of the
last --n_last_blocks blocks, concatenated (DINO: 4 for ViT-S), plus the mean of the last block's
patch tokens with --avgpool (iBOT ViT-B: 1 block + avgpool); every other backbone gives its pooled
output (ResNet: global-average-pooled, projector never part of an export). The backbone is frozen in
eval mode; the head is initialised N(0, 0.01), trained with random-resized-crop (0.08-1) + flip
augmentation and a per-step cosine schedule, and the best top-1 over epochs is reported as upstream
does (the last epoch is reported too).

Defaults are the SimSiam ImageNet protocol (LARS, lr 0.1 x batch/256, momentum 0.9, wd 0, 90
epochs). The DINO protocol: --optimizer sgd --lr 0.001 --epochs 100. Several comma-separated
--lr values train one head each on the same features and report the best (iBOT eval_linear_multi).

--cache_views K > 0 extracts the training features once, for K augmented copies of every image
("view epochs" 0..K-1: every image once, in order, with that view's augmentation), and the epochs
cycle through the copies: the backbone runs K times over the train split instead of once per
epoch. On the shipped Fashion-MNIST subset a preset (see PRESETS) does this and the whole probe
takes a few minutes on 2 CPU cores. Without a cache every epoch streams the train split shuffled,
in full batches (hvp_run.BatchStream's training mode).

Images that cannot be decoded are skipped and counted, per split ("skipped_images" in the JSON, and
on the result line): left out of the test split and of cached views; without a cache, replaced in
their batch by another view of a decodable image, each epoch's count in its record and the most
any epoch met at the top (an epoch reads every image at most once).

    python eval/linear.py --backbone outputs/simsiam                    # training output folder
    python eval/linear.py --backbone outputs/simsiam --random_init      # same architecture, random weights
    python eval/linear.py --backbone outputs/dino --checkpoint_key teacher
    python eval/linear.py --backbone hf-hub:<org>/<repo> --dataset <hub id | folder | parquet>
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 eval/linear.py \\
        --backbone outputs/simsiam --dataset ILSVRC/imagenet-1k --test_split validation --batch_size 512

Writes a JSON result (--output, default <backbone folder>/linear.json; outputs/<org>--<name>/linear.json for
a Hub backbone) with every epoch's accuracy.
"""
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hvp_utils as hvp  # noqa: E402
import hvp_run  # noqa: E402
from eval import common  # noqa: E402
from train_simclr import LARS  # noqa: E402  (the SimSiam probe's optimizer is SimCLR's LARS)


# ----------------------------------------------------------------------------------- config

@dataclass
class Config:
    backbone: str = ""  # training output folder, checkpoint folder, export folder (config.json + model.safetensors) or hf-hub:<id>
    checkpoint_key: str = ""  # take the backbone weights from this entry of the checkpoint state (e.g. teacher for DINO/iBOT)
    random_init: bool = False  # same architecture with freshly initialised weights (the baseline to beat)
    dataset: str = hvp_run.DEFAULT_DATASET  # Hub dataset id, local image folder, or parquet file/folder
    train_split: str = "train"  # split the head is trained on
    test_split: str = "test"  # split evaluated after every epoch
    image_column: str = "image"  # dataset column holding images
    label_column: str = "label"  # dataset column holding labels
    image_size: int = 0  # crop size; 0 = the size the backbone was trained at (config.json)
    n_last_blocks: int = 4  # ViT: concatenate the [CLS] token of this many last blocks (DINO ViT-S: 4, iBOT ViT-B: 1)
    avgpool: bool = False  # ViT: also append the mean patch token of the last block (iBOT ViT-B)
    optimizer: str = "lars"  # lars (SimSiam) or sgd (DINO, SimCLR, CIFAR)
    lr: str = "0.1"  # base learning rate(s), x global batch / 256; several comma-separated values train one head each
    momentum: float = 0.9  # optimizer momentum
    weight_decay: float = 0.0  # weight decay of the head
    head_batchnorm: bool = False  # standardise features (BatchNorm, no affine) before the head, as MoCo v3 / MAE probes: one lr grid then fits backbones of any feature scale
    epochs: int = 90  # passes over the train split
    batch_size: int = 256  # images per process per step
    crop_scale: tuple = (0.08, 1.0)  # random-resized-crop area range of the training augmentation (reference protocols: 0.08-1)
    cache_views: int = 0  # 0 = backbone forward on fresh augmentations every epoch; K > 0 = extract K augmented copies once
    seed: int = 0  # augmentation and head initialisation seed
    num_workers: int = 2  # data loader workers per process
    mixed_precision: str = ""  # no | fp16 | bf16 for the backbone forward; empty = accelerate's setting
    output: str = ""  # JSON result file; default <backbone folder>/linear.json


# The shipped Fashion-MNIST subset (10k train / 2k test, 28 px) on 2 CPU cores: cached features,
# crops of at least half the (tiny) image, standardised (a random-init and a trained backbone differ in feature scale by orders of
# magnitude, so the comparison is fair only then) and an lr grid.
PRESETS = {hvp_run.DEFAULT_DATASET: dict(optimizer="sgd", lr="0.01,0.03,0.1,0.3,1", epochs=30, cache_views=2,
                                     crop_scale=(0.5, 1.0), head_batchnorm=True, num_workers=1)}


def check_config(cfg):
    if not cfg.backbone:
        raise hvp_run.HVPError("give --backbone <training output | checkpoint | export folder | hf-hub:id>")
    if cfg.optimizer not in ("lars", "sgd"):
        raise hvp_run.HVPError(f"--optimizer must be lars or sgd, got {cfg.optimizer!r}")
    common.check_precision(cfg.mixed_precision)
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.cache_views < 0 or cfg.n_last_blocks < 1:
        raise hvp_run.HVPError("--epochs, --batch_size and --n_last_blocks must be >= 1, --cache_views >= 0")
    if not 0 < cfg.crop_scale[0] <= cfg.crop_scale[1] <= 1:
        raise hvp_run.HVPError(f"--crop_scale must be two numbers 0 < min <= max <= 1, got {cfg.crop_scale}")
    return parse_lrs(cfg.lr)


def parse_lrs(text):
    try:
        lrs = [float(v) for v in text.split(",")]
    except ValueError:
        raise hvp_run.HVPError(f"--lr must be comma-separated numbers, got {text!r}") from None
    if any(not lr > 0 for lr in lrs):
        raise hvp_run.HVPError(f"--lr values must be > 0, got {text!r}")
    return lrs


# ----------------------------------------------------------------------------------- features

class FeatureModel(nn.Module):
    """Frozen backbone -> probe features: concat of the final-norm [CLS] of the last n blocks
    (+ mean patch token of the last block) for ViTs, the pooled output otherwise."""

    def __init__(self, backbone, n_last_blocks=4, avgpool=False):
        super().__init__()
        self.backbone, self.n_last_blocks, self.avgpool = backbone, n_last_blocks, avgpool
        self.vit = common.is_vit(backbone)
        if self.vit and n_last_blocks > len(backbone.blocks):
            raise hvp_run.HVPError(f"--n_last_blocks {n_last_blocks} but the ViT has {len(backbone.blocks)} blocks")
        width = backbone.num_features
        self.dim = width * (n_last_blocks + avgpool) if self.vit else width

    def forward(self, x):
        if not self.vit:
            return self.backbone(x)
        blocks = self.backbone.forward_intermediates(x, indices=self.n_last_blocks, norm=True, output_fmt="NLC",
                                                     return_prefix_tokens=True, intermediates_only=True)
        features = [prefix[:, 0] for _, prefix in blocks]  # token 0 of the prefix is the class token
        if self.avgpool:
            features.append(blocks[-1][0].mean(1))
        return torch.cat(features, dim=1)


# ----------------------------------------------------------------------------------- head and optimizer

class LinearHeads(nn.Module):
    """One linear classifier per learning rate, all on the same (optionally standardised) features,
    weights N(0, 0.01)."""

    def __init__(self, dim, num_classes, count, batchnorm=False):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False) if batchnorm else nn.Identity()
        self.heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(count))
        for head in self.heads:
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)

    def forward(self, features):
        features = self.norm(features)
        return torch.stack([head(features) for head in self.heads])  # (heads, B, classes)


def make_optimizer(cfg, heads, lrs):
    """One parameter group per head (its lr in "base_lr"). LARS is train_simclr.py's: each weight
    matrix's step scaled by the trust ratio 0.001 x |w| / |grad + wd x w|, biases plain momentum SGD
    without weight decay (the SimSiam probe); SGD decays every parameter (the DINO probe)."""
    if cfg.optimizer == "lars":
        groups = [group for head, lr in zip(heads.heads, lrs) for group in (
            {"params": [head.weight], "base_lr": lr, "weight_decay": cfg.weight_decay, "lars": True},
            {"params": [head.bias], "base_lr": lr, "weight_decay": 0.0, "lars": False})]
        return LARS(groups, lr=lrs[0], momentum=cfg.momentum)
    groups = [{"params": head.parameters(), "base_lr": lr} for head, lr in zip(heads.heads, lrs)]
    return torch.optim.SGD(groups, lr=lrs[0], momentum=cfg.momentum, weight_decay=cfg.weight_decay)


# ----------------------------------------------------------------------------------- probe

def run(cfg, accelerator=None):
    """The whole probe; returns the result dict (every process gets it)."""
    lrs = check_config(cfg)
    accelerator = accelerator or common.make_accelerator(cfg.mixed_precision)
    is_main, device, world = accelerator.is_main_process, accelerator.device, accelerator.num_processes
    start_time = time.perf_counter()
    # fail fast, before the model is built
    train_source = common.open_split(cfg.dataset, cfg.train_split, cfg.image_column, cfg.label_column, accelerator,
                              "a linear probe")
    test_source = common.open_split(cfg.dataset, cfg.test_split, cfg.image_column, cfg.label_column, accelerator,
                             "a linear probe")
    global_batch = cfg.batch_size * world
    steps = None if cfg.cache_views else common.steps_per_epoch(train_source, global_batch)  # cached: once extracted
    backbone, config = common.load_backbone(cfg.backbone, cfg.checkpoint_key, cfg.random_init, cfg.seed)
    size, mean, std = common.data_config(config, cfg.image_size)
    extractor = FeatureModel(backbone, cfg.n_last_blocks, cfg.avgpool).to(device).eval()
    if is_main:
        kind = f"ViT [CLS] x {cfg.n_last_blocks}{' + avgpool' if cfg.avgpool else ''}" if extractor.vit else "pooled"
        print(f"linear probe | {cfg.backbone}{' (random init)' if cfg.random_init else ''} | {kind} features, "
              f"dim {extractor.dim} | {size}px | {world} process(es) on {device.type} | {cfg.optimizer} lr {cfg.lr} "
              f"| {cfg.epochs} epochs | {'cached x' + str(cfg.cache_views) if cfg.cache_views else 'no cache'}",
              flush=True)

    # Test features once: the backbone is frozen and the eval transform is deterministic.
    test_loader = hvp_run.eval_loader(test_source, size, accelerator, cfg.batch_size, cfg.num_workers, mean, std)
    test_feats, test_labels, test_skipped = hvp_run.extract_features(extractor, test_loader, accelerator,
                                                                 f"features {cfg.test_split}")
    common.check_labels(test_labels, cfg.test_split)

    loaders = common.augmented_loaders(train_source, cfg, size, mean, std, accelerator, batches=steps)
    if cfg.cache_views:
        # view epoch v: every train image once, in order, with its view-v augmentation; the same
        # images decode every time, so row i of every view is the same image
        cached = []
        for view in range(cfg.cache_views):
            feats, labels, train_skipped = hvp_run.extract_features(
                extractor, loaders(view), accelerator, f"features {cfg.train_split} view {view + 1}/{cfg.cache_views}")
            cached.append((feats, labels))
        train_labels = cached[0][1]
        count = len(train_labels)
        steps = max(1, count // global_batch)
        common.check_labels(train_labels, cfg.train_split)
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    else:
        count = train_source.num_rows
        num_classes = int(test_labels.max()) + 1  # labels above it would be out of range: checked per batch
    total_steps = cfg.epochs * steps

    torch.manual_seed(cfg.seed)
    heads = LinearHeads(extractor.dim, num_classes, len(lrs), cfg.head_batchnorm).to(device)
    optimizer = make_optimizer(cfg, heads, lrs)
    heads, optimizer = accelerator.prepare(heads, optimizer)
    lr_scale = global_batch / 256

    def train_step(features, labels, step):
        if int(labels.max()) >= num_classes or int(labels.min()) < 0:
            raise hvp_run.HVPError(f"split {cfg.train_split!r} has labels outside 0..{num_classes - 1} (the test split's range)")
        for group in optimizer.param_groups:
            group["lr"] = hvp.cosine(step, total_steps, group["base_lr"] * lr_scale)
        logits = heads(features.float())
        loss = F.cross_entropy(logits.flatten(0, 1), labels.repeat(len(lrs)), reduction="none").view(len(lrs), -1)
        accelerator.backward(loss.mean(1).sum())  # one independent loss per head
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().mean(1)

    skipped_now = 0  # images replaced in this process's batches of the current epoch (no cache)
    if cfg.cache_views:
        stream = None

        def epoch_batches(epoch):
            """Global batches of one cached view in a seeded order; this process takes its slice."""
            feats, labels = cached[epoch % cfg.cache_views]
            order = torch.randperm(count, generator=torch.Generator().manual_seed(hvp_run.mix_seed(cfg.seed, epoch)))
            for i in range(steps):
                rows = order[i * global_batch:(i + 1) * global_batch][accelerator.process_index::world].to(device)
                yield feats[rows], labels[rows]
    else:
        stream = hvp_run.training_batches(loaders, steps)

        def epoch_batches(epoch):
            nonlocal skipped_now
            for _ in range(steps):
                _, batch = next(stream)
                skipped_now += int(batch["skipped"])
                with torch.no_grad(), accelerator.autocast():
                    features = extractor(batch["image"].to(device, non_blocking=True))
                yield features, batch["label"].to(device)

    history, step = [], 0
    bar = hvp_run.progress_bar(total_steps, 0, "linear probe", is_main)
    for epoch in range(cfg.epochs):
        heads.train()
        losses = []
        skipped_now = 0
        for features, labels in epoch_batches(epoch):
            losses.append(train_step(features, labels, step))
            step += 1
            bar.update(1)
        heads.eval()
        with torch.no_grad():
            top1, top5 = common.accuracy(accelerator.unwrap_model(heads)(test_feats), test_labels)
        train_loss = accelerator.reduce(torch.stack(losses).mean(0), reduction="mean")
        best = int(top1.argmax())
        record = {"epoch": epoch + 1, "top1": top1.tolist(), "top5": top5.tolist(), "train_loss": train_loss.tolist()}
        if stream is not None:  # this epoch's train images that could not be decoded, over all processes
            record["skipped_images"] = int(accelerator.reduce(torch.tensor([skipped_now], device=device),
                                                              reduction="sum").item())
        history.append(record)
        bar.set_postfix(top1=f"{top1[best]:.2f}", lr=lrs[best])
    bar.close()
    if stream is not None:
        stream.close()  # ends its loader workers
        train_skipped = max(h["skipped_images"] for h in history)

    top1_all = torch.tensor([h["top1"] for h in history])  # (epochs, heads)
    best_epoch, best_head = divmod(int(top1_all.argmax()), len(lrs))
    last_head = int(top1_all[-1].argmax())
    result = {
        "backbone": cfg.backbone, "random_init": cfg.random_init, "dataset": cfg.dataset,
        "features": ("vit_cls" if extractor.vit else "pooled"), "feature_dim": extractor.dim, "image_size": size,
        "train_samples": count, "test_samples": len(test_labels), "num_classes": num_classes,
        "skipped_images": {"train": train_skipped, "test": test_skipped},
        "best_top1": history[best_epoch]["top1"][best_head], "best_top5": history[best_epoch]["top5"][best_head],
        "best_epoch": best_epoch + 1, "best_lr": lrs[best_head],
        "final_top1": history[-1]["top1"][last_head], "final_top5": history[-1]["top5"][last_head],
        "final_lr": lrs[last_head], "lrs": lrs, "epochs": history,
        "seconds": time.perf_counter() - start_time, "processes": world, "config": asdict(cfg),
    }
    if is_main:
        print(f"linear probe {cfg.backbone}{' (random init)' if cfg.random_init else ''} on "
              f"{Path(cfg.dataset).name or cfg.dataset} [{cfg.test_split}]: best top-1 {result['best_top1']:.2f} % "
              f"(epoch {result['best_epoch']}, lr {result['best_lr']:g}), last epoch top-1 {result['final_top1']:.2f} %, "
              f"top-5 {result['final_top5']:.2f} % | {common.skipped_text(result['skipped_images'])} | "
              f"{result['seconds']:.0f} s", flush=True)
    return result


def main():
    cfg, notes = hvp_run.parse_config(Config, presets=PRESETS, description=__doc__.splitlines()[0])
    accelerator = common.make_accelerator(cfg.mixed_precision)
    if accelerator.is_main_process:
        for note in notes:  # "preset for the shipped dataset: ..."
            print(note, flush=True)
    result = run(cfg, accelerator)
    if accelerator.is_main_process:
        common.write_result(Path(cfg.output) if cfg.output else common.default_output(cfg, "linear"), result)
    accelerator.end_training()


if __name__ == "__main__":
    hvp_run.run_main(main)
