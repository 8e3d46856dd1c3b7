"""SimSiam with Hard View Pretraining (HVP), in one file.

Every step draws --num_views augmented views per image, runs them all through the model once
without gradients, scores every pair with SimSiam's own per-sample loss, and trains a plain SimSiam
step on the hardest pair of each image. --num_views 2 is plain SimSiam (no selection pass).

    python train_simsiam.py                          # CPU: the shipped Fashion-MNIST subset, k-NN at the end
    accelerate launch train_simsiam.py --arch resnet50 --dataset <hub id | image folder | parquet>
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 train_simsiam.py \\
        --arch resnet50 --dataset ILSVRC/imagenet-1k --batch_size 64 --epochs 100
    # the HVP paper's SimSiam run (RECIPES: ResNet-50, 100 epochs, batch 256, N = 4)
    accelerate launch --multi_gpu --num_machines 2 --machine_rank $RANK --main_process_ip $HOST \\
        --num_processes 16 train_simsiam.py --recipe hvp_simsiam_r50_100ep --dataset ILSVRC/imagenet-1k \\
        --batch_size 16 --resume auto
    python train_simsiam.py --resume                 # continue the run in --output_dir
    python train_simsiam.py --push_to_hub --hub_model_id <user>/hvp-simsiam   # then, anywhere:
        timm.create_model("hf-hub:<user>/hvp-simsiam", pretrained=True)

Defaults are the official SimSiam argparse defaults (ResNet-50, SGD lr 0.05 x batch/256, momentum 0.9,
wd 1e-4, cosine per epoch, fixed predictor lr, MoCo-v2 augmentations, 100 epochs, N = 4 views). On the
shipped dataset a CPU preset (see PRESETS) replaces the flags you do not give; the README lists
the k-NN accuracy it reaches and the time it takes on 2 CPU cores.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import hvp_utils as hvp
import hvp_run


# ----------------------------------------------------------------------------------- config

@dataclass
class Config(hvp_run.RunConfig):  # + the data, output, lifecycle and Hub flags every script shares (hvp_run.RunConfig)
    output_dir: str = "outputs/simsiam"  # checkpoints, backbone export, metrics.jsonl, TensorBoard logs (one run per folder)
    arch: str = "resnet50"  # any timm model name; aliases vit_tiny/vit_small/vit_base
    small_stem: bool = False  # 28-64 px inputs: 3x3 stride-1 ResNet stem / ViT patch 4-8
    image_size: int = 224  # training crop size
    crop_scale: tuple = (0.2, 1.0)  # random-resized-crop area range (SimSiam / MoCo v2: 0.2-1)
    epochs: int = 100  # length of the run (steps per epoch = examples // global batch)
    max_steps: int = 0  # if > 0, stop after this many optimizer steps (the schedule spans them)
    batch_size: int = 64  # images per process per micro-step; global batch = this x processes x grad_accum
    grad_accum: int = 1  # micro-steps per optimizer step (or set --global_batch)
    lr: float = 0.05  # base learning rate, scaled by global batch / 256
    lr_schedule: str = "epoch"  # cosine to 0, updated once per epoch (official SimSiam) or every "step"
    weight_decay: float = 1e-4  # SGD weight decay
    momentum: float = 0.9  # SGD momentum
    fix_pred_lr: bool = True  # keep the predictor at the initial lr (SimSiam paper)
    proj_dim: int = 2048  # projector output and hidden width
    proj_layers: int = 3  # projector depth: 3 (ImageNet recipe) or 2 (the reference's CIFAR-sized variant)
    pred_dim: int = 512  # predictor bottleneck width
    num_views: int = 4  # candidate views per image; 2 = plain SimSiam, 4 = the paper's HVP setting
    hvp_every: int = 1  # select hard views every k-th step (plain pair (0, 1) otherwise)
    hvp_start_epoch: int = 0  # plain SimSiam before this epoch
    hvp_select_res: float = 1.0  # run the selection forward at this fraction of the resolution (0.5 = 4x fewer pixels)
    channels_last: bool = True  # NHWC memory format (faster convolutions on GPUs with AMP and on CPUs)


# What a checkpoint's model is made of: --resume refuses a checkpoint that differs in these.
MODEL_FIELDS = ("arch", "small_stem", "image_size", "proj_dim", "proj_layers", "pred_dim")

# Published recipes (--recipe NAME): each replaces the defaults of the flags you do not give.
RECIPES = {
    # Official SimSiam (Chen & He 2021; facebookresearch/simsiam README and main_simsiam.py defaults):
    # ResNet-50, 100 epochs, batch 512, SGD lr 0.05 x B/256, wd 1e-4, momentum 0.9, --fix-pred-lr,
    # cosine per epoch, 2 views, fp32 (main_simsiam.py has no mixed precision). Linear probe 68.1 % (README).
    "simsiam_r50_100ep": dict(arch="resnet50", image_size=224, epochs=100, global_batch=512, lr=0.05,
                              weight_decay=1e-4, momentum=0.9, fix_pred_lr=True, proj_dim=2048, proj_layers=3,
                              pred_dim=512, lr_schedule="epoch", num_views=2, mixed_precision="no"),
    # The HVP paper's SimSiam runs (automl/hvp, branch main: configs/ImageNet/pretrain_default.yaml with
    # num_crops 4; the runs are named ep100-bs256-lr0.05-wd0.0001-mom0.9): the official recipe at batch
    # 256 with N = 4 candidate views, fp16 (the config's fp16: True). Linear probe 68.98 % (HVP) vs 68.2 %
    # (their plain run).
    "hvp_simsiam_r50_100ep": dict(arch="resnet50", image_size=224, epochs=100, global_batch=256, lr=0.05,
                                  weight_decay=1e-4, momentum=0.9, fix_pred_lr=True, proj_dim=2048, proj_layers=3,
                                  pred_dim=512, lr_schedule="epoch", num_views=4, mixed_precision="fp16"),
    # The same at 200 epochs, fp16 (HVP 70.47 % vs 69.76 % plain in the authors' number-of-views analysis).
    "hvp_simsiam_r50_200ep": dict(arch="resnet50", image_size=224, epochs=200, global_batch=256, lr=0.05,
                                  weight_decay=1e-4, momentum=0.9, fix_pred_lr=True, proj_dim=2048, proj_layers=3,
                                  pred_dim=512, lr_schedule="epoch", num_views=4, mixed_precision="fp16"),
}

# The shipped Fashion-MNIST subset: 28 px grayscale, 10k images. This preset pretrains on 2 CPU
# cores in 4 to 4.7 minutes in fp32 (README, "Results": the times and seeds); it replaces the
# ImageNet defaults above for flags you do not give. Chosen by a sweep at a fixed time budget
# (README, "Results"): timm's test_resnet (0.37 M parameters: a deep stem and 4 basic blocks) at
# 32 px for 20 epochs beat ResNet-18 at 64 px for 2 epochs (75.3 %) by 7 points of k-NN accuracy;
# batch 64 beat 128 and 256, lr 0.5 beat 0.3 and 1.0, and a narrow projector suits the 10 classes;
# a 2-layer projector (the SimSiam paper's CIFAR variant) beat 3 layers by 0.37 points over 3 seeds.
PRESETS = {hvp_run.DEFAULT_DATASET: dict(
    arch="test_resnet", small_stem=False, image_size=32, epochs=20, batch_size=64, lr=0.5, lr_schedule="step",
    weight_decay=5e-4, proj_dim=512, proj_layers=2, pred_dim=128, num_workers=1, log_every=50, save_every=500,
    mixed_precision="auto")}


def check_config(cfg):
    hvp_run.check_run_config(cfg)
    hvp_run.check_arch(cfg.arch)
    if cfg.num_views < 2:
        raise hvp_run.HVPError(f"--num_views must be at least 2 (2 = plain SimSiam), got {cfg.num_views}")
    if not 0 < cfg.hvp_select_res <= 1:
        raise hvp_run.HVPError(f"--hvp_select_res must be in (0, 1], got {cfg.hvp_select_res}")
    if cfg.proj_layers not in (2, 3):
        raise hvp_run.HVPError(f"--proj_layers must be 2 or 3, got {cfg.proj_layers}")
    if cfg.hvp_every < 1 or cfg.batch_size < 2 or cfg.grad_accum < 1:
        raise hvp_run.HVPError("--hvp_every and --grad_accum must be >= 1 and --batch_size >= 2 (BatchNorm)")
    if cfg.lr_schedule not in ("epoch", "step"):
        raise hvp_run.HVPError(f"--lr_schedule must be epoch or step, got {cfg.lr_schedule!r}")


# ----------------------------------------------------------------------------------- data

def simsiam_aug(cfg):
    """MoCo-v2 / SimSiam augmentations (blur kernel 9 and sigma 0.1-2 at 224 px, scaled with size)."""
    return hvp.ViewAug(size=cfg.image_size, scale=cfg.crop_scale, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8,
                       gray_p=0.2, blur_p=0.5, blur_kernel=9, flip_p=0.5, interpolation="bilinear")


# ----------------------------------------------------------------------------------- model

class SimSiam(nn.Module):
    """Backbone -> 2- or 3-layer projector (last BN without affine) -> 2-layer bottleneck predictor."""

    def __init__(self, backbone, proj_dim, pred_dim, proj_layers=3):
        super().__init__()
        layers, width = [], backbone.num_features
        for _ in range(proj_layers - 1):
            layers += [nn.Linear(width, proj_dim, bias=False), nn.BatchNorm1d(proj_dim), nn.ReLU(inplace=True)]
            width = proj_dim
        self.backbone = backbone
        self.projector = nn.Sequential(
            *layers, nn.Linear(width, proj_dim, bias=False), nn.BatchNorm1d(proj_dim, affine=False))
        self.predictor = nn.Sequential(
            nn.Linear(proj_dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim), nn.ReLU(inplace=True),
            nn.Linear(pred_dim, proj_dim))

    def embed(self, x):
        z = self.projector(self.backbone(x))
        return self.predictor(z), z

    def forward(self, x1, x2):
        # each view has its own forward, so BatchNorm statistics are per view (reference step 5)
        (p1, z1), (p2, z2) = self.embed(x1), self.embed(x2)
        return p1, p2, z1, z2


# ----------------------------------------------------------------------------------- loss

def simsiam_loss(p1, p2, z1, z2):
    """Symmetric negative cosine similarity with stop-gradient on the targets."""
    return -0.5 * (F.cosine_similarity(p1, z2.detach(), dim=-1).mean() +
                   F.cosine_similarity(p2, z1.detach(), dim=-1).mean())


def pair_loss(first, second):
    """The same loss per sample for candidate pairs: (p, z) tensors shaped (B, K, D) -> (B, K)."""
    (p1, z1), (p2, z2) = first, second
    return -0.5 * (F.cosine_similarity(p1, z2, dim=-1) + F.cosine_similarity(p2, z1, dim=-1))


# ----------------------------------------------------------------------------------- hard-view selection

@torch.no_grad()
def select_hard_pair(model, views, cfg, accelerator):
    """One no-grad forward of all B x N views (train mode, same autocast as training), then the
    per-sample hardest pair. Returns (pair (B, 2), its score (B,), all scores (B, K); column 0 is
    the plain pair (0, 1))."""
    B, N = views.shape[:2]
    x = hvp.resize_views(views, cfg.hvp_select_res).flatten(0, 1)
    with accelerator.autocast():
        p, z = model.embed(x.contiguous(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format))
    return hvp.select_hard_pairs((p.float().unflatten(0, (B, N)), z.float().unflatten(0, (B, N))), pair_loss)


# ----------------------------------------------------------------------------------- training step

def learning_rate(step, cfg, init_lr, steps_per_epoch, total_steps):
    """Cosine from the scaled lr to 0: per epoch as the official SimSiam (--lr_schedule epoch), or per step."""
    if cfg.lr_schedule == "epoch":
        return init_lr * 0.5 * (1 + math.cos(math.pi * (step // steps_per_epoch) * steps_per_epoch / total_steps))
    return hvp.cosine(step, total_steps, init_lr)


def train_step(model, optimizer, micro_batches, cfg, accelerator, step, epoch, log_now=False, select_threads=None):
    """One optimizer step of SimSiam + HVP over the step's micro-batches: views made on the device,
    the hardest pair of each image (every --hvp_every steps from --hvp_start_epoch on; the plain pair
    (0, 1) otherwise), an ordinary SimSiam forward and backward; the optimizer steps after the last
    micro-batch. Returns (record, (views, pair) of the last micro-batch or None): the record has the
    loss, the time split and, when log_now, the selection statistics.
    select_threads: torch's CPU threads for the selection forward (Run.select_threads; None: as they are)."""
    unwrapped = accelerator.unwrap_model(model)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    hard = cfg.num_views > 2 and epoch >= cfg.hvp_start_epoch and step % cfg.hvp_every == 0
    record, shown, select_s, train_s = {}, None, 0.0, 0.0
    for batch in micro_batches:
        views = hvp.views_from_batch(hvp.pixels_to_device(batch, accelerator.device), "views", cfg.image_size,
                                     simsiam_aug(cfg).interpolation)
        t0 = hvp.clock(log_now, accelerator.device)
        if hard:
            with hvp.threads(select_threads):
                pair, hard_score, scores = select_hard_pair(unwrapped, views, cfg, accelerator)
            x1, x2 = hvp.gather_views(views, pair[:, 0]), hvp.gather_views(views, pair[:, 1])
        else:
            x1, x2 = views[:, 0], views[:, 1]
        x1, x2 = x1.contiguous(memory_format=memory_format), x2.contiguous(memory_format=memory_format)
        t1 = hvp.clock(log_now, accelerator.device)
        with accelerator.accumulate(model):
            loss = simsiam_loss(*model(x1, x2))
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        t2 = hvp.clock(log_now, accelerator.device)
        select_s, train_s = select_s + t1 - t0, train_s + t2 - t1
    record.update(loss=loss.detach(), select_s=select_s, train_s=train_s)
    if hard and log_now:
        record.update(hvp.selection_stats(batch["views_params"], pair, hard_score, scores[:, 0]))
        shown = (views, pair)
    return record, shown


# ----------------------------------------------------------------------------------- main

def main():
    cfg, notes = hvp_run.parse_config(Config, presets=PRESETS, recipes=RECIPES, description=__doc__.splitlines()[0])
    check_config(cfg)
    run = hvp_run.Run(cfg, "SimSiam", MODEL_FIELDS, notes)

    backbone = hvp_run.create_backbone(cfg.arch, cfg.image_size, cfg.small_stem)
    if cfg.init_from and not run.resuming:
        hvp_run.init_backbone(backbone, cfg.init_from)
    model = SimSiam(backbone, cfg.proj_dim, cfg.pred_dim, cfg.proj_layers)
    model = model.to(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    if run.world > 1 and run.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    init_lr = cfg.lr * run.global_batch / 256
    optimizer = torch.optim.SGD(
        [{"params": [*model.backbone.parameters(), *model.projector.parameters()], "fix_lr": False},
         {"params": model.predictor.parameters(), "fix_lr": cfg.fix_pred_lr}],
        lr=init_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    model, optimizer = run.prepare(model, optimizer)
    unwrapped = run.accelerator.unwrap_model(model)

    transform = hvp.MultiViewTransform({"views": [simsiam_aug(cfg)] * cfg.num_views}, crops=run.crops)
    run.start({"model": unwrapped, "optimizer": optimizer}, transform, export=unwrapped.backbone,
              banner=f"{'+ HVP ' if cfg.num_views > 2 else ''}| {cfg.arch} {cfg.image_size}px | {cfg.num_views} views "
                     f"| lr {init_lr:.4g}")
    if run.world > 1 and run.device.type != "cuda" and run.is_main:
        print("note: SyncBatchNorm needs GPUs; on CPU each process normalises its own batch", flush=True)
    model.train()
    for step in run.steps():
        lr = learning_rate(step.index, cfg, init_lr, run.steps_per_epoch, run.total_steps)
        for group in optimizer.param_groups:
            group["lr"] = init_lr if group["fix_lr"] else lr
        record, shown = train_step(model, optimizer, step.micro_batches, cfg, run.accelerator, step.index, step.epoch,
                                   step.log_now, run.select_threads)
        if shown and step.grid_now:
            run.save_grid(step, "", *shown)
        run.log(step, {**record, "lr": lr})
    run.finish()


if __name__ == "__main__":
    hvp_run.run_main(main)
