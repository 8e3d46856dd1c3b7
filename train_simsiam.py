"""SimSiam with Hard View Pretraining (HVP), in one file.

Every step draws --num_views augmented views per image, runs them all through the model once
without gradients, scores every pair with SimSiam's own per-sample loss, and trains a plain SimSiam
step on the hardest pair of each image. --num_views 2 is plain SimSiam (no selection pass).

    python train_simsiam.py                          # CPU: the shipped Fashion-MNIST subset, k-NN at the end
    accelerate launch train_simsiam.py --arch resnet50 --dataset <hub id | image folder | parquet>
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 train_simsiam.py \\
        --arch resnet50 --dataset ILSVRC/imagenet-1k --batch_size 64 --epochs 100
    accelerate launch --multi_gpu --num_machines 2 --machine_rank $RANK --main_process_ip $HOST \\
        --num_processes 16 train_simsiam.py --arch resnet50 --dataset ILSVRC/imagenet-1k
    python train_simsiam.py --resume                 # continue the run in --output_dir
    python train_simsiam.py --push_to_hub --hub_model_id <user>/hvp-simsiam   # then, anywhere:
        timm.create_model("hf-hub:<user>/hvp-simsiam", pretrained=True)

Defaults are the reference ImageNet recipe (ResNet-50, SGD lr 0.05 x batch/256, momentum 0.9,
wd 1e-4, cosine, fixed predictor lr, MoCo-v2 augmentations, 100 epochs, N = 4 views). On the
shipped dataset a CPU preset (see PRESETS) replaces the flags you do not give; the README lists
the k-NN accuracy it reaches and the time it takes on 2 CPU cores.
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
    output_dir: str = "outputs/simsiam"  # checkpoints, backbone export, metrics.jsonl, TensorBoard logs
    arch: str = "resnet50"  # any timm model name; aliases vit_tiny/vit_small/vit_base
    small_stem: bool = False  # 28-64 px inputs: 3x3 stride-1 ResNet stem / ViT patch 4-8
    image_size: int = 224  # training crop size
    epochs: int = 100  # length of the run (steps per epoch = examples // global batch)
    max_steps: int = 0  # if > 0, stop after this many optimizer steps (the schedule spans them)
    batch_size: int = 64  # images per process per micro-step; global batch = this x processes x grad_accum
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 0.05  # base learning rate, scaled by global batch / 256
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
    push_to_hub: bool = False  # push backbone + model card to the Hugging Face Hub (token: `hf auth login`/HF_TOKEN)
    hub_model_id: str = ""  # <user or org>/<name>; default <your user>/<--output_dir folder name>
    hub_private: bool = False  # create the Hub repo private
    hub_every: int = 0  # also push at the first checkpoint after every N steps (0 = only at the end)
    hub_push_state: bool = False  # also push the full training state to the repo's "training-state" branch


# The shipped Fashion-MNIST subset: 28 px grayscale, 10k images. This preset pretrains on 2 CPU
# cores in about 5 minutes; it replaces the ImageNet defaults above for flags you do not give.
# Chosen by a sweep (README, "Results"): the standard stem at 64 px beat the small stem at 28 px
# (4x slower) and 32 px; a narrow projector and a high lr learn most in two epochs.
PRESETS = {hvp.DEFAULT_DATASET: dict(
    arch="resnet18", small_stem=False, image_size=64, epochs=2, batch_size=128, lr=1.6,
    weight_decay=5e-4, proj_dim=512, pred_dim=128, num_workers=1, log_every=10, save_every=200,
    mixed_precision="bf16")}


def check_config(cfg):
    if cfg.num_views < 2:
        raise hvp.HVPError(f"--num_views must be at least 2 (2 = plain SimSiam), got {cfg.num_views}")
    if not 0 < cfg.hvp_select_res <= 1:
        raise hvp.HVPError(f"--hvp_select_res must be in (0, 1], got {cfg.hvp_select_res}")
    if cfg.proj_layers not in (2, 3):
        raise hvp.HVPError(f"--proj_layers must be 2 or 3, got {cfg.proj_layers}")
    if cfg.hvp_every < 1 or cfg.batch_size < 2 or cfg.grad_accum < 1:
        raise hvp.HVPError("--hvp_every and --grad_accum must be >= 1 and --batch_size >= 2 (BatchNorm)")
    if cfg.mixed_precision not in ("", "no", "fp16", "bf16"):
        raise hvp.HVPError(f"--mixed_precision must be no, fp16 or bf16, got {cfg.mixed_precision!r}")


# ----------------------------------------------------------------------------------- data

def simsiam_aug(cfg):
    """MoCo-v2 / SimSiam augmentations (blur kernel 9 and sigma 0.1-2 at 224 px, scaled with size)."""
    return hvp.ViewAug(size=cfg.image_size, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8,
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


# ----------------------------------------------------------------------------------- train loop

def main():
    cfg, preset_keys = hvp.parse_config(Config, presets=PRESETS, description=__doc__.splitlines()[0])
    check_config(cfg)
    output_dir = Path(cfg.output_dir)
    accelerator = hvp.make_accelerator(cfg.mixed_precision, cfg.grad_accum, cfg.report_to, output_dir)
    pusher = hvp.HubPusher.from_config(cfg, accelerator, "SimSiam")
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
    transform = hvp.MultiViewTransform({"views": [simsiam_aug(cfg)] * cfg.num_views})
    stream = hvp.ViewStream(ds, transform, cfg.image_column, cfg.label_column if has_labels else None,
                            cfg.seed, rank, cfg.batch_size)
    loader = hvp.make_loader(stream, cfg.batch_size, cfg.num_workers, num_shards, pin_memory=device.type == "cuda")

    backbone = hvp.create_backbone(cfg.arch, cfg.image_size, cfg.small_stem)
    if cfg.init_from and checkpoint is None:
        hvp.init_backbone(backbone, cfg.init_from)
        if is_main:
            print(f"backbone initialised from {cfg.init_from}", flush=True)
    model = SimSiam(backbone, cfg.proj_dim, cfg.pred_dim, cfg.proj_layers)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if world > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    init_lr = cfg.lr * global_batch / 256
    optimizer = torch.optim.SGD(
        [{"params": [*model.backbone.parameters(), *model.projector.parameters()], "fix_lr": False},
         {"params": model.predictor.parameters(), "fix_lr": cfg.fix_pred_lr}],
        lr=init_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    step = 0
    if checkpoint is not None:
        state = hvp.load_checkpoint(checkpoint)
        unwrapped.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
        step = state["step"]
    output_dir.mkdir(parents=True, exist_ok=True)
    hvp.cleanup_partial_checkpoints(output_dir)
    if is_main:
        hvp.write_run_info(output_dir, cfg)
    accelerator.init_trackers("hvp_simsiam", config={k: v for k, v in vars(cfg).items() if not isinstance(v, tuple)})
    if is_main:
        print(f"SimSiam {'+ HVP ' if cfg.num_views > 2 else ''}| {cfg.arch} {cfg.image_size}px | "
              f"{world} process(es) on {device.type} | global batch {global_batch} | {steps_per_epoch} steps/epoch | "
              f"{total_steps} steps | lr {init_lr:.4g} | precision {accelerator.mixed_precision}"
              + (f" | resumed at step {step}" if step else "")
              + (f"\npreset for the shipped dataset: {', '.join(f'{k}={getattr(cfg, k)}' for k in preset_keys)}"
                 if preset_keys else ""), flush=True)
        if world > 1 and device.type != "cuda":
            print("note: SyncBatchNorm needs GPUs; on CPU each process normalises its own batch", flush=True)

    data_config = {"input_size": (3, cfg.image_size, cfg.image_size), "interpolation": "bicubic",
                   "crop_pct": 0.875, "mean": hvp.IMAGENET_MEAN, "std": hvp.IMAGENET_STD}

    def save():
        accelerator.wait_for_everyone()
        if is_main:
            state = {"model": unwrapped.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                     "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                     "config": vars(cfg)}
            path = hvp.save_checkpoint(output_dir, step, state, unwrapped.backbone, data_config,
                                       "hvp_simsiam", cfg.keep_checkpoints)
            hvp.export_backbone(unwrapped.backbone, output_dir / "backbone", data_config, "hvp_simsiam")
            if pusher.due(step) and step < total_steps:
                pusher.push(output_dir / "backbone", step, state_dir=path)
        accelerator.wait_for_everyone()
        return output_dir / f"checkpoint-{step:08d}"

    def knn():
        if not has_labels:
            return None
        unwrapped.eval()
        result = hvp.knn_eval(unwrapped.backbone, accelerator, cfg.dataset, cfg.split, cfg.eval_split,
                              cfg.image_column, cfg.label_column, cfg.image_size, batch_size=2 * cfg.batch_size,
                              num_workers=cfg.num_workers, k=cfg.knn_k)
        unwrapped.train()
        return result

    stop = hvp.StopRequest()
    log = hvp.MetricsLog(accelerator, output_dir)
    bar = tqdm(total=total_steps, initial=step, disable=not is_main, desc="SimSiam", dynamic_ncols=True)
    model.train()
    interval_start, interval_steps, skipped = time.perf_counter(), 0, 0
    stopped = False
    batches = hvp.training_batches(loader, steps_per_epoch, step, cfg.grad_accum)
    while step < total_steps and not stopped:
        lr = hvp.cosine(step, total_steps, init_lr)
        for group in optimizer.param_groups:
            group["lr"] = init_lr if group["fix_lr"] else lr
        timed = (step + 1) % cfg.log_every == 0
        select_s = train_s = 0.0
        for micro in range(cfg.grad_accum):
            epoch, batch = next(batches)
            skipped += int(batch["skipped"].sum())
            torch.manual_seed(hvp.mix_seed(cfg.seed, rank, step, micro))  # drop-path etc. replay on resume
            views = hvp.photometric(batch["views"].to(device, non_blocking=True), batch["views_params"])
            hard = cfg.num_views > 2 and epoch >= cfg.hvp_start_epoch and step % cfg.hvp_every == 0
            t0 = hvp.clock(timed, device)
            if hard:
                pair, hard_score, scores = select_hard_pair(unwrapped, views, cfg, accelerator)
                x1, x2 = hvp.gather_views(views, pair[:, 0]), hvp.gather_views(views, pair[:, 1])
            else:
                x1, x2 = views[:, 0], views[:, 1]
            x1, x2 = x1.contiguous(memory_format=memory_format), x2.contiguous(memory_format=memory_format)
            t1 = hvp.clock(timed, device)
            with accelerator.accumulate(model):
                loss = simsiam_loss(*model(x1, x2))
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            t2 = hvp.clock(timed, device)
            select_s, train_s = select_s + t1 - t0, train_s + t2 - t1
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
                      "images_per_s": interval_steps * global_batch / elapsed,
                      "select_s": select_s, "train_s": train_s, "skipped_images": skipped}
            if hard:
                record.update(hvp.selection_stats(batch["views_params"], pair, hard_score, scores[:, 0]))
                if is_main and (step - 1) % steps_per_epoch < cfg.log_every:  # first record of an epoch
                    (output_dir / "grids").mkdir(exist_ok=True)
                    hvp.save_view_grid(output_dir / "grids" / f"step-{step:08d}.png", views, pair)
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
        print(f"backbone exported to {output_dir / 'backbone'} (timm: create_model('local-dir:{output_dir / 'backbone'}'"
              ", pretrained=True))", flush=True)
    pusher.push(output_dir / "backbone", step, results=result, state_dir=path)
    pusher.close()
    log.close()
    accelerator.end_training()


if __name__ == "__main__":
    hvp.run_main(main)
