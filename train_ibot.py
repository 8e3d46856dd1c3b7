"""iBOT (masked image modelling + self-distillation) with Hard View Pretraining (HVP), in one file.

Every step draws --global_views G candidate global crops (even ones with global transform 1, odd
ones with transform 2, as DINO; DESIGN.md, D5), each with its own block-wise mask, and --local_views
L_loader candidate local crops per image. One pass without gradients runs the teacher on all
unmasked globals and the student on all masked globals and all locals, and keeps per image the
(even global, odd global, --local_crops_number L locals) tuple with the highest iBOT loss:
lambda1 x [CLS] self-distillation over the tuple + lambda2 x masked-patch self-distillation of its
two globals. Globals keep the mask they were scored with. The local subset is the exact top-L (DESIGN.md, D4),
which the reference could not select. Then one ordinary iBOT step trains on that tuple, reusing the
teacher outputs of the selection pass (DESIGN.md, D3). --global_views 2 --local_views L is plain iBOT.

    python train_ibot.py                             # CPU: the shipped Fashion-MNIST subset (ViT-Ti), k-NN at the end
    accelerate launch train_ibot.py --arch vit_small --dataset <hub id | image folder | parquet>
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 train_ibot.py \\
        --arch vit_small --dataset ILSVRC/imagenet-1k --batch_size 64 --local_views 20 --local_crops_number 10
    # iBOT's published ViT-S/16 run with hard views (RECIPES; batch 1024 over all processes; fp16 as
    # iBOT's run: the recipe pins it, --mixed_precision bf16 after train_ibot.py replaces it)
    accelerate launch --multi_gpu --num_machines 2 --machine_rank $RANK --main_process_ip $HOST \\
        --num_processes 16 train_ibot.py --recipe hvp_ibot_vits16_800ep \\
        --dataset ILSVRC/imagenet-1k --batch_size 64 --resume auto
    python train_ibot.py --resume                    # continue the run in --output_dir

Defaults are the reference iBOT recipe (ViT-S/16, drop-path 0.1, a 2048-2048-256 head shared by
[CLS] and patch tokens with separate weight-normalised last layers of 8192 prototypes each in the
student and one for both in the teacher, block masks of 30 % of the patches with aspect 0.3-3.3,
lambda1 = lambda2 = 1, teacher temperatures 0.04 for [CLS] and 0.04 -> 0.07 over 30 epochs for
patches, student 0.1, two centres with momentum 0.9, AdamW lr 5e-4 x batch/256 with 10 warm-up
epochs and cosine to 1e-6, weight decay 0.04 -> 0.4, clip 3.0, last layers frozen for the first
epoch, teacher EMA 0.996 -> 1, 2 x 224 px globals at scale 0.14-1, no locals, 100 epochs) with
G = 4 candidate globals. On the shipped dataset a CPU preset (see PRESETS) replaces the flags you
do not give: two epochs (312 steps) of ViT-Ti, then k-NN.

Masking: the student's patch embeddings at masked positions are replaced by a learnable mask token
(on the model wrapper, so it is trained, averaged into the teacher and saved) before the position
embedding and the transformer blocks; the teacher always sees the unmasked view. Masks are drawn
per view in the data workers from the view's own seeded generator (exact on resume), each with its
own ratio drawn as the reference does: one of the --pred_ratio values picked at random, each
uniform within -/+ its --pred_ratio_var (the reference's ViT-S/16 recipe, --pred_ratio 0 0.3
--pred_ratio_var 0 0.2, leaves half the views unmasked and masks 10-50 % of the others); no masking
before --pred_start_epoch, and the patch temperature's warm-up starts at that epoch (as in the
reference). As in the reference (--shared_head_teacher, its default), the teacher computes patch
targets with its [CLS] last layer while the student has a separate patch last layer, which the
teacher EMA skips (it averages the parameters both have, by name); the teacher's one last layer
starts as the student's patch last layer (the reference's load order) and the EMA draws it
towards the student's [CLS] one.

Differences from the reference iBOT code: globals alternate the two transforms (the reference gives
transform 1 to view 0 only, DESIGN.md, D5); only the global views get masks (the reference also draws masks
for the local crops, which it never uses); before --pred_start_epoch the masks drawn in the data
workers are replaced by empty ones (the reference draws none), so the data stream does not depend
on it.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import hvp_utils as hvp
import hvp_run


# ----------------------------------------------------------------------------------- config

@dataclass
class Config(hvp_run.RunConfig):  # + the data, output, lifecycle and Hub flags every script shares (hvp_run.RunConfig)
    output_dir: str = "outputs/ibot"  # checkpoints, backbone export, metrics.jsonl, TensorBoard logs (one run per folder)
    arch: str = "vit_small"  # a timm VisionTransformer name; aliases vit_tiny/vit_small/vit_base (patch 16)
    small_stem: bool = False  # 28-64 px inputs: ViT patch 4-8
    patch_size: int = 0  # ViT patch size (0: the model's own, or 4/8 with --small_stem)
    pos_embed_resample: str = "dino"  # position embeddings for other crop sizes: dino (as iBOT, bicubic) or timm (antialiased)
    image_size: int = 224  # global crop size (also the k-NN evaluation size)
    local_size: int = 96  # local crop size
    global_scale: tuple = (0.14, 1.0)  # random-resized-crop area range of global crops
    local_scale: tuple = (0.05, 0.4)  # random-resized-crop area range of local crops
    epochs: int = 100  # length of the run (steps per epoch = examples // global batch)
    max_steps: int = 0  # if > 0, stop after this many optimizer steps (the schedules span them)
    batch_size: int = 128  # images per process per micro-step; global batch = this x processes x grad_accum
    grad_accum: int = 1  # micro-steps per optimizer step (or set --global_batch)
    lr: float = 5e-4  # peak AdamW learning rate, scaled by global batch / 256
    min_lr: float = 1e-6  # learning rate at the end of the cosine
    warmup_epochs: float = 10.0  # linear learning-rate warm-up from 0, in epochs of data (also under --max_steps)
    weight_decay: float = 0.04  # weight decay at the start (not on biases and norms) ...
    weight_decay_end: float = 0.4  # ... cosine-increased to this at the end
    clip_grad: float = 3.0  # clip each parameter's gradient norm to this (0 = off)
    freeze_last_layer: float = 1.0  # epochs during which the heads' last layers are not trained
    drop_path: float = 0.1  # stochastic depth of the student (the teacher has none)
    out_dim: int = 8192  # [CLS] prototypes
    patch_out_dim: int = 8192  # patch prototypes (must equal out_dim with --shared_head or --shared_head_teacher)
    shared_head: bool = False  # one last layer for [CLS] and patch tokens (the MLP is always shared)
    shared_head_teacher: bool = True  # teacher patch tokens use its [CLS] last layer (official); no-: own layer, the student's EMA
    hidden_dim: int = 2048  # head MLP width
    bottleneck_dim: int = 256  # head bottleneck before the weight-normalised last layer(s)
    norm_last_layer: bool = True  # fix the last layers' weight norm to 1 (more stable for ViTs)
    momentum_teacher: float = 0.996  # teacher EMA momentum, cosine-increased to 1 (0.9995 suits batch 256)
    teacher_temp: float = 0.04  # teacher [CLS] softmax temperature after warm-up
    warmup_teacher_temp: float = 0.04  # teacher [CLS] temperature at epoch 0
    teacher_patch_temp: float = 0.07  # teacher patch softmax temperature after warm-up
    warmup_teacher_patch_temp: float = 0.04  # teacher patch temperature at epoch 0
    warmup_teacher_temp_epochs: int = 30  # epochs of linear warm-up of both teacher temperatures (patch: from --pred_start_epoch)
    student_temp: float = 0.1  # student softmax temperature ([CLS] and patches)
    center_momentum: float = 0.9  # EMA momentum of the [CLS] centre
    center_momentum2: float = 0.9  # EMA momentum of the patch centre
    lambda1: float = 1.0  # weight of the [CLS] self-distillation loss
    lambda2: float = 1.0  # weight of the masked-patch (MIM) self-distillation loss
    pred_ratio: tuple = (0.3,)  # fraction of a global crop's patches masked for the student (0 = no MIM); several: one per view
    pred_ratio_var: tuple = (0.0,)  # each view's ratio is uniform in pred_ratio -/+ this (one number, or one per pred_ratio)
    pred_start_epoch: int = 0  # no masking (no MIM loss) before this epoch; the patch temperature warm-up starts here
    pred_aspect: tuple = (0.3, 1 / 0.3)  # aspect-ratio range of the mask blocks
    global_views: int = 4  # candidate global crops per image (even number); 2 = no global selection
    local_views: int = 0  # candidate local crops per image; = local_crops_number: no local selection
    local_crops_number: int = 0  # local crops trained per image (iBOT's default 0; ImageNet runs use 10)
    hvp_every: int = 1  # select hard views every k-th step (views 0, 1 and the first L locals otherwise)
    hvp_start_epoch: int = 0  # plain iBOT before this epoch
    hvp_select_res: float = 1.0  # run the selection forward at this fraction of the resolution (masks resized too)
    hvp_limit: int = 0  # score only this many random candidate tuples (0 = all, exactly, via top-L locals)
    channels_last: bool = True  # NHWC memory format for the patch-embedding convolution


# What a checkpoint's model is made of: --resume refuses a checkpoint that differs in these.
MODEL_FIELDS = ("arch", "small_stem", "patch_size", "image_size", "out_dim", "patch_out_dim", "shared_head",
                "shared_head_teacher", "hidden_dim", "bottleneck_dim", "norm_last_layer")

# Published recipes (--recipe NAME): each replaces the defaults of the flags you do not give. Each
# pins the precision its source trained in (--mixed_precision bf16 on the script's command line
# replaces it, as any recipe value).
_IBOT_S16 = dict(arch="vit_small", image_size=224, local_size=96, epochs=800, global_batch=1024, lr=5e-4, min_lr=1e-6,
                 teacher_temp=0.07, warmup_teacher_temp=0.04, teacher_patch_temp=0.07, warmup_teacher_patch_temp=0.04,
                 warmup_teacher_temp_epochs=30, norm_last_layer=False, shared_head=True, shared_head_teacher=True,
                 out_dim=8192, patch_out_dim=8192, local_crops_number=10, global_scale=(0.25, 1.0),
                 local_scale=(0.05, 0.25), pred_ratio=(0.0, 0.3), pred_ratio_var=(0.0, 0.2), mixed_precision="fp16")
RECIPES = {
    # iBOT ViT-S/16, 800 epochs, the command in bytedance/ibot's README (2 nodes x 8 GPUs x 64 = 1024):
    # teacher temperatures 0.07 for [CLS] and patches (both warm up from 0.04 over 30 epochs), last
    # layer not normalised, shared head, 8192 prototypes, 10 locals, scales 0.25-1 / 0.05-0.25, mask
    # ratio 0 or 0.1-0.5 (--pred_ratio 0 0.3 --pred_ratio_var 0 0.2); main_ibot.py defaults for the
    # rest, fp16 included (--use_fp16 defaults to true; neither the command nor run.sh changes it).
    # k-NN 75.2 %, linear 77.9 % (README). Plain iBOT: 2 globals, 10 locals.
    "ibot_vits16_800ep": dict(_IBOT_S16, global_views=2, local_views=10),
    # The same with hard views. The HVP paper gives no setting of its iBOT run, and the authors' iBOT
    # code (automl/hvp, branch ibot: iBOT's main_ibot.py with hvs, fp16 as iBOT) takes any number of
    # candidate globals above 2 and cannot select locals. G = 4 candidate globals (as the authors' DINO
    # runs) and 16 candidate locals, of which the 10 hardest are kept, are our choice.
    "hvp_ibot_vits16_800ep": dict(_IBOT_S16, global_views=4, local_views=16),
}

# The shipped Fashion-MNIST subset: 28 px grayscale, 10k images. 260 steps (1.67 epochs) of ViT-Ti on
# 2 CPU cores: 24 px globals (3 x 3 patches of 8 px, ~3 masked) and 16 px locals, a 1024-wide head with
# 2048 prototypes (the patch head runs on every token), a faster teacher, 2 of 4 candidate locals, no
# teacher-temperature warm-up (the run is short). A ViT-S trains one epoch in the time of two ViT-Ti
# epochs (README, "Results"); both full epochs (312 steps, a fifth more) gave 63.70 % instead of
# 64.00 %. No loader workers: loading is a few per cent of a ViT step here, and torch then gets every
# core (2 threads ran 1.7x faster than 1 beside a worker). It replaces the ImageNet defaults above for
# the flags you do not give (with --epochs, the epochs you give run in full).
PRESETS = {hvp_run.DEFAULT_DATASET: dict(
    arch="vit_tiny", small_stem=True, patch_size=8, image_size=24, local_size=16, global_scale=(0.4, 1.0),
    epochs=2, max_steps=260, batch_size=64, lr=1e-3, warmup_epochs=0.1, freeze_last_layer=0.0, drop_path=0.0,
    out_dim=2048, patch_out_dim=2048, hidden_dim=1024, momentum_teacher=0.97, warmup_teacher_temp_epochs=0,
    local_views=4, local_crops_number=2, num_workers=0, log_every=10, save_every=200, mixed_precision="auto")}


def check_config(cfg):
    hvp_run.check_run_config(cfg)
    hvp_run.check_arch(cfg.arch)
    if cfg.global_views < 2 or cfg.global_views % 2:
        raise hvp_run.HVPError(f"--global_views must be an even number >= 2 (2 = no global selection), got {cfg.global_views}")
    if not 0 <= cfg.local_crops_number <= cfg.local_views:
        raise hvp_run.HVPError(f"--local_crops_number must be in [0, --local_views = {cfg.local_views}], "
                           f"got {cfg.local_crops_number}")
    means, half_widths = ratio_options(cfg.pred_ratio, cfg.pred_ratio_var)
    if not all(0 <= m < 1 for m in means):
        raise hvp_run.HVPError(f"--pred_ratio must be in [0, 1), got {cfg.pred_ratio}")
    if len(half_widths) != len(means):
        raise hvp_run.HVPError(f"--pred_ratio_var must be one number or one per --pred_ratio ({len(means)}), "
                           f"got {cfg.pred_ratio_var}")
    if not all(0 <= v <= m and m + v < 1 for m, v in zip(means, half_widths)):
        raise hvp_run.HVPError(f"--pred_ratio_var must be in [0, pred_ratio] with pred_ratio + pred_ratio_var < 1, "
                           f"got --pred_ratio {cfg.pred_ratio} --pred_ratio_var {cfg.pred_ratio_var}")
    if cfg.pred_start_epoch < 0:
        raise hvp_run.HVPError(f"--pred_start_epoch must be >= 0, got {cfg.pred_start_epoch}")
    if not 0 < cfg.pred_aspect[0] <= cfg.pred_aspect[1]:
        raise hvp_run.HVPError(f"--pred_aspect must be two numbers 0 < low <= high, got {cfg.pred_aspect}")
    if cfg.shared_head and cfg.patch_out_dim != cfg.out_dim:
        raise hvp_run.HVPError(f"--shared_head needs --patch_out_dim = --out_dim, got {cfg.patch_out_dim} and {cfg.out_dim}")
    if cfg.shared_head and not cfg.shared_head_teacher:
        raise hvp_run.HVPError("--shared_head needs --shared_head_teacher: the teacher's separate patch last layer "
                           "would have no student counterpart to start from and follow")
    if cfg.shared_head_teacher and cfg.patch_out_dim != cfg.out_dim:
        raise hvp_run.HVPError(f"--shared_head_teacher (the default) needs --patch_out_dim = --out_dim, got "
                           f"{cfg.patch_out_dim} and {cfg.out_dim} (or pass --no-shared_head_teacher)")
    if not 0 < cfg.hvp_select_res <= 1:
        raise hvp_run.HVPError(f"--hvp_select_res must be in (0, 1], got {cfg.hvp_select_res}")
    if cfg.hvp_every < 1 or cfg.hvp_limit < 0 or cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise hvp_run.HVPError("--hvp_every, --batch_size and --grad_accum must be >= 1 and --hvp_limit >= 0")
    if min(cfg.teacher_temp, cfg.warmup_teacher_temp, cfg.teacher_patch_temp, cfg.warmup_teacher_patch_temp,
           cfg.student_temp) <= 0:
        raise hvp_run.HVPError("temperatures must be > 0")


# ----------------------------------------------------------------------------------- data

def ratio_options(ratio, ratio_var):
    """--pred_ratio / --pred_ratio_var (numbers or sequences) as two equal-length tuples of means and
    half-widths: one half-width is used for every mean (official iBOT's broadcast)."""
    means = tuple(ratio) if isinstance(ratio, (tuple, list)) else (ratio,)
    half_widths = tuple(ratio_var) if isinstance(ratio_var, (tuple, list)) else (ratio_var,)
    return means, half_widths * len(means) if len(half_widths) == 1 else half_widths


def mask_ratios(n, ratio, ratio_var, generator):
    """n mask ratios as official iBOT draws them (ImageFolderMask.get_pred_ratio): for every (mean,
    half-width) pair uniform(mean - half-width, mean + half-width) (exactly the mean when the width
    is 0), then one of those values picked uniformly. One generator call. -> float64 array (n,)."""
    means, half_widths = (np.array(x, dtype=np.float64) for x in ratio_options(ratio, ratio_var))
    u = torch.rand(n, len(means) + 1, generator=generator, dtype=torch.float64).numpy()
    values = means + half_widths * (2 * u[:, :-1] - 1)
    return values[np.arange(n), (u[:, -1] * len(means)).astype(np.int64)]


def block_masks(ratios, height, width, aspect, generator, attempts=10):
    """BEiT-style block-wise masks of a height x width patch grid, one per ratio, with official
    iBOT's rules (loader.py): a mask grows by rectangles until ratio x height x width patches are
    masked or `attempts` proposals in a row add nothing. A proposal has an area uniform between
    (min(height, width) // 3)^2 and the patches still to mask, a log-uniform aspect in `aspect`,
    rounded sides, is usable only if strictly narrower and lower than the grid, gets a uniform
    position, and is accepted if it masks at least one new patch and no more than are still to mask.

    Vectorised: each round draws all masks' `attempts` proposals in one generator call, counts the
    patches they already cover from summed-area tables and keeps each mask's first acceptable one
    (the later proposals of a round are drawn but unused: the same distribution as drawing one by
    one). -> bool tensor (len(ratios), height, width)."""
    target = np.asarray(ratios, dtype=np.float64).reshape(-1) * height * width
    n = len(target)
    masks = np.zeros((n, height, width), dtype=bool)
    count = np.zeros(n, dtype=np.int64)
    low = (min(height, width) // 3) ** 2
    log_low, log_high = math.log(aspect[0]), math.log(aspect[1])
    rows, cols = np.arange(height), np.arange(width)
    active = np.flatnonzero(count < target)
    while len(active):
        u = torch.rand(len(active), attempts, 4, generator=generator, dtype=torch.float64).numpy()
        remaining = (target[active] - count[active])[:, None]
        area = low + (remaining - low) * u[..., 0]
        aspect_ratio = np.exp(log_low + (log_high - log_low) * u[..., 1])
        h = np.rint(np.sqrt(area * aspect_ratio)).astype(np.int64)  # rint, like round: halves to even
        w = np.rint(np.sqrt(area / aspect_ratio)).astype(np.int64)
        usable = (h < height) & (w < width)
        h, w = h * usable, w * usable                               # unusable ones: empty, in range
        top = (u[..., 2] * (height - h + 1)).astype(np.int64)       # uniform in [0, height - h]
        left = (u[..., 3] * (width - w + 1)).astype(np.int64)
        table = np.zeros((len(active), height + 1, width + 1), dtype=np.int64)  # summed-area tables
        table[:, 1:, 1:] = masks[active].cumsum(1).cumsum(2)
        b = np.arange(len(active))[:, None]
        covered = table[b, top + h, left + w] - table[b, top, left + w] - table[b, top + h, left] + table[b, top, left]
        new = h * w - covered
        ok = usable & (new > 0) & (new <= remaining)
        hit = np.flatnonzero(ok.any(1))                             # the others stop: `attempts` failures
        first = ok[hit].argmax(1)
        t, l, hh, ww = top[hit, first], left[hit, first], h[hit, first], w[hit, first]
        in_rows = (rows >= t[:, None]) & (rows < (t + hh)[:, None])
        in_cols = (cols >= l[:, None]) & (cols < (l + ww)[:, None])
        grown = active[hit]
        masks[grown] |= in_rows[:, :, None] & in_cols[:, None, :]
        count[grown] += new[hit, first]
        active = grown[count[grown] < target[grown]]
    return torch.from_numpy(masks)


def block_mask(height, width, ratio, aspect, generator):
    """One block mask of `ratio` (see block_masks). -> bool tensor (height, width)."""
    return block_masks([ratio], height, width, aspect, generator)[0]


class MaskedMultiCrop:
    """The multi-crop transform plus one block mask per global view ("masks": (G, h, w) bool), each
    with its own ratio (mask_ratios of `ratio`, `ratio_var`), drawn from the same per-sample
    generator, so masks are as reproducible as the crops."""

    def __init__(self, multicrop, grid, ratio, aspect, ratio_var=0.0):
        self.multicrop, self.grid, self.ratio, self.aspect, self.ratio_var = multicrop, grid, ratio, aspect, ratio_var
        self.crops = multicrop.crops  # where the views are cut (the data stream asks)

    def __call__(self, image, generator):
        out = self.multicrop(image, generator)
        if out is None:  # the image cannot be decoded
            return None
        ratios = mask_ratios(len(out["globals_params"]), self.ratio, self.ratio_var, generator)
        out["masks"] = block_masks(ratios, *self.grid, self.aspect, generator)
        return out


def masks_for_epoch(masks, epoch, cfg):
    """No masked image modelling before --pred_start_epoch (official iBOT: ratio 0 then): the masks
    drawn in the data workers are replaced by all-False ones."""
    return masks if epoch >= cfg.pred_start_epoch else torch.zeros_like(masks)


def mask_ratio_text(cfg):
    """The mask ratio settings for the start-up line: "0.3", "0 or 0.1-0.5", "... from epoch 10"."""
    means, half_widths = ratio_options(cfg.pred_ratio, cfg.pred_ratio_var)
    options = [f"{m:g}" if v == 0 else f"{m - v:g}-{m + v:g}" for m, v in zip(means, half_widths)]
    return " or ".join(options) + (f" from epoch {cfg.pred_start_epoch}" if cfg.pred_start_epoch else "")


def resize_masks(masks, grid):
    """Masks (..., h, w) on a coarser patch grid for the reduced-resolution selection (DESIGN.md, D6): bilinear
    interpolation, then a patch is masked if at least half of its area was."""
    if tuple(masks.shape[-2:]) == tuple(grid):
        return masks
    small = F.interpolate(masks.flatten(0, -3)[:, None].float(), size=tuple(grid), mode="bilinear", align_corners=False)
    return (small[:, 0] >= 0.5).unflatten(0, masks.shape[:-2])


# ----------------------------------------------------------------------------------- model

def create_backbone(cfg, drop_path_rate):
    """A timm VisionTransformer (with [CLS] token) via hvp_run.create_backbone; --patch_size applied."""
    from timm.models.vision_transformer import VisionTransformer
    extra = {"patch_size": cfg.patch_size} if cfg.patch_size else {}
    try:
        backbone = hvp_run.create_backbone(cfg.arch, cfg.image_size, cfg.small_stem, drop_path_rate, **extra)
    except TypeError:  # a model that takes no patch_size
        backbone = None
    if not isinstance(backbone, VisionTransformer) or backbone.cls_token is None or backbone.num_reg_tokens:
        raise hvp_run.HVPError(f"--arch {cfg.arch!r} is not a timm VisionTransformer with a [CLS] token: iBOT masks "
                           "patch tokens (try vit_tiny, vit_small, vit_base)")
    return hvp_run.set_pos_embed_resample(backbone, cfg.pos_embed_resample)


class IBOTHead(hvp.DINOHead):
    """DINO's head for [CLS] tokens; patch tokens share its MLP and get their own weight-normalised
    last layer (`last_layer2`) unless shared_head."""

    def __init__(self, in_dim, out_dim, patch_out_dim, hidden_dim=2048, bottleneck_dim=256, norm_last_layer=True,
                 shared_head=False):
        super().__init__(in_dim, out_dim, hidden_dim, bottleneck_dim, norm_last_layer)
        self.last_layer2 = None
        if not shared_head:
            self.last_layer2 = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, patch_out_dim, bias=False))
            magnitude = self.last_layer2.parametrizations.weight.original0
            magnitude.data.fill_(1.0)
            magnitude.requires_grad = not norm_last_layer

    def forward_patches(self, x):
        last = self.last_layer if self.last_layer2 is None else self.last_layer2
        return last(F.normalize(self.mlp(x), dim=-1))


class IBOTModel(nn.Module):
    """A timm ViT + iBOT head over groups of views at different resolutions (dynamic_img_size).
    Masked globals: the patch embeddings at masked positions become the learnable mask_token."""

    def __init__(self, backbone, head, memory_format=torch.contiguous_format):
        super().__init__()
        self.backbone, self.head, self.memory_format = backbone, head, memory_format
        self.mask_token = nn.Parameter(torch.zeros(1, 1, backbone.embed_dim))

    def tokens(self, x, mask=None):
        """timm's VisionTransformer.forward_features with the mask token substituted after the patch
        embedding. x (N, C, H, W), mask (N, h, w) bool -> ([CLS] (N, D), patch tokens (N, h*w, D))."""
        vit = self.backbone
        x = vit.patch_embed(x.contiguous(memory_format=self.memory_format))  # (N, h, w, D) with dynamic_img_size
        if mask is not None:
            x = torch.where(mask.reshape(x.shape[:-1])[..., None], self.mask_token.to(x.dtype).reshape(-1), x)
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))
        x = vit.norm(vit.blocks(x))
        return x[:, 0], x[:, vit.num_prefix_tokens:]

    def forward(self, global_views, masks=None, local_views=None):
        """global_views (B, G, C, H, W), masks (B, G, h, w) or None, local_views (B, L, C, h', w') or None
        -> ([CLS] logits (B, G + L, out_dim), global patch logits (B, G, h*w, patch_out_dim)).
        With masks (the student), the patch head runs on the masked tokens only, the only ones the
        loss looks at; the other positions hold zeros."""
        B, G = global_views.shape[:2]
        cls, patches = self.tokens(global_views.flatten(0, 1), None if masks is None else masks.flatten(0, 1))
        cls = [cls.unflatten(0, (B, G))]
        if local_views is not None and local_views.shape[1]:
            cls.append(self.tokens(local_views.flatten(0, 1))[0].unflatten(0, (B, local_views.shape[1])))
        patches = patches.unflatten(0, (B, G))
        if masks is None:
            return self.head(torch.cat(cls, 1)), self.head.forward_patches(patches)
        masked = masks.flatten(2)                                                  # (B, G, N)
        masked_logits = self.head.forward_patches(patches[masked])                 # (#masked, patch_out_dim)
        patch_logits = masked_logits.new_zeros(*masked.shape, masked_logits.shape[-1])
        patch_logits[masked] = masked_logits
        return self.head(torch.cat(cls, 1)), patch_logits


def build_model(cfg, drop_path_rate, shared_head=None):
    """The student (shared_head None: --shared_head) or, via build_teacher, the teacher."""
    backbone = create_backbone(cfg, drop_path_rate)
    head = IBOTHead(backbone.num_features, cfg.out_dim, cfg.patch_out_dim, cfg.hidden_dim, cfg.bottleneck_dim,
                    cfg.norm_last_layer, cfg.shared_head if shared_head is None else shared_head)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    return IBOTModel(backbone, head, memory_format)


def build_teacher(cfg):
    """The teacher: no drop-path, and (official iBOT's default --shared_head_teacher) one last layer
    for [CLS] and patch tokens, so it lacks the student's last_layer2. Not yet initialised: see
    copy_student_into."""
    return build_model(cfg, 0.0, shared_head=cfg.shared_head_teacher)


def copy_student_into(teacher, student):
    """Start the teacher from the student's weights: every teacher entry is copied from the student
    entry of the same name (a missing one is an error), except that a shared-head teacher of a student
    with a separate patch last layer starts its one last layer from that patch layer (`last_layer2`),
    as official iBOT's does: its shared layer is registered under both names and load_state_dict
    loads the later name last. The EMA then draws it towards the student's [CLS] `last_layer`."""
    source = student.state_dict()
    if teacher.head.last_layer2 is None and student.head.last_layer2 is not None:
        prefix = "head.last_layer2."
        source.update({"head.last_layer." + k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix)})
    names = teacher.state_dict().keys()
    teacher.load_state_dict({k: v for k, v in source.items() if k in names})


# ----------------------------------------------------------------------------------- loss

def masked_patch_loss(student_patches, teacher_patches, masks, patch_center, teacher_temp, student_temp):
    """iBOT's MIM term per global view: the teacher's patch distribution (unmasked view) against the
    student's (masked view) at the same position, averaged over the masked patches only.
    student/teacher_patches (B, G, N, K), masks (B, G, h, w) with h*w = N -> (B, G). The softmaxes
    run on the masked positions only (about pred_ratio of them: the K-wide part is the costly one)."""
    masked = masks.flatten(2).bool()                                                   # (B, G, N)
    ce = -(hvp.teacher_probs(teacher_patches[masked], patch_center, teacher_temp)
           * F.log_softmax(student_patches[masked].float() / student_temp, dim=-1)).sum(-1)   # (masked,)
    per_patch = torch.zeros(masked.shape, dtype=ce.dtype, device=ce.device).masked_scatter(masked, ce)
    return per_patch.sum(-1) / masked.sum(-1).clamp(min=1)


def ibot_loss(student_out, teacher_out, masks, centers, temps, cfg):
    """Per-sample iBOT loss (B,) and its parts: lambda1 x the mean [CLS] cross-entropy over the 2(L+1)
    (teacher global q, student view v != q) pairs + lambda2 x the masked-patch loss averaged over
    the two globals. student_out = ([CLS] (B, 2 + L, K), patches (B, 2, N, Kp)), teacher_out =
    ([CLS] (B, 2, K), patches (B, 2, N, Kp)), masks (B, 2, h, w), centers/temps = ([CLS], patch)."""
    table = hvp.cross_entropy_table(student_out[0], hvp.teacher_probs(teacher_out[0], centers[0], temps[0]), cfg.student_temp)
    other_view = ~torch.eye(*table.shape[1:], dtype=torch.bool, device=table.device)
    cls_loss = table[:, other_view].mean(1)
    patch_loss = masked_patch_loss(student_out[1], teacher_out[1], masks, centers[1], temps[1], cfg.student_temp).mean(1)
    return cfg.lambda1 * cls_loss + cfg.lambda2 * patch_loss, cls_loss, patch_loss


def teacher_temperatures(epoch, cfg):
    """([CLS], patch) teacher temperatures: linear warm-ups that reach their final values at the last
    of the warmup_teacher_temp_epochs epochs (as iBOT's np.linspace schedules). The patch warm-up
    starts at --pred_start_epoch and the patch temperature keeps its warm-up value before (official
    iBOT's schedule with mim_start_epoch): it warms up over the epochs that have masked patches."""
    epochs, start = cfg.warmup_teacher_temp_epochs, cfg.pred_start_epoch
    cls_temp = hvp.linear_warmup(epoch, cfg.warmup_teacher_temp, cfg.teacher_temp, epochs)
    if epoch < start:
        return cls_temp, cfg.warmup_teacher_patch_temp
    return cls_temp, hvp.linear_warmup(epoch - start, cfg.warmup_teacher_patch_temp, cfg.teacher_patch_temp, epochs)


# ----------------------------------------------------------------------------------- hard-view selection

@torch.no_grad()
def select_hard_views(student, teacher, global_views, masks, local_views, centers, temps, cfg, accelerator,
                      patch=1, generator=None):
    """One no-grad pass (train mode, same autocast as training; DESIGN.md, D1): the teacher on the G unmasked
    candidate globals, the student on the G masked globals and all L_loader locals. Per sample the
    (even, odd, top-L locals) tuple with the highest iBOT loss wins (DESIGN.md, D4): the [CLS] terms come from a
    cross-entropy table (scaled by lambda1 / 2(L+1)), the masked-patch loss of each global is a
    per-global term (scaled by lambda2 / 2), so a tuple's score is exactly its per-sample ibot_loss.

    Returns a dict: globals (B, 2) and locals (B, L) view indices (locals counted from 0 within the
    local views), score and plain_score (B,) = the per-sample iBOT loss of the chosen tuple and of
    the plain tuple (0, 1, first L locals), and teacher_out = ([CLS] (B, 2, K), patches (B, 2, N, Kp))
    of the chosen globals (DESIGN.md, D3), or None when the selection ran at reduced resolution (DESIGN.md, D6)."""
    B, G = global_views.shape[:2]
    L = cfg.local_crops_number
    if cfg.hvp_select_res < 1:
        size = hvp.selection_size(cfg.image_size, cfg.hvp_select_res, patch)
        global_views = hvp.resize_views(global_views, size / cfg.image_size)
        local_views = hvp.resize_views(local_views, hvp.selection_size(cfg.local_size, cfg.hvp_select_res, patch) / cfg.local_size)
        masks = resize_masks(masks, (size // patch, size // patch))
    with accelerator.autocast():
        teacher_cls, teacher_patches = teacher(global_views)                      # (B, G, K), (B, G, N, Kp)
        student_cls, student_patches = student(global_views, masks, local_views)  # (B, G + L_loader, K), (B, G, N, Kp)
    teacher_cls, teacher_patches = teacher_cls.float(), teacher_patches.float()
    cost = hvp.cross_entropy_table(student_cls, hvp.teacher_probs(teacher_cls, centers[0], temps[0]), cfg.student_temp)
    cost = cost * (cfg.lambda1 / (2 * (L + 1)))
    per_global = masked_patch_loss(student_patches, teacher_patches, masks, centers[1], temps[1], cfg.student_temp)
    per_global = per_global * (cfg.lambda2 / 2)
    pair, locals_, score = hvp.select_multicrop(cost, L, extra=per_global, limit=cfg.hvp_limit, generator=generator)
    first, second = torch.zeros(B, dtype=torch.long, device=cost.device), torch.ones(B, dtype=torch.long, device=cost.device)
    plain = hvp.tuple_score(cost, first, second, torch.arange(G, G + L, device=cost.device).expand(B, -1), per_global)
    reused = None
    if cfg.hvp_select_res == 1:
        reused = (hvp.gather_views(teacher_cls, pair), hvp.gather_views(teacher_patches, pair))
    return {"globals": pair, "locals": locals_ - G, "score": score, "plain_score": plain, "teacher_out": reused}


# ----------------------------------------------------------------------------------- training step

def train_step(model, teacher, optimizer, centers, micro_batches, schedule, cfg, accelerator, step, epoch,
               patch=1, log_now=False, select_threads=None):
    """One optimizer step of iBOT + HVP over the step's micro-batches: views made on the device, the
    masks (none before --pred_start_epoch); the hardest (even, odd, top-L locals) tuple of each
    image, whose globals keep their masks (every --hvp_every steps from --hvp_start_epoch on;
    otherwise globals 0, 1 and the first L locals); the teacher's outputs of the chosen globals
    (reused from the selection, DESIGN.md, D3); an ordinary iBOT forward and backward with
    per-parameter clipping and frozen last layers; after the last micro-batch the optimizer step,
    the teacher EMA and both centre updates. centers = ([CLS] centre, patch centre), updated in
    place; `schedule` is distillation_schedule's dict. Returns (record, views to show or None).
    select_threads: torch's CPU threads for the selection forward (Run.select_threads; None: as they are)."""
    unwrapped = accelerator.unwrap_model(model)
    center, patch_center = centers
    device, L, L_loader = accelerator.device, cfg.local_crops_number, cfg.local_views
    hvp.apply_schedule(optimizer, schedule)
    interpolation = hvp.dino_augs(cfg)[0].interpolation
    temps = teacher_temperatures(epoch, cfg)
    hard = (cfg.global_views > 2 or L_loader > L) and epoch >= cfg.hvp_start_epoch and step % cfg.hvp_every == 0
    cls_sum, patch_sum = torch.zeros_like(center), torch.zeros_like(patch_center)
    teacher_count = torch.zeros(1, device=device)
    select_s = train_s = 0.0
    for micro, batch in enumerate(micro_batches):
        batch = hvp.pixels_to_device(batch, device)
        global_views = hvp.views_from_batch(batch, "globals", cfg.image_size, interpolation)
        masks = masks_for_epoch(batch["masks"], epoch, cfg).to(device, non_blocking=True)
        local_views = (hvp.views_from_batch(batch, "locals", cfg.local_size, interpolation) if L_loader
                       else global_views.new_zeros(len(global_views), 0, 3, cfg.local_size, cfg.local_size))
        t0 = hvp.clock(log_now, device)
        teacher_out = None
        if hard:
            limit_rng = torch.Generator().manual_seed(hvp_run.mix_seed(cfg.seed, accelerator.process_index, step, micro, "limit"))
            with hvp.threads(select_threads):
                chosen = select_hard_views(unwrapped, teacher, global_views, masks, local_views, centers, temps, cfg,
                                           accelerator, patch, limit_rng)
            x_globals, x_masks = hvp.gather_views(global_views, chosen["globals"]), hvp.gather_views(masks, chosen["globals"])
            x_locals = hvp.gather_views(local_views, chosen["locals"])
            teacher_out = chosen["teacher_out"]
        else:
            x_globals, x_masks, x_locals = global_views[:, :2], masks[:, :2], local_views[:, :L]
        t1 = hvp.clock(log_now, device)
        if teacher_out is None:
            with torch.no_grad(), accelerator.autocast():
                teacher_out = tuple(t.float() for t in teacher(x_globals))
        with accelerator.accumulate(model):
            with accelerator.autocast():
                student_out = model(x_globals, x_masks, x_locals)
            per_sample, cls_loss, patch_loss = ibot_loss(student_out, teacher_out, x_masks, centers, temps, cfg)
            loss = per_sample.mean()
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                if cfg.clip_grad:
                    hvp.clip_each_gradient(unwrapped, cfg.clip_grad, accelerator, optimizer)
                if schedule["freeze_last_layer"]:  # iBOT: the prototypes are kept fixed at first
                    for name, p in unwrapped.head.named_parameters():
                        if name.startswith("last_layer"):
                            p.grad = None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        cls_sum += teacher_out[0].sum((0, 1))
        patch_sum += teacher_out[1].mean(2).sum((0, 1))
        teacher_count += teacher_out[0].shape[0] * teacher_out[0].shape[1]
        t2 = hvp.clock(log_now, device)
        select_s, train_s = select_s + t1 - t0, train_s + t2 - t1
    hvp.ema_update(teacher, unwrapped, schedule["momentum"])
    hvp.update_center(center, cls_sum, teacher_count, cfg.center_momentum, accelerator)
    hvp.update_center(patch_center, patch_sum, teacher_count, cfg.center_momentum2, accelerator)
    record = {"loss": loss.detach(), "cls_loss": cls_loss.detach().mean(), "patch_loss": patch_loss.detach().mean(),
              "mask_ratio": x_masks.float().mean(), "teacher_temp": temps[0], "teacher_patch_temp": temps[1],
              "select_s": select_s, "train_s": train_s}
    record.update({k: v for k, v in schedule.items() if k != "freeze_last_layer"})
    shown = None
    if hard and log_now:
        record.update(hvp.selection_stats(batch["globals_params"], chosen["globals"], chosen["score"], chosen["plain_score"]))
        if L:
            record.update(hvp.local_selection_stats(batch["locals_params"], chosen["locals"], L))
        shown = {"-globals": (global_views, chosen["globals"]), **({"-locals": (local_views, chosen["locals"])} if L else {})}
    return record, shown


# ----------------------------------------------------------------------------------- main

def main():
    cfg, notes = hvp_run.parse_config(Config, presets=PRESETS, recipes=RECIPES, description=__doc__.splitlines()[0])
    check_config(cfg)
    run = hvp_run.Run(cfg, "iBOT", MODEL_FIELDS, notes)

    student = build_model(cfg, cfg.drop_path)
    if cfg.init_from and not run.resuming:  # before the teacher copies the student
        hvp_run.init_backbone(student.backbone, cfg.init_from)
    patch = student.backbone.patch_embed.patch_size[0]
    if cfg.image_size % patch or cfg.local_size % patch:
        raise hvp_run.HVPError(f"--image_size {cfg.image_size} and --local_size {cfg.local_size} must be multiples "
                           f"of the ViT patch size {patch}")
    grid = (cfg.image_size // patch, cfg.image_size // patch)
    teacher = build_teacher(cfg)  # no drop-path; kept out of `prepare`: it has no gradients and no DDP
    copy_student_into(teacher, student)  # a shared-head teacher's one last layer: the student's last_layer2, as iBOT
    teacher.requires_grad_(False)
    teacher.to(run.device)
    optimizer = torch.optim.AdamW(hvp.adamw_param_groups(student), lr=0.0)
    model, optimizer = run.prepare(student, optimizer)
    unwrapped = run.accelerator.unwrap_model(model)
    centers = (torch.zeros(cfg.out_dim, device=run.device), torch.zeros(cfg.patch_out_dim, device=run.device))

    init_lr = cfg.lr * run.global_batch / 256
    G, L_loader, L = cfg.global_views, cfg.local_views, cfg.local_crops_number
    transform = MaskedMultiCrop(hvp.multicrop_transform(cfg, run.crops), grid, cfg.pred_ratio, cfg.pred_aspect,
                                cfg.pred_ratio_var)
    # the teacher is the model iBOT evaluates and exports
    run.start({"student": unwrapped, "teacher": teacher, "center": centers[0], "patch_center": centers[1],
               "optimizer": optimizer}, transform, export=teacher.backbone, export_name="teacher backbone",
              banner=f"{'+ HVP ' if G > 2 or L_loader > L else ''}| {cfg.arch} {cfg.image_size}/{cfg.local_size}px "
                     f"patch {patch} | globals {G} -> 2, locals {L_loader} -> {L} | mask ratio {mask_ratio_text(cfg)} "
                     f"| lr {init_lr:.4g}")
    model.train()
    teacher.train()
    for step in run.steps():
        schedule = hvp.distillation_schedule(step.index, cfg, init_lr, run.steps_per_epoch, run.total_steps)
        record, shown = train_step(model, teacher, optimizer, centers, step.micro_batches, schedule, cfg,
                                   run.accelerator, step.index, step.epoch, patch, step.log_now, run.select_threads)
        for name, (views, chosen) in (shown or {}).items() if step.grid_now else ():
            run.save_grid(step, name, views, chosen)
        run.log(step, record)
    run.finish()


if __name__ == "__main__":
    hvp_run.run_main(main)
