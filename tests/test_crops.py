"""Device-side crops (MultiViewTransform(crops="device") + collate_views + crop_views) against the
worker-side crops (torchvision resized_crop, antialiased) on real photos; reduced-size JPEG
decoding, EXIF orientation, collate padding, and the two photometric paths.

Real photos: the 20 ImageNet JPEGs shipped in the `foolbox` wheel (requirements-nodeps.txt; read
as files with PIL, foolbox itself is never imported). 19 are 512 x 512 and one 1024 x 683, so they
are also cut and rescaled here to other sizes and aspect ratios.
"""
import importlib.metadata
import io
import os
from pathlib import Path

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps

import hvp_utils as hvp
import hvp_run

PLAIN = dict(jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)
# (height, width) of the photo variants: landscape and portrait ImageNet shapes, a square, a small
# odd-sized one (its crops are upscaled to 96 px), a wide one
SHAPES = [(375, 500), (500, 333), (256, 256), (97, 141), (180, 400)]

# Measured on these photos (|device - worker| in 0-255 units over every pixel of every view, mean
# and percentiles; CPU, torch 2.15): from full-size pixels, bilinear mean 0.28, 99.9 % 0.90,
# max 1.0; bicubic mean 0.28, 99.9 % 0.97, max 8.0 (the worker rounds and clips its intermediate
# uint8 pass, which bicubic's overshoot at sharp edges hits; crop_views stays in float). From a
# reduced-size (draft) decode at 1/2 - 1/8: mean 1.1 - 1.5, 99 % 8.0 - 9.8 (the JPEG's scaled
# decoding is an extra low-pass before the antialiasing filter). The bounds are a bit above.
FULL_BOUND = {"mean": 0.35, "p999": 1.5, "max": {"bilinear": 1.5, "bicubic": 12.0}}
DRAFT_BOUND = {"mean": 2.0, "p99": 12.0}


def photo_files():
    try:
        folder = Path(importlib.metadata.distribution("foolbox").locate_file("foolbox/data"))
    except importlib.metadata.PackageNotFoundError:
        folder = None
    files = sorted(folder.glob("imagenet_*.jpg")) if folder else []
    if not files:
        message = "the foolbox wheel's photos are missing: ./run installs requirements-nodeps.txt"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return files


def cut(image, height, width):
    """The largest centred crop of `image` with the aspect ratio height : width, resized to it."""
    w, h = image.size
    if w * height > h * width:
        cw, ch = round(h * width / height), h
    else:
        cw, ch = w, round(w * height / width)
    box = ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)
    return image.crop(box).resize((width, height), Image.LANCZOS)


def jpeg(image, quality=90, **kwargs):
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos():
    """Real photos as RGB PIL images: the originals (512 x 512 and 1024 x 683) and cut variants."""
    files = photo_files()
    out = [Image.open(f).convert("RGB") for f in files[:4] + [f for f in files if "imagenet_10_" in f.name]]
    for i, f in enumerate(files[4:14]):
        out.append(cut(Image.open(f).convert("RGB"), *SHAPES[i % len(SHAPES)]))
    return out


def differences(a, b):
    """|a - b| in 0-255 units of float [0, 1] device crops a against uint8 worker crops b."""
    return (a * 255 - b.float()).abs().flatten()


def summary(d):
    s = d.sort().values
    return {"mean": float(d.mean()), "p99": float(s[int(0.99 * (len(s) - 1))]),
            "p999": float(s[int(0.999 * (len(s) - 1))]), "max": float(s[-1])}


def device_crops(samples, name, aug):
    batch = hvp.collate_views(samples)
    return hvp.crop_views(batch["image"], batch["image_size"], batch["image_box"], batch[name + "_params"],
                          aug.size, aug.interpolation)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_device_crops_match_worker_crops_on_real_photos(photos, interpolation):
    """Full-size pixels (the images are passed decoded, so nothing is decoded at reduced size):
    the two paths compute the same filter, differing by the worker's uint8 rounding."""
    globals_ = hvp.ViewAug(size=64, scale=(0.2, 1.0), interpolation=interpolation, flip_p=0.5, **PLAIN)
    locals_ = hvp.ViewAug(size=96, scale=(0.02, 0.3), interpolation=interpolation, flip_p=0.5, **PLAIN)
    groups = {"g": [globals_] * 3, "l": [locals_] * 3}
    worker, device = hvp.MultiViewTransform(groups), hvp.MultiViewTransform(groups, crops="device")
    w = [worker(image, torch.Generator().manual_seed(i)) for i, image in enumerate(photos)]
    d = [device(image, torch.Generator().manual_seed(i)) for i, image in enumerate(photos)]
    diffs = []
    for name, aug in (("g", globals_), ("l", locals_)):
        crops = device_crops(d, name, aug)    # one batch: images of every size, padded
        assert crops.shape == (len(photos), 3, 3, aug.size, aug.size) and crops.dtype == torch.float32
        assert 0 <= crops.min() and crops.max() <= 1
        diffs.append(differences(crops, torch.stack([s[name] for s in w])))
    upscaled = sum(int((s["l_params"][:, 2] < 96).sum()) for s in d)
    assert upscaled > 0  # some crops are upscaled, not only downscaled
    got = summary(torch.cat(diffs))
    assert got["mean"] <= FULL_BOUND["mean"] and got["p999"] <= FULL_BOUND["p999"], got
    assert got["max"] <= FULL_BOUND["max"][interpolation], got


def test_both_modes_draw_identical_parameters_and_statistics(photos):
    cfg = type("Cfg", (), dict(image_size=64, local_size=32, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4),
                               global_views=4, local_views=6))
    worker = hvp.multicrop_transform(cfg)
    device = hvp.MultiViewTransform(worker.groups, crops="device")
    for i, image in enumerate(photos[:6]):
        data = jpeg(image)
        gw, gd = torch.Generator().manual_seed(i), torch.Generator().manual_seed(i)
        w, d = worker(hvp_run.open_image(data), gw), device(hvp_run.open_image(data), gd)
        assert set(d) == {"image", "image_box", "globals_params", "locals_params"}
        for name in ("globals_params", "locals_params"):
            assert torch.equal(w[name], d[name])
        assert torch.equal(gw.get_state(), gd.get_state())  # what is drawn after (iBOT masks) is the same too
        g = torch.Generator().manual_seed(i)                # = sample_view_params view after view
        h, w_ = image.size[1], image.size[0]
        for name, recipes in worker.groups.items():
            expected = torch.stack([hvp.sample_view_params(h, w_, aug, g) for aug in recipes])
            assert torch.equal(d[name + "_params"], expected)
    pair = torch.tensor([[1, 2]] * 6)
    stats = [hvp.selection_stats(torch.stack([out["globals_params"] for out in outs]), pair, torch.ones(6), torch.ones(6))
             for outs in ([worker(im, torch.Generator().manual_seed(i)) for i, im in enumerate(photos[:6])],
                          [device(im, torch.Generator().manual_seed(i)) for i, im in enumerate(photos[:6])])]
    assert stats[0] == stats[1]


def test_device_mode_returns_the_union_of_the_view_boxes(photos):
    aug = hvp.ViewAug(size=32, scale=(0.02, 0.2), **PLAIN)
    transform = hvp.MultiViewTransform({"v": [aug] * 4}, crops="device")
    for i, image in enumerate(photos[:6]):
        out = transform(image, torch.Generator().manual_seed(i))   # decoded image: full size
        p = out["v_params"]
        top, left = int(p[:, 0].min()), int(p[:, 1].min())
        bottom, right = int((p[:, 0] + p[:, 2]).max()), int((p[:, 1] + p[:, 3]).max())
        assert out["image_box"].tolist() == [top, left, bottom - top, right - left]
        assert torch.equal(out["image"], TF.pil_to_tensor(image)[:, top:bottom, left:right])


def test_draft_reduction_rule():
    def params(*sides):
        p = torch.zeros(len(sides), len(hvp.PARAM_NAMES))
        p[:, hvp.P["height"]], p[:, hvp.P["width"]] = torch.tensor(sides, dtype=torch.float).T
        return p
    assert hvp.draft_reduction(params((400, 500)), [96]) == 4          # 400 / 4 = 100 >= 96
    assert hvp.draft_reduction(params((400, 500), (200, 190)), [96, 96]) == 1  # 190 / 2 < 96
    assert hvp.draft_reduction(params((400, 500), (200, 192)), [96, 96]) == 2
    assert hvp.draft_reduction(params((900, 900)), [100]) == 8
    assert hvp.draft_reduction(params((95, 300)), [96]) == 1           # upscaled view: never reduced
    assert hvp.draft_reduction(params((400, 400), (100, 100)), [224, 24]) == 1  # per view's own size
    assert hvp.draft_reduction(params((400, 500)), [96], margin=2) == 2          # 400 / 2 >= 2 x 96
    assert hvp.draft_reduction(params((400, 500)), [96], margin=4.2) == 1


def test_draft_decoding_is_used_only_when_the_rule_allows_it(photos):
    small = hvp.ViewAug(size=24, scale=(0.2, 1.0), **PLAIN)
    big = hvp.ViewAug(size=200, scale=(0.2, 1.0), **PLAIN)
    photo = photos[4]                                                   # 1024 x 683
    for groups, margin in (({"v": [small] * 4}, 1), ({"v": [small] * 3 + [big]}, 1), ({"v": [small] * 4}, 2)):
        transform = hvp.MultiViewTransform(groups, crops="device", draft=True if margin == 1 else margin)
        sizes = [aug.size for aug in groups["v"]]
        for i in range(4):
            out = transform(hvp_run.open_image(jpeg(photo)), torch.Generator().manual_seed(i))
            s = out["image_box"][2] / out["image"].shape[1]
            assert s == out["image_box"][3] / out["image"].shape[2]
            assert s == hvp.draft_reduction(out["v_params"], sizes, margin)
            p = out["v_params"]
            assert (torch.minimum(p[:, 2], p[:, 3]) / s >= margin * torch.tensor(sizes)).all()
    out = hvp.MultiViewTransform({"v": [small] * 4}, crops="device")(hvp_run.open_image(jpeg(photo)),
                                                                     torch.Generator().manual_seed(0))
    assert out["image_box"][2] >= 4 * out["image"].shape[1]            # the rule allows it here: used
    # never for other formats, already decoded images or with draft=False
    png = io.BytesIO()
    photo.save(png, format="PNG")
    for image, draft in ((hvp_run.open_image(png.getvalue()), True), (photo, True), (hvp_run.open_image(jpeg(photo)), False)):
        out = hvp.MultiViewTransform({"v": [small] * 4}, crops="device", draft=draft)(image, torch.Generator().manual_seed(0))
        assert out["image_box"][2] == out["image"].shape[1] and out["image_box"][3] == out["image"].shape[2]


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_draft_decoded_crops_stay_within_the_bound(photos, interpolation):
    """Views made from a reduced-size decode against the worker's from the full decode."""
    aug = hvp.ViewAug(size=48, scale=(0.2, 1.0), interpolation=interpolation, flip_p=0.5, **PLAIN)
    worker = hvp.MultiViewTransform({"v": [aug] * 4})
    device = hvp.MultiViewTransform({"v": [aug] * 4}, crops="device")
    data = [jpeg(image) for image in photos if min(image.size) >= 200]
    w = [worker(hvp_run.open_image(b), torch.Generator().manual_seed(i)) for i, b in enumerate(data)]
    d = [device(hvp_run.open_image(b), torch.Generator().manual_seed(i)) for i, b in enumerate(data)]
    reduced = [float(s["image_box"][2] / s["image"].shape[1]) for s in d]
    assert max(reduced) >= 4 and min(reduced) >= 1
    got = summary(differences(device_crops(d, "v", aug), torch.stack([s["v"] for s in w])))
    assert got["mean"] <= DRAFT_BOUND["mean"] and got["p99"] <= DRAFT_BOUND["p99"], got


def with_orientation(image, orientation):
    """A JPEG showing `image` upright once its EXIF orientation tag is applied: the stored pixels
    are the inverse transposition of `image`."""
    inverse = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
               4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
               7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}[orientation]
    stored = image if inverse is None else image.transpose(inverse)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg(stored, quality=95, exif=exif.tobytes())


def test_exif_orientation_is_applied():
    # stored 80 x 40, left half red, right half blue, tagged "rotate 90 clockwise" (6):
    # shown 40 wide and 80 high, red on top
    stored = Image.new("RGB", (80, 40), (255, 0, 0))
    stored.paste((0, 0, 255), (40, 0, 80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = hvp_run.decode_image(jpeg(stored, quality=95, exif=exif.tobytes()))
    assert decoded.size == (40, 80)
    top, bottom = decoded.getpixel((20, 10)), decoded.getpixel((20, 70))
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50
    assert hvp.oriented_size(hvp_run.open_image(jpeg(stored, exif=exif.tobytes()))) == (80, 40)
    for orientation in range(1, 9):   # every tag, as PIL's own exif_transpose of the file
        data = with_orientation(stored, orientation)
        expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        assert TF.pil_to_tensor(hvp_run.decode_image(data)).equal(TF.pil_to_tensor(expected))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_device_crops_of_oriented_reduced_jpegs(photos, orientation):
    """EXIF-oriented JPEGs whose sides are not multiples of 8, decoded at reduced size: the region's
    box accounts for the orientation (axes running backwards) and the rounded-up reduced size."""
    upright = cut(photos[4], 413, 597)
    aug = hvp.ViewAug(size=40, scale=(0.2, 1.0), flip_p=0.5, **PLAIN)
    worker = hvp.MultiViewTransform({"v": [aug] * 4})
    device = hvp.MultiViewTransform({"v": [aug] * 4}, crops="device")
    data = with_orientation(upright, orientation)
    w = [worker(hvp_run.open_image(data), torch.Generator().manual_seed(i)) for i in range(3)]
    d = [device(hvp_run.open_image(data), torch.Generator().manual_seed(i)) for i in range(3)]
    assert all(s["v_params"][0, hvp.P["src_height"]] == 413 for s in d)
    assert max(float(s["image_box"][2] / s["image"].shape[1]) for s in d) >= 2
    got = summary(differences(device_crops(d, "v", aug), torch.stack([s["v"] for s in w])))
    assert got["mean"] <= DRAFT_BOUND["mean"] and got["p99"] <= DRAFT_BOUND["p99"], got


@pytest.mark.parametrize("crops", ["worker", "device"])
def test_lazily_opened_images_that_do_not_decode_give_none(photos, crops):
    assert hvp_run.open_image(b"not an image") is None and hvp_run.open_image({"bytes": None, "path": "/no/such.jpg"}) is None
    data = jpeg(photos[5])
    transform = hvp.MultiViewTransform({"v": [hvp.ViewAug(size=16)] * 2}, crops=crops)
    assert transform(hvp_run.open_image(data[: len(data) // 3]), torch.Generator().manual_seed(0)) is None  # truncated
    assert transform(hvp_run.open_image(data), torch.Generator().manual_seed(0)) is not None


def test_collate_views_pads_and_stacks():
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(1, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in ((5, 7), (9, 4), (6, 6))]
    samples = [{"image": im, "image_box": torch.tensor([0.0, 1.0, 2.0 * im.shape[1], 2.0 * im.shape[2]]),
                "v_params": torch.full((2, len(hvp.PARAM_NAMES)), float(i)), "label": i, "skipped": 0, "id": f"x{i}"}
               for i, im in enumerate(images)]
    batch = hvp.collate_views(samples)
    assert batch["image"].shape == (3, 3, 9, 7) and batch["image"].dtype == torch.uint8
    assert batch["image_size"].tolist() == [[5, 7], [9, 4], [6, 6]] and batch["image_size"].dtype == torch.int64
    for i, im in enumerate(images):
        h, w = im.shape[1:]
        assert torch.equal(batch["image"][i, :, :h, :w], im)
        assert batch["image"][i, :, h:].eq(0).all() and batch["image"][i, :, :, w:].eq(0).all()
    assert batch["image_box"].shape == (3, 4) and batch["v_params"].shape == (3, 2, len(hvp.PARAM_NAMES))
    assert torch.equal(batch["v_params"][:, 0, 0], torch.tensor([0.0, 1.0, 2.0]))
    assert batch["label"].tolist() == [0, 1, 2] and batch["skipped"].dtype == torch.int64
    assert batch["id"] == ["x0", "x1", "x2"]
    worker = hvp.collate_views([{"v": torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "label": 1}] * 2)
    assert worker["v"].shape == (2, 2, 3, 4, 4) and "image_size" not in worker
    # in a loader worker process (shared-memory buffers): the same batch
    loader = torch.utils.data.DataLoader(samples, batch_size=3, num_workers=1, collate_fn=hvp.collate_views)
    (shared,) = list(loader)
    assert shared.keys() == batch.keys()
    for key, value in batch.items():
        assert torch.equal(shared[key], value) if isinstance(value, torch.Tensor) else shared[key] == value


def test_crop_views_reads_no_padding_and_accepts_float_images(photos):
    """A view crossing the bottom-right edge of a small image in a batch padded for a larger one
    sees only the image: padding with 255 instead of 0 changes nothing."""
    aug = hvp.ViewAug(size=32, scale=(0.5, 1.0), interpolation="bicubic", **PLAIN)
    transform = hvp.MultiViewTransform({"v": [aug] * 4}, crops="device")
    samples = [transform(image, torch.Generator().manual_seed(i)) for i, image in enumerate(photos[5:8])]
    batch = hvp.collate_views(samples)
    crops = hvp.crop_views(batch["image"], batch["image_size"], batch["image_box"], batch["v_params"], 32, "bicubic")
    filled = batch["image"].clone()
    for i, (h, w) in enumerate(batch["image_size"].tolist()):
        filled[i, :, h:], filled[i, :, :, w:] = 255, 255
    torch.testing.assert_close(hvp.crop_views(filled, batch["image_size"], batch["image_box"], batch["v_params"],
                                              32, "bicubic"), crops, atol=1e-6, rtol=0)
    as_float = hvp.crop_views(batch["image"].float() / 255, batch["image_size"], batch["image_box"],
                              batch["v_params"], 32, "bicubic")
    torch.testing.assert_close(as_float, crops, atol=1e-6, rtol=0)


def test_views_from_batch_in_both_modes(photos):
    aug = hvp.ViewAug(size=48, scale=(0.2, 1.0), jitter_p=0.8, gray_p=0.2, blur_p=0.5, solarize_p=0.2)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = {}
    for crops in ("worker", "device"):
        transform = hvp.MultiViewTransform({"v": [aug] * 4}, crops=crops)
        batch = hvp.collate_views([transform(image, torch.Generator().manual_seed(i)) for i, image in enumerate(photos[:6])])
        assert transform.geometry("v") == (48, "bilinear")
        out[crops] = hvp.views_from_batch(batch, "v", 48, "bilinear", mean, std)
        assert out[crops].shape == (6, 4, 3, 48, 48) and out[crops].dtype == torch.float32
        if crops == "worker":
            expected = hvp.photometric(batch["v"], batch["v_params"], mean, std)
        else:
            expected = hvp.photometric(hvp.crop_views(batch["image"], batch["image_size"], batch["image_box"],
                                                      batch["v_params"], 48, "bilinear"), batch["v_params"], mean, std)
        torch.testing.assert_close(out[crops], expected, atol=0, rtol=0)
    # the same views, up to the crops' rounding (amplified by contrast / saturation jitter <= 1.4
    # and divided by std >= 0.2), except where solarize flips a pixel near 0.5
    close = ((out["worker"] - out["device"]).abs() <= 1.4 * 1.5 / 255 / 0.2).float().mean()
    assert close > 0.998


def test_photometric_paths_agree():
    """The sync-free path (every op on every view, torch.where) against the subset path, on CPU."""
    g = torch.Generator().manual_seed(0)
    augs = [hvp.ViewAug(size=32, jitter=(0.8, 0.8, 0.8, 0.3), jitter_p=0.8, gray_p=0.3, blur_p=0.5, blur_kernel=k,
                        solarize_p=0.3) for k in (9, 37, 45)]     # kernels 3, 5 and 7 at 32 px: mixed sizes
    params = torch.stack([torch.stack([hvp.sample_view_params(60, 50, a, g) for a in augs * 2]) for _ in range(24)])
    assert len(params[..., hvp.P["blur_kernel"]].unique()) == 4  # 0 (no blur), 3, 5, 7
    views = torch.randint(0, 256, (24, 6, 3, 32, 32), dtype=torch.uint8, generator=g)
    subsets = hvp.photometric(views, params, sync_free=False)
    masked = hvp.photometric(views, params, sync_free=True)
    torch.testing.assert_close(masked, subsets, atol=1e-5, rtol=1e-6)
    assert torch.equal(hvp.photometric(views, params), subsets)  # CPU default: the subset path
    # float input: the same as uint8 / 255, in both paths
    for sync_free in (False, True):
        torch.testing.assert_close(hvp.photometric(views.float() / 255, params, sync_free=sync_free), subsets,
                                   atol=1e-5, rtol=1e-6)
    floats = views.float() / 255
    hvp.photometric(floats, params, sync_free=False)
    assert torch.equal(floats, views.float() / 255)              # the input is not modified


def test_photometric_applied_in_a_loader_worker_equals_views_from_batch(photos):
    """collate_views(..., apply_photometric=True) in a loader worker process gives exactly the
    views the training process makes from the plain batch; views_from_batch passes them through."""
    import functools
    aug = hvp.ViewAug(size=24, scale=(0.2, 1.0), jitter_p=0.8, gray_p=0.2, blur_p=0.5, solarize_p=0.2)
    transform = hvp.MultiViewTransform({"v": [aug] * 3, "w": [hvp.ViewAug(size=12)] * 2}, crops="worker")
    samples = [transform(image, torch.Generator().manual_seed(i)) for i, image in enumerate(photos[:5])]
    plain = hvp.collate_views(samples)
    loader = torch.utils.data.DataLoader(samples, batch_size=5, num_workers=1,
                                         collate_fn=functools.partial(hvp.collate_views, apply_photometric=True))
    (finished,) = list(loader)
    for name, size in (("v", 24), ("w", 12)):
        expected = hvp.views_from_batch(plain, name, size, "bilinear")
        assert finished[name].dtype == torch.float32 and finished[name].shape == (5, len(transform.groups[name]), 3, size, size)
        torch.testing.assert_close(finished[name], expected, atol=1e-6, rtol=0)
        assert hvp.views_from_batch(finished, name, size, "bilinear") is finished[name]
        assert torch.equal(finished[name + "_params"], plain[name + "_params"])
    with pytest.raises(ValueError, match="ImageNet mean"):
        hvp.views_from_batch(finished, "v", 24, "bilinear", mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    with pytest.raises(ValueError, match="uint8"):
        hvp.collate_views([{"v": torch.zeros(2, 3, 4, 4), "v_params": torch.zeros(2, len(hvp.PARAM_NAMES))}],
                          apply_photometric=True)
