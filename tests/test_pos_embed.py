"""Position embeddings of crops at other sizes (DESIGN.md, "Position embeddings of local crops").

The ViTs of hvp_run.create_backbone use timm's dynamic_img_size: for a 96 px local crop the 14 x 14 grid
of learned position embeddings (224 px, patch 16) is resampled to 6 x 6 by
timm.layers.resample_abs_pos_embed, bicubic *with antialiasing*. DINO and iBOT (interpolate_pos_encoding
in their vision_transformer.py) resample it bicubic *without* antialiasing, by the scale factor
(new grid + 0.1) / old grid. The first tests pin timm's way (the default) and the size of the
difference; the last ones specify the option that makes the ViTs resample DINO's way
(hvp_run.create_backbone(..., pos_embed_resample="dino")), which train_dino.py and train_ibot.py use
by default.
"""
import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

import hvp_run
import train_dino as td
import train_ibot as ti


def dino_interpolate(pos_embed, grid, old_grid, num_prefix=1):
    """DINO/iBOT's resampling of a (1, prefix + old grid, dim) position embedding to `grid`, written
    out: the prefix ([CLS]) entry kept, the patch grid resized by F.interpolate(mode="bicubic") with
    scale factors (grid + 0.1) / old grid (align_corners False, no antialiasing); the embedding as it is
    for the grid it was made for (DINO returns early there: with the + 0.1, interpolating would change it)."""
    if tuple(grid) == tuple(old_grid):
        return pos_embed
    prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    dim = pos_embed.shape[-1]
    patches = patches.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    scale = ((grid[0] + 0.1) / old_grid[0], (grid[1] + 0.1) / old_grid[1])
    patches = F.interpolate(patches, scale_factor=scale, mode="bicubic")
    assert tuple(patches.shape[-2:]) == tuple(grid)
    return torch.cat([prefix, patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim)], dim=1)


def used_pos_embed(vit, grid):
    """The position embedding `vit` adds to a grid of patch tokens of size `grid` ([CLS] entry first):
    its _pos_embed on all-zero tokens, less the class token."""
    with torch.no_grad():
        tokens = vit._pos_embed(torch.zeros(1, grid[0], grid[1], vit.embed_dim))
    return torch.cat([tokens[:, :1] - vit.cls_token, tokens[:, 1:]], dim=1)


def dino_forward(vit, x):
    """The pooled [CLS] output of a timm ViT with the position embedding resampled DINO's way."""
    with torch.no_grad():
        patches = vit.patch_embed(x)  # (B, H, W, C) with dynamic_img_size
        B, H, W, C = patches.shape
        tokens = torch.cat([vit.cls_token.expand(B, -1, -1), patches.reshape(B, H * W, C)], dim=1)
        tokens = tokens + dino_interpolate(vit.pos_embed, (H, W), vit.patch_embed.grid_size)
        return vit.norm(vit.blocks(vit.norm_pre(tokens)))[:, 0]


def vit_small(seed=0, **kw):
    torch.manual_seed(seed)
    return hvp_run.create_backbone("vit_small", 224, **kw).eval()


def difference(a, b):
    d = (a - b).abs()
    return d.max().item(), d.mean().item()


# ----------------------------------------------------------------------------------- timm's way (the default)

def test_our_vits_resample_with_timms_antialiased_bicubic():
    vit = vit_small()
    assert vit.dynamic_img_size and tuple(vit.patch_embed.grid_size) == (14, 14)
    for grid in ((6, 6), (7, 7), (14, 14), (6, 4)):  # locals, half-resolution globals, globals, non-square
        timm_way = resample_abs_pos_embed(vit.pos_embed, new_size=grid, old_size=(14, 14), num_prefix_tokens=1,
                                          interpolation="bicubic", antialias=True)
        torch.testing.assert_close(used_pos_embed(vit, grid), timm_way, rtol=0, atol=1e-7)
    torch.testing.assert_close(used_pos_embed(vit, (14, 14)), vit.pos_embed, rtol=0, atol=0)  # no resampling at 224 px
    # without antialiasing, timm's resampling is the newer `size=` form of DINO's (no + 0.1 in the scale)
    plain = resample_abs_pos_embed(vit.pos_embed, new_size=(6, 6), old_size=(14, 14), num_prefix_tokens=1, antialias=False)
    patches = F.interpolate(vit.pos_embed[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2), size=(6, 6), mode="bicubic")
    torch.testing.assert_close(plain[:, 1:], patches.permute(0, 2, 3, 1).reshape(1, 36, -1), rtol=0, atol=1e-7)


def test_the_difference_to_dino_at_96_px_is_what_design_md_states():
    """ViT-S/16 at its initialisation (timm's: position embedding truncated normal, std 0.02), seed 0,
    8 random 96 px inputs (N(0, 1) pixels): the numbers quoted in DESIGN.md, within loose bounds."""
    vit = vit_small()
    ours, dino = used_pos_embed(vit, (6, 6)), dino_interpolate(vit.pos_embed.detach(), (6, 6), (14, 14))
    pos_max, pos_mean = difference(ours[:, 1:], dino[:, 1:])
    assert 4e-2 < pos_max < 9e-2 and 0.8e-2 < pos_mean < 1.4e-2  # measured 6.2e-2 / 1.09e-2; |pos| averages 1.6e-2
    assert torch.equal(ours[:, :1], dino[:, :1])  # the [CLS] entry is never resampled
    x = torch.randn(8, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cls_max, cls_mean = difference(vit(x), dino_forward(vit, x))
        scale = vit(x).abs().mean().item()
    assert 5e-2 < cls_max < 1.5e-1 and 1.2e-2 < cls_mean < 2.5e-2  # measured 9.3e-2 / 1.85e-2, |CLS| averages 0.80
    assert 0.5 < scale < 1.2
    x224 = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # and none at the native size: both leave the 14 x 14 grid as it is
        torch.testing.assert_close(vit(x224), dino_forward(vit, x224))


# ----------------------------------------------------------------------------------- the "dino" option
# hvp_run.create_backbone(..., pos_embed_resample="dino") makes a timm ViT resample its position embedding
# as DINO/iBOT do; "timm" (the default) keeps timm's.

@pytest.mark.parametrize("size", [(96, 96), (112, 112), (224, 224), (96, 64)])
def test_the_dino_option_resamples_the_position_embedding_as_dino_does(size):
    dino_vit, timm_vit = vit_small(pos_embed_resample="dino"), vit_small(pos_embed_resample="timm")
    default = vit_small()
    state = dino_vit.state_dict()
    assert state.keys() == timm_vit.state_dict().keys() == default.state_dict().keys()  # no new parameters
    assert all(torch.equal(state[k], v) for k, v in default.state_dict().items())
    x = torch.randn(4, 3, *size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(dino_vit(x), dino_forward(dino_vit, x))
        torch.testing.assert_close(timm_vit(x), default(x), rtol=0, atol=0)  # "timm" is the default
        if size == (224, 224):
            torch.testing.assert_close(dino_vit(x), default(x), rtol=0, atol=0)
    grid = (size[0] // 16, size[1] // 16)
    torch.testing.assert_close(used_pos_embed(dino_vit, grid),
                               dino_interpolate(dino_vit.pos_embed.detach(), grid, (14, 14)))


def test_the_dino_option_works_for_small_stems_copies_and_gradients():
    torch.manual_seed(0)  # the CPU preset's ViT: patch 8, 32 px globals, 16 px locals (a 4 x 4 grid -> 2 x 2)
    vit = hvp_run.create_backbone("vit_tiny", 32, small_stem=True, pos_embed_resample="dino")
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(vit.eval()(x), dino_forward(vit, x))
    twin = copy.deepcopy(vit)  # a copy resamples its own position embedding, not the original's
    with torch.no_grad():
        twin.pos_embed.mul_(3)
    torch.testing.assert_close(twin(x), dino_forward(twin, x))
    assert not torch.allclose(twin(x), vit(x))
    vit.train()(x).sum().backward()  # the resampled embedding is trained through
    assert vit.pos_embed.grad is not None and vit.pos_embed.grad[:, 1:].abs().sum() > 0


def test_an_export_remembers_the_option_and_plain_timm_agrees_at_the_native_size(tmp_path):
    import timm
    vit = vit_small(pos_embed_resample="dino")
    folder = hvp_run.export_backbone(vit, tmp_path / "export", {"input_size": (3, 224, 224)}, "hvp_dino")
    loaded, _ = hvp_run.load_backbone(folder)
    by_timm = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=0).eval()
    local, native = torch.randn(2, 3, 96, 96), torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(local), dino_forward(vit, local))  # hvp's loader re-applies it
        torch.testing.assert_close(by_timm(native), vit(native))  # plain timm: the same at 224 px (no resampling)
    with pytest.raises(hvp_run.HVPError, match="pos_embed_resample"):
        hvp_run.create_backbone("vit_small", 224, pos_embed_resample="nearest")


@pytest.mark.parametrize("script", [td, ti])
def test_the_dino_and_ibot_scripts_resample_dinos_way_by_default(script):
    """DESIGN.md's decision: train_dino.py and train_ibot.py build ViTs that resample as DINO/iBOT do,
    so their local crops (a 2 x 2 grid here, from 4 x 4) get DINO's position embeddings."""
    cfg = replace(script.Config(), arch="vit_tiny", small_stem=True, patch_size=8, image_size=32)
    assert cfg.pos_embed_resample == "dino"
    torch.manual_seed(0)
    vit = script.create_backbone(cfg, 0.0).eval()
    assert vit.hvp_pos_embed_resample == "dino"
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), dino_forward(vit, x))
