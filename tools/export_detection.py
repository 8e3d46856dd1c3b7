"""Convert an HVP backbone into the files detectron2, ViTDet, MMDetection and MMSegmentation load.

The backbone comes from anything hvp_run.load_backbone takes (training output folder, checkpoint
folder, export folder, hf-hub:<id>). Exports hold the backbone alone: for DINO and iBOT that is the
teacher, for SimSiam and SimCLR the encoder (no projector, no head), so there is nothing to select.

    python tools/export_detection.py --backbone outputs/simsiam --format detectron2   # ResNet -> .pkl + .yaml
    python tools/export_detection.py --backbone outputs/simsiam --format mmdet        # ResNet -> .pth + .py
    python tools/export_detection.py --backbone outputs/dino --format vitdet          # ViT -> .pkl + .py
    python tools/export_detection.py --backbone hf-hub:<org>/<repo> --format mmseg    # ViT or ResNet -> .pth + .py

Formats (each a renaming of the timm weights, values untouched; every weight of the backbone gets a
name, or nothing is written):
  detectron2  standard-stem ResNet-18/34/50/101/152 in detectron2's ResNet names (stem.conv1.norm.*,
              res2.0.shortcut.*, ...), pickled as {"model": {name: numpy array}, "__author__": "HVP",
              "matching_heuristics": True}: DetectionCheckpointer then matches the names as suffixes,
              so they land under backbone.bottom_up.* (FPN) or backbone.* / roi_heads.res5.* (C4).
              Next to it a YAML with the settings the weights need (RGB, pixel mean/std in 0-255,
              STRIDE_IN_1X1 False, SyncBN, FREEZE_AT 0).
  vitdet      ViT in the names of detectron2's ViTDet ViT (projects/ViTDet, detectron2.modeling.ViT), with
              the full module path backbone.net.* of its Mask R-CNN configs ("matching_heuristics": False:
              an exact load). cls_token and the final norm are kept: ViTDet has neither and lists them as
              unused (its pos_embed keeps the class position and drops it at run time).
  mmdet       standard-stem ResNet in torchvision names (conv1, bn1, layer1.0.conv1, ... downsample.1):
              MMDetection's and MMSegmentation's ResNet (style="pytorch") use them; {"state_dict": ...}
              torch file for init_cfg=dict(type="Pretrained", checkpoint=...). Next to it a config snippet.
  mmseg       ViT in MMSegmentation's VisionTransformer names (the renaming of its
              tools/model_converters/vit2mmseg.py: layers.N.ln1, attn.attn.in_proj_weight,
              ffn.layers.0.0, ...); ResNets as for mmdet. {"state_dict": ...} torch file + config snippet.

What cannot be exported stops with a one-line error (exit status 2) before anything is written:
small-stem ResNets (no detector has their 3x3 stride-1 stem), deep-stem / avg-down / grouped ResNets,
ViTs with weights the target has no place for (layer scale, register tokens, q/k norm, a pre-norm,
average-pool fc_norm), anything that is neither.
"""
import argparse
import os
import pickle
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hvp_run  # noqa: E402
from eval.common import data_config, results_folder  # noqa: E402

FORMATS = ("detectron2", "vitdet", "mmdet", "mmseg")
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
RESNET_DEPTHS = {("BasicBlock", (2, 2, 2, 2)): 18, ("BasicBlock", (3, 4, 6, 3)): 34,
                 ("Bottleneck", (3, 4, 6, 3)): 50, ("Bottleneck", (3, 4, 23, 3)): 101,
                 ("Bottleneck", (3, 8, 36, 3)): 152}


# ----------------------------------------------------------------------------------- what the backbone is

def model_kind(model):
    """"resnet" or "vit" for the backbones the formats describe; a one-line error otherwise."""
    from timm.models.resnet import ResNet
    from timm.models.vision_transformer import VisionTransformer
    if isinstance(model, ResNet):
        return "resnet"
    if isinstance(model, VisionTransformer):
        return "vit"
    raise hvp_run.HVPError(f"cannot export a {type(model).__name__} for detection: only timm ResNets and "
                           "VisionTransformers have a layout in detectron2 / MMDetection / MMSegmentation")


def resnet_layout(model):
    """(depth, block type name, stride_in_1x1) of a standard-stem ResNet; a one-line error for one no
    detection library builds (the key names could still match, the network would not)."""
    from timm.models.resnet import BasicBlock, Bottleneck
    if getattr(model, "hvp_small_stem", False):
        raise hvp_run.HVPError("a small-stem ResNet (3x3 stride-1 stem, no max-pool) has no detectron2 / "
                               "MMDetection counterpart: detectors need the standard 7x7 stride-2 stem")
    conv1 = model.conv1
    if not (isinstance(conv1, nn.Conv2d) and conv1.kernel_size == (7, 7) and conv1.stride == (2, 2)
            and isinstance(model.maxpool, nn.MaxPool2d)):
        raise hvp_run.HVPError("only ResNets with the standard stem (one 7x7 stride-2 conv + max-pool) can be "
                               "exported for detection; this one has a deep or modified stem")
    blocks = [list(getattr(model, f"layer{s}")) for s in range(1, 5)]
    kinds = {type(b) for stage in blocks for b in stage}
    if len(kinds) != 1 or not kinds <= {BasicBlock, Bottleneck}:
        raise hvp_run.HVPError(f"cannot export ResNet blocks {sorted(k.__name__ for k in kinds)} for detection")
    block = kinds.pop()
    depth = RESNET_DEPTHS.get((block.__name__, tuple(len(stage) for stage in blocks)))
    if depth is None:
        raise hvp_run.HVPError("detectron2 and MMDetection build ResNet-18/34/50/101/152 only; this one has "
                               f"{[len(stage) for stage in blocks]} blocks per stage")
    for stage in blocks:
        for b in stage:
            down = b.downsample
            if down is not None and not (isinstance(down, nn.Sequential) and len(down) == 2
                                         and isinstance(down[0], nn.Conv2d) and down[0].kernel_size == (1, 1)):
                raise hvp_run.HVPError("only ResNets with 1x1-conv shortcuts can be exported for detection "
                                       "(this one down-samples by average pooling: a ResNet-D)")
            if b.conv1.groups != 1 or (block is Bottleneck and b.conv2.groups != 1):
                raise hvp_run.HVPError("grouped (ResNeXt-style) ResNets are not supported by this export")
    width = blocks[0][0].conv1.out_channels
    if width != 64:
        raise hvp_run.HVPError(f"only standard-width ResNets can be exported (first block width 64, got {width})")
    # a Bottleneck's stride sits in its 1x1 (Caffe, old detectron) or its 3x3 conv (timm, torchvision);
    # a BasicBlock has no 1x1 conv
    stride_in_1x1 = block is Bottleneck and blocks[1][0].conv1.stride == (2, 2)
    return depth, block.__name__, stride_in_1x1


def check_vit(model):
    """A one-line error for a ViT whose computation the targets cannot reproduce even with every weight
    named (the weights they have no names for are caught by the key check in `target_names`)."""
    if getattr(model, "cls_token", None) is None or getattr(model, "pos_embed", None) is None:
        raise hvp_run.HVPError("only ViTs with a class token and learned absolute position embeddings can be "
                               "exported for detection")
    if getattr(model, "no_embed_class", False):
        raise hvp_run.HVPError("ViTs whose position embedding excludes the class token cannot be exported")
    proj = model.patch_embed.proj
    if proj.kernel_size != proj.stride:
        raise hvp_run.HVPError("only ViTs with non-overlapping patches can be exported")
    if not all(isinstance(block.mlp.act, nn.GELU) for block in model.blocks):
        raise hvp_run.HVPError("only ViTs with GELU MLPs can be exported (the targets build GELU)")


# ----------------------------------------------------------------------------------- key maps

def resnet_names(model, target):
    """{timm name: target name} for every weight a standard ResNet can have (a BatchNorm's five
    tensors, num_batches_tracked included, so the map covers the whole state dict)."""
    d2 = target == "detectron2"
    names = {"conv1.weight": "stem.conv1.weight" if d2 else "conv1.weight"}
    names.update({f"bn1.{p}": f"stem.conv1.norm.{p}" if d2 else f"bn1.{p}" for p in BN})
    for s in range(1, 5):
        for b, block in enumerate(getattr(model, f"layer{s}")):
            src = f"layer{s}.{b}."
            dst = f"res{s + 1}.{b}." if d2 else src  # detectron2 counts stages from the stem (res1)
            for c in range(1, 4 if hasattr(block, "conv3") else 3):
                names[f"{src}conv{c}.weight"] = f"{dst}conv{c}.weight"
                names.update({f"{src}bn{c}.{p}": f"{dst}conv{c}.norm.{p}" if d2 else f"{dst}bn{c}.{p}" for p in BN})
            if block.downsample is not None:
                names[f"{src}downsample.0.weight"] = f"{dst}shortcut.weight" if d2 else f"{dst}downsample.0.weight"
                names.update({f"{src}downsample.1.{p}": f"{dst}shortcut.norm.{p}" if d2 else f"{dst}downsample.1.{p}"
                              for p in BN})
    return names


def vit_names(model, target):
    """{timm name: target name} for every weight of a plain timm ViT (qkv bias or not)."""
    if target == "vitdet":  # detectron2's ViT reuses timm's block names; ViTDet nests it at backbone.net
        return {key: f"backbone.net.{key}" for key in model.state_dict()
                if key in ("cls_token", "pos_embed", "norm.weight", "norm.bias")
                or key.startswith("patch_embed.proj.") or _is_plain_block_key(key)}
    # MMSegmentation's VisionTransformer (mmseg/models/backbones/vit.py, nn.MultiheadAttention inside)
    names = {"cls_token": "cls_token", "pos_embed": "pos_embed", "norm.weight": "ln1.weight", "norm.bias": "ln1.bias",
             "patch_embed.proj.weight": "patch_embed.projection.weight",
             "patch_embed.proj.bias": "patch_embed.projection.bias"}
    parts = {"norm1": "ln1", "norm2": "ln2", "attn.qkv.weight": "attn.attn.in_proj_weight",
             "attn.qkv.bias": "attn.attn.in_proj_bias", "attn.proj": "attn.attn.out_proj",
             "mlp.fc1": "ffn.layers.0.0", "mlp.fc2": "ffn.layers.1"}
    for i in range(len(model.blocks)):
        for src, dst in parts.items():
            if src.endswith((".weight", ".bias")):
                names[f"blocks.{i}.{src}"] = f"layers.{i}.{dst}"
            else:
                for p in ("weight", "bias"):
                    names[f"blocks.{i}.{src}.{p}"] = f"layers.{i}.{dst}.{p}"
    return names


def _is_plain_block_key(key):
    """A weight of a pre-norm block as ViTDet's Block has it: norm1, attn.qkv, attn.proj, norm2, mlp.fc1/fc2."""
    parts = key.split(".")
    return (len(parts) >= 4 and parts[0] == "blocks" and parts[1].isdigit()
            and ".".join(parts[2:-1]) in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
            and parts[-1] in ("weight", "bias"))


def target_names(model, target):
    """{timm name: target name} covering exactly the backbone's state dict: a one-line error when the
    target has no layout for the model, or no name for some of its weights (exporting would drop them)."""
    kind = model_kind(model)
    if kind == "resnet":
        if target == "vitdet":
            raise hvp_run.HVPError("--format vitdet is for ViTs; export ResNets with --format detectron2")
        resnet_layout(model)
        names = resnet_names(model, target)
    else:
        if target in ("detectron2", "mmdet"):
            raise hvp_run.HVPError(f"--format {target} is for ResNets; export ViTs with --format vitdet "
                                   "(detectron2's ViTDet) or --format mmseg (MMSegmentation's VisionTransformer)")
        check_vit(model)
        names = vit_names(model, target)
    keys = list(model.state_dict())
    unnamed = [k for k in keys if k not in names]
    if unnamed:
        shown = ", ".join(unnamed[:3]) + (f" and {len(unnamed) - 3} more" if len(unnamed) > 3 else "")
        raise hvp_run.HVPError(f"--format {target} has no place for {len(unnamed)} weight(s) of this backbone "
                               f"({shown}): exporting would silently drop them")
    return {k: names[k] for k in keys}


def to_target(state_dict, names):
    """The state dict under the target's names (values shared, not copied)."""
    return {names[k]: v for k, v in state_dict.items()}


def from_target(target_state, names):
    """The inverse: a target-named state dict (tensors or numpy arrays) back under timm's names."""
    back = {v: k for k, v in names.items()}
    return {back[k]: torch.as_tensor(v) for k, v in target_state.items()}


# ----------------------------------------------------------------------------------- files

def pixel_stats(config):
    """(mean, std) in 0-255 RGB: the backbone's own normalisation (its export's data config), scaled the
    way detectron2 and MMDetection take it."""
    _, mean, std = data_config(config)
    return [round(255 * m, 3) for m in mean], [round(255 * s, 3) for s in std]


def settings_text(target, model, config, weights_path, source):
    """The settings file written next to the weights: what a config must say for them to be used right."""
    mean, std = pixel_stats(config)
    path = str(Path(weights_path).resolve())
    head = f"HVP backbone {source} ({config.get('architecture', '?')}), written by tools/export_detection.py."
    if target == "detectron2":
        depth, block, stride_in_1x1 = resnet_layout(model)
        return "\n".join([
            f"# {head}",
            "# Merge after a model zoo config (cfg.merge_from_file(zoo_yaml); cfg.merge_from_file(this_file)), or",
            "# add `_BASE_: <path to e.g. configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml>` on top.",
            "MODEL:",
            f'  WEIGHTS: "{path}"',
            f"  PIXEL_MEAN: {mean}  # RGB, 0-255: the normalisation the backbone was trained with",
            f"  PIXEL_STD: {std}",
            "  BACKBONE:",
            "    FREEZE_AT: 0  # fine-tune every stage (MoCo's detection configs)",
            "  RESNETS:",
            f"    DEPTH: {depth}",
            f"    RES2_OUT_CHANNELS: {64 if block == 'BasicBlock' else 256}",
            f"    STRIDE_IN_1X1: {stride_in_1x1}  # timm/torchvision ResNets stride in the 3x3 conv",
            '    NORM: "SyncBN"  # SSL ResNets need BN that trains (MoCo: frozen BN hurts; its configs use naiveSyncBN)',
            "INPUT:",
            '  FORMAT: "RGB"  # detectron2 defaults to BGR: the channels would be swapped',
            "TEST:",
            "  PRECISE_BN:",
            "    ENABLED: True  # MoCo's Base-RCNN-C4-BN.yaml",
            ""])
    if target == "vitdet":
        patch = model.patch_embed.patch_size[0]
        grid = model.patch_embed.grid_size
        return "\n".join([
            f"# {head}",
            "# Lines for a ViTDet LazyConfig (detectron2 projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py style):",
            f'train.init_checkpoint = "{path}"  # exact names (backbone.net.*); cls_token and norm.* are listed as unused',
            f"model.backbone.net.embed_dim = {model.embed_dim}",
            f"model.backbone.net.depth = {len(model.blocks)}",
            f"model.backbone.net.num_heads = {model.blocks[0].attn.num_heads}",
            f"model.backbone.net.mlp_ratio = {model.blocks[0].mlp.fc1.out_features / model.embed_dim}",
            f"model.backbone.net.patch_size = {patch}",
            f"model.backbone.net.qkv_bias = {model.blocks[0].attn.qkv.bias is not None}",
            f"model.backbone.net.pretrain_img_size = {grid[0] * patch}  # the grid of the exported pos_embed "
            f"({grid[0]}x{grid[1]}); ViTDet resamples it (bicubic) to the detection grid",
            "model.backbone.net.pretrain_use_cls_token = True  # the exported pos_embed has the class position",
            "model.backbone.square_pad = 1024  # ViTDet pads to a 1024 px square",
            f"model.pixel_mean = {mean}  # RGB, 0-255",
            f"model.pixel_std = {std}",
            'model.input_format = "RGB"',
            f"model.backbone.net.norm_layer = partial(nn.LayerNorm, eps={model.blocks[0].norm1.eps})  # timm's eps",
            ""])
    resnet = model_kind(model) == "resnet"
    lines = [f"# {head}", "# Fields to merge into an MMDetection / MMSegmentation model config.",
             "model = dict(",
             f"    data_preprocessor=dict(mean={mean}, std={std}, bgr_to_rgb=True),  # RGB, 0-255 (images load as BGR)"]
    if resnet:
        depth, _, stride_in_1x1 = resnet_layout(model)
        lines += [
            "    backbone=dict(",
            f"        type='ResNet', depth={depth},",
            f"        style={'caffe' if stride_in_1x1 else 'pytorch'!r},  # where the stride is: "
            "'pytorch' = in the 3x3 conv (timm, torchvision)",
            "        frozen_stages=-1,  # fine-tune every stage (MoCo)",
            "        norm_cfg=dict(type='SyncBN', requires_grad=True), norm_eval=False,  # BN that trains (SSL ResNets)",
            f"        init_cfg=dict(type='Pretrained', checkpoint='{path}')),"]
    else:
        grid = model.patch_embed.grid_size
        lines += [
            "    backbone=dict(",
            "        type='VisionTransformer',  # MMSegmentation",
            f"        patch_size={model.patch_embed.patch_size[0]}, embed_dims={model.embed_dim}, "
            f"num_layers={len(model.blocks)}, num_heads={model.blocks[0].attn.num_heads},",
            f"        mlp_ratio={model.blocks[0].mlp.fc1.out_features / model.embed_dim}, "
            f"qkv_bias={model.blocks[0].attn.qkv.bias is not None}, with_cls_token=True,",
            f"        norm_cfg=dict(type='LN', eps={model.blocks[0].norm1.eps}),  # timm's eps, not mmcv's 1e-5",
            "        final_norm=True,  # the exported norm.* is ln1.*",
            "        interpolate_mode='bicubic',  # pos_embed "
            f"({grid[0]}x{grid[1]} patches) is resampled to img_size's grid at load",
            f"        init_cfg=dict(type='Pretrained', checkpoint='{path}')),"]
    return "\n".join(lines + [")", ""])


def suffixes(target):
    """(weights file suffix, settings file suffix)."""
    return {"detectron2": (".pkl", ".yaml"), "vitdet": (".pkl", ".py"), "mmdet": (".pth", ".py"),
            "mmseg": (".pth", ".py")}[target]


def _write_atomic(path, write):
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export(source, target, output=""):
    """Write the backbone of `source` in `target`'s format; returns (weights path, settings path).
    Everything is checked before the first file is written."""
    import numpy as np
    if target not in FORMATS:
        raise hvp_run.HVPError(f"--format must be one of {', '.join(FORMATS)}, got {target!r}")
    model, config = hvp_run.load_backbone(source)
    names = target_names(model, target)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    weights_suffix, settings_suffix = suffixes(target)
    if output:
        weights = Path(output)
    else:
        arch = str(config.get("architecture", "backbone")).replace("/", "_")
        weights = results_folder(source) / f"{target}_{arch}{weights_suffix}"
    if weights.suffix != weights_suffix:
        raise hvp_run.HVPError(f"--format {target} writes a {weights_suffix} file, --output is {str(weights)!r}")
    settings = weights.with_suffix(settings_suffix)
    text = settings_text(target, model, config, weights, source)
    weights.parent.mkdir(parents=True, exist_ok=True)
    renamed = to_target(state, names)
    if weights_suffix == ".pkl":  # detectron2's checkpointer reads a pickle of numpy arrays
        blob = {"model": {k: np.ascontiguousarray(v.numpy()) for k, v in renamed.items()}, "__author__": "HVP",
                "matching_heuristics": target == "detectron2"}  # ResNet names are suffixes of backbone.bottom_up.* etc.

        def write(path):
            with open(path, "wb") as f:
                pickle.dump(blob, f)
    else:
        def write(path):
            torch.save({"state_dict": {k: v.contiguous() for k, v in renamed.items()}}, path)
    _write_atomic(weights, write)
    _write_atomic(settings, lambda path: path.write_text(text))
    return weights, settings


def main(argv=None):
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", required=True,
                        help="training output folder, checkpoint folder, export folder or hf-hub:<id>")
    parser.add_argument("--format", required=True, choices=FORMATS, help="target library layout (see below)")
    parser.add_argument("--output", default="", help="weights file (.pkl for detectron2/vitdet, .pth for mmdet/mmseg); "
                        "default <backbone folder>/<format>_<arch>.<ext> (hf-hub:<org>/<name>: outputs/<org>--<name>/); the "
                        "settings file goes next to it")
    args = parser.parse_args(argv)
    weights, settings = export(args.backbone, args.format, args.output)
    print(f"wrote {weights} and {settings}", flush=True)


if __name__ == "__main__":
    hvp_run.run_main(main)
