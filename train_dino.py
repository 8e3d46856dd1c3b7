"""DINO with multi-crop Hard View Pretraining (HVP), in one file.

Every step draws --global_views G candidate global crops (even ones with DINO's global transform 1,
odd ones with transform 2) and --local_views L_loader candidate local crops per image, runs the
teacher on all globals and the student on all views once without gradients, and keeps per image the
(even global, odd global, --local_crops_number L locals) tuple with the highest DINO loss: the best
global pair over the (G/2)^2 (even, odd) pairs, each with its exact top-L locals (DESIGN.md, D4). Then
it trains one ordinary DINO step on that tuple, reusing the teacher outputs of the selection pass
(DESIGN.md, D3). --global_views 2 --local_views L is plain DINO (no selection pass).

    python train_dino.py                             # CPU: the shipped Fashion-MNIST subset (ViT-Ti), k-NN at the end
    accelerate launch train_dino.py --arch vit_small --dataset <hub id | image folder | parquet>
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 train_dino.py \\
        --arch vit_small --dataset ILSVRC/imagenet-1k --batch_size 64 --epochs 100
    # the HVP paper's ViT-B/16 run (RECIPES; batch 1024 over all processes, accumulation as needed; fp32
    # as DINO's ViT-B/16 run: the recipe pins it, --mixed_precision bf16 after train_dino.py replaces it)
    accelerate launch --multi_gpu --num_machines 4 --machine_rank $RANK --main_process_ip $HOST \\
        --num_processes 32 train_dino.py --recipe hvp_dino_vitb16_400ep \\
        --dataset ILSVRC/imagenet-1k --batch_size 32 --resume auto
    python train_dino.py --resume                    # continue the run in --output_dir

Defaults are the reference ImageNet recipe (ViT-S/16, drop-path 0.1, head 2048-2048-256-65536 with a
weight-normalised last layer, AdamW lr 5e-4 x batch/256 with 10 warm-up epochs and cosine to 1e-6,
weight decay 0.04 -> 0.4, clip 3.0, last layer frozen for the first epoch, teacher EMA 0.996 -> 1,
teacher temperature 0.04, student 0.1, centre momentum 0.9, 2 x 224 px globals at scale 0.4-1 and
96 px locals at scale 0.05-0.4, 100 epochs) with G = 4 candidate globals and 16 candidate locals of
which 8 are trained. On the shipped dataset a CPU preset (see PRESETS) replaces the flags you do
not give; it pretrains a ViT-Ti on 2 CPU cores in under 10 minutes (see the README for its k-NN
accuracy).

Teacher outputs: the teacher has no gradients, no dropout and no drop-path, and its weights do not
change between the selection pass and the training step, so its outputs for the selected globals
are taken from the selection pass (DESIGN.md, D3). Only a selection at reduced resolution (--hvp_select_res
< 1, DESIGN.md, D6) re-runs the teacher on the selected globals: the step trains on full-resolution views and
needs full-resolution teacher outputs. A teacher with BatchNorm (ResNets; train mode, as in DINO)
normalises the reused outputs with the statistics of all G candidate globals, not of the 2 selected.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

import hvp_utils as hvp
import hvp_run


# ----------------------------------------------------------------------------------- config

@dataclass
class Config(hvp_run.RunConfig):  # + the data, output, lifecycle and Hub flags every script shares (hvp_run.RunConfig)
    output_dir: str = "outputs/dino"  # checkpoints, backbone export, metrics.jsonl, TensorBoard logs (one run per folder)
    arch: str = "vit_small"  # any timm model name; aliases vit_tiny/vit_small/vit_base (patch 16)
    small_stem: bool = False  # 28-64 px inputs: 3x3 stride-1 ResNet stem / ViT patch 4-8
    patch_size: int = 0  # ViT patch size (0: the model's own, or 4/8 with --small_stem); CNNs have none
    pos_embed_resample: str = "dino"  # ViT position embeddings for other crop sizes: dino (as DINO, bicubic) or timm (antialiased)
    image_size: int = 224  # global crop size (also the k-NN evaluation size)
    local_size: int = 96  # local crop size
    global_scale: tuple = (0.4, 1.0)  # random-resized-crop area range of global crops
    local_scale: tuple = (0.05, 0.4)  # random-resized-crop area range of local crops
    epochs: int = 100  # length of the run (steps per epoch = examples // global batch)
    max_steps: int = 0  # if > 0, stop after this many optimizer steps (the schedules span them)
    batch_size: int = 64  # images per process per micro-step; global batch = this x processes x grad_accum
    grad_accum: int = 1  # micro-steps per optimizer step (or set --global_batch)
    lr: float = 5e-4  # peak AdamW learning rate, scaled by global batch / 256
    min_lr: float = 1e-6  # learning rate at the end of the cosine
    warmup_epochs: float = 10.0  # linear learning-rate warm-up from 0, in epochs of data (also under --max_steps)
    weight_decay: float = 0.04  # weight decay at the start (not on biases and norms) ...
    weight_decay_end: float = 0.4  # ... cosine-increased to this at the end
    clip_grad: float = 3.0  # clip each parameter's gradient norm to this (0 = off)
    freeze_last_layer: float = 1.0  # epochs during which the head's last layer is not trained
    drop_path: float = 0.1  # stochastic depth of the student (the teacher has none)
    out_dim: int = 65536  # prototypes: head output dimension
    hidden_dim: int = 2048  # head MLP width
    bottleneck_dim: int = 256  # head bottleneck before the weight-normalised last layer
    norm_last_layer: bool = True  # fix the last layer's weight norm to 1 (more stable for ViTs)
    momentum_teacher: float = 0.996  # teacher EMA momentum, cosine-increased to 1 (0.9995 suits batch 256)
    teacher_temp: float = 0.04  # teacher softmax temperature after warm-up (0.07 max; try 0.07 for long runs)
    warmup_teacher_temp: float = 0.04  # teacher temperature at epoch 0
    warmup_teacher_temp_epochs: int = 0  # epochs of linear teacher temperature warm-up
    student_temp: float = 0.1  # student softmax temperature
    center_momentum: float = 0.9  # EMA momentum of the centre subtracted from teacher outputs
    global_views: int = 4  # candidate global crops per image (even number); 2 = no global selection
    local_views: int = 16  # candidate local crops per image; = local_crops_number: no local selection
    local_crops_number: int = 8  # local crops trained per image (DINO's L)
    hvp_every: int = 1  # select hard views every k-th step (views 0, 1 and the first L locals otherwise)
    hvp_start_epoch: int = 0  # plain DINO before this epoch
    hvp_select_res: float = 1.0  # run the selection forward at this fraction of the resolution (0.5 = 4x fewer pixels)
    hvp_limit: int = 0  # score only this many random candidate tuples (0 = all, exactly, via top-L locals)
    channels_last: bool = True  # NHWC memory format (faster convolutions on GPUs with AMP and on CPUs)


# What a checkpoint's model is made of: --resume refuses a checkpoint that differs in these.
MODEL_FIELDS = ("arch", "small_stem", "patch_size", "image_size", "out_dim", "hidden_dim", "bottleneck_dim",
                "norm_last_layer")

# Published recipes (--recipe NAME): each replaces the defaults of the flags you do not give. The
# official DINO values are the argument lists published with each checkpoint (args.txt next to the
# weights, linked from facebookresearch/dino's README); batch = per-GPU batch x GPUs. Each recipe
# pins the precision its source trained in (--mixed_precision bf16 on the script's command line
# replaces it, as any recipe value).
_DINO_LONG = dict(global_scale=(0.25, 1.0), local_scale=(0.05, 0.25), local_crops_number=10, teacher_temp=0.07,
                  warmup_teacher_temp=0.04, global_batch=1024, image_size=224, local_size=96, weight_decay=0.04,
                  weight_decay_end=0.4, momentum_teacher=0.996, drop_path=0.1, warmup_epochs=10.0, out_dim=65536,
                  mixed_precision="no")
RECIPES = {
    # DINO ViT-B/16, 400 epochs (args.txt of dino_vitbase16_pretrain): lr 7.5e-4 x B/256 at B = 32 x 32
    # GPUs, min_lr 2e-6, teacher temperature 0.04 -> 0.07 over 50 epochs, clip 0.3, last layer frozen 3
    # epochs, 10 locals, crop scales 0.25-1 / 0.05-0.25, fp32 (use_fp16 false). k-NN 76.1 %, linear
    # 78.2 % (README). Plain DINO: 2 globals, 10 locals.
    "dino_vitb16_400ep": dict(_DINO_LONG, arch="vit_base", epochs=400, lr=7.5e-4, min_lr=2e-6,
                              warmup_teacher_temp_epochs=50, clip_grad=0.3, freeze_last_layer=3.0, norm_last_layer=True,
                              global_views=2, local_views=10),
    # The HVP paper's DINO ViT-B/16 run: 78.8 % linear vs 78.2 % (the paper's abstract; 400 epochs per a
    # summary of the paper). No public config of the authors has a ViT-B run, so this is the recipe
    # above, fp32 included, with our choice of G = 4 candidate globals and 16 candidate locals (the
    # values of the authors' only long-run config, example_config__juwels_pretrain.yaml in automl/hvp,
    # a ViT-S run, also fp32), of which the 10 hardest are trained (exactly, by top-L; they scored 64
    # random tuples).
    "hvp_dino_vitb16_400ep": dict(_DINO_LONG, arch="vit_base", epochs=400, lr=7.5e-4, min_lr=2e-6,
                                  warmup_teacher_temp_epochs=50, clip_grad=0.3, freeze_last_layer=3.0,
                                  norm_last_layer=True, global_views=4, local_views=16),
    # DINO ViT-S/16, 800 epochs (args.txt of dino_deitsmall16_pretrain): lr 5e-4 x B/256 at B = 64 x 16
    # GPUs, min_lr 1e-5, no clipping, teacher temperature 0.04 -> 0.07 over 30 epochs, last layer not
    # normalised, 10 locals, scales 0.25-1 / 0.05-0.25, fp32 (use_fp16 false). k-NN 74.5 %, linear
    # 77.0 % (README).
    "dino_vits16_800ep": dict(_DINO_LONG, arch="vit_small", epochs=800, lr=5e-4, min_lr=1e-5,
                              warmup_teacher_temp_epochs=30, clip_grad=0.0, freeze_last_layer=1.0,
                              norm_last_layer=False, global_views=2, local_views=10),
    # The authors' long HVP DINO run (automl/hvp, branch dino-wds, example_config__juwels_pretrain.yaml):
    # the ViT-S/16 800-epoch recipe (the config repeats its values, fp32 included: fp16 false) with G = 4
    # candidate globals and 16 candidate locals (num_global_crops_loader 4, num_local_crops_loader 16);
    # they scored 64 random tuples per step (--hvp_limit 64; here all, exactly).
    "hvp_dino_vits16_800ep": dict(_DINO_LONG, arch="vit_small", epochs=800, lr=5e-4, min_lr=1e-5,
                                  warmup_teacher_temp_epochs=30, clip_grad=0.0, freeze_last_layer=1.0,
                                  norm_last_layer=False, global_views=4, local_views=16),
    # The authors' default DINO config (automl/hvp, branch dino: configs/ImageNet/pretrain_default.yaml):
    # vanilla ViT-S/16 DINO for 100 epochs (this script's defaults), batch 1024, 8 locals trained, fp16
    # (fp16: true). That config draws 2 globals and 8 locals, so it selects nothing: G = 4 is from the
    # name of the authors' 100-epoch ViT-S run (branch analysis: ...-ep100-bs512-select_cross-ncrops4,
    # whose batch was 512), and 16 candidate locals are our choice, the number in their speed test
    # (branch dino-wds, analysis/speedtest/speed_test_hvs.py: 4 globals, 16 locals, 8 trained).
    "hvp_dino_vits16_100ep": dict(arch="vit_small", epochs=100, global_batch=1024, lr=5e-4, min_lr=1e-6,
                                  global_views=4, local_views=16, local_crops_number=8, mixed_precision="fp16"),
}

# The shipped Fashion-MNIST subset: 28 px grayscale, 10k images. This preset pretrains a ViT-Ti for
# one epoch on 2 CPU cores in about 3 minutes: 32 px globals and 16 px locals with 8 px patches
# (17 and 5 tokens), a 4096-prototype head, a faster teacher, 2 of 4 candidate locals. DINO needs
# far more steps than a CPU gives: a second epoch adds under 3 points of k-NN accuracy and a ViT-S
# is slower and no better (README, "Results"). No loader workers: loading is a few per cent of a
# ViT step here, and torch then gets every core (2 threads ran 1.7x faster than 1 beside a worker).
# It replaces the ImageNet defaults above for the flags you do not give.
PRESETS = {hvp_run.DEFAULT_DATASET: dict(
    arch="vit_tiny", small_stem=True, patch_size=8, image_size=32, local_size=16, epochs=1, batch_size=64, lr=1e-3,
    warmup_epochs=0.1, freeze_last_layer=0.0, drop_path=0.0, out_dim=4096, momentum_teacher=0.97,
    local_views=4, local_crops_number=2, num_workers=0, log_every=10, save_every=200, mixed_precision="auto")}


def check_config(cfg):
    hvp_run.check_run_config(cfg)
    hvp_run.check_arch(cfg.arch)
    if cfg.global_views < 2 or cfg.global_views % 2:
        raise hvp_run.HVPError(f"--global_views must be an even number >= 2 (2 = no global selection), got {cfg.global_views}")
    if not 0 <= cfg.local_crops_number <= cfg.local_views:
        raise hvp_run.HVPError(f"--local_crops_number must be in [0, --local_views = {cfg.local_views}], "
                           f"got {cfg.local_crops_number}")
    if not 0 < cfg.hvp_select_res <= 1:
        raise hvp_run.HVPError(f"--hvp_select_res must be in (0, 1], got {cfg.hvp_select_res}")
    if cfg.hvp_every < 1 or cfg.hvp_limit < 0 or cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise hvp_run.HVPError("--hvp_every, --batch_size and --grad_accum must be >= 1 and --hvp_limit >= 0")
    if min(cfg.teacher_temp, cfg.warmup_teacher_temp, cfg.student_temp) <= 0:
        raise hvp_run.HVPError("temperatures must be > 0")


# ----------------------------------------------------------------------------------- model

def create_backbone(cfg, drop_path_rate):
    """hvp_run.create_backbone, with --patch_size and --pos_embed_resample for ViTs only (convolutional
    networks have neither patches nor position embeddings)."""
    is_vit = hvp_run.is_vit_arch(cfg.arch)
    extra = {"patch_size": cfg.patch_size} if cfg.patch_size and is_vit else {}
    resample = cfg.pos_embed_resample if is_vit else "timm"
    return hvp_run.create_backbone(cfg.arch, cfg.image_size, cfg.small_stem, drop_path_rate, resample, **extra)


class MultiCrop(nn.Module):
    """Backbone + DINO head over groups of views at different resolutions: one backbone pass per
    group (a ViT takes any size thanks to dynamic_img_size), one head pass for all of them."""

    def __init__(self, backbone, head, memory_format=torch.contiguous_format):
        super().__init__()
        self.backbone, self.head, self.memory_format = backbone, head, memory_format

    def forward(self, *view_groups):
        """view_groups: tensors (B, n, C, H, W), one per resolution -> logits (B, sum of n, out_dim),
        views in the order given."""
        B = view_groups[0].shape[0]
        features = [self.backbone(v.flatten(0, 1).contiguous(memory_format=self.memory_format)).unflatten(0, (B, v.shape[1]))
                    for v in view_groups if v.shape[1]]
        return self.head(torch.cat(features, 1))


def build_model(cfg, drop_path_rate):
    backbone = create_backbone(cfg, drop_path_rate)
    head = hvp.DINOHead(backbone.num_features, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.norm_last_layer)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    return MultiCrop(backbone, head, memory_format).to(memory_format=memory_format)


# ----------------------------------------------------------------------------------- loss

def dino_loss(student_logits, teacher_logits, center, teacher_temp, student_temp):
    """Per-sample DINO loss (B,): the mean of H(teacher global q, student view v) over the 2(L+1)
    pairs v != q. student_logits (B, 2 + L, K) for [global 0, global 1, locals]; teacher_logits (B, 2, K)."""
    table = hvp.cross_entropy_table(student_logits, hvp.teacher_probs(teacher_logits, center, teacher_temp), student_temp)
    other_view = ~torch.eye(*table.shape[1:], dtype=torch.bool, device=table.device)
    return table[:, other_view].mean(1)


def teacher_temperature(epoch, cfg):
    """Linear warm-up from warmup_teacher_temp to teacher_temp, reached at the last of the
    warmup_teacher_temp_epochs epochs (as DINO's np.linspace schedule)."""
    return hvp.linear_warmup(epoch, cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.warmup_teacher_temp_epochs)


# ----------------------------------------------------------------------------------- hard-view selection

@torch.no_grad()
def select_hard_views(student, teacher, global_views, local_views, center, teacher_temp, cfg, accelerator,
                      patch=1, generator=None):
    """One no-grad pass (train mode, same autocast as training; DESIGN.md, D1): the teacher on the G candidate
    globals, the student on all G + L_loader views. Every DINO loss term goes into a cross-entropy
    table, and per sample the (even, odd, top-L locals) tuple with the highest summed loss wins (DESIGN.md, D4).

    Returns a dict: globals (B, 2) and locals (B, L) view indices (locals counted from 0 within the
    local views), score and plain_score (B,) = the per-sample DINO loss of the chosen tuple and of
    the plain tuple (0, 1, first L locals), and teacher_logits (B, 2, K) of the chosen globals
    (DESIGN.md, D3), or None when the selection ran at reduced resolution (DESIGN.md, D6)."""
    B, G = global_views.shape[:2]
    L = cfg.local_crops_number
    if cfg.hvp_select_res < 1:
        global_views = hvp.resize_views(global_views, hvp.selection_size(cfg.image_size, cfg.hvp_select_res, patch) / cfg.image_size)
        local_views = hvp.resize_views(local_views, hvp.selection_size(cfg.local_size, cfg.hvp_select_res, patch) / cfg.local_size)
    with accelerator.autocast():
        teacher_logits = teacher(global_views).float()                          # (B, G, K)
        student_logits = student(global_views, local_views)                     # (B, G + L_loader, K)
    cost = hvp.cross_entropy_table(student_logits, hvp.teacher_probs(teacher_logits, center, teacher_temp), cfg.student_temp)
    pair, locals_, score = hvp.select_multicrop(cost, L, limit=cfg.hvp_limit, generator=generator)
    first, second = torch.zeros(B, dtype=torch.long, device=cost.device), torch.ones(B, dtype=torch.long, device=cost.device)
    plain = hvp.tuple_score(cost, first, second, torch.arange(G, G + L, device=cost.device).expand(B, -1))
    terms = 2 * (L + 1)
    return {"globals": pair, "locals": locals_ - G, "score": score / terms, "plain_score": plain / terms,
            "teacher_logits": hvp.gather_views(teacher_logits, pair) if cfg.hvp_select_res == 1 else None}


# ----------------------------------------------------------------------------------- training step

def train_step(model, teacher, optimizer, center, micro_batches, schedule, cfg, accelerator, step, epoch,
               patch=1, log_now=False, select_threads=None):
    """One optimizer step of DINO + HVP over the step's micro-batches: views made on the device;
    the hardest (even, odd, top-L locals) tuple of each image (every --hvp_every steps from
    --hvp_start_epoch on; otherwise globals 0, 1 and the first L locals); the teacher's outputs of
    the chosen globals (reused from the selection, DESIGN.md, D3); an ordinary DINO forward and
    backward with per-parameter clipping and the frozen last layer; after the last micro-batch the
    optimizer step, the teacher EMA and the centre update. `schedule` is distillation_schedule's
    dict, applied here. Returns (record, views to show or None).
    select_threads: torch's CPU threads for the selection forward (Run.select_threads; None: as they are)."""
    unwrapped = accelerator.unwrap_model(model)
    device, L, L_loader = accelerator.device, cfg.local_crops_number, cfg.local_views
    hvp.apply_schedule(optimizer, schedule)
    interpolation = hvp.dino_augs(cfg)[0].interpolation
    teacher_temp = teacher_temperature(epoch, cfg)
    selecting = cfg.global_views > 2 or L_loader > L
    hard = selecting and epoch >= cfg.hvp_start_epoch and step % cfg.hvp_every == 0
    teacher_sum, teacher_count = torch.zeros_like(center), torch.zeros(1, device=device)
    select_s = train_s = 0.0
    for micro, batch in enumerate(micro_batches):
        batch = hvp.pixels_to_device(batch, device)
        global_views = hvp.views_from_batch(batch, "globals", cfg.image_size, interpolation)
        local_views = (hvp.views_from_batch(batch, "locals", cfg.local_size, interpolation) if L_loader
                       else global_views.new_zeros(len(global_views), 0, 3, cfg.local_size, cfg.local_size))
        t0 = hvp.clock(log_now, device)
        teacher_logits = None
        if hard:
            limit_rng = torch.Generator().manual_seed(hvp_run.mix_seed(cfg.seed, accelerator.process_index, step, micro, "limit"))
            with hvp.threads(select_threads):
                chosen = select_hard_views(unwrapped, teacher, global_views, local_views, center, teacher_temp, cfg,
                                           accelerator, patch, limit_rng)
            x_globals = hvp.gather_views(global_views, chosen["globals"])
            x_locals = hvp.gather_views(local_views, chosen["locals"])
            teacher_logits = chosen["teacher_logits"]
        else:
            x_globals, x_locals = global_views[:, :2], local_views[:, :L]
        t1 = hvp.clock(log_now, device)
        if teacher_logits is None:
            with torch.no_grad(), accelerator.autocast():
                teacher_logits = teacher(x_globals).float()
        with accelerator.accumulate(model):
            with accelerator.autocast():
                student_logits = model(x_globals, x_locals)
            loss = dino_loss(student_logits, teacher_logits, center, teacher_temp, cfg.student_temp).mean()
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                if cfg.clip_grad:
                    hvp.clip_each_gradient(unwrapped, cfg.clip_grad, accelerator, optimizer)
                if schedule["freeze_last_layer"]:  # DINO: the prototypes are kept fixed at first
                    for p in unwrapped.head.last_layer.parameters():
                        p.grad = None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        teacher_sum += teacher_logits.sum((0, 1))
        teacher_count += teacher_logits.shape[0] * teacher_logits.shape[1]
        t2 = hvp.clock(log_now, device)
        select_s, train_s = select_s + t1 - t0, train_s + t2 - t1
    hvp.ema_update(teacher, unwrapped, schedule["momentum"])
    hvp.update_center(center, teacher_sum, teacher_count, cfg.center_momentum, accelerator)
    record = {"loss": loss.detach(), "teacher_temp": teacher_temp, "select_s": select_s, "train_s": train_s}
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
    run = hvp_run.Run(cfg, "DINO", MODEL_FIELDS, notes)

    student = build_model(cfg, cfg.drop_path)
    if cfg.init_from and not run.resuming:  # before the teacher copies the student
        hvp_run.init_backbone(student.backbone, cfg.init_from)
    patch = student.backbone.patch_embed.patch_size[0] if hasattr(student.backbone, "patch_embed") else 1
    if cfg.image_size % patch or cfg.local_size % patch:
        raise hvp_run.HVPError(f"--image_size {cfg.image_size} and --local_size {cfg.local_size} must be multiples "
                           f"of the ViT patch size {patch}")
    teacher = build_model(cfg, 0.0)  # no drop-path; kept out of `prepare`: it has no gradients and no DDP
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    teacher.to(run.device)
    if run.world > 1 and run.device.type == "cuda":
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    optimizer = torch.optim.AdamW(hvp.adamw_param_groups(student), lr=0.0)
    model, optimizer = run.prepare(student, optimizer)
    unwrapped = run.accelerator.unwrap_model(model)
    center = torch.zeros(cfg.out_dim, device=run.device)

    init_lr = cfg.lr * run.global_batch / 256
    G, L_loader, L = cfg.global_views, cfg.local_views, cfg.local_crops_number
    # the teacher is the model DINO evaluates and exports
    run.start({"student": unwrapped, "teacher": teacher, "center": center, "optimizer": optimizer},
              hvp.multicrop_transform(cfg, run.crops), export=teacher.backbone, export_name="teacher backbone",
              banner=f"{'+ HVP ' if G > 2 or L_loader > L else ''}| {cfg.arch} {cfg.image_size}/{cfg.local_size}px | "
                     f"globals {G} -> 2, locals {L_loader} -> {L} | lr {init_lr:.4g}")
    model.train()
    teacher.train()  # as DINO: BatchNorm in the teacher normalises with batch statistics
    for step in run.steps():
        schedule = hvp.distillation_schedule(step.index, cfg, init_lr, run.steps_per_epoch, run.total_steps)
        record, shown = train_step(model, teacher, optimizer, center, step.micro_batches, schedule, cfg,
                                   run.accelerator, step.index, step.epoch, patch, step.log_now, run.select_threads)
        for name, (views, chosen) in (shown or {}).items() if step.grid_now else ():
            run.save_grid(step, name, views, chosen)
        run.log(step, record)
    run.finish()


if __name__ == "__main__":
    hvp_run.run_main(main)
