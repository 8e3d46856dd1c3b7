"""Multi-view augmentation: recorded parameters describe the produced views exactly."""
import io

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

import hvp_utils as hvp
import hvp_run

PLAIN = dict(jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)


def random_image(h=40, w=56, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


@pytest.mark.parametrize("flip_p", [0.0, 1.0])
def test_crop_parameters_reproduce_the_view(flip_p):
    image = random_image()
    src = TF.pil_to_tensor(image)
    aug = hvp.ViewAug(size=16, scale=(0.1, 1.0), flip_p=flip_p, **PLAIN)
    out = hvp.MultiViewTransform({"views": [aug] * 6})(image, torch.Generator().manual_seed(3))
    assert out["views"].shape == (6, 3, 16, 16) and out["views_params"].shape == (6, len(hvp.PARAM_NAMES))
    assert out["views"].dtype == torch.uint8
    for view, p in zip(out["views"], out["views_params"]):
        top, left, h, w, H, W = (int(v) for v in p[:6])
        assert (H, W) == (40, 56) and 0 <= top and top + h <= H and 0 <= left and left + w <= W
        expected = TF.resized_crop(src, top, left, h, w, [16, 16], antialias=True)
        if p[hvp.P["flip"]]:
            expected = expected.flip(-1)
        assert p[hvp.P["flip"]] == flip_p
        assert torch.equal(view, expected)


def test_crop_boxes_respect_scale_and_ratio():
    aug = hvp.ViewAug(size=8, scale=(0.3, 0.6), **PLAIN)
    out = hvp.MultiViewTransform({"views": [aug] * 64})(random_image(100, 100), torch.Generator().manual_seed(0))
    area = hvp.crop_area(out["views_params"])
    h, w = out["views_params"][:, 2], out["views_params"][:, 3]
    assert (area > 0.29).all() and (area < 0.61).all()
    assert ((w / h) > 0.74).all() and ((w / h) < 1.34).all()


def test_every_image_and_view_gets_its_own_random_parameters():
    aug = hvp.ViewAug(size=8)
    t = hvp.MultiViewTransform({"views": [aug] * 4})
    a = t(random_image(), torch.Generator().manual_seed(1))
    b = t(random_image(), torch.Generator().manual_seed(2))
    again = t(random_image(), torch.Generator().manual_seed(1))
    assert torch.equal(a["views"], again["views"]) and torch.equal(a["views_params"], again["views_params"])
    assert not torch.equal(a["views_params"], b["views_params"])
    assert len({tuple(p[:4].tolist()) for p in a["views_params"]}) == 4


def reference_photometric(view, p, mean, std):
    """One view at a time with torchvision's own functions, from the recorded parameters."""
    x = view.float() / 255
    if p[hvp.P["jitter_order"]] >= 0:
        factors = [float(p[hvp.P[n]]) for n in ("brightness", "contrast", "saturation", "hue")]
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for k in hvp._JITTER_ORDERS[int(p[hvp.P["jitter_order"]])]:
            if factors[k] != (0.0 if k == 3 else 1.0):
                x = ops[k](x, factors[k])
    if p[hvp.P["grayscale"]]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if p[hvp.P["blur_sigma"]] > 0:
        k, sigma = int(p[hvp.P["blur_kernel"]]), float(p[hvp.P["blur_sigma"]])
        x = TF.gaussian_blur(x, [k, k], [sigma, sigma])
    if p[hvp.P["solarize"]]:
        x = TF.solarize(x, 0.5)
    return TF.normalize(x, list(mean), list(std))


@pytest.mark.parametrize("size,blur_kernel", [(16, 9), (32, 23), (64, 9)])
def test_batched_photometric_equals_torchvision_view_by_view(size, blur_kernel):
    aug = hvp.ViewAug(size=size, scale=(0.1, 1.0), jitter=(0.8, 0.8, 0.8, 0.3), jitter_p=0.8, gray_p=0.3,
                      blur_p=0.5, blur_kernel=blur_kernel, solarize_p=0.3)
    t = hvp.MultiViewTransform({"views": [aug] * 4})
    batch = [t(random_image(48, 40, seed=i), torch.Generator().manual_seed(i)) for i in range(16)]
    views = torch.stack([b["views"] for b in batch])          # (16, 4, 3, S, S) uint8
    params = torch.stack([b["views_params"] for b in batch])
    for name in ("jitter_order", "grayscale", "blur_sigma", "solarize"):  # every operation is exercised
        assert (params[..., hvp.P[name]] > 0).any() and (params[..., hvp.P[name]] <= 0).any(), name
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    fast = hvp.photometric(views, params, mean, std)
    assert fast.shape == views.shape and fast.dtype == torch.float32
    for b in range(16):
        for n in range(4):
            torch.testing.assert_close(fast[b, n], reference_photometric(views[b, n], params[b, n], mean, std),
                                       atol=2e-5, rtol=1e-5)


def test_photometric_without_augmentation_is_plain_normalisation():
    views = torch.randint(0, 256, (2, 3, 3, 8, 8), dtype=torch.uint8)
    params = torch.zeros(2, 3, len(hvp.PARAM_NAMES))
    params[..., hvp.P["jitter_order"]] = -1
    out = hvp.photometric(views, params)
    expected = (views.float() / 255 - torch.tensor(hvp.IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(hvp.IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(out, expected)


def test_recorded_parameters_follow_the_recipe():
    image = random_image()
    jitter = hvp.ViewAug(size=12, jitter_p=1.0, gray_p=1.0, blur_p=1.0, solarize_p=1.0)
    p = hvp.MultiViewTransform({"v": [jitter] * 5})(image, torch.Generator().manual_seed(0))["v_params"]
    assert ((p[:, hvp.P["brightness"]] - 1).abs() <= 0.4).all() and (p[:, hvp.P["jitter_order"]] >= 0).all()
    assert (p[:, hvp.P["hue"]].abs() <= 0.1).all() and (p[:, hvp.P["grayscale"]] == 1).all()
    assert (p[:, hvp.P["blur_sigma"]] > 0).all() and (p[:, hvp.P["blur_kernel"]] == 3).all()
    assert (p[:, hvp.P["solarize"]] == 1).all()
    none = hvp.ViewAug(size=12, jitter_p=0.0, gray_p=0.0, blur_p=0.0, flip_p=0.0)
    p = hvp.MultiViewTransform({"v": [none] * 5})(image, torch.Generator().manual_seed(0))["v_params"]
    assert (p[:, hvp.P["jitter_order"]] == -1).all() and (p[:, 6:].abs().sum(1) == 3 + 1).all()


def test_groups_with_different_recipes_and_sizes():
    g1, g2 = hvp.ViewAug(size=16, blur_p=1.0), hvp.ViewAug(size=16, blur_p=0.1, solarize_p=0.2)
    local = hvp.ViewAug(size=8, scale=(0.05, 0.4))
    out = hvp.MultiViewTransform({"global_views": [g1, g2, g1, g2], "local_views": [local] * 5})(
        random_image(), torch.Generator().manual_seed(0))
    assert out["global_views"].shape == (4, 3, 16, 16) and out["local_views"].shape == (5, 3, 8, 8)
    assert hvp.photometric(out["local_views"], out["local_views_params"]).shape == (5, 3, 8, 8)
    assert (out["global_views_params"][0::2, hvp.P["blur_sigma"]] > 0).all()  # transform 1 always blurs


def test_crop_iou_on_known_boxes():
    box = lambda t, l, h, w: torch.tensor([t, l, h, w], dtype=torch.float)
    assert hvp.crop_iou(box(0, 0, 10, 10), box(0, 0, 10, 10)) == 1
    assert hvp.crop_iou(box(0, 0, 10, 10), box(10, 10, 5, 5)) == 0
    assert hvp.crop_iou(box(0, 0, 10, 10), box(0, 5, 10, 10)) == pytest.approx(50 / 150)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "1", "RGB"])
def test_every_image_mode_decodes_to_rgb(mode):
    image = random_image(20, 24).convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        image = Image.fromarray((torch.arange(20 * 24).view(20, 24) * 100).numpy().astype("uint16"))
    buf = io.BytesIO()
    image.save(buf, format="TIFF" if mode in ("CMYK", "I;16") else "PNG")
    decoded = hvp_run.decode_image({"bytes": buf.getvalue(), "path": None})
    assert decoded.mode == "RGB" and decoded.size == (24, 20)
    if mode == "I;16":  # 16-bit values are rescaled, not clipped to white
        assert decoded.getextrema()[0] == (0, 255)


def test_undecodable_image_gives_none():
    assert hvp_run.decode_image({"bytes": b"\x89PNG\r\n\x1a\nnot really", "path": None}) is None
    buf = io.BytesIO()
    random_image().save(buf, format="JPEG")
    assert hvp_run.decode_image(buf.getvalue()[: len(buf.getvalue()) // 3]) is None  # truncated JPEG


def test_resize_views_keeps_leading_dims():
    views = torch.randn(2, 4, 3, 16, 16)
    assert hvp.resize_views(views, 0.5).shape == (2, 4, 3, 8, 8)
    assert hvp.resize_views(views, 1.0) is views


def test_grey_views_skip_the_hue_shift_exactly():
    """The CPU path skips the hue shift for views whose pixels are all grey (R = G = B), where it is
    the identity; the result equals the path that shifts every view, and torchvision view by view."""
    aug = hvp.ViewAug(size=24, jitter=(0.4, 0.4, 0.4, 0.3), jitter_p=1.0, gray_p=0.3, blur_p=0.5)
    t = hvp.MultiViewTransform({"views": [aug] * 4})
    images = [random_image(40, 32, seed=i) for i in range(8)]
    images = [im.convert("L").convert("RGB") if i % 2 else im for i, im in enumerate(images)]  # grey, colour
    batch = [t(im, torch.Generator().manual_seed(i)) for i, im in enumerate(images)]
    views = torch.stack([b["views"] for b in batch])
    params = torch.stack([b["views_params"] for b in batch])
    assert (params[..., hvp.P["hue"]] != 0).all()
    grey = views[1::2].float() / 255
    assert torch.equal(hvp._shift_hue(grey.flatten(0, 1), params[1::2, :, hvp.P["hue"]].flatten()), grey.flatten(0, 1))
    cpu = hvp.photometric(views, params, sync_free=False)
    torch.testing.assert_close(cpu, hvp.photometric(views, params, sync_free=True), atol=1e-5, rtol=1e-6)
    for b in range(8):
        for n in range(4):
            expected = reference_photometric(views[b, n], params[b, n], hvp.IMAGENET_MEAN, hvp.IMAGENET_STD)
            torch.testing.assert_close(cpu[b, n], expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_crop_view_equals_torchvision_resized_crop(interpolation):
    """crop_view resizes the uint8 crop itself (one interpolate call: a third of torchvision's time
    per view); pixel for pixel it is torchvision's antialiased resized_crop, then the flip."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("torchvision resizes uint8 through float on CPUs without AVX2")
    image = TF.pil_to_tensor(random_image(40, 56, seed=3))
    aug = hvp.ViewAug(size=24, scale=(0.05, 1.0), interpolation=interpolation)
    g = torch.Generator().manual_seed(0)
    mode = TF.InterpolationMode.BICUBIC if interpolation == "bicubic" else TF.InterpolationMode.BILINEAR
    for params in [hvp.sample_view_params(40, 56, aug, g) for _ in range(64)]:
        top, left, h, w = (int(v) for v in params[:4])
        expected = TF.resized_crop(image, top, left, h, w, [24, 24], interpolation=mode, antialias=True)
        expected = expected.flip(-1) if params[hvp.P["flip"]] else expected
        assert torch.equal(hvp.crop_view(image, params, aug), expected)
        assert torch.equal(hvp.crop_view(image, params.tolist(), aug), expected)
