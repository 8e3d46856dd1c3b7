"""DINO with multi-crop Hard View Pretraining (HVP), in one file.

Every step draws --global_views G candidate global crops (even ones with DINO's global transform 1,
odd ones with transform 2) and --local_views L_loader candidate local crops per image, runs the
teacher on all globals and the student on all views once without gradients, and keeps per image the
(even global, odd global, --local_crops_number L locals) tuple with the highest DINO loss: the best
global pair over the (G/2)^2 (even, odd) pairs, each with its exact top-L locals (decision D4). Then
it trains one ordinary DINO step on that tuple, reusing the teacher outputs of the selection pass
(D3). --global_views 2 --local_views L is plain DINO (no selection pass).

    python train_dino.py --arch vit_small            # CPU: the shipped Fashion-MNIST subset, k-NN at the end
    accelerate launch train_dino.py --arch vit_small --dataset <hub id | image folder | parquet>
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 train_dino.py \\
        --arch vit_small --dataset ILSVRC/imagenet-1k --batch_size 64 --epochs 100
    accelerate launch --multi_gpu --num_machines 2 --machine_rank $RANK --main_process_ip $HOST \\
        --num_processes 16 train_dino.py --arch vit_base --dataset ILSVRC/imagenet-1k
    python train_dino.py --resume                    # continue the run in --output_dir

Defaults are the reference ImageNet recipe (ViT-S/16, drop-path 0.1, head 2048-2048-256-65536 with a
weight-normalised last layer, AdamW lr 5e-4 x batch/256 with 10 warm-up epochs and cosine to 1e-6,
weight decay 0.04 -> 0.4, clip 3.0, last layer frozen for the first epoch, teacher EMA 0.996 -> 1,
teacher temperature 0.04, student 0.1, centre momentum 0.9, 2 x 224 px globals at scale 0.4-1 and
96 px locals at scale 0.05-0.4, 100 epochs) with G = 4 candidate globals and 16 candidate locals of
which 8 are trained. On the shipped dataset a CPU preset (see PRESETS) replaces the flags you do
not give; it pretrains a ViT-S on 2 CPU cores in under 10 minutes (see the README for its k-NN
accuracy).

Teacher outputs: the teacher has no gradients, no dropout and no drop-path, and its weights do not
change between the selection pass and the training step, so its outputs for the selected globals
are taken from the selection pass (D3). Only a selection at reduced resolution (--hvp_select_res
< 1, D6) re-runs the teacher on the selected globals: the step trains on full-resolution views and
needs full-resolution teacher outputs. A teacher with BatchNorm (ResNets; train mode, as in DINO)
normalises the reused outputs with the statistics of all G candidate globals, not of the 2 selected.
"""
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

import hvp_utils as hvp


# ----------------------------------------------------------------------------------- config

@dataclass
class Config:
    dataset: str = hvp.DEFAULT_DATASET  # Hub dataset id, local image folder, or parquet file/folder
    split: str = "train"  # split to pretrain on
    eval_split: str = "test"  # labelled split used as k-NN queries (the train split is the memory bank)
    image_column: str = "image"  # dataset column holding images
    label_column: str = "label"  # dataset column holding labels (k-NN only)
    output_dir: str = "outputs/dino"  # checkpoints, backbone export, metrics.jsonl, TensorBoard logs
    arch: str = "vit_small"  # any timm model name; aliases vit_tiny/vit_small/vit_base (patch 16)
    small_stem: bool = False  # 28-64 px inputs: 3x3 stride-1 ResNet stem / ViT patch 4-8
    patch_size: int = 0  # ViT patch size (0: the model's own, or 4/8 with --small_stem); CNNs have none
    image_size: int = 224  # global crop size (also the k-NN evaluation size)
    local_size: int = 96  # local crop size
    global_scale: tuple = (0.4, 1.0)  # random-resized-crop area range of global crops
    local_scale: tuple = (0.05, 0.4)  # random-resized-crop area range of local crops
    epochs: int = 100  # length of the run (steps per epoch = examples // global batch)
    max_steps: int = 0  # if > 0, stop after this many optimizer steps (the schedules span them)
    batch_size: int = 64  # images per process per micro-step; global batch = this x processes x grad_accum
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 5e-4  # peak AdamW learning rate, scaled by global batch / 256
    min_lr: float = 1e-6  # learning rate at the end of the cosine
    warmup_epochs: float = 10.0  # linear learning-rate warm-up from 0
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
    mixed_precision: str = ""  # no | fp16 | bf16; empty = whatever `accelerate launch` was given
    channels_last: bool = True  # NHWC memory format (faster convolutions on GPUs with AMP and on CPUs)
    num_workers: int = 4  # data loader workers per process
    shuffle_buffer: int = 5000  # streaming shuffle buffer (examples per worker)
    seed: int = 0  # seeds every random source; a CPU run is reproducible
    log_every: int = 20  # steps between metrics.jsonl records
    save_every: int = 1000  # steps between checkpoints (plus one at the end and on SIGTERM)
    keep_checkpoints: int = 2  # checkpoints kept in output_dir
    resume: bool = False  # continue from the latest checkpoint in output_dir
    knn_every: int = 0  # epochs between k-NN evaluations during training (0 = only at the end)
    knn_k: int = 20  # neighbours for k-NN
    report_to: str = "tensorboard"  # Accelerate tracker(s), comma-separated, or "none"
    init_from: str = ""  # start the backbone from these weights: export/output folder or hf-hub:<user>/<repo>
    push_to_hub: bool = False  # push the teacher backbone + model card to the Hugging Face Hub (token: `hf auth login`/HF_TOKEN)
    hub_model_id: str = ""  # <user or org>/<name>; default <your user>/<--output_dir folder name>
    hub_private: bool = False  # create the Hub repo private
    hub_every: int = 0  # also push at the first checkpoint after every N steps (0 = only at the end)
    hub_push_state: bool = False  # also push the full training state to the repo's "training-state" branch


# The shipped Fashion-MNIST subset: 28 px grayscale, 10k images. This preset pretrains a ViT-S for
# one epoch on 2 CPU cores in under 10 minutes: 32 px globals and 16 px locals with 8 px patches
# (17 and 5 tokens), a 4096-prototype head, a faster teacher, 2 of 4 candidate locals. It replaces
# the ImageNet defaults above for the flags you do not give.
PRESETS = {hvp.DEFAULT_DATASET: dict(
    small_stem=True, patch_size=8, image_size=32, local_size=16, epochs=1, batch_size=64, lr=1e-3,
    warmup_epochs=0.1, freeze_last_layer=0.0, drop_path=0.0, out_dim=4096, momentum_teacher=0.97,
    local_views=4, local_crops_number=2, num_workers=2, log_every=10, save_every=200, mixed_precision="bf16")}


def check_config(cfg):
    if cfg.global_views < 2 or cfg.global_views % 2:
        raise hvp.HVPError(f"--global_views must be an even number >= 2 (2 = no global selection), got {cfg.global_views}")
    if not 0 <= cfg.local_crops_number <= cfg.local_views:
        raise hvp.HVPError(f"--local_crops_number must be in [0, --local_views = {cfg.local_views}], "
                           f"got {cfg.local_crops_number}")
    if not 0 < cfg.hvp_select_res <= 1:
        raise hvp.HVPError(f"--hvp_select_res must be in (0, 1], got {cfg.hvp_select_res}")
    if cfg.hvp_every < 1 or cfg.hvp_limit < 0 or cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise hvp.HVPError("--hvp_every, --batch_size and --grad_accum must be >= 1 and --hvp_limit >= 0")
    if cfg.mixed_precision not in ("", "no", "fp16", "bf16"):
        raise hvp.HVPError(f"--mixed_precision must be no, fp16 or bf16, got {cfg.mixed_precision!r}")
    if min(cfg.teacher_temp, cfg.warmup_teacher_temp, cfg.student_temp) <= 0:
        raise hvp.HVPError("temperatures must be > 0")


# ----------------------------------------------------------------------------------- model

def create_backbone(cfg, drop_path_rate):
    """hvp.create_backbone, with --patch_size passed to ViTs only (convolutional networks have no patches)."""
    import timm
    name = hvp.ARCH_ALIASES.get(cfg.arch, cfg.arch)
    is_vit = timm.is_model(name) and timm.models.is_model_in_modules(name, ["vision_transformer", "deit", "eva", "beit"])
    extra = {"patch_size": cfg.patch_size} if cfg.patch_size and is_vit else {}
    return hvp.create_backbone(cfg.arch, cfg.image_size, cfg.small_stem, drop_path_rate, **extra)


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
    """Linear warm-up from warmup_teacher_temp to teacher_temp over warmup_teacher_temp_epochs."""
    if epoch >= cfg.warmup_teacher_temp_epochs:
        return cfg.teacher_temp
    return cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * epoch / cfg.warmup_teacher_temp_epochs


# ----------------------------------------------------------------------------------- hard-view selection

@torch.no_grad()
def select_hard_views(student, teacher, global_views, local_views, center, teacher_temp, cfg, accelerator,
                      patch=1, generator=None):
    """One no-grad pass (train mode, same autocast as training; D1): the teacher on the G candidate
    globals, the student on all G + L_loader views. Every DINO loss term goes into a cross-entropy
    table, and per sample the (even, odd, top-L locals) tuple with the highest summed loss wins (D4).

    Returns a dict: globals (B, 2) and locals (B, L) view indices (locals counted from 0 within the
    local views), score and plain_score (B,) = the per-sample DINO loss of the chosen tuple and of
    the plain tuple (0, 1, first L locals), and teacher_logits (B, 2, K) of the chosen globals
    (D3), or None when the selection ran at reduced resolution (D6)."""
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


# ----------------------------------------------------------------------------------- train loop

def main():
    cfg, preset_keys = hvp.parse_config(Config, presets=PRESETS, description=__doc__.splitlines()[0])
    check_config(cfg)
    output_dir = Path(cfg.output_dir)
    accelerator = hvp.make_accelerator(cfg.mixed_precision, cfg.grad_accum, cfg.report_to, output_dir)
    pusher = hvp.HubPusher.from_config(cfg, accelerator, "DINO")
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    is_main = accelerator.is_main_process
    checkpoint = hvp.latest_checkpoint(output_dir)
    if checkpoint is not None and not cfg.resume:
        raise hvp.HVPError(f"{output_dir} already holds a run ({checkpoint.name}): pass --resume to continue "
                           "it, or choose another --output_dir")
    hvp.seed_all(cfg.seed + rank)

    # Data first, so a wrong dataset fails in a second with one line, before any model is built.
    ds, has_labels = hvp.open_dataset(cfg.dataset, cfg.split, cfg.image_column, cfg.label_column)
    global_batch = cfg.batch_size * world * cfg.grad_accum
    steps_per_epoch = hvp.num_examples(ds, cfg.split) // global_batch
    if steps_per_epoch == 0:
        raise hvp.HVPError(f"split {cfg.split!r} has fewer images than one global batch ({global_batch})")
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    ds = hvp.shard_for_rank(ds, rank, world, cfg.num_workers)
    num_shards = ds.num_shards
    ds = ds.shuffle(seed=cfg.seed, buffer_size=cfg.shuffle_buffer)
    stream = hvp.ViewStream(ds, hvp.multicrop_transform(cfg), cfg.image_column, cfg.label_column if has_labels else None,
                            cfg.seed, rank, cfg.batch_size)
    loader = hvp.make_loader(stream, cfg.batch_size, cfg.num_workers, num_shards, pin_memory=device.type == "cuda")

    student = build_model(cfg, cfg.drop_path)
    if cfg.init_from and checkpoint is None:  # before the teacher copies the student
        hvp.init_backbone(student.backbone, cfg.init_from)
        if is_main:
            print(f"backbone initialised from {cfg.init_from}", flush=True)
    patch = student.backbone.patch_embed.patch_size[0] if hasattr(student.backbone, "patch_embed") else 1
    if cfg.image_size % patch or cfg.local_size % patch:
        raise hvp.HVPError(f"--image_size {cfg.image_size} and --local_size {cfg.local_size} must be multiples "
                           f"of the ViT patch size {patch}")
    teacher = build_model(cfg, 0.0)  # no drop-path; kept out of `prepare`: it has no gradients and no DDP
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    teacher.to(device)
    if world > 1 and device.type == "cuda":
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    # no weight decay on biases and normalisation parameters; the schedule drives the first group only
    decay, no_decay = [], []
    for name, p in student.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "decay": True}, {"params": no_decay, "decay": False,
                                                                       "weight_decay": 0.0}], lr=0.0)
    model, optimizer = accelerator.prepare(student, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    center = torch.zeros(cfg.out_dim, device=device)

    init_lr = cfg.lr * global_batch / 256
    warmup_steps = min(round(cfg.warmup_epochs * steps_per_epoch), total_steps)
    freeze_steps = round(cfg.freeze_last_layer * steps_per_epoch)
    step = 0
    if checkpoint is not None:
        state = hvp.load_checkpoint(checkpoint)
        unwrapped.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        center.copy_(state["center"])
        optimizer.load_state_dict(state["optimizer"])
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
        step = state["step"]
    output_dir.mkdir(parents=True, exist_ok=True)
    hvp.cleanup_partial_checkpoints(output_dir)
    if is_main:
        hvp.write_run_info(output_dir, cfg)
    accelerator.init_trackers("hvp_dino", config={k: v for k, v in vars(cfg).items() if not isinstance(v, tuple)})
    G, L_loader, L = cfg.global_views, cfg.local_views, cfg.local_crops_number
    selecting = G > 2 or L_loader > L
    if is_main:
        print(f"DINO {'+ HVP ' if selecting else ''}| {cfg.arch} {cfg.image_size}/{cfg.local_size}px | "
              f"globals {G} -> 2, locals {L_loader} -> {L} | {world} process(es) on {device.type} | "
              f"global batch {global_batch} | {steps_per_epoch} steps/epoch | {total_steps} steps | lr {init_lr:.4g} | "
              f"precision {accelerator.mixed_precision}" + (f" | resumed at step {step}" if step else "")
              + (f"\npreset for the shipped dataset: {', '.join(f'{k}={getattr(cfg, k)}' for k in preset_keys)}"
                 if preset_keys else ""), flush=True)

    data_config = {"input_size": (3, cfg.image_size, cfg.image_size), "interpolation": "bicubic",
                   "crop_pct": 0.875, "mean": hvp.IMAGENET_MEAN, "std": hvp.IMAGENET_STD}

    def save():
        accelerator.wait_for_everyone()
        if is_main:
            state = {"student": unwrapped.state_dict(), "teacher": teacher.state_dict(), "center": center,
                     "optimizer": optimizer.state_dict(), "step": step, "config": vars(cfg),
                     "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None}
            # the teacher is the model DINO evaluates and exports
            path = hvp.save_checkpoint(output_dir, step, state, teacher.backbone, data_config, "hvp_dino",
                                       cfg.keep_checkpoints)
            hvp.export_backbone(teacher.backbone, output_dir / "backbone", data_config, "hvp_dino")
            if pusher.due(step) and step < total_steps:
                pusher.push(output_dir / "backbone", step, state_dir=path)
        accelerator.wait_for_everyone()
        return output_dir / f"checkpoint-{step:08d}"

    def knn():
        if not has_labels:
            return None
        teacher.eval()
        result = hvp.knn_eval(teacher.backbone, accelerator, cfg.dataset, cfg.split, cfg.eval_split,
                              cfg.image_column, cfg.label_column, cfg.image_size, batch_size=2 * cfg.batch_size,
                              num_workers=cfg.num_workers, k=cfg.knn_k)
        teacher.train()
        return result

    stop = hvp.StopRequest()
    log = hvp.MetricsLog(accelerator, output_dir)
    bar = tqdm(total=total_steps, initial=step, disable=not is_main, desc="DINO", dynamic_ncols=True)
    model.train()
    teacher.train()  # as DINO: BatchNorm in the teacher normalises with batch statistics
    interval_start, interval_steps, skipped = time.perf_counter(), 0, 0
    stopped = False
    batches = hvp.training_batches(loader, steps_per_epoch, step, cfg.grad_accum)
    while step < total_steps and not stopped:
        lr = hvp.cosine(step, total_steps, init_lr, cfg.min_lr, warmup_steps)
        weight_decay = hvp.cosine(step, total_steps, cfg.weight_decay, cfg.weight_decay_end)
        momentum = hvp.cosine(step, total_steps, cfg.momentum_teacher, 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr
            if group["decay"]:
                group["weight_decay"] = weight_decay
        timed = (step + 1) % cfg.log_every == 0
        select_s = train_s = 0.0
        teacher_sum, teacher_count = torch.zeros_like(center), torch.zeros(1, device=device)
        for micro in range(cfg.grad_accum):
            epoch, batch = next(batches)
            skipped += int(batch["skipped"].sum())
            torch.manual_seed(hvp.mix_seed(cfg.seed, rank, step, micro))  # drop-path etc. replay on resume
            global_views = hvp.photometric(batch["globals"].to(device, non_blocking=True), batch["globals_params"])
            local_views = (hvp.photometric(batch["locals"].to(device, non_blocking=True), batch["locals_params"])
                           if L_loader else global_views.new_zeros(len(global_views), 0, 3, cfg.local_size, cfg.local_size))
            teacher_temp = teacher_temperature(epoch, cfg)
            hard = selecting and epoch >= cfg.hvp_start_epoch and step % cfg.hvp_every == 0
            t0 = hvp.clock(timed, device)
            teacher_logits = None
            if hard:
                limit_rng = torch.Generator().manual_seed(hvp.mix_seed(cfg.seed, rank, step, micro, "limit"))
                chosen = select_hard_views(unwrapped, teacher, global_views, local_views, center, teacher_temp, cfg,
                                           accelerator, patch, limit_rng)
                x_globals = hvp.gather_views(global_views, chosen["globals"])
                x_locals = hvp.gather_views(local_views, chosen["locals"])
                teacher_logits = chosen["teacher_logits"]
            else:
                x_globals, x_locals = global_views[:, :2], local_views[:, :L]
            t1 = hvp.clock(timed, device)
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
                    if step < freeze_steps:  # DINO: the prototypes are kept fixed at first
                        for p in unwrapped.head.last_layer.parameters():
                            p.grad = None
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            teacher_sum += teacher_logits.sum((0, 1))
            teacher_count += teacher_logits.shape[0] * teacher_logits.shape[1]
            t2 = hvp.clock(timed, device)
            select_s, train_s = select_s + t1 - t0, train_s + t2 - t1
        hvp.ema_update(teacher, unwrapped, momentum)
        hvp.update_center(center, teacher_sum, teacher_count, cfg.center_momentum, accelerator)
        step += 1
        interval_steps += 1
        bar.update(1)

        if step % cfg.log_every == 0 or step == total_steps:
            loss_value = accelerator.reduce(loss.detach().float(), reduction="mean").item()
            if not torch.isfinite(torch.tensor(loss_value)):
                raise hvp.HVPError(f"loss became {loss_value} at step {step}: training diverged; the last "
                                   f"checkpoint in {output_dir} is intact (try a lower --lr)")
            elapsed = time.perf_counter() - interval_start
            record = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": loss_value, "lr": lr,
                      "weight_decay": weight_decay, "momentum": momentum, "teacher_temp": teacher_temp,
                      "images_per_s": interval_steps * global_batch / elapsed,
                      "select_s": select_s, "train_s": train_s, "skipped_images": skipped}
            if hard:
                record.update(hvp.selection_stats(batch["globals_params"], chosen["globals"], chosen["score"],
                                                  chosen["plain_score"]))
                if L:
                    hard_locals = hvp.gather_views(batch["locals_params"], chosen["locals"].cpu())
                    record["hard_local_area"] = float(hvp.crop_area(hard_locals).mean())
                    record["random_local_area"] = float(hvp.crop_area(batch["locals_params"][:, :L]).mean())
                if is_main and (step - 1) % steps_per_epoch < cfg.log_every:  # first record of an epoch
                    (output_dir / "grids").mkdir(exist_ok=True)
                    hvp.save_view_grid(output_dir / "grids" / f"step-{step:08d}-globals.png", global_views, chosen["globals"])
                    if L:
                        hvp.save_view_grid(output_dir / "grids" / f"step-{step:08d}-locals.png", local_views, chosen["locals"])
            log.log(record)
            bar.set_postfix(loss=f"{loss_value:.3f}", img_s=f"{record['images_per_s']:.0f}")
            interval_start, interval_steps = time.perf_counter(), 0
        if step % cfg.save_every == 0 and step < total_steps:
            save()
        if cfg.knn_every and step % (cfg.knn_every * steps_per_epoch) == 0 and step < total_steps:
            result = knn()
            if result:
                log.log({"step": step, "epoch": step / steps_per_epoch, **result})
        stopped = stop.agreed(accelerator)
    del batches
    bar.close()

    path = save()
    if stopped:
        if is_main:
            print(f"SIGTERM: saved {path}; continue with the same command plus --resume", flush=True)
        pusher.close()
        log.close()
        accelerator.end_training()
        return
    result = knn()
    if result is not None and is_main:
        log.log({"step": step, "epoch": step / steps_per_epoch, **result})
        (output_dir / "knn.json").write_text(json.dumps(result, indent=2))
        print(f"k-NN (k={cfg.knn_k}, T=0.07) on {Path(cfg.dataset).name or cfg.dataset} "
              f"[{cfg.eval_split}]: top-1 {result['knn_top1']:.2f} %, top-5 {result['knn_top5']:.2f} %", flush=True)
    if is_main:
        print(f"teacher backbone exported to {output_dir / 'backbone'} (timm: create_model('local-dir:"
              f"{output_dir / 'backbone'}', pretrained=True))", flush=True)
    pusher.push(output_dir / "backbone", step, results=result, state_dir=path)
    pusher.close()
    log.close()
    accelerator.end_training()


if __name__ == "__main__":
    hvp.run_main(main)
