"""Backbones: timm model names and aliases, small-stem variants, and ViT position embeddings
resampled as DINO and iBOT do."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import HVPError


# ----------------------------------------------------------------------------------- models

ARCH_ALIASES = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224",
                "vit_base": "vit_base_patch16_224", "vit_large": "vit_large_patch16_224"}


def check_arch(arch):
    """One-line error for an --arch that timm does not know (checked before anything is written)."""
    import timm
    if not timm.is_model(ARCH_ALIASES.get(arch, arch)):
        raise HVPError(f"unknown --arch {arch!r}: not a timm model name (try resnet18, resnet50, vit_small, "
                       f"vit_base, or any name from timm.list_models())")


def is_vit_arch(arch):
    """True for a timm name (or alias) of the ViT family: what gets a patch size, a dynamic image
    size and a resampled position embedding (create_backbone)."""
    import timm
    name = ARCH_ALIASES.get(arch, arch)
    return timm.is_model(name) and timm.models.is_model_in_modules(name, ["vision_transformer", "deit", "eva", "beit"])


POS_EMBED_RESAMPLE = ("timm", "dino")


def _dino_pos_embed(self, x):
    """timm's VisionTransformer._pos_embed, with the position embedding resampled to the patch grid
    as DINO's and iBOT's interpolate_pos_encoding do: bicubic by the scale factor (new grid + 0.1) /
    old grid, without antialiasing (timm antialiases), unchanged at the grid it was made for.
    x: (B, H, W, C) patch tokens (dynamic_img_size)."""
    B, H, W, C = x.shape
    pos, skip = self.pos_embed, 0 if self.no_embed_class else self.num_prefix_tokens
    gh, gw = self.patch_embed.grid_size
    if (H, W) != (gh, gw):
        grid = pos[:, skip:].float().reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((H + 0.1) / gh, (W + 0.1) / gw), mode="bicubic", align_corners=False)
        pos = torch.cat([pos[:, :skip], grid.permute(0, 2, 3, 1).reshape(1, H * W, -1).to(pos.dtype)], dim=1)
    x = x.reshape(B, H * W, C)
    prefix = [t.expand(B, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
    if self.no_embed_class:
        x = torch.cat(prefix + [x + pos], dim=1)
    else:
        x = torch.cat(prefix + [x], dim=1) + pos
    return self.pos_drop(x)


def set_pos_embed_resample(model, how):
    """How a timm ViT resamples its position embedding for other crop sizes: "timm" (timm's
    antialiased bicubic) or "dino" (DINO's and iBOT's; see _dino_pos_embed). Parameters are unchanged."""
    import types
    if how not in POS_EMBED_RESAMPLE:
        raise HVPError(f"--pos_embed_resample must be one of {', '.join(POS_EMBED_RESAMPLE)}, got {how!r}")
    if how == "dino":
        if not (hasattr(model, "_pos_embed") and getattr(model, "pos_embed", None) is not None):
            raise HVPError("--pos_embed_resample dino needs a ViT with learned absolute position embeddings")
        model._pos_embed = types.MethodType(_dino_pos_embed, model)  # deepcopy rebinds it to the copy
    else:
        model.__dict__.pop("_pos_embed", None)
    model.hvp_pos_embed_resample = how
    return model


def create_backbone(arch, image_size=224, small_stem=False, drop_path_rate=0.0, pos_embed_resample="timm",
                    **model_args):
    """A timm backbone without classifier (num_classes=0). ViTs accept any image size
    (dynamic_img_size), so global and local crops and reduced-resolution selection share one model;
    pos_embed_resample says how their position embedding is resampled for other sizes (timm's way or
    DINO's, set_pos_embed_resample). small_stem (28-64 px inputs): ResNet-style models get a 3x3
    stride-1 first conv and no max-pool; ViTs get patch size 4 (<= 48 px) or 8."""
    import timm
    if pos_embed_resample not in POS_EMBED_RESAMPLE:
        raise HVPError(f"--pos_embed_resample must be one of {', '.join(POS_EMBED_RESAMPLE)}, got {pos_embed_resample!r}")
    check_arch(arch)
    name = ARCH_ALIASES.get(arch, arch)
    kwargs = dict(num_classes=0, **model_args)
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    is_vit = is_vit_arch(arch)
    if is_vit:
        kwargs.setdefault("img_size", image_size)
        kwargs.setdefault("dynamic_img_size", True)
        if small_stem:
            kwargs.setdefault("patch_size", 4 if image_size <= 48 else 8)
    model = timm.create_model(name, **kwargs)
    if small_stem and not is_vit:
        conv, pool = getattr(model, "conv1", None), getattr(model, "maxpool", None)
        first = conv if isinstance(conv, nn.Conv2d) else next(
            (m for m in conv.modules() if isinstance(m, nn.Conv2d)), None) if isinstance(conv, nn.Sequential) else None
        if first is None or pool is None:
            raise HVPError(f"--small_stem supports ResNet-style (conv1 + maxpool) and ViT models, not {arch!r}")
        if isinstance(conv, nn.Conv2d):  # the 7x7 stride-2 stem becomes a 3x3 stride-1 one
            model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=False)
        else:  # a deep stem (resnet*d, *t, test_resnet): its first convolution keeps its weights, at stride 1
            first.stride = (1, 1)
        model.maxpool = nn.Identity()
        model.hvp_small_stem = True
    if pos_embed_resample != "timm":
        if not is_vit:
            raise HVPError(f"--pos_embed_resample {pos_embed_resample} is for ViTs, not {arch!r}")
        set_pos_embed_resample(model, pos_embed_resample)
    return model
