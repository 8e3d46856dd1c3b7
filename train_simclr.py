"""SimCLR with Hard View Pretraining (HVP), in one file.

Every step draws --num_views augmented views per image, runs them all through the model once
without gradients, scores every pair with SimCLR's own per-sample NT-Xent loss (negatives from all
processes), and trains a plain SimCLR step on the hardest pair of each image. --num_views 2 is
plain SimCLR (no selection pass).

    python train_simclr.py                           # CPU: the shipped Fashion-MNIST subset, k-NN at the end
    accelerate launch train_simclr.py --arch resnet50 --dataset <hub id | image folder | parquet>
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 train_simclr.py \\
        --arch resnet50 --dataset ILSVRC/imagenet-1k --batch_size 512 --epochs 100
    # the HVP paper's SimCLR run (RECIPES: ResNet-50, batch 4096, LARS, 100 epochs, N = 4)
    accelerate launch --multi_gpu --num_machines 2 --machine_rank $RANK --main_process_ip $HOST \\
        --num_processes 16 train_simclr.py --recipe hvp_simclr_r50_100ep --dataset ILSVRC/imagenet-1k \\
        --batch_size 256 --resume auto
    python train_simclr.py --resume                  # continue the run in --output_dir

Defaults are the reference ImageNet recipe (ResNet-50, projector 2048-2048-128 with BatchNorm,
NT-Xent at temperature 0.1 with the negatives of all processes, LARS lr 0.3 x batch/256, momentum
0.9, wd 1e-4, 10 warm-up epochs then a per-step cosine to 1e-6, SimCLR augmentations, 100 epochs,
N = 4 views). On the shipped dataset a CPU preset (see PRESETS) replaces the flags you do not
give; the README lists the k-NN accuracy it reaches and the time it takes on 2 CPU cores.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import hvp_utils as hvp
import hvp_run


# ----------------------------------------------------------------------------------- config

@dataclass
class Config(hvp_run.RunConfig):  # + the data, output, lifecycle and Hub flags every script shares (hvp_run.RunConfig)
    output_dir: str = "outputs/simclr"  # checkpoints, backbone export, metrics.jsonl, TensorBoard logs (one run per folder)
    arch: str = "resnet50"  # any timm model name; aliases vit_tiny/vit_small/vit_base
    small_stem: bool = False  # 28-64 px inputs: 3x3 stride-1 ResNet stem / ViT patch 4-8
    image_size: int = 224  # training crop size
    epochs: int = 100  # length of the run (steps per epoch = examples // global batch)
    warmup_epochs: float = 10.0  # linear lr warm-up from 0, in epochs of data (also under --max_steps)
    max_steps: int = 0  # if > 0, stop after this many optimizer steps (the schedule spans them)
    batch_size: int = 64  # images per process per micro-step; global batch = this x processes x grad_accum
    grad_accum: int = 1  # micro-steps per optimizer step, or set --global_batch (NT-Xent negatives come from one micro-step of every process)
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
    channels_last: bool = True  # NHWC memory format (faster convolutions on GPUs with AMP and on CPUs)


# What a checkpoint's model is made of: --resume refuses a checkpoint that differs in these.
MODEL_FIELDS = ("arch", "small_stem", "image_size", "proj_hidden_dim", "proj_dim")

# Published recipes (--recipe NAME): each replaces the defaults of the flags you do not give.
RECIPES = {
    # The HVP paper's SimCLR runs (automl/hvp, branch simclr: configs/pretrain_default.yaml): ResNet-50,
    # batch 4096, LARS lr 0.3 x B/256 (4.8), momentum 0.9, wd 1e-4, 10 warm-up epochs then cosine,
    # NT-Xent temperature 0.1, 100 epochs, fp16 (the config's fp16); N = 4 candidate views (their default is
    # 2: the plain run).
    "hvp_simclr_r50_100ep": dict(arch="resnet50", image_size=224, epochs=100, warmup_epochs=10.0, global_batch=4096,
                                 lr=0.3, weight_decay=1e-4, momentum=0.9, temperature=0.1, proj_hidden_dim=2048,
                                 proj_dim=128, num_views=4, mixed_precision="fp16"),
    # The same config with 2 views, fp16: the authors' plain SimCLR baseline (their default num_views).
    "simclr_r50_100ep": dict(arch="resnet50", image_size=224, epochs=100, warmup_epochs=10.0, global_batch=4096,
                             lr=0.3, weight_decay=1e-4, momentum=0.9, temperature=0.1, proj_hidden_dim=2048,
                             proj_dim=128, num_views=2, mixed_precision="fp16"),
}

# The shipped Fashion-MNIST subset: 28 px grayscale, 10k images, upscaled to 32 px for the standard
# ResNet stem. lr 1.2 at batch 256 is SimCLR's square-root scaling for small batches (0.075 x
# sqrt(256)). timm's test_resnet (0.37 M parameters) at 20 epochs beat ResNet-18 at 8 epochs
# (77.55 %) in about the same time; batch 128 did worse than 256 (README, "Results"). 16 epochs
# train in about 3 minutes on 2 CPU cores in fp32 (20 took 4 min 12 s: about 7 minutes on the
# slowest CPU measured). It replaces the ImageNet defaults above for flags you do not give.
PRESETS = {hvp_run.DEFAULT_DATASET: dict(
    arch="test_resnet", small_stem=False, image_size=32, epochs=16, warmup_epochs=1.0, batch_size=256, lr=1.2,
    num_workers=1, log_every=20, save_every=200, mixed_precision="auto")}


def check_config(cfg):
    hvp_run.check_run_config(cfg)
    hvp_run.check_arch(cfg.arch)
    if cfg.num_views < 2:
        raise hvp_run.HVPError(f"--num_views must be at least 2 (2 = plain SimCLR), got {cfg.num_views}")
    if not 0 < cfg.hvp_select_res <= 1:
        raise hvp_run.HVPError(f"--hvp_select_res must be in (0, 1], got {cfg.hvp_select_res}")
    if cfg.temperature <= 0:
        raise hvp_run.HVPError(f"--temperature must be positive, got {cfg.temperature}")
    if cfg.epochs < 1 or not 0 <= cfg.warmup_epochs <= cfg.epochs:
        raise hvp_run.HVPError(f"--epochs must be >= 1 and --warmup_epochs in [0, --epochs], got {cfg.epochs} "
                           f"and {cfg.warmup_epochs}")
    if cfg.hvp_every < 1 or cfg.batch_size < 2 or cfg.grad_accum < 1:
        raise hvp_run.HVPError("--hvp_every and --grad_accum must be >= 1 and --batch_size >= 2 (BatchNorm)")


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


# ----------------------------------------------------------------------------------- training step

def train_step(model, optimizer, micro_batches, cfg, accelerator, step, epoch, log_now=False, select_threads=None):
    """One optimizer step of SimCLR + HVP over the step's micro-batches: views made on the device,
    the hardest pair of each image by its NT-Xent loss with negatives from every process (every
    --hvp_every steps from --hvp_start_epoch on; the plain pair (0, 1) otherwise), an ordinary
    SimCLR forward and backward (both views in one forward, so BatchNorm normalises them together);
    the optimizer steps after the last micro-batch. Returns (record, (views, pair) or None).
    select_threads: torch's CPU threads for the selection forward (Run.select_threads; None: as they are)."""
    unwrapped = accelerator.unwrap_model(model)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    # the same decision on every process: selection gathers embeddings from all of them
    hard = cfg.num_views > 2 and epoch >= cfg.hvp_start_epoch and step % cfg.hvp_every == 0
    record, shown, select_s, train_s = {}, None, 0.0, 0.0
    for batch in micro_batches:
        views = hvp.views_from_batch(hvp.pixels_to_device(batch, accelerator.device), "views", cfg.image_size,
                                     simclr_aug(cfg).interpolation)
        t0 = hvp.clock(log_now, accelerator.device)
        if hard:
            with hvp.threads(select_threads):
                pair, hard_score, scores = select_hard_pair(unwrapped, views, cfg, accelerator)
            x1, x2 = hvp.gather_views(views, pair[:, 0]), hvp.gather_views(views, pair[:, 1])
        else:
            x1, x2 = views[:, 0], views[:, 1]
        x = torch.cat([x1, x2]).contiguous(memory_format=memory_format)
        t1 = hvp.clock(log_now, accelerator.device)
        with accelerator.accumulate(model):
            z1, z2 = model(x).chunk(2)
            loss = nt_xent_loss(z1, z2, cfg.temperature)
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
    run = hvp_run.Run(cfg, "SimCLR", MODEL_FIELDS, notes)

    backbone = hvp_run.create_backbone(cfg.arch, cfg.image_size, cfg.small_stem)
    if cfg.init_from and not run.resuming:
        hvp_run.init_backbone(backbone, cfg.init_from)
    model = SimCLR(backbone, cfg.proj_hidden_dim, cfg.proj_dim)
    model = model.to(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    if run.world > 1 and run.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    init_lr = cfg.lr * run.global_batch / 256
    optimizer = LARS(lars_param_groups(model, cfg.weight_decay), lr=init_lr, momentum=cfg.momentum, eta=cfg.lars_eta)
    model, optimizer = run.prepare(model, optimizer)
    unwrapped = run.accelerator.unwrap_model(model)

    transform = hvp.MultiViewTransform({"views": [simclr_aug(cfg)] * cfg.num_views}, crops=run.crops)
    run.start({"model": unwrapped, "optimizer": optimizer}, transform, export=unwrapped.backbone,
              banner=f"{'+ HVP ' if cfg.num_views > 2 else ''}| {cfg.arch} {cfg.image_size}px | {cfg.num_views} views "
                     f"| lr {init_lr:.4g}")
    if run.world > 1 and run.device.type != "cuda" and run.is_main:
        print("note: SyncBatchNorm needs GPUs; on CPU each process normalises its own batch", flush=True)
    warmup_steps = min(round(cfg.warmup_epochs * run.steps_per_epoch), run.total_steps)
    model.train()
    for step in run.steps():
        lr = hvp.cosine(step.index, run.total_steps, init_lr, cfg.min_lr, warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        record, shown = train_step(model, optimizer, step.micro_batches, cfg, run.accelerator, step.index, step.epoch,
                                   step.log_now, run.select_threads)
        if shown and step.grid_now:
            run.save_grid(step, "", *shown)
        run.log(step, {**record, "lr": lr})
    run.finish()


if __name__ == "__main__":
    hvp_run.run_main(main)
