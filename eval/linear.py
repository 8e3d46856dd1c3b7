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

Writes a JSON result (--output, default <backbone folder>/linear.json) with every epoch's accuracy.
"""
import copy
import dataclasses
import json
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
    if cfg.mixed_precision not in ("", "no", "fp16", "bf16"):
        raise hvp_run.HVPError(f"--mixed_precision must be no, fp16 or bf16, got {cfg.mixed_precision!r}")
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


# ----------------------------------------------------------------------------------- backbone

def load_backbone(source, checkpoint_key="", random_init=False, seed=0):
    """A frozen-eval backbone from any source `hvp_run.load_backbone` accepts, optionally with the
    weights of one entry of the training state (`checkpoint_key`, e.g. the DINO/iBOT teacher) or
    freshly initialised. Returns (model in eval mode, config dict)."""
    model, config = hvp_run.load_backbone(source)
    if checkpoint_key:
        model.load_state_dict(checkpoint_backbone_weights(source, checkpoint_key))
    if random_init:
        model = reinitialised(model, seed)
    return model.eval().requires_grad_(False), config


def checkpoint_backbone_weights(source, key):
    """Backbone weights stored under `key` in the newest checkpoint of `source`: a state dict of the
    whole network (keys "backbone.*", possibly behind "module.") or of the backbone alone."""
    path = Path(source).expanduser()
    ckpt = hvp_run.latest_checkpoint(path) if path.is_dir() else None
    if ckpt is None:
        raise hvp_run.HVPError(f"--checkpoint_key needs a checkpoint or training output folder, got {source!r}")
    state = hvp_run.load_checkpoint(ckpt)
    if not isinstance(state.get(key), dict):
        raise hvp_run.HVPError(f"checkpoint {ckpt} has no state {key!r} (it has: {', '.join(sorted(state))})")
    weights = {k.removeprefix("module."): v for k, v in state[key].items() if torch.is_tensor(v)}
    if any(k.startswith("backbone.") for k in weights):
        weights = {k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")}
    return weights


def reinitialised(model, seed):
    """A copy of `model` with every parameter and buffer re-initialised the way a fresh model is
    (module `reset_parameters`, BatchNorm statistics, then timm's own `init_weights`): exactly the
    same architecture, none of the learned weights."""
    fresh = copy.deepcopy(model)
    torch.manual_seed(seed)
    for module in fresh.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        if isinstance(module, nn.modules.batchnorm._NormBase):
            module.reset_running_stats()
    if hasattr(fresh, "init_weights"):
        fresh.init_weights()
    return fresh


def is_vit(model):
    """A timm VisionTransformer-like model with a class token and per-block outputs."""
    return getattr(model, "cls_token", None) is not None and hasattr(model, "forward_intermediates")


class FeatureModel(nn.Module):
    """Frozen backbone -> probe features: concat of the final-norm [CLS] of the last n blocks
    (+ mean patch token of the last block) for ViTs, the pooled output otherwise."""

    def __init__(self, backbone, n_last_blocks=4, avgpool=False):
        super().__init__()
        self.backbone, self.n_last_blocks, self.avgpool = backbone, n_last_blocks, avgpool
        self.vit = is_vit(backbone)
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


# ----------------------------------------------------------------------------------- data

class TrainTransform:
    """Random-resized-crop (area 0.08-1) + horizontal flip, normalised: the linear-probe training
    augmentation. Its randomness comes from the per-sample generator hvp_run.BatchStream passes in."""

    def __init__(self, size, mean, std, scale=(0.08, 1.0)):
        self.aug = hvp.ViewAug(size=size, scale=scale, flip_p=0.5, jitter_p=0.0, gray_p=0.0, blur_p=0.0)
        self.mean, self.std = list(mean), list(std)

    def __call__(self, image, generator):
        import torchvision.transforms.v2.functional as TF
        src = TF.pil_to_tensor(image)
        params = hvp.sample_view_params(src.shape[1], src.shape[2], self.aug, generator)
        view = hvp.crop_view(src, params, self.aug).float().div_(255)
        return {"image": TF.normalize(view, self.mean, self.std)}


def open_split(dataset, split, image_column, label_column, accelerator, what):
    """A labelled split as an hvp_run.Source: resolved once, by the main process (a format without row
    counts is counted once), and shared; a one-line error if it cannot be opened or has no integer
    label column (`what` needs labels)."""
    source = hvp_run.Source(**hvp_run.on_main(accelerator, lambda: dataclasses.asdict(
        hvp_run.open_source(dataset, split, image_column, label_column))))
    if source.label_column is None:
        raise hvp_run.HVPError(f"dataset {dataset!r} split {split!r} has no label column {label_column!r}: {what} needs "
                           f"labels (an integer column; pass --label_column)")
    return source


def augmented_loaders(source, cfg, size, mean, std, accelerator, batches=None):
    """make_epoch_loader(epoch, skip=0) -> this process's loader of augmented (TrainTransform),
    labelled images of `source` for that epoch; the augmentation of every image is drawn from
    (--seed, epoch, row). batches None: every image once, in order (the views of a feature cache,
    one per epoch); batches N: N full, shuffled batches per epoch (hvp_run.training_batches)."""
    transform = TrainTransform(size, mean, std, cfg.crop_scale)
    pin = accelerator.device.type == "cuda"

    def make_epoch_loader(epoch, skip=0):
        stream = hvp_run.BatchStream(source, transform, cfg.batch_size, epoch, cfg.seed, accelerator.process_index,
                                 accelerator.num_processes, batches, skip)
        return hvp_run.make_loader(stream, cfg.num_workers, pin_memory=pin)

    return make_epoch_loader


def steps_per_epoch(source, global_batch):
    """Full global batches per epoch of a split streamed in training mode; a one-line error if the
    split has fewer images than one."""
    steps = source.num_rows // global_batch
    if steps == 0:
        raise hvp_run.HVPError(f"split {source.split!r} has {source.num_rows} images, fewer than one global batch "
                           f"({global_batch}): lower --batch_size")
    return steps


def skipped_text(skipped):
    """The result-line part for {"train": n, "test": m}: images that could not be decoded."""
    return "undecodable images skipped: " + ", ".join(f"{split} {n}" for split, n in skipped.items())


def check_labels(labels, name):
    if len(labels) == 0:
        raise hvp_run.HVPError(f"split {name!r} is empty")
    if (labels < 0).any():
        raise hvp_run.HVPError(f"split {name!r} has {int((labels < 0).sum())} examples without a label")


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


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), the SimSiam linear
    probe optimizer: each weight matrix's step is scaled by trust * |w| / |grad + wd * w|; biases
    and other 1-D parameters take plain momentum SGD without weight decay."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, trust=0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust=trust))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = p.norm(), update.norm()
                    scale = torch.where((w_norm > 0) & (u_norm > 0), group["trust"] * w_norm / u_norm, 1.0)
                    update = update * scale
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(update)
                p.sub_(buf, alpha=group["lr"])
        return None


def make_optimizer(cfg, heads, lrs):
    groups = [{"params": head.parameters(), "base_lr": lr} for head, lr in zip(heads.heads, lrs)]
    if cfg.optimizer == "lars":
        return LARS(groups, lr=lrs[0], momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=lrs[0], momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def accuracy(logits, labels):
    """Top-1 and top-5 accuracy (%) of (heads, M, C) logits -> two (heads,) tensors."""
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    hit = top == labels[None, :, None]
    return hit[..., 0].float().mean(1) * 100, hit.any(-1).float().mean(1) * 100


# ----------------------------------------------------------------------------------- probe

def run(cfg, accelerator=None):
    """The whole probe; returns the result dict (every process gets it)."""
    lrs = check_config(cfg)
    accelerator = accelerator or hvp_run.make_accelerator(cfg.mixed_precision, 1, "none", ".")
    is_main, device, world = accelerator.is_main_process, accelerator.device, accelerator.num_processes
    start_time = time.perf_counter()
    # fail fast, before the model is built
    train_source = open_split(cfg.dataset, cfg.train_split, cfg.image_column, cfg.label_column, accelerator,
                              "a linear probe")
    test_source = open_split(cfg.dataset, cfg.test_split, cfg.image_column, cfg.label_column, accelerator,
                             "a linear probe")
    global_batch = cfg.batch_size * world
    steps = None if cfg.cache_views else steps_per_epoch(train_source, global_batch)  # cached: once extracted
    backbone, config = load_backbone(cfg.backbone, cfg.checkpoint_key, cfg.random_init, cfg.seed)
    pretrained = config.get("pretrained_cfg", {})
    size = cfg.image_size or pretrained.get("input_size", (3, 224, 224))[-1]
    mean, std = tuple(pretrained.get("mean", hvp.IMAGENET_MEAN)), tuple(pretrained.get("std", hvp.IMAGENET_STD))
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
    check_labels(test_labels, cfg.test_split)

    loaders = augmented_loaders(train_source, cfg, size, mean, std, accelerator, batches=steps)
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
        check_labels(train_labels, cfg.train_split)
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
            top1, top5 = accuracy(accelerator.unwrap_model(heads)(test_feats), test_labels)
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
              f"top-5 {result['final_top5']:.2f} % | {skipped_text(result['skipped_images'])} | "
              f"{result['seconds']:.0f} s", flush=True)
    return result


def default_output(cfg, name):
    source = Path(cfg.backbone).expanduser()
    folder = source if source.is_dir() else Path(".")
    return folder / (f"{name}_random_init.json" if cfg.random_init else f"{name}.json")


def main():
    cfg, notes = hvp_run.parse_config(Config, presets=PRESETS, description=__doc__.splitlines()[0])
    accelerator = hvp_run.make_accelerator(cfg.mixed_precision, 1, "none", ".")
    if accelerator.is_main_process:
        for note in notes:  # "preset for the shipped dataset: ..."
            print(note, flush=True)
    result = run(cfg, accelerator)
    if accelerator.is_main_process:
        output = Path(cfg.output) if cfg.output else default_output(cfg, "linear")
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2))
    accelerator.end_training()


if __name__ == "__main__":
    hvp_run.run_main(main)
