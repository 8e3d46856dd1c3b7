"""What the evaluation scripts share: the backbone from any source with its data config, opening a
labelled split, the evaluation and augmented loaders, accuracy, the accelerator, and where results
go. The scripts import it as they import hvp_run, from the repository root:

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import hvp_run
    from eval import common
"""
import copy
import dataclasses
import json
import re
from pathlib import Path

import torch
import torch.nn as nn

import hvp_utils as hvp
import hvp_run


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


def data_config(config, image_size=0):
    """(crop size, mean, std) of a backbone's config.json: --image_size if given, else the size it
    was trained at (224 px when the export does not say), and its normalisation."""
    pretrained = config.get("pretrained_cfg", {})
    size = image_size or pretrained.get("input_size", (3, 224, 224))[-1]
    return size, tuple(pretrained.get("mean", hvp.IMAGENET_MEAN)), tuple(pretrained.get("std", hvp.IMAGENET_STD))


def is_vit(model):
    """A timm VisionTransformer-like model with a class token and per-block outputs."""
    return getattr(model, "cls_token", None) is not None and hasattr(model, "forward_intermediates")


# ----------------------------------------------------------------------------------- data

class TrainTransform:
    """Random-resized-crop (area 0.08-1) + horizontal flip, normalised: the training augmentation of
    linear probes and fine-tuning. Its randomness comes from the per-sample generator
    hvp_run.BatchStream passes in."""

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
        raise hvp_run.HVPError(f"dataset {dataset!r} split {split!r} has no label column {label_column!r}: {what} "
                               "needs labels (an integer column; pass --label_column)")
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


def check_labels(labels, name):
    if len(labels) == 0:
        raise hvp_run.HVPError(f"split {name!r} is empty")
    if (labels < 0).any():
        raise hvp_run.HVPError(f"split {name!r} has {int((labels < 0).sum())} examples without a label")


# ----------------------------------------------------------------------------------- results

def accuracy(logits, labels):
    """Top-1 and top-5 accuracy (%) of (heads, M, C) logits -> two (heads,) tensors."""
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    hit = top == labels[None, :, None]
    return hit[..., 0].float().mean(1) * 100, hit.any(-1).float().mean(1) * 100


def skipped_text(skipped):
    """The result-line part for {"train": n, "test": m}: images that could not be decoded."""
    return "undecodable images skipped: " + ", ".join(f"{split} {n}" for split, n in skipped.items())


def dataset_name(dataset):
    """A dataset as a file name part: a folder's or Hub id's last component (cifar10 of uoft-cs/cifar10)."""
    return Path(str(dataset)).name or str(dataset).replace("/", "_")


def default_output(cfg, name):
    """<results folder>/<name>.json, "_random_init" added with --random_init (the same architecture,
    none of the weights: another result)."""
    return results_folder(cfg.backbone) / (f"{name}_random_init.json" if cfg.random_init else f"{name}.json")


def write_result(output, result):
    """Write an evaluation's result dict as JSON to `output` (its folder created)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))


def results_folder(backbone):
    """Where an evaluation writes by default: the backbone's own folder (training output, checkpoint,
    export); for a Hub or timm id, outputs/<id with '/' as '--'> in the current folder, never the
    current folder itself."""
    path = Path(str(backbone)).expanduser()
    if path.is_dir():
        return path
    name = re.sub(r"[^\w.@-]+", "-", str(backbone).removeprefix("hf-hub:").replace("/", "--")).strip("-.")
    return Path("outputs") / (name or "backbone")


# ----------------------------------------------------------------------------------- processes

PRECISIONS = ("", "auto", "no", "fp16", "bf16")


def check_precision(mixed_precision):
    if mixed_precision not in PRECISIONS:
        raise hvp_run.HVPError(f"--mixed_precision must be auto, no, fp16 or bf16, got {mixed_precision!r}")


def accelerate_precision(mixed_precision):
    """--mixed_precision as in training: auto (bf16 where native, else fp32), no, fp16, bf16, or empty
    (accelerate's setting; None); anything else is a one-line error."""
    check_precision(mixed_precision)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return hvp_run.resolve_precision(mixed_precision, device)[0]


def make_accelerator(mixed_precision):
    """The evaluation's Accelerator (accelerate_precision)."""
    return hvp_run.make_accelerator(accelerate_precision(mixed_precision), 1, "none", ".")
