"""Full fine-tuning of a pretrained backbone with a new linear classifier, top-1/top-5 each epoch.

The transfer protocol of the paper's upstream code (DESIGN.md, evaluation protocols): AdamW, weight
decay 0.05, global batch 512, lr x global batch / 256 with a per-step cosine schedule,
random-resized-crop (0.08-1) + flip training augmentation, resize + centre-crop evaluation at the
backbone's resolution (224 px for ImageNet backbones: CIFAR is upsampled). ViTs get layer-wise lr
decay (--layer_decay, timm's BEiT-style grouping; the upstream runs do not record one, 1.0 switches
it off). The best top-1 over epochs is reported as upstream does, and the last epoch too.

Per-dataset presets (lr / epochs; the table in DESIGN.md, evaluation protocols) apply when --dataset
is one of the names below (or its Hub id) and you do not give the flag yourself; --protocol dino
takes the DINO column:

    dataset      Hub id                             SimSiam lr / ep   DINO lr / ep
    cifar10      uoft-cs/cifar10                    7.5e-6 / 300      7.5e-6 / 300
    cifar100     uoft-cs/cifar100                   5e-6 / 300        5e-6 / 300
    food101      ethz/food101                       5e-6 / 300        (linear only upstream)
    flowers102   dpdl-benchmark/oxford_flowers102   5e-4 / 300        5e-5 / 300
    places365    (local copy: give --lr --epochs)   5e-5 / 100        5e-5 / 100
    inat21       (local copy: give --lr --epochs)   7.5e-5 / 100      5e-5 / 100

    python eval/finetune.py --backbone outputs/simsiam                    # shipped dataset, CPU preset
    python eval/finetune.py --backbone outputs/dino --checkpoint_key teacher --dataset cifar10 --protocol dino
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 eval/finetune.py \\
        --backbone hf-hub:<org>/<repo> --dataset flowers102 --batch_size 64

Every epoch streams the train split shuffled, in full batches with fresh augmentations
(hvp_run.BatchStream's training mode, a new stream per epoch); the test split is read whole, in order,
after every epoch. Images that cannot be decoded are counted per split ("skipped_images" in the
JSON, and on the result line): replaced in their training batch by another view of a decodable
image (each epoch's count in its record, the most any epoch met at the top: an epoch reads every
image at most once), left out of the test split.

Writes a JSON result (--output, default <backbone folder>/finetune_<dataset>.json; outputs/<org>--<name>/
for a Hub backbone) and the fine-tuned
model, the backbone with its classifier head as it is after the last epoch, to --output_dir (default:
the JSON's path without ".json"): model.safetensors + timm config.json (num_classes, the class names
as label_names, the evaluation preprocessing) + a model card README.md. It loads with plain timm,

    model = timm.create_model("local-dir:<output_dir>", pretrained=True)   # or "hf-hub:<user>/<repo>"
    model.pretrained_cfg["label_names"]                                    # the class of each logit

except a ResNet fine-tuned from a --small_stem backbone (a stem timm cannot describe): load that one
with load_model("<output_dir>" or "hf-hub:<user>/<repo>") from this file. --push_to_hub uploads the
folder to the Hugging Face Hub (--hub_model_id, default <your user>/<--output_dir folder name>;
--hub_private; --hub_license sets the licence on the card and in config.json) through the same code
as the training scripts' push (hvp_run/hub.py); the token is huggingface_hub's business, checked for
before fine-tuning starts and never printed or written. A failed upload is retried and reported with
the `hf upload` command that pushes the folder later, the local files stay as they are, and the
command exits with status 2.
"""
import copy
import json
import os
import shutil
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
from hvp_run import hub  # noqa: E402


# ----------------------------------------------------------------------------------- config

@dataclass
class Config:
    backbone: str = ""  # training output folder, checkpoint folder, export folder (config.json + model.safetensors) or hf-hub:<id>
    checkpoint_key: str = ""  # take the backbone weights from this entry of the checkpoint state (e.g. teacher for DINO/iBOT)
    random_init: bool = False  # same architecture with freshly initialised weights (training from scratch)
    dataset: str = hvp_run.DEFAULT_DATASET  # a preset name (cifar10, ...), Hub dataset id, local image folder, or parquet
    train_split: str = "train"  # split to fine-tune on
    test_split: str = "test"  # split evaluated after every epoch
    image_column: str = "image"  # dataset column holding images
    label_column: str = "label"  # dataset column holding labels
    image_size: int = 0  # crop size; 0 = the size the backbone was trained at (config.json)
    crop_scale: tuple = (0.08, 1.0)  # random-resized-crop area range of the training augmentation
    protocol: str = "simsiam"  # which column of the preset table sets lr / epochs: simsiam | dino
    lr: float = 5e-5  # base learning rate, x global batch / 256
    layer_decay: float = 0.75  # ViT only: lr x layer_decay^(depth - layer); 1.0 = no layer-wise decay
    weight_decay: float = 0.05  # AdamW weight decay (not on biases and norm parameters)
    warmup_epochs: int = 0  # linear lr warm-up (the upstream transfer runs record none)
    epochs: int = 100  # passes over the train split
    batch_size: int = 64  # images per process per step (upstream: 512 in total)
    seed: int = 0  # head initialisation, augmentation and data order
    num_workers: int = 2  # data loader workers per process
    mixed_precision: str = ""  # no | fp16 | bf16; empty = accelerate's setting
    output: str = ""  # JSON result file; default <backbone folder>/finetune_<dataset>.json
    output_dir: str = ""  # folder for the fine-tuned model (model.safetensors, timm config.json, README.md); default: --output without .json
    save_model: bool = True  # write the fine-tuned model to --output_dir (--no-save_model: only the JSON result)
    push_to_hub: bool = False  # push the fine-tuned model and its model card to the Hugging Face Hub
    hub_model_id: str = ""  # <user or org>/<name>; default <your user>/<--output_dir folder name>
    hub_private: bool = False  # create the Hub repo private
    hub_license: str = hvp_run.HUB_LICENSE  # licence of the fine-tuned weights (model card, config.json): a Hub licence id


# name: (Hub id, image column, label column, test split, (SimSiam lr, epochs), (DINO lr, epochs))
TRANSFER = {
    "cifar10": ("uoft-cs/cifar10", "img", "label", "test", (7.5e-6, 300), (7.5e-6, 300)),
    "cifar100": ("uoft-cs/cifar100", "img", "fine_label", "test", (5e-6, 300), (5e-6, 300)),
    "food101": ("ethz/food101", "image", "label", "validation", (5e-6, 300), (5e-6, 300)),
    "flowers102": ("dpdl-benchmark/oxford_flowers102", "image", "label", "test", (5e-4, 300), (5e-5, 300)),
    "places365": (None, "image", "label", "validation", (5e-5, 100), (5e-5, 100)),
    "inat21": (None, "image", "label", "validation", (7.5e-5, 100), (5e-5, 100)),
}


def transfer_preset(name, protocol="simsiam"):
    """Preset flags for a TRANSFER dataset (by name or Hub id); {} for any other dataset."""
    for key, (hub_id, image_column, label_column, test_split, simsiam, dino) in TRANSFER.items():
        if name in (key, hub_id):
            lr, epochs = dino if protocol == "dino" else simsiam
            return dict(dataset=hub_id or key, image_column=image_column, label_column=label_column,
                        test_split=test_split, lr=lr, epochs=epochs)
    return {}


def presets(protocol="simsiam"):
    """Defaults by --dataset, for the flags not given: the shipped Fashion-MNIST subset on 2 CPU
    cores (a few epochs with a larger lr), and every TRANSFER dataset, by name and by Hub id, with
    the lr / epochs of the --protocol column."""
    table = {hvp_run.DEFAULT_DATASET: dict(lr=1e-3, epochs=3, batch_size=64, crop_scale=(0.5, 1.0), num_workers=1)}
    for name, (hub_id, *_) in TRANSFER.items():
        for key in (name, hub_id) if hub_id else (name,):
            table[key] = transfer_preset(name, protocol)
    return table


PRESETS = presets()  # the SimSiam column


def parse_args(argv=None):
    """(config, start-up notes) from the command line. The preset table depends on --protocol, so
    --protocol is read first (a parse without presets) and the command line is then parsed with that
    protocol's table: hvp_run.parse_config fills in preset values only for the flags not given."""
    description = __doc__.splitlines()[0]
    protocol = hvp_run.parse_config(Config, argv, description=description)[0].protocol
    return hvp_run.parse_config(Config, argv, presets=presets(protocol), description=description)


def resolve_config(cfg):
    """Turn a preset name into its Hub id (lr / epochs of the preset are already in cfg, see
    parse_args) and check the flags."""
    preset = transfer_preset(cfg.dataset, cfg.protocol)
    if preset:
        if preset["dataset"] in TRANSFER:  # no public Hub copy known: the user must point at one
            raise hvp_run.HVPError(f"--dataset {cfg.dataset}: no public Hub copy known; give a local copy or Hub id with --dataset, and "
                               f"--lr {preset['lr']:g} --epochs {preset['epochs']} (preset table in --help)")
        cfg.dataset = preset["dataset"]
    if cfg.protocol not in ("simsiam", "dino"):
        raise hvp_run.HVPError(f"--protocol must be simsiam or dino, got {cfg.protocol!r}")
    common.check_precision(cfg.mixed_precision)
    if cfg.epochs < 1 or cfg.batch_size < 1 or not cfg.lr > 0 or not 0 < cfg.layer_decay <= 1:
        raise hvp_run.HVPError("--epochs and --batch_size must be >= 1, --lr > 0 and --layer_decay in (0, 1]")
    if not 0 < cfg.crop_scale[0] <= cfg.crop_scale[1] <= 1:
        raise hvp_run.HVPError(f"--crop_scale must be two numbers 0 < min <= max <= 1, got {cfg.crop_scale}")
    if cfg.push_to_hub and not cfg.save_model:
        raise hvp_run.HVPError("--push_to_hub pushes the saved model: it cannot be combined with --no-save_model")
    return cfg


# ----------------------------------------------------------------------------------- data

def _parquet(path):
    import pyarrow.parquet as pq
    if "://" in path:  # hf:// files of a Hub dataset
        import fsspec
        return pq.ParquetFile(fsspec.open(path, "rb").open())
    return pq.ParquetFile(path)


def split_labels(source):
    """Every label of a split (-1 where missing): parquet files by their label column alone, other
    formats by one pass over the rows."""
    if source.kind == "parquet":
        opened = {}
        for file, group, _ in source.pieces:
            if file not in opened:
                opened = {file: _parquet(source.files[file])}
            yield from opened[file].read_row_group(group, columns=[source.label_column]).column(0).to_pylist()
    else:
        for piece, (_, _, rows) in enumerate(source.pieces):
            yield from (label for _, label in source.read(piece, 0, rows))


def label_feature(source):
    """The datasets.ClassLabel a Hugging Face parquet split records for its label column, else None."""
    if source.kind != "parquet":
        return None
    import datasets
    try:
        feature = datasets.Features.from_arrow_schema(_parquet(source.files[0]).schema_arrow).get(source.label_column)
    except Exception:  # no or foreign feature metadata
        return None
    return feature if isinstance(feature, datasets.ClassLabel) else None


def class_names(source, num_classes):
    """The name of each class index: the image folder's class folders, the ClassLabel names of a
    Hugging Face parquet split, else "0", "1", ..."""
    if source.class_names and len(source.class_names) == num_classes:
        return [str(name) for name in source.class_names]
    feature = label_feature(source)
    if feature is not None and feature.num_classes == num_classes:
        return [str(name) for name in feature.names]
    return [str(i) for i in range(num_classes)]


def count_classes(source):
    """Number of classes of a labelled split (an hvp_run.Source): its image folder's classes, the
    ClassLabel feature a Hugging Face parquet file records, else the largest label + 1."""
    if source.class_names:
        return len(source.class_names)
    feature = label_feature(source)
    if feature is not None:
        return feature.num_classes
    labels = [-1 if label is None else int(label) for label in split_labels(source)]
    if not labels or min(labels) < 0:
        raise hvp_run.HVPError(f"split {source.split!r} is empty or has examples without a label")
    return max(labels) + 1


# ----------------------------------------------------------------------------------- model and optimizer

def build_model(cfg, num_classes):
    """The backbone with a new linear classifier (N(0, 0.01), zero bias), all parameters trainable."""
    model, config = common.load_backbone(cfg.backbone, cfg.checkpoint_key, cfg.random_init, cfg.seed)
    if not hasattr(model, "reset_classifier"):
        raise hvp_run.HVPError(f"{cfg.backbone!r} is not a timm classifier model (no reset_classifier)")
    torch.manual_seed(cfg.seed)
    model.reset_classifier(num_classes)
    head = model.get_classifier()
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    return model.train().requires_grad_(True), config


def make_optimizer(cfg, model, lr):
    """AdamW without weight decay on 1-D parameters; ViTs get BEiT-style layer-wise lr scales
    (each group's `lr_scale`, applied by the schedule)."""
    import timm.optim
    layer_decay = cfg.layer_decay if common.is_vit(model) and cfg.layer_decay < 1 else None
    return timm.optim.create_optimizer_v2(model, "adamw", lr=lr, weight_decay=cfg.weight_decay,
                                          layer_decay=layer_decay)


# ----------------------------------------------------------------------------------- the fine-tuned model

MODEL_TAG = "hvp_finetune"  # pretrained_cfg tag of a saved fine-tuned model (how an earlier one is recognised)
METHODS = {"simsiam": "SimSiam", "simclr": "SimCLR", "dino": "DINO", "ibot": "iBOT"}  # backbone tags hvp_<method>


def default_paths(cfg):
    """(JSON result file, model folder): --output / --output_dir, by default <backbone folder>/finetune_<dataset>
    .json and the folder of that name ("_random_init" added with --random_init; under outputs/ for a Hub
    backbone, common.results_folder)."""
    output = Path(cfg.output) if cfg.output else common.default_output(cfg, f"finetune_{common.dataset_name(cfg.dataset)}")
    if cfg.output_dir:
        return output, Path(cfg.output_dir)
    return output, output.with_suffix("") if output.suffix == ".json" else output.with_name(output.name + "_model")


def check_model_folder(folder):
    """A one-line error unless `folder` is new, empty, or holds an earlier fine-tuned model (which the
    run replaces): never replace a folder this script did not write."""
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise hvp_run.HVPError(f"--output_dir {folder} exists and is not a folder")
    if not any(folder.iterdir()):
        return
    try:
        tag = json.loads((folder / "config.json").read_text())["pretrained_cfg"]["tag"]
    except (OSError, ValueError, KeyError, TypeError):
        tag = None
    if tag != MODEL_TAG:
        raise hvp_run.HVPError(f"--output_dir {folder} exists and does not hold a fine-tuned model: pick another "
                           "folder (an earlier fine-tuned model there would be replaced)")


def _replace_folder(tmp, folder):
    """Put the finished folder `tmp` in place of `folder` by renames (an earlier model there is removed
    only once the new one is in place)."""
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        os.rename(folder, old)
    os.rename(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def save_model(model, folder, label_names, data_config, card, license=hvp_run.HUB_LICENSE):
    """Write the fine-tuned classifier to `folder`: model.safetensors + timm config.json (num_classes,
    label_names, `data_config`, `license` in place of the one timm copies from its registry) + README.md
    (`card`), complete or not at all. Returns the folder."""
    import timm
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).eval()  # safetensors: no channels_last
    model_config = {"label_names": list(label_names), "pretrained_cfg": {"tag": MODEL_TAG, "license": license}}
    if getattr(plain, "hvp_small_stem", False):
        model_config["hvp_small_stem"] = True
    timm.models.save_for_hf(plain, tmp, model_config=model_config, safe_serialization=True, data_config=data_config)
    (tmp / "README.md").write_text(card)
    _replace_folder(tmp, folder)
    return folder


def load_model(source):
    """The fine-tuned classifier (eval mode) from a folder save_model wrote or "hf-hub:<user>/<repo>[@revision]",
    also for ResNets with the small stem, which plain timm cannot build."""
    import timm
    from safetensors.torch import load_file
    path = hvp_run.download_hub_backbone(str(source)) if str(source).startswith("hf-hub:") else Path(source).expanduser()
    if not ((path / "config.json").is_file() and (path / "model.safetensors").is_file()):
        raise hvp_run.HVPError(f"no fine-tuned model at {source!r}: expected a folder with config.json and model.safetensors")
    config = json.loads((path / "config.json").read_text())
    if not config.get("hvp_small_stem"):
        return timm.create_model(f"local-dir:{path}", pretrained=True).eval()
    args = {k: v for k, v in config.get("model_args", {}).items() if k not in ("num_classes", "in_chans", "global_pool")}
    model = hvp_run.create_backbone(config["architecture"], small_stem=True, **args)
    model.reset_classifier(config["num_classes"])
    model.load_state_dict(load_file(path / "model.safetensors"))
    model.pretrained_cfg = model.default_cfg = dict(config.get("pretrained_cfg", {}), architecture=config["architecture"],
                                                    label_names=config.get("label_names"))
    return model.eval()


FINETUNED_CARD = """---
{{ card_data }}
---

# `{{ arch }}` fine-tuned on {{ dataset_name }}

A `{{ arch }}` image classifier ({{ num_classes }} classes) fine-tuned end to end (every weight trained, a new
linear head) {{ origin }}, on the `{{ train_split }}` split of `{{ dataset }}`
({{ train_samples }} images) at {{ size }} px, for {{ epochs }}.

## Accuracy

On the `{{ test_split }}` split ({{ test_samples }} images; resize to {{ size }} / 0.875, centre crop):

| weights | top-1 | top-5 |
|---|---|---|
| these (last epoch, {{ last.epoch }}) | {{ "%.2f" % last.top1 }} % | {{ "%.2f" % last.top5 }} % |
| best epoch ({{ best_epoch }}), the number the transfer protocol reports | {{ "%.2f" % best_top1 }} % | {{ "%.2f" % best_top5 }} % |
{{ kept }}
## Usage

```python
{{ imports }}import timm
import torch
from PIL import Image

{{ load }}
transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
with torch.no_grad():
    logits = model(transform(Image.open("image.jpg").convert("RGB")).unsqueeze(0))
print(model.pretrained_cfg["label_names"][logits.argmax(1).item()])
```

## Fine-tuning

AdamW, peak lr {{ "%.4g" % lr }} ({{ base_lr }} x global batch {{ global_batch }} / 256), weight decay
{{ weight_decay }}, layer-wise lr decay {{ layer_decay }} (ViTs only), cosine schedule after {{ warmup }} of
warm-up; random-resized crops at scale {{ crop_scale[0] }}-{{ crop_scale[1] }} and horizontal flips; on
{{ processes }}. Fine-tuned with `eval/finetune.py` of the HVP repository:

```json
{{ shown }}
```
"""


def model_card(repo_id, cfg, result, backbone_config, small_stem=False, folder_name="finetuned"):
    """README.md of a fine-tuned model: Hub metadata (with the last epoch's top-1 as model-index
    results), what it was fine-tuned from and on, the accuracy of these weights (the last epoch) and of
    the best epoch, the configuration, and how to load it."""
    from huggingface_hub import EvalResult, ModelCardData
    hub_dataset, dataset_name = hub.card_dataset(cfg.dataset)
    backbone = str(cfg.backbone)
    base_model = backbone[len("hf-hub:"):].split("@")[0] if backbone.startswith("hf-hub:") else None
    tag = (backbone_config.get("pretrained_cfg") or {}).get("tag", "")
    method = METHODS.get(tag.removeprefix("hvp_"))
    arch = backbone_config.get("architecture", "?")
    if cfg.random_init:
        origin = f"from random initialisation (the architecture of `{hub.card_value(backbone)}`, none of its weights)"
    else:
        origin = f"from the backbone `{hub.card_value(backbone)}`" + (
            f", pretrained with self-supervised **{method}** and **Hard View Pretraining** (HVP; Ferreira et al., "
            "*Beyond Random Augmentations: Pretraining with Hard Views*, ICLR 2025)" if method else "")
    last = result["epochs"][-1]
    where = f"hf-hub:{repo_id}" if repo_id else f"local-dir:path/to/{folder_name}"
    eval_results = [EvalResult(
        task_type="image-classification", dataset_type=hub_dataset or dataset_name, dataset_name=dataset_name,
        dataset_split=cfg.test_split, metric_type="accuracy", metric_name="top-1 accuracy (%)",
        metric_value=round(last["top1"], 2))]
    metadata = ModelCardData(
        library_name=hvp_run.HUB_CUSTOM_LIBRARY if small_stem else "timm", license=cfg.hub_license,
        pipeline_tag="image-classification", base_model=base_model, datasets=[hub_dataset] if hub_dataset else None,
        metrics=["accuracy"], tags=list(dict.fromkeys(filter(None, [
            "image-classification", "pytorch" if small_stem else "timm", "fine-tuned", "hard-view-pretraining" if method else None,
            method.lower() if method else None, dataset_name]))),
        model_name=repo_id or folder_name, eval_results=eval_results)
    if small_stem:  # run from a clone of the HVP repository: plain timm cannot build the small-stem ResNet
        imports = 'from eval import finetune  # run from a clone of the HVP repository\n'
        load = f'model = finetune.load_model("{where.removeprefix("local-dir:")}")'
    else:
        imports, load = "", f'model = timm.create_model("{where}", pretrained=True).eval()'
    kept = ("" if result["best_epoch"] == last["epoch"] else
            f"\nThe weights here are those after the last epoch; those of epoch {result['best_epoch']} were not kept.\n")
    shown = {k: hub.card_value(v) for k, v in asdict(cfg).items() if k not in ("output", "output_dir")}
    return hub.render_card(
        metadata, FINETUNED_CARD, arch=arch, dataset_name=dataset_name, num_classes=result["num_classes"], origin=origin,
        train_split=cfg.train_split, dataset=hub_dataset or dataset_name, train_samples=result["train_samples"],
        size=result["image_size"], epochs=hub.counted(cfg.epochs, "epoch"), test_split=cfg.test_split,
        test_samples=result["test_samples"], last=last, best_epoch=result["best_epoch"],
        best_top1=result["best_top1"], best_top5=result["best_top5"], kept=kept, imports=imports, load=load,
        lr=cfg.lr * cfg.batch_size * result["processes"] / 256, base_lr=f"{cfg.lr:g}",
        global_batch=cfg.batch_size * result["processes"], weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay,
        warmup=hub.counted(cfg.warmup_epochs, "epoch"), crop_scale=cfg.crop_scale,
        processes=hub.counted(result["processes"], "process", "processes"),
        shown=json.dumps(shown, indent=2, default=str))


def push_model(folder, repo_id, private, write_card, tries=3, retry_wait=10.0):
    """Upload `folder` to the model repo `repo_id` (created if needed) with the training scripts' code
    (hvp_run.hub.push_folder: retries, deadlines; `write_card(repo_id)` rewrites the card once a bare
    repo name has resolved to <user>/<name>). A push that failed after its tries is reported with the
    command that uploads the folder later. Returns (repo id, True if the Hub has it)."""
    repo_id, error = hub.push_folder(repo_id, folder, f"HVP fine-tuning: {Path(folder).name}", "the fine-tuned model",
                                     private, write_card, tries=tries, retry_wait=retry_wait)
    if error is not None:
        print(f"hub: push of the fine-tuned model to {repo_id} failed after {tries} tries: {error}. The model is "
              f"intact in {folder}; {hub.upload_later(repo_id, folder)}", file=sys.stderr, flush=True)
    return repo_id, error is None


# ----------------------------------------------------------------------------------- fine-tuning

def run(cfg, accelerator=None):
    """The whole fine-tuning run; returns the result dict (every process gets it)."""
    accelerator = accelerator or common.make_accelerator(cfg.mixed_precision)
    is_main, device, world = accelerator.is_main_process, accelerator.device, accelerator.num_processes
    start_time = time.perf_counter()
    _, model_dir = default_paths(cfg)
    if cfg.save_model:  # before anything is trained: where the model goes, and the Hub settings
        check_model_folder(model_dir)
    repo_id = hub.hub_repo_id(cfg, model_dir)
    # fails fast on a dataset without labels or too small for one batch, before the model
    train_source = common.open_split(cfg.dataset, cfg.train_split, cfg.image_column, cfg.label_column, accelerator,
                                     "fine-tuning")
    test_source = common.open_split(cfg.dataset, cfg.test_split, cfg.image_column, cfg.label_column, accelerator,
                                    "fine-tuning")
    global_batch = cfg.batch_size * world
    steps_per_epoch = common.steps_per_epoch(train_source, global_batch)
    num_classes, label_names = hvp_run.on_main(accelerator, lambda: _classes(train_source))
    model, config = build_model(cfg, num_classes)
    size, mean, std = common.data_config(config, cfg.image_size)

    # a new shuffled stream of full batches every epoch (hvp_run.training_batches starts the next one early)
    epoch_loader = common.augmented_loaders(train_source, cfg, size, mean, std, accelerator, batches=steps_per_epoch)
    test_loader = hvp_run.eval_loader(test_source, size, accelerator, cfg.batch_size, cfg.num_workers, mean, std)
    count = train_source.num_rows
    total_steps, warmup_steps = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    peak_lr = cfg.lr * global_batch / 256
    optimizer = make_optimizer(cfg, model, peak_lr)
    model, optimizer = accelerator.prepare(model.to(device), optimizer)
    if is_main:
        decay = f"layer decay {cfg.layer_decay}" if common.is_vit(accelerator.unwrap_model(model)) and cfg.layer_decay < 1 else "no layer decay"
        print(f"fine-tune | {cfg.backbone}{' (random init)' if cfg.random_init else ''} | {num_classes} classes | "
              f"{size}px | {world} process(es) on {device.type} | global batch {global_batch} | AdamW lr {peak_lr:.3g} "
              f"wd {cfg.weight_decay} {decay} | {cfg.epochs} epochs x {steps_per_epoch} steps | "
              f"precision {accelerator.mixed_precision}", flush=True)

    history, step = [], 0
    batches = hvp_run.training_batches(epoch_loader, steps_per_epoch)
    bar = hvp_run.progress_bar(total_steps, 0, "fine-tune", is_main)
    for epoch in range(cfg.epochs):
        model.train()
        losses, skipped = [], 0
        for _ in range(steps_per_epoch):
            lr = hvp.cosine(step, total_steps, peak_lr, warmup_steps=warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            _, batch = next(batches)
            skipped += int(batch["skipped"])
            labels = batch["label"].to(device)
            if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
                raise hvp_run.HVPError(f"split {cfg.train_split!r} has a label outside 0..{num_classes - 1}")
            with accelerator.autocast():
                loss = F.cross_entropy(model(batch["image"].to(device, non_blocking=True)), labels)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach().float())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1].item():.3f}")
        model.eval()
        logits, test_labels, test_skipped = hvp_run.extract_features(model, test_loader, accelerator, f"eval {cfg.test_split}")
        common.check_labels(test_labels, cfg.test_split)
        top1, top5 = (v.item() for v in common.accuracy(logits[None], test_labels))
        train_loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
        skipped = int(accelerator.reduce(torch.tensor([skipped], device=device), reduction="sum").item())
        history.append({"epoch": epoch + 1, "top1": top1, "top5": top5, "train_loss": train_loss,
                        "skipped_images": skipped})
        if is_main:
            bar.write(f"epoch {epoch + 1}: train loss {train_loss:.4f}, top-1 {top1:.2f} %, top-5 {top5:.2f} %"
                      + (f" ({skipped} undecodable train images replaced)" if skipped else ""))
    bar.close()
    batches.close()  # ends its loader workers

    best = max(history, key=lambda h: h["top1"])
    result = {
        "backbone": cfg.backbone, "random_init": cfg.random_init, "dataset": cfg.dataset, "image_size": size,
        "num_classes": num_classes, "train_samples": count, "test_samples": len(test_labels),
        "skipped_images": {"train": max(h["skipped_images"] for h in history), "test": test_skipped},
        "best_top1": best["top1"], "best_top5": best["top5"], "best_epoch": best["epoch"],
        "final_top1": history[-1]["top1"], "final_top5": history[-1]["top5"], "epochs": history,
        "seconds": time.perf_counter() - start_time, "processes": world, "config": asdict(cfg),
    }
    if is_main:
        print(f"fine-tune {cfg.backbone} on {Path(cfg.dataset).name or cfg.dataset} [{cfg.test_split}]: best top-1 "
              f"{best['top1']:.2f} % (epoch {best['epoch']}), last epoch top-1 {history[-1]['top1']:.2f} %, "
              f"top-5 {history[-1]['top5']:.2f} % | {common.skipped_text(result['skipped_images'])} | "
              f"{result['seconds']:.0f} s", flush=True)
    if is_main and cfg.save_model:
        trained = accelerator.unwrap_model(model)
        small_stem = bool(getattr(trained, "hvp_small_stem", False))
        data_config = {"input_size": (3, size, size), "interpolation": "bicubic", "crop_pct": 0.875, "mean": mean,
                       "std": std}  # what the evaluation above used (hvp_run.eval_loader)

        def card(repo):
            return model_card(repo, cfg, result, config, small_stem, model_dir.name)
        save_model(trained, model_dir, label_names, data_config, card(repo_id), cfg.hub_license)
        result["model_dir"] = str(model_dir)
        how = f"load_model('{model_dir}')" if small_stem else f"timm.create_model('local-dir:{model_dir}', pretrained=True)"
        print(f"fine-tuned model saved to {model_dir} ({how})", flush=True)
        if repo_id:
            result["hub_model_id"], result["pushed_to_hub"] = push_model(
                model_dir, repo_id, cfg.hub_private, lambda repo: (model_dir / "README.md").write_text(card(repo)))
    return result


def _classes(source):
    count = count_classes(source)
    return count, class_names(source, count)


def main():
    cfg, notes = parse_args()
    given_dataset = cfg.dataset
    cfg = resolve_config(cfg)
    if not cfg.backbone:
        raise hvp_run.HVPError("give --backbone <training output | checkpoint | export folder | hf-hub:id>")
    accelerator = common.make_accelerator(cfg.mixed_precision)
    if accelerator.is_main_process:
        for note in notes:  # hvp_run.parse_config words its preset note for the shipped dataset, its only use there
            if given_dataset != hvp_run.DEFAULT_DATASET:
                note = note.replace("preset for the shipped dataset", f"preset for {given_dataset}")
            print(note, flush=True)
    result = run(cfg, accelerator)
    if accelerator.is_main_process:
        common.write_result(default_paths(cfg)[0], result)
    accelerator.end_training()
    if result.get("pushed_to_hub") is False:  # the user asked for the Hub: a script or scheduler must see it failed
        raise hvp_run.HVPError(f"the fine-tuned model is saved in {result['model_dir']} but did not reach the Hub "
                               f"(see above); {hub.upload_later(result['hub_model_id'], result['model_dir'])}")


if __name__ == "__main__":
    hvp_run.run_main(main)
