"""Object detection and instance segmentation transfer: Mask R-CNN fine-tuned on a COCO-format dataset.

A pretrained backbone (training output folder, checkpoint folder, export folder or hf-hub:<id>; DINO
and iBOT exports are the teacher, SimSiam and SimCLR the encoder) is fine-tuned with torchvision's
Mask R-CNN: ResNets through an FPN over their four stages, ViTs through ViTDet's simple feature
pyramid (the last block's stride-16 map made into strides 4, 8, 16, 32 by deconvolution / pooling,
plus the FPN's max-pooled stride-64 level). A ViT's position embedding is resampled to every input's
patch grid the way its pretraining did (timm's or DINO's resampling, recorded in the export). Box AP
and mask AP on the validation set come from pycocotools' COCOeval (AP, AP50, AP75, APs, APm, APl, in
%; -1 where COCOeval has no ground truth to score) and go to a JSON file.

Defaults (--protocol auto picks by backbone; every value below is a flag):
  resnet  detectron2's 1x schedule as MoCo fine-tunes its ResNet-50 (configs/Base-RCNN-*.yaml,
          MoCo detection/configs): SGD momentum 0.9, lr 0.02 at batch 16 (scaled linearly with the global
          batch), weight decay 1e-4, 90k iterations, lr x0.1 at 60k and 80k, 1000 warm-up iterations
          (from 0.001x), shorter side 640-800 px (step 32) / longer side <= 1333 px for training, 800 px
          for testing, horizontal flip, every stage trained (FREEZE_AT 0), BatchNorm synchronised across
          processes (SyncBN: SSL ResNets need BN that trains; --norm frozen is torchvision's default).
  vit     ViTDet's ViT-B recipe (detectron2 projects/ViTDet, mask_rcnn_vitdet_b_100ep.py; iBOT's own
          MMDetection set-up is a Cascade Mask R-CNN, not reproduced): AdamW lr 1e-4 at batch 64, weight decay 0.1,
          layer-wise lr decay 0.7 (ViTDet ViT-B; 0.8 for ViT-L), drop path 0.1, 184,375 iterations (100 epochs
          of COCO at batch 64), lr x0.1 at 163,889 and 177,546, 250 warm-up iterations, 1024 px (longer side).

Where this differs from the references (DESIGN.md): torchvision's Mask R-CNN (4-conv mask head, 2-FC box
head) instead of the papers' Cascade Mask R-CNN; no large-scale jitter (ViTDet: 0.1-2.0x random resize +
1024 px crop), only flips; global attention in every ViT block (ViTDet: 14x14 windows in most blocks,
relative position biases); no weight decay on norms, biases and position embeddings (detectron2 decays
biases); no precise-BN pass before testing. AP numbers are therefore comparable between backbones run
with this script, not with the papers' tables.

    python eval/detection.py --backbone outputs/simsiam --train_images coco/train2017 \\
        --train_annotations coco/annotations/instances_train2017.json --val_images coco/val2017 \\
        --val_annotations coco/annotations/instances_val2017.json
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 eval/detection.py \\
        --backbone outputs/dino --train_images ... --val_annotations ... --batch_size 8   # ViT: 64 in total
    python eval/detection.py --backbone outputs/simsiam ... --max_iter 2 --min_size 64 --max_size 96 \\
        --test_min_size 64 --batch_size 2        # a CPU smoke run on a tiny set

Writes a JSON result (--output, default <backbone folder>/detection.json): box and mask AP, the resolved
settings and the training loss every --log_every iterations. No checkpoints are written and a run
cannot be resumed: an interrupted run starts again.
"""
import copy
import dataclasses
import json
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hvp_run  # noqa: E402
from eval import common  # noqa: E402


# ----------------------------------------------------------------------------------- config

@dataclass
class Config:
    backbone: str = ""  # training output folder, checkpoint folder, export folder (config.json + model.safetensors) or hf-hub:<id>
    train_images: str = ""  # folder of the training images (the JSON's file_name is relative to it)
    train_annotations: str = ""  # COCO instances JSON of the training images (boxes + polygon or RLE masks)
    val_images: str = ""  # folder of the validation images
    val_annotations: str = ""  # COCO instances JSON of the validation images (scored by COCOeval)
    protocol: str = "auto"  # resnet | vit | auto (by backbone): which column of defaults the 0 / -1 / "" flags take
    min_size: str = ""  # training shorter-side sizes, one drawn per image; "" = resnet 640,672,...,800 | vit 1024
    max_size: int = 0  # longer-side limit, train and test; 0 = resnet 1333 | vit 1024
    test_min_size: int = 0  # testing shorter side; 0 = resnet 800 | vit 1024
    batch_size: int = 2  # images per process per iteration (references: 16 in total for resnet, 64 for vit)
    max_iter: int = 0  # training iterations; 0 = resnet 90000 (1x) | vit 184375 (100 epochs at batch 64)
    lr: float = 0.0  # peak lr at the reference global batch (resnet 16, vit 64), scaled linearly; 0 = resnet 0.02 | vit 1e-4
    lr_steps: str = ""  # iterations where the lr drops 10x, comma-separated; "" = resnet 60000,80000 | vit 163889,177546, scaled to --max_iter
    warmup_iters: int = -1  # linear warm-up from 0.001x; -1 = resnet 1000 | vit 250
    weight_decay: float = -1.0  # -1 = resnet 1e-4 (SGD) | vit 0.1 (AdamW)
    layer_decay: float = 0.0  # ViT: lr x layer_decay^(depth + 1 - layer); 0 = 0.7 (ViTDet ViT-B; ViT-L 0.8); 1 = off
    drop_path: float = -1.0  # ViT stochastic depth, linear over the blocks; -1 = 0.1 (ViTDet ViT-B)
    norm: str = "syncbn"  # ResNet BatchNorm: syncbn (MoCo; plain BN in one process), bn, frozen (torchvision's default)
    trainable_layers: int = 5  # ResNet stages fine-tuned, from the top (5 = all, MoCo / FREEZE_AT 0; torchvision: 3)
    fpn_channels: int = 256  # channels of the feature pyramid and the heads' input
    detections_per_image: int = 100  # detections kept per test image (COCOeval scores at most 100)
    log_every: int = 20  # iterations between recorded training losses
    seed: int = 0  # model head initialisation, data order and flips
    num_workers: int = 2  # data loader workers per process
    mixed_precision: str = ""  # auto (bf16 where native, else fp32) | no | fp16 | bf16; empty = accelerate's setting
    output: str = ""  # JSON result file; default <backbone folder>/detection.json (hf-hub:<org>/<name>: outputs/<org>--<name>/)


PROTOCOLS = {
    "resnet": dict(min_size="640,672,704,736,768,800", max_size=1333, test_min_size=800, max_iter=90000, lr=0.02,
                   lr_steps="60000,80000", warmup_iters=1000, weight_decay=1e-4, layer_decay=1.0, drop_path=0.0),
    "vit": dict(min_size="1024", max_size=1024, test_min_size=1024, max_iter=184375, lr=1e-4,
                lr_steps="163889,177546", warmup_iters=250, weight_decay=0.1, layer_decay=0.7, drop_path=0.1),
}
REFERENCE_BATCH = {"resnet": 16, "vit": 64}  # the global batch the reference lr was set for
UNSET = {"min_size": "", "max_size": 0, "test_min_size": 0, "max_iter": 0, "lr": 0.0, "lr_steps": "",
         "warmup_iters": -1, "weight_decay": -1.0, "layer_decay": 0.0, "drop_path": -1.0}


def resolve_config(cfg, kind):
    """cfg with the protocol's value for every flag left unset; lr_steps of the protocol are scaled to
    --max_iter when that is given."""
    protocol = kind if cfg.protocol == "auto" else cfg.protocol
    if protocol not in PROTOCOLS:
        raise hvp_run.HVPError(f"--protocol must be auto, resnet or vit, got {cfg.protocol!r}")
    defaults = PROTOCOLS[protocol]
    values = {k: defaults[k] for k, unset in UNSET.items() if getattr(cfg, k) == unset}
    if "lr_steps" in values:
        scale = (cfg.max_iter or defaults["max_iter"]) / defaults["max_iter"]
        values["lr_steps"] = ",".join(str(round(int(s) * scale)) for s in defaults["lr_steps"].split(","))
    return dataclasses.replace(cfg, protocol=protocol, **values)


def parse_ints(text, flag):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise hvp_run.HVPError(f"--{flag} must be comma-separated integers, got {text!r}") from None
    return values


def check_config(cfg):
    if not cfg.backbone:
        raise hvp_run.HVPError("give --backbone <training output | checkpoint | export folder | hf-hub:id>")
    for flag in ("train_images", "train_annotations", "val_images", "val_annotations"):
        if not getattr(cfg, flag):
            raise hvp_run.HVPError(f"give --{flag} (a COCO-format dataset: an images folder + an instances JSON)")
        if not Path(getattr(cfg, flag)).exists():
            raise hvp_run.HVPError(f"--{flag} {getattr(cfg, flag)!r} does not exist")
    if cfg.norm not in ("syncbn", "bn", "frozen"):
        raise hvp_run.HVPError(f"--norm must be syncbn, bn or frozen, got {cfg.norm!r}")
    common.check_precision(cfg.mixed_precision)
    if (cfg.batch_size < 1 or cfg.log_every < 1 or cfg.detections_per_image < 1 or not 0 <= cfg.trainable_layers <= 5
            or cfg.fpn_channels < 8):
        raise hvp_run.HVPError("--batch_size, --log_every, --detections_per_image must be >= 1, --trainable_layers "
                               "0..5, --fpn_channels >= 8")


# ----------------------------------------------------------------------------------- data

SHAPE_CATEGORIES = [{"id": 5, "name": "square"}, {"id": 9, "name": "disc"}]  # ids not 1..K: the label map is used


def write_shapes_dataset(folder, count=8, size=64, seed=0):
    """A tiny COCO-format set to check an installation end to end (tests, bench/gpu_check.py):
    `count` images of `size` px with one red square (polygon mask) and one blue disc (RLE mask) each,
    at varying places: folder/images + folder/instances.json. Returns folder."""
    import numpy as np
    import pycocotools.mask as mask_utils
    from PIL import Image
    folder, gen = Path(folder), np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    images, annotations = [], []
    for i in range(count):
        pixels = np.full((size, size, 3), 235, np.uint8)
        x, y, s = (int(v) for v in gen.integers(2, size // 2 - 4, 3))
        s = max(s, 10)
        pixels[y:y + s, x:x + s] = (210, 30, 30)
        cx, cy, r = int(gen.integers(size // 2 + 8, size - 10)), int(gen.integers(10, size - 10)), 8
        yy, xx = np.mgrid[:size, :size]
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r).astype(np.uint8)
        pixels[disc.astype(bool)] = (30, 30, 210)
        Image.fromarray(pixels).save(folder / "images" / f"{i:03d}.png")
        images.append({"id": i + 1, "file_name": f"{i:03d}.png", "width": size, "height": size})
        annotations.append({"id": 2 * i + 1, "image_id": i + 1, "category_id": 5, "iscrowd": 0, "area": s * s,
                            "bbox": [x, y, s, s], "segmentation": [[x, y, x + s, y, x + s, y + s, x, y + s]]})
        rle = mask_utils.encode(np.asfortranarray(disc))
        annotations.append({"id": 2 * i + 2, "image_id": i + 1, "category_id": 9, "iscrowd": 0,
                            "area": float(mask_utils.area(rle)), "bbox": mask_utils.toBbox(rle).tolist(),
                            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    (folder / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": SHAPE_CATEGORIES}))
    return folder


def load_coco(annotations):
    """pycocotools' COCO index of an instances JSON, quietly (it prints), with a one-line error."""
    import contextlib
    import io
    from pycocotools.coco import COCO
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(annotations))
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        raise hvp_run.HVPError(f"cannot read COCO annotations {annotations}: {type(e).__name__}: {e}") from None


class CocoInstances(torch.utils.data.Dataset):
    """A COCO-format instances dataset as torchvision's detection models take it: (image as float RGB
    in 0-1, {"boxes" xyxy, "labels" 1..K, "masks" (N, H, W) uint8, "image_id"}). Crowd regions and boxes
    under 1 px are left out; training keeps only images with an instance (detectron2's default) and
    flips half of them horizontally."""

    def __init__(self, images, coco, train):
        self.root, self.coco, self.train = Path(images), coco, train
        self.category_ids = sorted(coco.cats)  # label i + 1 <-> category_ids[i]; 0 is the background
        self.label_of = {c: i + 1 for i, c in enumerate(self.category_ids)}
        ids = sorted(coco.imgs)
        self.ids = [i for i in ids if self.instances(i)] if train else ids

    def instances(self, image_id):
        return [a for a in self.coco.imgToAnns[image_id]
                if not a.get("iscrowd", 0) and a["bbox"][2] >= 1 and a["bbox"][3] >= 1]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        import numpy as np
        import torchvision.transforms.v2.functional as TF
        from PIL import Image
        image_id = self.ids[index]
        with Image.open(self.root / self.coco.imgs[image_id]["file_name"]) as f:
            image = TF.to_dtype(TF.pil_to_tensor(f.convert("RGB")), torch.float32, scale=True)
        anns = self.instances(image_id)
        h, w = image.shape[1:]
        boxes = torch.tensor([[x, y, x + bw, y + bh] for x, y, bw, bh in (a["bbox"] for a in anns)],
                             dtype=torch.float32).reshape(-1, 4)
        masks = torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns])) if anns else \
            torch.zeros((0, h, w), dtype=torch.uint8)
        labels = torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64)
        if self.train and torch.rand(()) < 0.5:  # the loader's seeded generator draws this
            image, masks = image.flip(-1), masks.flip(-1)
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
        return image, {"boxes": boxes, "labels": labels, "masks": masks, "image_id": image_id}


def collate(batch):
    return tuple(zip(*batch))  # images differ in size: Mask R-CNN's transform batches them itself


def make_loader(dataset, indices, batch_size, num_workers, seed, drop_last):
    return torch.utils.data.DataLoader(dataset, batch_size, sampler=indices, collate_fn=collate, drop_last=drop_last,
                                       num_workers=num_workers, generator=torch.Generator().manual_seed(seed),
                                       persistent_workers=False)


def training_batches(dataset, cfg, rank, world):
    """Endless batches of this process: every epoch a new seeded permutation split evenly over the
    processes (the same number of full batches on each)."""
    per_rank = len(dataset) // world
    if per_rank < cfg.batch_size:
        raise hvp_run.HVPError(f"{len(dataset)} training images with instances: fewer than one batch per process "
                               f"({cfg.batch_size} x {world}); lower --batch_size")
    epoch = 0
    while True:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(hvp_run.mix_seed(cfg.seed, epoch)))
        indices = order[rank::world][:per_rank].tolist()
        yield from make_loader(dataset, indices, cfg.batch_size, cfg.num_workers,
                               hvp_run.mix_seed(cfg.seed, epoch, rank), drop_last=True)
        epoch += 1


# ----------------------------------------------------------------------------------- model

def is_vit(model):
    # the simple feature pyramid needs timm's VisionTransformer itself (its patch_embed, blocks and
    # position-embedding resampling), not any model with a class token (common.is_vit)
    from timm.models.vision_transformer import VisionTransformer
    return isinstance(model, VisionTransformer)


def freeze_batchnorm(module):
    """module with every BatchNorm replaced by torchvision's FrozenBatchNorm2d holding its statistics."""
    from torchvision.ops import FrozenBatchNorm2d
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        frozen = FrozenBatchNorm2d(module.num_features, module.eps)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(frozen, name).copy_(getattr(module, name).detach())
        return frozen
    for name, child in module.named_children():
        setattr(module, name, freeze_batchnorm(child))
    return module


def resnet_fpn(backbone, cfg, world, device):
    """A timm ResNet's four stages through torchvision's FPN (+ max-pooled level): strides 4-64. Stages
    below --trainable_layers are frozen, their BatchNorm too (detectron2's FREEZE_AT)."""
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:cfg.trainable_layers]
    if cfg.trainable_layers == 5:
        trainable.append("bn1")
    for name, child in backbone.named_children():
        if name not in trainable and any(True for _ in child.parameters()):
            child.requires_grad_(False)
            setattr(backbone, name, freeze_batchnorm(child))
    if cfg.norm == "frozen":
        backbone = freeze_batchnorm(backbone)
    elif cfg.norm == "syncbn" and world > 1 and device.type == "cuda":  # SyncBN needs a GPU process group
        backbone = nn.SyncBatchNorm.convert_sync_batchnorm(backbone)
    channels = [backbone.feature_info[i]["num_chs"] for i in range(1, 5)]
    return BackboneWithFPN(backbone, {f"layer{i}": str(i - 1) for i in range(1, 5)}, channels, cfg.fpn_channels,
                           extra_blocks=LastLevelMaxPool())


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid (Li et al. 2022, Fig. 2c): the last ViT block's map at stride p
    (the patch size) becomes strides p/4 (two 2x deconvolutions), p/2 (one), p and 2p (2x max-pool),
    each projected by a 1x1 and a 3x3 convolution with channel LayerNorm; a stride-4p level is
    max-pooled from the last, as torchvision's FPN does. Keys "0"-"3", "pool" as MaskRCNN expects."""

    def __init__(self, vit, out_channels):
        from timm.layers import LayerNorm2d
        super().__init__()
        dim = vit.embed_dim
        self.vit, self.out_channels = vit, out_channels
        self.scales = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, 2), LayerNorm2d(dim // 2), nn.GELU(),
                          nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2)),
            nn.ConvTranspose2d(dim, dim // 2, 2, 2),
            nn.Identity(),
            nn.MaxPool2d(2, 2)])
        self.outputs = nn.ModuleList([
            nn.Sequential(nn.Conv2d(c, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                          nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels))
            for c in (dim // 4, dim // 2, dim, dim)])

    def forward(self, images):
        # the last block's tokens without the final norm (ViTDet's ViT has none); timm resamples the
        # position embedding to this input's grid (dynamic_img_size), as the export recorded
        x = self.vit.forward_intermediates(images, indices=1, norm=False, output_fmt="NCHW", intermediates_only=True)[0]
        features = OrderedDict((str(i), out(scale(x))) for i, (scale, out) in enumerate(zip(self.scales, self.outputs)))
        features["pool"] = F.max_pool2d(features["3"], 1, 2)
        return features


def vit_pyramid(vit, cfg):
    """A timm ViT with stochastic depth (linear over the blocks, as ViTDet) and a dynamic input size,
    under ViTDet's simple feature pyramid. Its final norm and head are unused (no gradient)."""
    from timm.layers import DropPath
    if not getattr(vit, "dynamic_img_size", False):
        raise hvp_run.HVPError("this ViT export has a fixed input size (no dynamic_img_size): detection resizes "
                               "images, so export it with hvp_run.create_backbone (dynamic_img_size=True)")
    for rate, block in zip(torch.linspace(0, cfg.drop_path, len(vit.blocks)).tolist(), vit.blocks):
        block.drop_path1 = DropPath(rate) if rate > 0 else nn.Identity()
        block.drop_path2 = DropPath(rate) if rate > 0 else nn.Identity()
    vit.norm.requires_grad_(False)  # unused: without a gradient, DDP would wait for it
    return SimpleFeaturePyramid(vit, cfg.fpn_channels)


def build_model(cfg, backbone, num_classes, mean, std, world, device):
    from torchvision.models.detection import MaskRCNN
    body = vit_pyramid(backbone, cfg) if is_vit(backbone) else resnet_fpn(backbone, cfg, world, device)
    torch.manual_seed(cfg.seed)  # the heads' initialisation
    return MaskRCNN(body, num_classes + 1, min_size=tuple(parse_ints(cfg.min_size, "min_size")),
                    max_size=cfg.max_size, image_mean=list(mean), image_std=list(std),
                    box_detections_per_img=cfg.detections_per_image)


def param_groups(model, cfg):
    """Optimizer groups: no weight decay on 1-D parameters (norms, biases) and position embeddings; ViT
    parameters get ViTDet's layer-wise lr scale layer_decay^(depth + 1 - layer), layer 0 being the
    patch / position embeddings and layer depth + 1 everything above the ViT (pyramid, heads)."""
    vit = getattr(model.backbone, "vit", None)
    depth = len(vit.blocks) if vit is not None else 0
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = depth + 1
        if vit is not None and name.startswith("backbone.vit."):
            inner = name[len("backbone.vit."):]
            if inner.startswith("blocks."):
                layer = int(inner.split(".")[1]) + 1
            elif inner.startswith(("patch_embed", "pos_embed", "cls_token", "reg_token")):
                layer = 0
        no_decay = param.ndim <= 1 or name.endswith(("pos_embed", "cls_token"))
        scale = cfg.layer_decay ** (depth + 1 - layer) if vit is not None else 1.0
        key = (scale, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "lr_scale": scale, "weight_decay": 0.0 if no_decay else cfg.weight_decay}
        groups[key]["params"].append(param)
    return list(groups.values())


def lr_at(step, cfg, peak, steps):
    """detectron2's WarmupMultiStepLR: linear warm-up from 0.001 x peak, x0.1 at each step passed."""
    warm = 1.0
    if step < cfg.warmup_iters:
        alpha = step / cfg.warmup_iters
        warm = 0.001 * (1 - alpha) + alpha
    return peak * warm * 0.1 ** sum(step >= s for s in steps)


# ----------------------------------------------------------------------------------- evaluation

def predict(model, dataset, cfg, accelerator):
    """COCO-format box and mask results of this process's share of the validation images, gathered on
    every process: (box results, mask results)."""
    import numpy as np
    import pycocotools.mask as mask_utils
    from accelerate.utils import gather_object
    indices = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    loader = make_loader(dataset, indices, cfg.batch_size, cfg.num_workers, cfg.seed, drop_last=False)
    boxes_out, masks_out = [], []
    bar = hvp_run.progress_bar(len(loader), 0, "eval", accelerator.is_main_process)
    model.eval()
    with torch.no_grad():
        for images, targets in loader:
            with accelerator.autocast():
                outputs = model([image.to(accelerator.device) for image in images])
            for target, out in zip(targets, outputs):
                keep = {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in out.items()}
                for box, score, label, mask in zip(keep["boxes"], keep["scores"], keep["labels"], keep["masks"]):
                    x0, y0, x1, y1 = box.tolist()
                    common = {"image_id": target["image_id"], "category_id": dataset.category_ids[int(label) - 1],
                              "score": float(score)}
                    boxes_out.append({**common, "bbox": [x0, y0, x1 - x0, y1 - y0]})
                    rle = mask_utils.encode(np.asfortranarray((mask[0] > 0.5).numpy().astype(np.uint8)))
                    rle["counts"] = rle["counts"].decode("ascii")  # JSON-able, as COCO's own results files
                    masks_out.append({**common, "segmentation": rle})
            bar.update(1)
    bar.close()
    gathered_boxes, gathered_masks = gather_object(boxes_out), gather_object(masks_out)
    return gathered_boxes, gathered_masks


AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_ap(coco, results, iou_type):
    """COCOeval's six AP numbers in % ({name: value}; -1 where COCOeval has nothing to score). No
    detections at all scores 0 wherever there is ground truth."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    if results:
        detections = coco.loadRes(copy.deepcopy(results))  # loadRes writes into the dicts
    else:  # loadRes cannot take an empty list
        detections = COCO()
        detections.dataset = {"images": coco.dataset["images"], "categories": coco.dataset["categories"],
                              "annotations": []}
        detections.createIndex()
    evaluator = COCOeval(coco, detections, iou_type)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return {name: float(v) * 100 if v >= 0 else -1.0 for name, v in zip(AP_NAMES, evaluator.stats[:6])}


# ----------------------------------------------------------------------------------- main

def run(cfg, accelerator):
    """The whole fine-tuning and evaluation; returns the result dict (box_ap and mask_ap on the main
    process only: COCOeval runs there on the gathered detections)."""
    check_config(cfg)
    start_time = time.perf_counter()
    is_main, device, world = accelerator.is_main_process, accelerator.device, accelerator.num_processes
    train_coco, val_coco = load_coco(cfg.train_annotations), load_coco(cfg.val_annotations)
    train_set, val_set = CocoInstances(cfg.train_images, train_coco, True), CocoInstances(cfg.val_images, val_coco, False)
    if train_set.category_ids != val_set.category_ids:
        raise hvp_run.HVPError("the training and validation JSONs list different categories")
    backbone, config = hvp_run.load_backbone(cfg.backbone)
    kind = "vit" if is_vit(backbone) else "resnet"
    if kind == "resnet" and not hasattr(backbone, "layer4"):
        raise hvp_run.HVPError(f"{cfg.backbone!r} is neither a timm ResNet nor a ViT: no detection layout for it")
    cfg = resolve_config(cfg, kind)
    steps = parse_ints(cfg.lr_steps, "lr_steps")
    if cfg.max_iter < 1 or not parse_ints(cfg.min_size, "min_size") or cfg.max_size < 1 or cfg.test_min_size < 1:
        raise hvp_run.HVPError("--max_iter, --min_size, --max_size and --test_min_size must be >= 1")
    _, mean, std = common.data_config(config)
    model = build_model(cfg, backbone, len(train_set.category_ids), mean, std, world, device)
    global_batch = cfg.batch_size * world
    peak_lr = cfg.lr * global_batch / REFERENCE_BATCH[cfg.protocol]
    groups = param_groups(model, cfg)
    optimizer = (torch.optim.AdamW(groups, lr=peak_lr, betas=(0.9, 0.999)) if cfg.protocol == "vit"
                 else torch.optim.SGD(groups, lr=peak_lr, momentum=0.9))
    model, optimizer = accelerator.prepare(model.to(device), optimizer)
    if is_main:
        print(f"detection | {cfg.backbone} ({config.get('architecture', '?')}) | {cfg.protocol} protocol | "
              f"{len(train_set)} train / {len(val_set)} val images, {len(train_set.category_ids)} categories | "
              f"{world} process(es) on {device.type} | global batch {global_batch} | "
              f"{'AdamW' if cfg.protocol == 'vit' else 'SGD'} lr {peak_lr:.3g} wd {cfg.weight_decay} "
              + (f"layer decay {cfg.layer_decay} drop path {cfg.drop_path} " if kind == "vit" else f"norm {cfg.norm} ")
              + f"| {cfg.max_iter} iterations, lr steps {steps} | train sizes {cfg.min_size} (max {cfg.max_size}), "
              f"test {cfg.test_min_size} | precision {accelerator.mixed_precision}", flush=True)

    # ----- train
    losses, window = [], []
    batches = training_batches(train_set, cfg, accelerator.process_index, world)
    bar = hvp_run.progress_bar(cfg.max_iter, 0, "detection", is_main)
    model.train()
    for step in range(cfg.max_iter):
        lr = lr_at(step, cfg, peak_lr, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        images, targets = next(batches)
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        with accelerator.autocast():
            loss_parts = model(images, targets)
            loss = sum(loss_parts.values())
        if not torch.isfinite(loss):
            raise hvp_run.HVPError(f"the training loss is {loss.item()} at iteration {step}: lower --lr")
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(loss.detach().float())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_iter:
            mean_loss = accelerator.reduce(torch.stack(window).mean(), reduction="mean").item()
            losses.append({"iteration": step + 1, "loss": mean_loss, "lr": lr})
            window = []
        bar.update(1)
        bar.set_postfix(loss=f"{window[-1].item() if window else losses[-1]['loss']:.3f}")
    bar.close()

    # ----- evaluate
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.transform.min_size = (cfg.test_min_size,)  # the testing scale (training draws from --min_size)
    box_results, mask_results = predict(model, val_set, cfg, accelerator)
    result = {"backbone": cfg.backbone, "architecture": config.get("architecture"), "protocol": cfg.protocol,
              "train_images": len(train_set), "val_images": len(val_set), "detections": len(box_results)}
    if is_main:
        result["box_ap"] = coco_ap(val_coco, box_results, "bbox")
        result["mask_ap"] = coco_ap(val_coco, mask_results, "segm")
    result.update({"losses": losses, "seconds": time.perf_counter() - start_time, "processes": world,
                   "config": dataclasses.asdict(cfg)})
    if is_main:
        print(f"detection {cfg.backbone}: box AP {result['box_ap']['AP']:.2f}, mask AP {result['mask_ap']['AP']:.2f} "
              f"({len(val_set)} val images, {cfg.max_iter} iterations, {result['seconds']:.0f} s)", flush=True)
    return result


def main():
    cfg, _ = hvp_run.parse_config(Config, description=__doc__.splitlines()[0])
    check_config(cfg)
    accelerator = common.make_accelerator(cfg.mixed_precision)
    result = run(cfg, accelerator)
    if accelerator.is_main_process:
        output = Path(cfg.output) if cfg.output else common.results_folder(cfg.backbone) / "detection.json"
        common.write_result(output, result)
        print(f"wrote {output}", flush=True)
    accelerator.end_training()


if __name__ == "__main__":
    hvp_run.run_main(main)
