"""SimCLR with Hard View Pretraining (HVP), in one file.

Every step draws --num_views augmented views per image, runs them all through the model once
without gradients, scores every pair with SimCLR's own per-sample NT-Xent loss (negatives from all
processes), and trains a plain SimCLR step on the hardest pair of each image. --num_views 2 is
plain SimCLR (no selection pass).

    python train_simclr.py                           # CPU: the shipped Fashion-MNIST subset, k-NN at the end
    accelerate launch train_simclr.py --arch resnet50 --dataset <hub id | image folder | parquet>
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 train_simclr.py \\
        --arch resnet50 --dataset ILSVRC/imagenet-1k --batch_size 512 --epochs 100
    accelerate launch --multi_gpu --num_machines 2 --machine_rank $RANK --main_process_ip $HOST \\
        --num_processes 16 train_simclr.py --arch resnet50 --dataset ILSVRC/imagenet-1k --batch_size 256
    python train_simclr.py --resume                  # continue the run in --output_dir

Defaults are the reference ImageNet recipe (ResNet-50, projector 2048-2048-128 with BatchNorm,
NT-Xent at temperature 0.1 with the negatives of all processes, LARS lr 0.3 x batch/256, momentum
0.9, wd 1e-4, 10 warm-up epochs then a per-step cosine to 1e-6, SimCLR augmentations, 100 epochs,
N = 4 views). On the shipped dataset a CPU preset (see PRESETS) replaces the flags you do not
give; the README lists the k-NN accuracy it reaches and the time it takes on 2 CPU cores.
"""
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
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
    output_dir: str = "outputs/simclr"  # checkpoints, backbone export, metrics.jsonl, TensorBoard logs
    arch: str = "resnet50"  # any timm model name; aliases vit_tiny/vit_small/vit_base
    small_stem: bool = False  # 28-64 px inputs: 3x3 stride-1 ResNet stem / ViT patch 4-8
    image_size: int = 224  # training crop size
    epochs: int = 100  # length of the run (steps per epoch = examples // global batch)
    warmup_epochs: float = 10.0  # linear lr warm-up from 0 (the same fraction of the run when --max_steps is set)
    max_steps: int = 0  # if > 0, stop after this many optimizer steps (the schedule spans them)
    batch_size: int = 64  # images per process per micro-step; global batch = this x processes x grad_accum
    grad_accum: int = 1  # micro-steps per optimizer step (NT-Xent negatives come from one micro-step of every process)
    lr: float = 0.3  # base learning rate, scaled by global batch / 256 (4.8 at batch 4096)
    min_lr: float = 1e-6  # learning rate at the end of the cosine
    weight_decay: float = 1e-4  # LARS weight decay (not applied to biases and BatchNorm)
    momentum: float = 0.9  # LARS momentum
    lars_eta: float = 0.001  # LARS trust coefficient (biases and BatchNorm are not adapted)
    proj_hidden_dim: int = 2048  # projector hidden width
    proj_dim: int = 128  # projector output: the embedding NT-Xent compares
    temperature: float = 0.1  # NT-Xent temperature
    num_views: int = 4  # candidate views per image; 2 = plain SimCLR, 4 = the paper's HVP setting
    hvp_every: int = 1  # select hard views every k-th step (plain pair (0, 1) otherwise)
    hvp_start_epoch: int = 0  # plain SimCLR before this epoch
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
    push_to_hub: bool = False  # push the backbone + model card to the Hugging Face Hub (token: `hf auth login`/HF_TOKEN)
    hub_model_id: str = ""  # <user or org>/<name>; default <your user>/<--output_dir folder name>
    hub_private: bool = False  # create the Hub repo private
    hub_every: int = 0  # also push at the first checkpoint after every N steps (0 = only at the end)
    hub_push_state: bool = False  # also push the full training state to the repo's "training-state" branch


# The shipped Fashion-MNIST subset: 28 px grayscale, 10k images, upscaled to 32 px for the standard
# ResNet stem (the small stem at 28 px is ~8x slower). lr 1.2 at batch 256 is SimCLR's square-root
# scaling for small batches (0.075 x sqrt(256)). Measured on a shared 2-core CPU: ~230 img/s in its
# unloaded stretches (so ~6-7 minutes including k-NN on idle cores), 77.55 % k-NN top-1 (raw pixels:
# 81.15 %). It replaces the ImageNet defaults above for flags you do not give.
PRESETS = {hvp.DEFAULT_DATASET: dict(
    arch="resnet18", small_stem=False, image_size=32, epochs=8, warmup_epochs=1.0, batch_size=256, lr=1.2,
    num_workers=1, log_every=10, save_every=200, mixed_precision="bf16")}


def check_config(cfg):
    if cfg.num_views < 2:
        raise hvp.HVPError(f"--num_views must be at least 2 (2 = plain SimCLR), got {cfg.num_views}")
    if not 0 < cfg.hvp_select_res <= 1:
        raise hvp.HVPError(f"--hvp_select_res must be in (0, 1], got {cfg.hvp_select_res}")
    if cfg.temperature <= 0:
        raise hvp.HVPError(f"--temperature must be positive, got {cfg.temperature}")
    if cfg.epochs < 1 or not 0 <= cfg.warmup_epochs <= cfg.epochs:
        raise hvp.HVPError(f"--epochs must be >= 1 and --warmup_epochs in [0, --epochs], got {cfg.epochs} "
                           f"and {cfg.warmup_epochs}")
    if cfg.hvp_every < 1 or cfg.batch_size < 2 or cfg.grad_accum < 1:
        raise hvp.HVPError("--hvp_every and --grad_accum must be >= 1 and --batch_size >= 2 (BatchNorm)")
    if cfg.mixed_precision not in ("", "no", "fp16", "bf16"):
        raise hvp.HVPError(f"--mixed_precision must be no, fp16 or bf16, got {cfg.mixed_precision!r}")


# ----------------------------------------------------------------------------------- data

def simclr_aug(cfg):
    """SimCLR augmentations: crop scale 0.08-1, colour jitter of strength 0.8 (0.8, 0.8, 0.8, 0.2)
    with p 0.8, grayscale 0.2, blur p 0.5 (kernel 23 and sigma 0.1-2 at 224 px, scaled with size)."""
    return hvp.ViewAug(size=cfg.image_size, scale=(0.08, 1.0), jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8,
                       gray_p=0.2, blur_p=0.5, blur_sigma=(0.1, 2.0), blur_kernel=23, flip_p=0.5,
                       interpolation="bilinear")


# ----------------------------------------------------------------------------------- model

class SimCLR(nn.Module):
    """Backbone -> projector Linear-BN-ReLU-Linear-BN (ResNet-50: 2048 -> 2048 -> 128)."""

    def __init__(self, backbone, hidden_dim, proj_dim):
        super().__init__()
        self.backbone = backbone
        self.projector = nn.Sequential(
            nn.Linear(backbone.num_features, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True), nn.Linear(hidden_dim, proj_dim, bias=False), nn.BatchNorm1d(proj_dim))

    def forward(self, x):
        return self.projector(self.backbone(x))


# ----------------------------------------------------------------------------------- loss

class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each process the summed gradient of its own slice, i.e.
    what every process's loss sends to it. With DDP's gradient averaging, a step is then exactly
    the 1-process step on the global batch (a plain all_gather has no gradient at all)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather_with_grad(x):
    """Concatenate x (same shape on every process) over processes along dim 0, gradients flowing
    back; returns (gathered, offset of this process's rows). A no-op in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return _GatherWithGrad.apply(x), dist.get_rank() * x.shape[0]


def nt_xent_table(z, temperature):
    """NT-Xent (Chen et al. 2020, eq. 1) of every ordered view pair of every sample, in one matmul.

    z: (B, V, D) this process's embeddings of V views of its B images (the same B on every process).
    Returns loss (B, V, V): loss[b, i, j] = -log softmax of sim(z_bi, z_bj) / T among the candidates
    {views i and j of every image on every process} minus z_bi itself, i.e. the NT-Xent term of
    anchor view i with positive view j, whose negatives are the 2 B_global - 2 other embeddings of
    the pair (i, j). With V = 2 that is SimCLR's loss; with V = N the HVP scores of all pairs. The
    diagonal is meaningless. Cosine similarities come from a normalised matmul: no B x B x D tensor.
    """
    B, V, _ = z.shape
    z = F.normalize(z.float(), dim=-1)
    everyone, offset = gather_with_grad(z)                                   # (B_global, V, D), one gather
    sim = (z.flatten(0, 1) @ everyone.flatten(0, 1).T / temperature).view(B, V, -1, V)  # sim[b, i, c, j]
    rows, own = torch.arange(B, device=z.device), torch.arange(B, device=z.device) + offset
    is_self = torch.zeros(B, everyone.shape[0], 1, dtype=torch.bool, device=z.device)
    is_self[rows, own] = True
    same_view = sim.diagonal(dim1=1, dim2=3).masked_fill(is_self, float("-inf")).logsumexp(1)  # (B, V): view i, minus self
    other_view = sim.logsumexp(2)                                            # (B, V, V): all of view j
    positive = sim[rows, :, own, :]                                          # (B, V, V): sim(z_bi, z_bj)
    return torch.logaddexp(same_view[:, :, None], other_view) - positive


def nt_xent_loss(z1, z2, temperature):
    """SimCLR's loss: NT-Xent averaged over the 2B anchors of this process, negatives from all
    processes. With equal batches, the mean over processes is the loss of the global batch."""
    table = nt_xent_table(torch.stack([z1, z2], dim=1), temperature)
    return (table[:, 0, 1] + table[:, 1, 0]).mean() / 2


def pair_scores(table, pairs):
    """Per-sample score of candidate pairs (K, 2): NT-Xent in both directions, (B, V, V) -> (B, K)."""
    first, second = pairs[:, 0], pairs[:, 1]
    return table[:, first, second] + table[:, second, first]


# ----------------------------------------------------------------------------------- optimizer

class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017): each tensor's update
    (gradient + weight decay) is rescaled to eta x |w| / |update|. Groups with lars=False (biases,
    BatchNorm: every tensor with one dimension) get neither weight decay nor the trust ratio."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if group["lars"]:
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = p.norm(), update.norm()
                    trust = torch.where((w_norm > 0) & (u_norm > 0), group["eta"] * w_norm / u_norm, 1.0)
                    update = update * trust
                state = self.state[p]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(p)
                state["momentum"].mul_(group["momentum"]).add_(update)
                p.add_(state["momentum"], alpha=-group["lr"])


def lars_param_groups(model, weight_decay):
    """Weight matrices and conv kernels get weight decay and LARS adaptation; 1-D tensors do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay, "lars": True},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lars": False}]


# ----------------------------------------------------------------------------------- hard-view selection

@torch.no_grad()
def select_hard_pair(model, views, cfg, accelerator):
    """One no-grad forward of all B x N views (train mode, same autocast as training), one gather
    of all candidate embeddings, then the per-sample hardest pair by NT-Xent. Returns (pair (B, 2),
    its score (B,), all scores (B, K); column 0 is the plain pair (0, 1))."""
    B, N = views.shape[:2]
    x = hvp.resize_views(views, cfg.hvp_select_res).flatten(0, 1)
    with accelerator.autocast():
        z = model(x.contiguous(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format))
    pairs = hvp.candidate_pairs(N, views.device)
    scores = pair_scores(nt_xent_table(z.unflatten(0, (B, N)), cfg.temperature), pairs)
    index, hard_score = hvp.hardest(scores)
    return pairs[index], hard_score, scores


# ----------------------------------------------------------------------------------- train loop

def main():
    cfg, preset_keys = hvp.parse_config(Config, presets=PRESETS, description=__doc__.splitlines()[0])
    check_config(cfg)
    output_dir = Path(cfg.output_dir)
    accelerator = hvp.make_accelerator(cfg.mixed_precision, cfg.grad_accum, cfg.report_to, output_dir)
    pusher = hvp.HubPusher.from_config(cfg, accelerator, "SimCLR")
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
    warmup_steps = round(total_steps * cfg.warmup_epochs / cfg.epochs)
    ds = hvp.shard_for_rank(ds, rank, world, cfg.num_workers)
    num_shards = ds.num_shards
    ds = ds.shuffle(seed=cfg.seed, buffer_size=cfg.shuffle_buffer)
    transform = hvp.MultiViewTransform({"views": [simclr_aug(cfg)] * cfg.num_views})
    stream = hvp.ViewStream(ds, transform, cfg.image_column, cfg.label_column if has_labels else None,
                            cfg.seed, rank, cfg.batch_size)
    loader = hvp.make_loader(stream, cfg.batch_size, cfg.num_workers, num_shards, pin_memory=device.type == "cuda")

    backbone = hvp.create_backbone(cfg.arch, cfg.image_size, cfg.small_stem)
    if cfg.init_from and checkpoint is None:
        hvp.init_backbone(backbone, cfg.init_from)
        if is_main:
            print(f"backbone initialised from {cfg.init_from}", flush=True)
    model = SimCLR(backbone, cfg.proj_hidden_dim, cfg.proj_dim)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if world > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    init_lr = cfg.lr * global_batch / 256
    optimizer = LARS(lars_param_groups(model, cfg.weight_decay), lr=init_lr, momentum=cfg.momentum,
                     eta=cfg.lars_eta)
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
    accelerator.init_trackers("hvp_simclr", config={k: v for k, v in vars(cfg).items() if not isinstance(v, tuple)})
    if is_main:
        print(f"SimCLR {'+ HVP ' if cfg.num_views > 2 else ''}| {cfg.arch} {cfg.image_size}px | "
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
                                       "hvp_simclr", cfg.keep_checkpoints)
            hvp.export_backbone(unwrapped.backbone, output_dir / "backbone", data_config, "hvp_simclr")
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
    bar = tqdm(total=total_steps, initial=step, disable=not is_main, desc="SimCLR", dynamic_ncols=True)
    model.train()
    interval_start, interval_steps, skipped = time.perf_counter(), 0, 0
    stopped = False
    batches = hvp.training_batches(loader, steps_per_epoch, step, cfg.grad_accum)
    while step < total_steps and not stopped:
        lr = hvp.cosine(step, total_steps, init_lr, cfg.min_lr, warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        timed = (step + 1) % cfg.log_every == 0
        select_s = train_s = 0.0
        for micro in range(cfg.grad_accum):
            epoch, batch = next(batches)
            skipped += int(batch["skipped"].sum())
            torch.manual_seed(hvp.mix_seed(cfg.seed, rank, step, micro))  # drop-path etc. replay on resume
            views = hvp.photometric(batch["views"].to(device, non_blocking=True), batch["views_params"])
            # the same decision on every process: selection gathers embeddings from all of them
            hard = cfg.num_views > 2 and epoch >= cfg.hvp_start_epoch and step % cfg.hvp_every == 0
            t0 = hvp.clock(timed, device)
            if hard:
                pair, hard_score, scores = select_hard_pair(unwrapped, views, cfg, accelerator)
                x1, x2 = hvp.gather_views(views, pair[:, 0]), hvp.gather_views(views, pair[:, 1])
            else:
                x1, x2 = views[:, 0], views[:, 1]
            x = torch.cat([x1, x2]).contiguous(memory_format=memory_format)
            t1 = hvp.clock(timed, device)
            with accelerator.accumulate(model):
                # both views in one forward, so BatchNorm normalises them together (reference step 5)
                z1, z2 = model(x).chunk(2)
                loss = nt_xent_loss(z1, z2, cfg.temperature)
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
