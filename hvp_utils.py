"""Hard View Pretraining (HVP), the part to copy: multi-view augmentation and hard-view selection.

HVP (Ferreira et al., "Beyond Random Augmentations: Pretraining with Hard Views", ICLR 2025) draws
more augmented views per image than the method trains on, scores every candidate pair (or multi-crop
tuple) with the method's own per-sample loss in one no-grad forward, and trains on the hardest.

The sections, in file order:
- images: `load_image` decodes a PIL image to upright RGB (EXIF orientation, 16-bit, transparency).
- views: `ViewAug` (one augmentation recipe) and `MultiViewTransform`, which draws N views per image
  with every random parameter recorded (crop box, flip, colour factors); `collate_views` batches
  them; `views_from_batch` makes the batch's views on the training device (`crop_views`, `photometric`).
- selection: `select_hard_pairs` (two-view methods: the per-sample loss of every pair -> the hardest
  pair) and `select_multicrop` (DINO-style: the (even, odd) global pair and the exact top-L locals
  from a cross-entropy table); `gather_views` takes the chosen views, `selection_stats` describes them.
- schedules, step timing and threads: `cosine`, `linear_warmup`, `clock`, `threads`.
- self-distillation (DINO, iBOT): `dino_augs`, `DINOHead`, `ema_update`, `teacher_probs`,
  `cross_entropy_table`, the centre, the optimizer groups and per-step schedules.

Use (two-view method): a Dataset returns `transform(image, generator)`, with transform =
`MultiViewTransform({"views": [ViewAug(...)] * N})`, and the DataLoader batches with
`collate_views`; each step `views = views_from_batch(batch, "views", size, interpolation)`
(B, N, 3, S, S), one no-grad forward of all B x N views, `pair, score, scores =
select_hard_pairs(outputs, pair_loss)`, `gather_views(views, pair[:, 0])` and `pair[:, 1]`, then an
ordinary training step on those two views. The README's section "Use HVP in your own training loop"
shows the whole loop, for SimSiam and for DINO's multi-crop selection.

It needs torch only (torchvision, PIL and numpy are imported inside the functions that use them)
and knows no training loop, launcher, dataset library or Hub: copy this file alone into your own
trainer. The training scripts' run machinery (data streaming, checkpoints, Hub, k-NN) is the
package `hvp_run/` beside it, which imports this file, never the other way round.

Tensor layout: batches are batch-major. `views` is (B, N, C, H, W) and `params` is (B, N, P).
Score matrices are (B, K): K candidates per sample, the first candidate wins ties.
"""
import contextlib
import dataclasses
import itertools
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------- images

_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap height and width


def image_orientation(image):
    """EXIF orientation tag of a PIL image (1..8; 1 when absent or invalid). Cheap on a lazily
    opened JPEG (the header carries it)."""
    try:
        value = int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:
        return 1
    return value if 1 <= value <= 8 else 1


def oriented_size(image):
    """(height, width) of an image as it is shown, i.e. after its EXIF orientation is applied,
    without decoding it."""
    w, h = image.size
    return (w, h) if image_orientation(image) in _TRANSPOSED else (h, w)


def load_image(image, reduce=1):
    """Decode an opened image (see open_image) to an upright RGB PIL image.

    reduce: for a not yet loaded JPEG, decode at 1/s of the stored size (PIL `draft`: libjpeg's
    DCT scaling, much cheaper than decoding everything and resizing), s the largest of 8, 4, 2, 1
    that is <= reduce; the result is ceil(W / s) x ceil(H / s) pixels, pixel j covering source
    pixels [j s, (j + 1) s). Other formats, and images already loaded, are decoded at full size.
    Then: EXIF orientation (PIL.ImageOps.exif_transpose, as the `datasets` image decoder does),
    16-bit / float grayscale rescaled to 8 bits, transparency composited onto white, any other
    mode converted to RGB.

    Returns (rgb_image, s), s the reduction actually applied, or None when the image cannot be
    decoded (truncated, corrupt, unsupported)."""
    from PIL import Image, ImageOps
    try:
        scale = 1
        if reduce > 1:
            s = next(s for s in (8, 4, 2, 1) if s <= reduce)
            w, h = image.size
            if s > 1 and w >= s and h >= s and image.draft(None, (w // s, h // s)) is not None:
                scale = s
        image.load()
        if image_orientation(image) != 1:
            image = ImageOps.exif_transpose(image)
        img = image
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit / float grayscale: rescale to 8 bits
            import numpy as np
            a = np.asarray(img, dtype=np.float32)
            a = (a - a.min()) / max(float(a.max() - a.min()), 1e-6) * 255
            img = Image.fromarray(a.astype(np.uint8), mode="L")
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return (img if img.mode == "RGB" else img.convert("RGB")), scale
    except Exception:  # truncated, corrupt, unsupported: the caller skips and counts it
        return None


# ----------------------------------------------------------------------------------- views

PARAM_NAMES = ("top", "left", "height", "width", "src_height", "src_width", "flip",
               "brightness", "contrast", "saturation", "hue", "jitter_order",
               "grayscale", "blur_sigma", "blur_kernel", "solarize")


P = {name: i for i, name in enumerate(PARAM_NAMES)}


_JITTER_ORDERS = list(itertools.permutations(range(4)))  # jitter_order indexes these (-1: no jitter)


@dataclasses.dataclass
class ViewAug:
    """One augmentation recipe. Blur kernel and sigma are given for 224 px and scale with `size`."""
    size: int = 224
    scale: tuple = (0.2, 1.0)                 # random-resized-crop area range
    ratio: tuple = (3 / 4, 4 / 3)             # random-resized-crop aspect range
    flip_p: float = 0.5
    jitter: tuple = (0.4, 0.4, 0.4, 0.1)      # brightness, contrast, saturation, hue strengths
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple = (0.1, 2.0)
    blur_kernel: int = 9
    solarize_p: float = 0.0
    interpolation: str = "bilinear"


def sample_crop(height, width, scale, ratio, u):
    """Random-resized-crop box (top, left, h, w) in source pixels: area fraction in `scale`,
    log-uniform aspect ratio in `ratio`, 10 tries, then the largest central crop in range.
    `u` yields uniform [0, 1) numbers."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * next(u))
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * next(u))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(next(u) * (height - h + 1)), int(next(u) * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_view_params(height, width, aug, g):
    """Draw every random parameter of one view (see PARAM_NAMES) from generator `g`."""
    return torch.tensor(_view_param_values(height, width, aug, g), dtype=torch.float)


def _view_param_values(height, width, aug, g):
    """sample_view_params as a list of Python numbers."""
    u = iter(torch.rand(40, generator=g).tolist())  # one generator call per view: enough for any path

    def uniform(low, high):
        return low + (high - low) * next(u)

    p = dict.fromkeys(PARAM_NAMES, 0.0)
    p["top"], p["left"], p["height"], p["width"] = sample_crop(height, width, aug.scale, aug.ratio, u)
    p["src_height"], p["src_width"] = height, width
    p["flip"] = float(next(u) < aug.flip_p)
    p["brightness"], p["contrast"], p["saturation"], p["jitter_order"] = 1.0, 1.0, 1.0, -1
    if next(u) < aug.jitter_p:
        b, c, s, h = aug.jitter
        p["brightness"], p["contrast"] = uniform(max(0, 1 - b), 1 + b), uniform(max(0, 1 - c), 1 + c)
        p["saturation"], p["hue"] = uniform(max(0, 1 - s), 1 + s), uniform(-h, h)
        p["jitter_order"] = int(next(u) * 24)
    p["grayscale"] = float(next(u) < aug.gray_p)
    if next(u) < aug.blur_p:
        rel = aug.size / 224
        p["blur_sigma"] = uniform(aug.blur_sigma[0] * rel, aug.blur_sigma[1] * rel)
        p["blur_kernel"] = max(3, int(round(aug.blur_kernel * rel)) // 2 * 2 + 1)
    p["solarize"] = float(next(u) < aug.solarize_p)
    return [p[name] for name in PARAM_NAMES]


def crop_view(image, params, aug):
    """The geometric part of a view: crop the recorded box from a uint8 (3, H, W) image, resize to
    aug.size (antialiased, on the uint8 pixels: what torchvision's resized_crop does on CPUs with
    AVX2 or AVX-512, tests/test_views.py), flip if recorded. Stays uint8 (4x less to move between
    processes). params: the view's row of recorded parameters, a tensor or a list (a list is
    faster to read)."""
    top, left, h, w = (int(v) for v in params[:4])
    view = F.interpolate(image[None, :, top:top + h, left:left + w], size=(aug.size, aug.size),
                         mode=aug.interpolation, align_corners=False, antialias=True)[0]
    return view.flip(-1) if params[P["flip"]] else view


def draft_reduction(params, sizes, margin=1.0):
    """How much smaller a JPEG may be decoded for these views: the largest s of 8, 4, 2, 1 such that
    every view's crop box, at 1/s scale, still has at least its output size on both sides
    (min(height_i, width_i) / s >= margin * size_i), so that no view is made from fewer pixels
    than it has. params (N, P) recorded view parameters, sizes: the N output sizes. margin > 1
    keeps more pixels than that (closer to the full-size crops; tests/test_crops.py)."""
    sides = torch.minimum(params[:, P["height"]], params[:, P["width"]])
    limit = float((sides / (margin * torch.tensor(sizes, dtype=sides.dtype))).min())
    return next((s for s in (8, 4, 2) if s <= limit), 1)


# EXIF orientations whose upright image runs backwards along y / x relative to the stored pixels
_REVERSED_Y, _REVERSED_X = (3, 4, 7, 8), (2, 3, 6, 7)


class MultiViewTransform:
    """N independent views per image, each from its own recipe, plus all their random parameters.

    `groups` maps an output name to a list of recipes, one per view, e.g.
    {"views": [simsiam_aug] * 4} or {"global_views": [gt1, gt2, gt1, gt2], "local_views": [local] * 8};
    the views of one group share their output size. Called as transform(image, generator): `image`
    is either a loaded RGB PIL image (decode_image) or a lazily opened one (open_image), which is
    decoded here (load_image: EXIF orientation, RGB) and, in device mode, at reduced size when the
    views allow it. Returns None when a lazily opened image cannot be decoded (skip it, as a failed
    decode_image). Every view's parameters (PARAM_NAMES: crop box in upright source pixels, flip,
    jitter, grayscale, blur, solarize) are drawn from `generator` in the same order in both modes,
    so boxes, flips and every statistic computed from them are identical for the same seed.

    crops="worker": the crops are made here (crop_view: as torchvision's resized_crop, antialiased):
        {name: (n, 3, S, S) uint8, name + "_params": (n, len(PARAM_NAMES)) float}.
    crops="device": the crops are left to the training device (views_from_batch / crop_views);
        here only the pixels they need are decoded:
        {"image": (3, h, w) uint8, "image_box": (4,) float, name + "_params": ...}.
        "image" is the region of the upright image covering the union of all view boxes;
        "image_box" = (top, left, height, width) of that region in source pixels, its h x w pixel
        grid mapped linearly onto it (pixel (i, j) covers top + i height/h ... top + (i+1) height/h).
        Reduced-size decoding rule (`draft`, JPEG only, lazily opened images only): the image is
        decoded at 1/s scale (s in 8, 4, 2, 1; h, w are then about height/s, width/s) for the
        largest s at which every view's crop box still has at least the view's output size on both
        sides (draft_reduction), so no view is made from fewer pixels than it has. The scaled
        decode is an extra low-pass: such crops differ from the full-size ones by about 1-1.5 / 255
        on average (99th percentile <= 12 / 255; tests/test_crops.py). draft=False never reduces;
        draft=m (a number >= 1) asks for m times the output size (draft_reduction's margin): at
        m = 2 the difference was 0.4 / 255 on average, 99th percentile 2.2 / 255.

    In both modes the photometric part (jitter, grayscale, blur, solarize, normalise) is applied to
    whole batches on the training device by `photometric` (views_from_batch does both steps).
    """

    def __init__(self, groups, crops="worker", draft=True):
        if crops not in ("worker", "device"):
            raise ValueError(f"crops must be 'worker' or 'device', got {crops!r}")
        self.groups, self.crops, self.draft = groups, crops, draft

    def geometry(self, name):
        """(size, interpolation) of group `name`, the arguments views_from_batch needs for it."""
        kinds = {(aug.size, aug.interpolation) for aug in self.groups[name]}
        if len(kinds) != 1:
            raise ValueError(f"views of group {name!r} differ in size or interpolation: {sorted(kinds)}")
        return kinds.pop()

    def sample_params(self, height, width, generator):
        """Every view's parameters for an upright image of height x width, drawn from `generator`
        in the order both modes use: {name: (n, len(PARAM_NAMES))}."""
        return {name: torch.tensor([_view_param_values(height, width, aug, generator) for aug in recipes],
                                   dtype=torch.float)  # = stacked sample_view_params, in one call
                for name, recipes in self.groups.items()}

    def __call__(self, image, generator):
        import torchvision.transforms.v2.functional as TF
        if self.crops == "worker":
            loaded = load_image(image)
            if loaded is None:
                return None
            src = TF.pil_to_tensor(loaded[0])
            out = {}
            for name, params in self.sample_params(src.shape[1], src.shape[2], generator).items():
                out[name] = torch.stack([crop_view(src, p, aug) for p, aug in zip(params.tolist(), self.groups[name])])
                out[name + "_params"] = params
            return out
        orientation = image_orientation(image)
        height, width = oriented_size(image)
        params = self.sample_params(height, width, generator)
        every = torch.cat(list(params.values()))
        reduce = 1
        if self.draft:
            reduce = draft_reduction(every, [aug.size for recipes in self.groups.values() for aug in recipes],
                                     1.0 if self.draft is True else float(self.draft))
        loaded = load_image(image, reduce)
        if loaded is None:
            return None
        pixels, s = loaded                       # ceil(width / s) x ceil(height / s), upright
        w, h = pixels.size
        # Upright pixel i covers source [off + i s, off + (i+1) s): off = 0, or where the upright
        # axis runs backwards over the stored one and the reduced size was rounded up, size - h s.
        off_y = height - h * s if orientation in _REVERSED_Y else 0
        off_x = width - w * s if orientation in _REVERSED_X else 0
        boxes = every[:, [P["top"], P["left"], P["height"], P["width"]]].tolist()
        top, left = min(b[0] for b in boxes), min(b[1] for b in boxes)
        bottom, right = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
        r0, r1 = max(0, math.floor((top - off_y) / s)), min(h, math.ceil((bottom - off_y) / s))
        c0, c1 = max(0, math.floor((left - off_x) / s)), min(w, math.ceil((right - off_x) / s))
        if (r0, r1, c0, c1) != (0, h, 0, w):
            pixels = pixels.crop((c0, r0, c1, r1))
        import numpy as np
        # (3, r1 - r0, c1 - c0), a view of (h, w, 3) memory (as TF.pil_to_tensor, with one copy less)
        out = {"image": torch.from_numpy(np.asarray(pixels).copy()).permute(2, 0, 1),
               "image_box": torch.tensor([off_y + r0 * s, off_x + c0 * s, (r1 - r0) * s, (c1 - c0) * s],
                                         dtype=torch.float)}
        for name, p in params.items():
            out[name + "_params"] = p
        return out


def collate_views(samples, apply_photometric=False):
    """Stack a list of MultiViewTransform outputs (plus any scalars the stream adds, e.g. "label",
    "skipped") into one batch, batch-major: tensors are stacked ((B, ...)), Python numbers become
    tensors ((B,)), anything else is kept as a list. Device-mode "image"s, whose sizes differ, are
    zero-padded at the bottom and right to the batch's largest h and w: "image" (B, 3, H, W) uint8
    (channels-last memory, as PIL decodes: 3-4x cheaper to fill than planar), plus "image_size"
    (B, 2) int64 = each image's own (h, w). Meant to run in the loader workers
    (DataLoader collate_fn): in a worker the big tensors are allocated in shared memory, so that
    handing the batch to the training process copies nothing.

    apply_photometric=True (worker-mode crops only) also finishes the views here: every group of
    uint8 crops becomes photometric(crops, params), float32 normalised with the ImageNet mean and
    std, which views_from_batch then passes through. For training on a CPU, where the loader
    workers have cores of their own and the training process does not wait for them."""
    in_worker = torch.utils.data.get_worker_info() is not None

    def empty(shape, like):
        if in_worker:  # as torch's default_collate: straight into shared memory
            try:
                storage = like._typed_storage()._new_shared(math.prod(shape), device=like.device)
                return like.new(storage).resize_(shape)
            except AttributeError:  # private API gone: one more copy
                return torch.empty(shape, dtype=like.dtype).share_memory_()
        return torch.empty(shape, dtype=like.dtype)

    batch = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        first = values[0]
        if key == "image" and isinstance(first, torch.Tensor):
            sizes = torch.tensor([v.shape[-2:] for v in values], dtype=torch.int64)
            out = empty((len(values), *sizes.max(0).values.tolist(), first.shape[0]), first)
            for o, v in zip(out, values):   # decoded pixels are (h, w, 3) in memory: row by row copies
                h, w = v.shape[1:]
                o[:h, :w] = v.permute(1, 2, 0)
                o[h:].zero_()
                o[:h, w:].zero_()
            batch[key], batch["image_size"] = out.permute(0, 3, 1, 2), sizes
        elif isinstance(first, torch.Tensor):
            batch[key] = torch.stack(values, out=empty((len(values), *first.shape), first))
        elif isinstance(first, (bool, int, float)):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    if apply_photometric:
        for key in [k for k in batch if k + "_params" in batch]:
            if batch[key].dtype != torch.uint8:
                raise ValueError(f"apply_photometric needs worker-mode uint8 crops; {key!r} is {batch[key].dtype}")
            batch[key] = photometric(batch[key], batch[key + "_params"])
    return batch


def _aa_filter(t, interpolation):
    """The resampling filters of torch's antialiased interpolate (as PIL): triangle for bilinear,
    Keys cubic with a = -0.5 for bicubic."""
    t = t.abs()
    if interpolation == "bicubic":
        a = -0.5
        near = ((a + 2) * t - (a + 3)) * t * t + 1
        far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
        return torch.where(t < 1, near, torch.where(t < 2, far, torch.zeros_like(t)))
    return (1 - t).clamp(min=0)


def _resample_weights(start, length, out_size, in_size, interpolation):
    """Dense weights (M, out_size, in_size) that resample the span [start, start + length) of an axis
    of in_size pixels (float pixel units, one span per row of start/length) to out_size pixels, as
    torch's antialiased interpolate does on that span cut out (so as torchvision's resized_crop with
    antialias=True): output pixel i is centred at start + (i + 0.5) length / out_size, the filter is
    stretched by the downscaling factor when there is one, only pixels overlapping the span are
    read, and each row is normalised to sum 1. The taps are computed in a band around each centre
    (its width bounded by the shapes alone: the span is at most in_size long), then scattered."""
    dev, dtype = start.device, start.dtype
    support = 2.0 if interpolation == "bicubic" else 1.0
    scale = length / out_size
    reach = support * scale.clamp(min=1)                                     # filter half-width, pixels
    taps = min(in_size, math.ceil(2 * support * max(in_size / out_size, 1.0)) + 2)
    centre = start[:, None] + (torch.arange(out_size, device=dev, dtype=dtype) + 0.5) * scale[:, None]  # (M, S)
    first, end = torch.floor(start + 1e-4)[:, None, None], torch.ceil(start + length - 1e-4)[:, None, None]
    pixel = torch.floor(centre - reach[:, None] - 0.5)[..., None] + torch.arange(taps, device=dev, dtype=dtype)
    w = _aa_filter((pixel + 0.5 - centre[..., None]) / scale.clamp(min=1)[:, None, None], interpolation)
    w = torch.where((pixel >= first) & (pixel < end), w, torch.zeros_like(w))
    w = w / w.sum(-1, keepdim=True).clamp(min=1e-12)
    dense = torch.zeros(*centre.shape, in_size, device=dev, dtype=dtype)
    return dense.scatter_add_(2, pixel.clamp(0, in_size - 1).long(), w)


def crop_views(images, image_size, image_box, params, size, interpolation="bilinear"):
    """Cut, resize and flip every view of a batch on the images' device, in one batched call: the
    device-side counterpart of crop_view for MultiViewTransform(crops="device") batches.

    images (B, 3, H, W) uint8 (or float in [0, 1]), zero-padded; image_size (B, 2) each image's
    own (h, w); image_box (B, 4) the (top, left, height, width) in source pixels its h x w pixels
    cover; params (B, n, P) the recorded view parameters (crop box in source pixels, flip); size,
    interpolation ("bilinear" or "bicubic"): the group's output size and resampling filter.
    Returns (B, n, 3, size, size) float32 in [0, 1], not rounded to 1/255 steps.

    Each view is resampled with the filter weights of torch's antialiased interpolate, the kernel
    torchvision's resized_crop(antialias=True) uses in the workers, computed for the view's box
    mapped into the image's pixel grid: separable, as two batched matrix products (all views of
    an image at once, horizontal pass then vertical, like the worker kernel). From full-size
    pixels this is the worker computation up to its rounding (it rounds to uint8 after each
    pass); on real photos (tests/test_crops.py) |crop_views * 255 - worker crop| is at most 0.35
    on average and 1.5 at the 99.9th percentile (measured 0.28 and 0.97), max 1.5 bilinear,
    12 bicubic (measured 1.0 and 8.0: the worker clips bicubic overshoot in its intermediate
    pass). From a draft (reduced-size) decode: mean <= 2, 99th percentile <= 12 (measured up to
    1.5 and 9.8). Cost: about 3 B n S H W multiply-adds, and (B n S (H + W) + 3 B n S H) floats
    of workspace; the host never waits for the device."""
    B, C, H, W = images.shape
    n = params.shape[1]
    dev = images.device
    p = params.to(dev, torch.float32, non_blocking=True)
    box = image_box.to(dev, torch.float32, non_blocking=True)
    hw = image_size.to(dev, torch.float32, non_blocking=True)
    sy, sx = (hw[:, 0] / box[:, 2])[:, None], (hw[:, 1] / box[:, 3])[:, None]   # pixels per source pixel
    y0, x0 = (p[..., P["top"]] - box[:, None, 0]) * sy, (p[..., P["left"]] - box[:, None, 1]) * sx
    wy = _resample_weights(y0.reshape(-1), (p[..., P["height"]] * sy).reshape(-1), size, H, interpolation)
    wx = _resample_weights(x0.reshape(-1), (p[..., P["width"]] * sx).reshape(-1), size, W, interpolation)
    wx = torch.where(p[..., P["flip"]].reshape(-1, 1, 1) > 0, wx.flip(1), wx)          # (B n, S, W)
    x = images.to(torch.float32, memory_format=torch.contiguous_format)
    if images.dtype == torch.uint8:
        x = x / 255
    rows = torch.bmm(x.reshape(B, C * H, W), wx.view(B, n * size, W).transpose(1, 2))  # (B, C H, n S)
    rows = rows.view(B, C, H, n, size).permute(0, 3, 2, 1, 4).reshape(B * n, H, C * size)
    out = torch.bmm(wy, rows).view(B, n, size, C, size).permute(0, 1, 3, 2, 4)         # (B, n, C, S, S)
    return out.contiguous().clamp_(0, 1)


def pixels_to_device(batch, device):
    """The batch with its pixels (device-mode "image", worker-mode views) moved to `device`
    (asynchronously from pinned memory); parameters and labels stay where they are."""
    moved = dict(batch)
    for key, value in batch.items():
        if torch.is_tensor(value) and value.dim() >= 4 and (value.dtype == torch.uint8 or value.is_floating_point()):
            moved[key] = value.to(device, non_blocking=True)
    return moved


def views_from_batch(batch, name, size, interpolation, mean=IMAGENET_MEAN, std=IMAGENET_STD, sync_free=None):
    """Normalised float views (B, n, 3, size, size) of group `name` on the device of the batch's
    pixels, from a batch of either mode (collate_views of MultiViewTransform outputs): worker mode
    (batch[name] holds the uint8 crops) -> photometric(batch[name], params); device mode
    (batch["image"], "image_size", "image_box") -> crop_views, then photometric. size and
    interpolation: the group's (MultiViewTransform.geometry(name)). The parameters
    batch[name + "_params"] may stay on the CPU (they usually do: photometric then reads what it
    needs from them without waiting for the device). Views the loader already finished
    (collate_views(..., apply_photometric=True): float, not uint8) are returned as they are."""
    params = batch[name + "_params"]
    if name in batch and batch[name].is_floating_point():
        if (tuple(mean), tuple(std)) != (IMAGENET_MEAN, IMAGENET_STD):
            raise ValueError(f"views {name!r} were finished in the loader with the ImageNet mean and std, not {mean}, {std}")
        return batch[name]
    if name in batch:
        return photometric(batch[name], params, mean, std, sync_free=sync_free)
    crops = crop_views(batch["image"], batch["image_size"], batch["image_box"], params, size, interpolation)
    return photometric(crops, params, mean, std, sync_free=sync_free)


def _gray(x):
    """ITU-R 601 luma, as torchvision's rgb_to_grayscale; (M, 3, H, W) -> (M, 1, H, W)."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _blend(a, b, ratio):
    return (ratio * a + (1 - ratio) * b).clamp(0, 1)


def _shift_hue(x, shift):
    """Rotate the hue of RGB images in [0, 1] by a per-sample fraction of the colour circle."""
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    delta = maxc - minc
    safe = torch.where(delta == 0, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta == 0, torch.zeros_like(h), h)
    h = ((h / 6.0) % 1.0 + shift.view(-1, 1, 1)) % 1.0
    s = torch.where(maxc == 0, torch.zeros_like(delta), delta / torch.where(maxc == 0, torch.ones_like(maxc), maxc))
    v = maxc
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    # sector i -> (r, g, b): 0 (v, t, p), 1 (q, v, p), 2 (p, v, t), 3 (p, q, v), 4 (t, p, v), 5 (v, p, q)
    r = torch.where((i == 0) | (i == 5), v, torch.where(i == 1, q, torch.where(i == 4, t, p)))
    g = torch.where((i == 1) | (i == 2), v, torch.where(i == 0, t, torch.where(i == 3, q, p)))
    b = torch.where((i == 3) | (i == 4), v, torch.where(i == 2, t, torch.where(i == 5, q, p)))
    return torch.stack((r, g, b), 1)


def _jitter_op(x, k, factor):
    """Colour-jitter operation k (0 brightness, 1 contrast, 2 saturation, 3 hue) with per-sample factors."""
    f = factor.view(-1, 1, 1, 1)
    if k == 0:
        return (x * f).clamp(0, 1)
    if k == 1:
        return _blend(x, _gray(x).mean((1, 2, 3), keepdim=True), f)
    if k == 2:
        return _blend(x, _gray(x), f)
    return _shift_hue(x, factor)


def _gaussian_blur(x, sigma, kernel):
    """Separable Gaussian blur with per-sample sigma (reflect padding, as torchvision)."""
    M, C, H, W = x.shape
    r = torch.arange(kernel, device=x.device, dtype=x.dtype) - (kernel - 1) / 2
    w = torch.exp(-0.5 * (r / sigma[:, None]) ** 2)
    w = (w / w.sum(1, keepdim=True)).repeat_interleave(C, 0)               # (M*C, k)
    pad = kernel // 2
    y = F.pad(x.reshape(1, M * C, H, W), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, w.view(M * C, 1, 1, kernel), groups=M * C)
    y = F.conv2d(y, w.view(M * C, 1, kernel, 1), groups=M * C)
    return y.view(M, C, H, W)


_CONSTANTS = {}


def _constant(values, device, dtype=torch.float32):
    """A small constant tensor on `device`, made once per device (a host-to-device copy each call
    would make the host wait for the device)."""
    key = (tuple(map(tuple, values)) if isinstance(values[0], (list, tuple)) else tuple(values), str(device), dtype)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, dtype=dtype, device=device)
    return _CONSTANTS[key]


def _blur_weights(sigma, kernel, size):
    """(M, size) Gaussian taps, each view's own `kernel` taps centred in `size` (odd) and zero
    outside, normalised; views without blur (sigma 0) get the identity tap."""
    r = torch.arange(size, device=sigma.device, dtype=sigma.dtype) - (size - 1) / 2
    blurred = sigma > 0
    w = torch.exp(-0.5 * (r / torch.where(blurred, sigma, torch.ones_like(sigma))[:, None]) ** 2)
    w = torch.where(r.abs() <= (kernel[:, None] - 1) / 2, w, torch.zeros_like(w))
    w = w / w.sum(1, keepdim=True)
    return torch.where(blurred[:, None], w, (r == 0).to(w.dtype).expand_as(w))


def _photometric_subsets(x, p):
    """Each operation on the rows that need it (index lists): least arithmetic, but finding the rows
    reads device values on the host (~21 waits per call on CUDA)."""
    order = p[:, P["jitter_order"]].long()
    if (order >= 0).any():
        perms = _constant(_JITTER_ORDERS, x.device, torch.long)[order.clamp(min=0)]
        factors = p[:, [P["brightness"], P["contrast"], P["saturation"], P["hue"]]]
        identity = _constant([1.0, 1.0, 1.0, 0.0], x.device)
        for position in range(4):
            for k in range(4):
                rows = ((order >= 0) & (perms[:, position] == k) & (factors[:, k] != identity[k])).nonzero()[:, 0]
                if k == 3 and len(rows):  # a hue shift leaves grey pixels exactly as they are: skip all-grey views
                    rows = rows[((views := x[rows]).amax(1) != views.amin(1)).flatten(1).any(1)]
                if len(rows):
                    x[rows] = _jitter_op(x[rows], k, factors[rows, k])
    rows = (p[:, P["grayscale"]] > 0).nonzero()[:, 0]
    if len(rows):
        x[rows] = _gray(x[rows]).expand(-1, 3, -1, -1)
    sigma, kernel = p[:, P["blur_sigma"]], p[:, P["blur_kernel"]].long()
    for k in kernel[sigma > 0].unique().tolist():
        rows = ((sigma > 0) & (kernel == k)).nonzero()[:, 0]
        x[rows] = _gaussian_blur(x[rows], sigma[rows], k)
    rows = (p[:, P["solarize"]] > 0).nonzero()[:, 0]
    if len(rows):
        x[rows] = torch.where(x[rows] >= 0.5, 1 - x[rows], x[rows])
    return x


def _photometric_masked(x, p, host):
    """Every operation on every row, kept where the row needs it (torch.where), fixed shapes: the
    host never waits for the device. `host`: the parameters on the CPU (or None), read only to
    skip operations no view uses and to size the blur kernel."""
    M = x.shape[0]
    use = lambda name: host is None or bool((host[:, P[name]] > 0).any())  # noqa: E731
    if host is None or bool((host[:, P["jitter_order"]] >= 0).any()):
        order = p[:, P["jitter_order"]].long()
        perms = _constant(_JITTER_ORDERS, x.device, torch.long)[order.clamp(min=0)]       # (M, 4)
        factors = p[:, P["brightness"]:P["hue"] + 1]   # (M, 4); a slice: a list index would be copied to the device
        active = (order >= 0)[:, None] & (factors != _constant([1.0, 1.0, 1.0, 0.0], x.device))
        # Hue, the costly operation, runs once on every view: the blends (brightness, contrast and
        # saturation: x blended with 0, its mean grey, its grey) that come before it in the view's
        # order run first, those after it then. A view without a hue shift has all its blends before.
        hue_at = torch.where(active[:, 3], (perms == 3).long().argmax(1), torch.full_like(order, 4))
        positions = torch.arange(4, device=x.device)

        def blends(x, before):
            for position in (range(4) if before else range(1, 4)):
                k = perms[:, position:position + 1]                                          # (M, 1)
                f, on = factors.gather(1, k)[:, 0], active.gather(1, k)[:, 0] & (k[:, 0] != 3)
                on = on & ((positions[position] < hue_at) if before else (positions[position] > hue_at))
                k = k.view(M, 1, 1, 1)
                gray = _gray(x)
                base = torch.where(k == 0, torch.zeros_like(gray),
                                   torch.where(k == 1, gray.mean((1, 2, 3), keepdim=True), gray))
                x = torch.where(on.view(M, 1, 1, 1), _blend(x, base, f.view(M, 1, 1, 1)), x)
            return x

        x = blends(x, before=True)
        if host is None or bool(((host[:, P["jitter_order"]] >= 0) & (host[:, P["hue"]] != 0)).any()):
            x = torch.where(active[:, 3].view(M, 1, 1, 1), _shift_hue(x, factors[:, 3]), x)
        x = blends(x, before=False)
    if use("grayscale"):
        x = torch.where((p[:, P["grayscale"]] > 0).view(M, 1, 1, 1), _gray(x).expand(-1, 3, -1, -1), x)
    if host is None:
        size = int(p[:, P["blur_kernel"]].max())  # the one wait of this path, when params live on the device
    else:
        size = int(host[:, P["blur_kernel"]][host[:, P["blur_sigma"]] > 0].max()) if use("blur_sigma") else 0
    if size > 0:
        _, C, H, W = x.shape
        w = _blur_weights(p[:, P["blur_sigma"]], p[:, P["blur_kernel"]], size)[:, None].expand(M, C, size)
        pad = size // 2
        y = F.pad(x.reshape(1, M * C, H, W), (pad, pad, pad, pad), mode="reflect")
        y = F.conv2d(y, w.reshape(M * C, 1, 1, size), groups=M * C)
        y = F.conv2d(y, w.reshape(M * C, 1, size, 1), groups=M * C)
        x = torch.where((p[:, P["blur_sigma"]] > 0).view(M, 1, 1, 1), y.view(M, C, H, W), x)
    if use("solarize"):
        x = torch.where((p[:, P["solarize"]] > 0).view(M, 1, 1, 1) & (x >= 0.5), 1 - x, x)
    return x


def photometric(views, params, mean=IMAGENET_MEAN, std=IMAGENET_STD, sync_free=None):
    """Apply the recorded photometric augmentations to a batch of crops, on their device: colour
    jitter (in each view's recorded random order), grayscale, Gaussian blur, solarize, then
    normalise. views (..., 3, H, W) uint8, or float in [0, 1] (crop_views; the uint8 path is
    exactly this on views / 255), params (..., P), on any device -> float32 views of the same shape.

    sync_free: True computes every operation on every view and keeps it where needed (fixed
    shapes, torch.where): the host never waits for the device, as long as `params` is on the CPU
    (where the loader leaves it; on the device, sizing the blur kernel costs one wait). False works
    on the subsets of views that need each operation: less arithmetic, but finding the subsets
    waits for the device ~21 times per call on CUDA. None (default): sync-free on accelerators,
    subsets on the CPU. Both give the same values up to float rounding."""
    shape = views.shape
    if views.dtype == torch.uint8:
        x = views.reshape(-1, *shape[-3:]).float().div_(255)
    else:
        x = views.reshape(-1, *shape[-3:]).to(torch.float32, copy=True)
    flat = params.reshape(-1, params.shape[-1])
    p = flat.to(x.device, torch.float32, non_blocking=True)
    if sync_free is None:
        sync_free = x.device.type != "cpu"
    if sync_free:
        x = _photometric_masked(x, p, flat.float() if flat.device.type == "cpu" else None)
    else:
        x = _photometric_subsets(x, p)
    x = (x - _constant(mean, x.device).view(1, 3, 1, 1)) / _constant(std, x.device).view(1, 3, 1, 1)
    return x.view(shape)


def resize_views(x, factor):
    """Downscale a (..., C, H, W) batch by `factor` for a cheaper selection forward (DESIGN.md, D6)."""
    if factor == 1:
        return x
    size = [max(1, round(s * factor)) for s in x.shape[-2:]]
    return F.interpolate(x.flatten(0, -4), size=size, mode="bilinear", antialias=True,
                         align_corners=False).unflatten(0, x.shape[:-3])


def crop_iou(params_a, params_b):
    """IoU of two sets of crop boxes in source pixels (flip ignored), shape (...)."""
    t1, l1, h1, w1 = params_a[..., :4].unbind(-1)
    t2, l2, h2, w2 = params_b[..., :4].unbind(-1)
    ih = (torch.minimum(t1 + h1, t2 + h2) - torch.maximum(t1, t2)).clamp(min=0)
    iw = (torch.minimum(l1 + w1, l2 + w2) - torch.maximum(l1, l2)).clamp(min=0)
    inter = ih * iw
    return inter / (h1 * w1 + h2 * w2 - inter)


def crop_area(params):
    """Crop area as a fraction of the source image."""
    return params[..., P["height"]] * params[..., P["width"]] / (params[..., P["src_height"]] * params[..., P["src_width"]])


# ----------------------------------------------------------------------------------- selection

def candidate_pairs(num_views, device=None):
    """All unordered view pairs (K, 2) in the reference's loop order (0,1), (0,2), ..., (N-2,N-1)."""
    return torch.combinations(torch.arange(num_views, device=device), 2)


def pair_scores(outputs, pair_loss, pairs):
    """Score every candidate pair for every sample in one vectorised call.

    outputs: a tensor or tuple of tensors shaped (B, N, ...) (per-view model outputs).
    pair_loss(first, second): the method's per-sample loss for pairs of such outputs, given
      tensors shaped (B, K, ...); returns (B, K). Higher = harder.
    """
    def take(col):
        return tuple(t[:, pairs[:, col]] for t in outputs) if isinstance(outputs, tuple) else outputs[:, pairs[:, col]]
    return pair_loss(take(0), take(1))


def hardest(scores):
    """Per-sample argmax over candidates (B, K) -> (index (B,), score (B,)). The first candidate
    reaching the maximum wins ties (as the reference's running strict-improvement loop); a NaN
    score wins like the reference's running max does."""
    index = scores.argmax(dim=1)
    return index, scores.gather(1, index[:, None])[:, 0]


def gather_views(views, index):
    """Pick per sample the views named by `index` with one indexed gather.
    views (B, N, ...); index (B,) -> (B, ...) or (B, S) -> (B, S, ...)."""
    rows = torch.arange(views.shape[0], device=views.device)
    return views[rows[:, None], index] if index.dim() == 2 else views[rows, index]


def select_hard_pairs(outputs, pair_loss):
    """HVP for pair methods (SimSiam, SimCLR). Returns (pair (B, 2) view indices with the lower
    index first, its score (B,), scores (B, K) of all candidates; column 0 is the plain pair (0, 1))."""
    first = outputs[0] if isinstance(outputs, tuple) else outputs
    pairs = candidate_pairs(first.shape[1], first.device)
    scores = pair_scores(outputs, pair_loss, pairs)
    index, best = hardest(scores)
    return pairs[index], best, scores


def global_pairs(num_globals, device=None):
    """Candidate (even, odd) global pairs in the reference order: product(evens, odds). Slot 0
    always holds an even view (global transform 1), slot 1 an odd one (transform 2)."""
    evens = torch.arange(0, num_globals, 2, device=device)
    odds = torch.arange(1, num_globals, 2, device=device)
    return torch.cartesian_prod(evens, odds).view(-1, 2)


def tuple_score(cost, g0, g1, locals_, extra=None):
    """Score of tuples (g0, g1, locals) from a cost table, per sample.
    cost (B, G, V); g0, g1 (B,) global indices; locals_ (B, L) absolute view indices (>= G)."""
    rows = torch.arange(cost.shape[0], device=cost.device)
    score = cost[rows, g0, g1] + cost[rows, g1, g0]
    if locals_.shape[1]:
        score = score + (cost[rows[:, None], g0[:, None], locals_] + cost[rows[:, None], g1[:, None], locals_]).sum(1)
    if extra is not None:
        score = score + extra[rows, g0] + extra[rows, g1]
    return score


def select_multicrop(cost, num_locals, extra=None, limit=0, generator=None):
    """HVP for multi-crop methods (DINO, iBOT): choose per sample the (even, odd, L locals) tuple
    with the highest additive score.

    cost (B, G, V): cost[b, q, v] = loss term of teacher global q against student view v, views
      ordered [G globals, L_loader locals]; extra (B, G) optional per-global term (iBOT patch loss).
    Score of (g0, g1, S) = cost[g0,g1] + cost[g1,g0] + sum_{l in S} (cost[g0,l] + cost[g1,l])
      (+ extra[g0] + extra[g1]); for DINO this is the sum of the 2(L+1) cross-entropy terms.
    Because the score is additive and |S| is fixed, the best S for a global pair is the top-L locals
    by cost[g0,l] + cost[g1,l]: exactly the exhaustive search over C(L_loader, L) subsets (DESIGN.md, D4).
    Global pairs are compared in product(evens, odds) order and local subsets in combinations order;
    the first wins ties.
    limit > 0: score only `limit` random tuples drawn with `generator`, shared by the batch.
    Returns (globals (B, 2), locals (B, L) ascending absolute indices, score (B,)).
    """
    B, G, V = cost.shape
    L_loader = V - G
    if num_locals > L_loader:
        raise ValueError(f"cannot keep {num_locals} locals out of {L_loader}")
    pairs = global_pairs(G, cost.device)
    if limit and limit < len(pairs) * math.comb(L_loader, num_locals):
        return _select_multicrop_limited(cost, num_locals, pairs, extra, limit, generator)
    g0, g1 = pairs[:, 0], pairs[:, 1]                              # (Pn,)
    pair_part = cost[:, g0, g1] + cost[:, g1, g0]                  # (B, Pn)
    if extra is not None:
        pair_part = pair_part + extra[:, g0] + extra[:, g1]
    local_w = cost[:, g0, G:] + cost[:, g1, G:]                    # (B, Pn, L_loader)
    # a stable sort, not topk: among equal locals the lower index wins, as in the exhaustive search
    top_w, top_i = (t[..., :num_locals] for t in local_w.sort(dim=2, descending=True, stable=True))
    k, best = hardest(pair_part + top_w.sum(2))
    rows = torch.arange(B, device=cost.device)
    locals_ = top_i[rows, k].sort(dim=1).values + G
    return pairs[k], locals_, best


def _select_multicrop_limited(cost, num_locals, pairs, extra, limit, generator):
    B, G, V = cost.shape
    gen_device = generator.device if generator is not None else torch.device("cpu")
    pick = torch.randint(0, len(pairs), (limit,), generator=generator, device=gen_device).to(cost.device)
    subsets = torch.rand(limit, V - G, generator=generator, device=gen_device).argsort(1)[:, :num_locals]
    subsets = subsets.sort(1).values.to(cost.device) + G            # (limit, L)
    g = pairs[pick]                                                 # (limit, 2)
    scores = torch.stack([tuple_score(cost, g[t, 0].expand(B), g[t, 1].expand(B),
                                      subsets[t].expand(B, -1), extra) for t in range(limit)], 1)
    index, best = hardest(scores)
    return g[index], subsets[index], best


def local_selection_stats(local_params, chosen_locals, num_locals):
    """Mean crop area of the kept locals (B, L indices) vs the plain first L, params (B, L_loader, P) on CPU."""
    kept = gather_views(local_params, chosen_locals.cpu())
    return {"hard_local_area": float(crop_area(kept).mean()),
            "random_local_area": float(crop_area(local_params[:, :num_locals]).mean())}


STATS_BINS = 10  # histogram bins over [0, 1] of the IoU and area distributions in selection_stats


def selection_stats(params, hard_pair, hard_score, random_score):
    """The statistics of DESIGN.md, D9 for a batch: mean score, crop IoU and crop area of the selected pair
    vs the plain pair (0, 1), plus the batch's IoU and area histograms (STATS_BINS equal bins over
    [0, 1]; area counts both crops of a pair). params (B, N, P) on CPU; hard_pair (B, 2)."""
    hard_pair = hard_pair.cpu()
    a, b = gather_views(params, hard_pair[:, 0]), gather_views(params, hard_pair[:, 1])
    iou = {"hard": crop_iou(a, b).float(), "random": crop_iou(params[:, 0], params[:, 1]).float()}
    area = {"hard": torch.cat([crop_area(a), crop_area(b)]).float(),
            "random": torch.cat([crop_area(params[:, 0]), crop_area(params[:, 1])]).float()}
    stats = {"hard_score": float(hard_score.float().mean()), "random_score": float(random_score.float().mean())}
    for kind in ("hard", "random"):
        stats[f"{kind}_iou"], stats[f"{kind}_area"] = float(iou[kind].mean()), float(area[kind].mean())
    for kind in ("hard", "random"):
        stats[f"{kind}_iou_hist"] = torch.histc(iou[kind], STATS_BINS, 0, 1).int().tolist()
        stats[f"{kind}_area_hist"] = torch.histc(area[kind], STATS_BINS, 0, 1).int().tolist()
    return stats


# ----------------------------------------------------------------------------------- schedules and step timing
# What every training script's step uses around the method: per-step schedules and the timing split.

def cosine(step, total_steps, start, end=0.0, warmup_steps=0, warmup_start=0.0):
    """Linear warm-up from warmup_start that reaches `start` at its last step (step warmup_steps - 1,
    as DINO's and iBOT's np.linspace warm-ups), then a cosine from start to end over the rest."""
    if step < warmup_steps:
        return warmup_start + (start - warmup_start) * step / max(1, warmup_steps - 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(1.0, progress)))


def linear_warmup(epoch, start, end, epochs):
    """A per-epoch linear warm-up from `start` that reaches `end` at epoch epochs - 1, then stays
    there: np.linspace(start, end, epochs)[epoch], as DINO's and iBOT's teacher temperatures (a
    1-epoch warm-up is `start` for epoch 0)."""
    if epoch >= epochs:
        return end
    return start if epochs == 1 else start + (end - start) * epoch / (epochs - 1)


@contextlib.contextmanager
def threads(count):
    """Run the block with `count` torch CPU threads, then restore the count (None or 0: unchanged).
    The training scripts run the selection forward so on a CPU with loader workers: fewer threads
    there leave the workers a core while the training step uses them all (hvp_run.torch_threads)."""
    before = torch.get_num_threads()
    if count and count != before:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def clock(enabled, device):
    """Wall clock for the timing split; synchronises the GPU only on the steps that are logged."""
    if enabled and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# ----------------------------------------------------------------------------------- self-distillation (DINO, iBOT)
# Multi-crop augmentation, the DINO head, its optimizer groups and schedules, the teacher's EMA and
# centre, and the cross-entropy table that both the DINO/iBOT loss and the hard-view selection use.

def dino_augs(cfg):
    """DINO's two global transforms and its local transform (bicubic crops, flip, colour jitter
    0.4/0.4/0.2/0.1 with p 0.8, grayscale 0.2). Global 1: always blurred. Global 2: blur 0.1,
    solarize 0.2. Local: blur 0.5. DINO blurs with PIL's GaussianBlur, whose radius is the standard
    deviation, 0.1-2 px at 224 px and 96 px alike, approximated by box blurs without a fixed
    support; here a Gaussian kernel of 13 taps (+-3 sigma at sigma 2) at both sizes. ViewAug states
    blur for 224 px and scales it with size/224, so the local blur is given as its 96 px values
    times 224/96 (and shrinks further with smaller crops, as everything else does)."""
    common = dict(flip_p=0.5, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2, interpolation="bicubic")
    global1 = ViewAug(size=cfg.image_size, scale=cfg.global_scale, blur_p=1.0, blur_kernel=13, solarize_p=0.0, **common)
    global2 = ViewAug(size=cfg.image_size, scale=cfg.global_scale, blur_p=0.1, blur_kernel=13, solarize_p=0.2, **common)
    local = ViewAug(size=cfg.local_size, scale=cfg.local_scale, blur_p=0.5, blur_sigma=(0.1 * 224 / 96, 2.0 * 224 / 96),
                    blur_kernel=round(13 * 224 / 96), **common)
    return global1, global2, local


def multicrop_transform(cfg, crops="worker"):
    """G candidate globals alternating transform 1 (even index) / 2 (odd index), then L_loader locals."""
    global1, global2, local = dino_augs(cfg)
    groups = {"globals": [global1, global2] * (cfg.global_views // 2)}
    if cfg.local_views:
        groups["locals"] = [local] * cfg.local_views
    return MultiViewTransform(groups, crops=crops)


class DINOHead(nn.Module):
    """3-layer MLP (GELU) -> bottleneck -> L2 normalisation -> weight-normalised linear layer to
    out_dim prototypes. norm_last_layer fixes the weight norm g to 1 (only directions are learnt)."""

    def __init__(self, in_dim, out_dim, hidden_dim=2048, bottleneck_dim=256, norm_last_layer=True):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, bottleneck_dim))
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        magnitude.data.fill_(1.0)
        magnitude.requires_grad = not norm_last_layer

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def adamw_param_groups(model):
    """DINO/iBOT's AdamW groups: weight decay (scheduled, group "decay") on weights, none on biases
    and normalisation parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "decay": True}, {"params": no_decay, "decay": False, "weight_decay": 0.0}]


def distillation_schedule(step, cfg, init_lr, steps_per_epoch, total_steps):
    """DINO's (and iBOT's) per-step schedules: lr warm-up over --warmup_epochs (epochs of data) then
    cosine to --min_lr; weight decay cosine from --weight_decay to --weight_decay_end; teacher EMA
    momentum cosine to 1; the head's last layer frozen for --freeze_last_layer epochs."""
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total_steps)
    return {"lr": cosine(step, total_steps, init_lr, cfg.min_lr, warmup),
            "weight_decay": cosine(step, total_steps, cfg.weight_decay, cfg.weight_decay_end),
            "momentum": cosine(step, total_steps, cfg.momentum_teacher, 1.0),
            "freeze_last_layer": step < round(cfg.freeze_last_layer * steps_per_epoch)}


def apply_schedule(optimizer, schedule):
    """Set the scheduled lr on every group and the scheduled weight decay on the "decay" group."""
    for group in optimizer.param_groups:
        group["lr"] = schedule["lr"]
        if group.get("decay"):
            group["weight_decay"] = schedule["weight_decay"]


@torch.no_grad()
def ema_update(teacher, student, momentum):
    """teacher <- momentum * teacher + (1 - momentum) * student, parameters only (buffers such as
    BatchNorm statistics are the teacher's own), matched by name: the student may have parameters
    the teacher lacks (iBOT's separate patch last layer), never the other way round."""
    student_params = dict(student.named_parameters())
    missing = [name for name, _ in teacher.named_parameters() if name not in student_params]
    if missing:
        raise ValueError(f"teacher parameters missing in the student: {missing}")
    for name, t in teacher.named_parameters():
        t.mul_(momentum).add_(student_params[name].detach(), alpha=1 - momentum)


def teacher_probs(teacher_logits, center, teacher_temp):
    """Centred, sharpened teacher distribution softmax((t - c) / tau_t)."""
    return F.softmax((teacher_logits.float() - center) / teacher_temp, dim=-1)


def cross_entropy_table(student_logits, probs, student_temp):
    """C[b, q, v] = H(teacher global q, student view v) = -sum_k probs[b,q,k] log softmax(s[b,v] / tau_s)[k].
    student_logits (B, V, K), probs (B, Q, K) -> (B, Q, V). Every DINO loss term, for every pair."""
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -torch.einsum("bqk,bvk->bqv", probs, log_p)


@torch.no_grad()
def update_center(center, teacher_sum, teacher_count, momentum, accelerator):
    """EMA of the mean teacher output over the global batch (all processes, all micro-steps)."""
    if accelerator.num_processes > 1:
        teacher_sum = accelerator.reduce(teacher_sum, reduction="sum")
        teacher_count = accelerator.reduce(teacher_count, reduction="sum")
    center.mul_(momentum).add_(teacher_sum / teacher_count, alpha=1 - momentum)


def selection_size(size, factor, patch):
    """Crop size for the reduced-resolution selection: size x factor, rounded to whole patches."""
    return max(patch, round(size * factor / patch) * patch)


def clip_each_gradient(model, max_norm, accelerator, optimizer):
    """DINO's clipping: every parameter's gradient is scaled to norm <= max_norm on its own (not one
    global norm). fp16 gradients are unscaled first."""
    if accelerator.scaler is not None:
        accelerator.unscale_gradients(optimizer)
    for p in model.parameters():
        if p.grad is not None:
            norm = p.grad.norm()
            p.grad.mul_((max_norm / (norm + 1e-6)).clamp(max=1.0))
