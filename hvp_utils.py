"""What the HVP training scripts share: config CLI, data streaming, multi-view augmentation with
recorded crop parameters, hard-view selection, checkpoints and exports, logging, k-NN.

Hard View Pretraining (Ferreira et al., "Beyond Random Augmentations: Pretraining with Hard Views",
ICLR 2025): sample more views than the method trains on, score every candidate pair (or multi-crop
tuple) with the method's own per-sample loss in one no-grad forward, and train on the hardest.

This module knows no method by name. A training script passes in its per-sample loss and gets back
indices and gathered tensors. Copy this file and one `train_<method>.py` and you have a working
project.

Tensor layout: batches are batch-major. `views` is (B, N, C, H, W) and `params` is (B, N, P).
Score matrices are (B, K): K candidates per sample, first candidate wins ties.
"""
import argparse
import dataclasses
import hashlib
import inspect
import io
import itertools
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO_DIR = Path(__file__).resolve().parent
DEFAULT_DATASET = str(REPO_DIR / "data" / "fashion_mnist_small")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class HVPError(Exception):
    """A user-facing error: printed as one line, exit status 2, nothing half-written."""


def run_main(main):
    """Run `main()`, turning HVPError into a one-line message and exit status 2."""
    try:
        main()
    except HVPError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


# ----------------------------------------------------------------------------------- config / CLI

def _field_comments(cls):
    """The `# comment` after each dataclass field, used as its --help text."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s*(\w+)\s*:[^#]*#\s*(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2)
    return comments


def parse_config(cls, argv=None, presets=None, description=None):
    """Turn a @dataclass into a CLI (one flag per field, its comment as help).

    `presets` maps a dataset name to defaults that replace the dataclass defaults when that
    dataset is used, for the flags the user did not give. Returns (config, preset keys applied).
    """
    parser = argparse.ArgumentParser(description=description)
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        kwargs = dict(default=argparse.SUPPRESS, help=f"{comments.get(f.name, '')} (default: {f.default})")
        if isinstance(f.default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(f.default, tuple):
            kwargs.update(nargs=len(f.default), type=type(f.default[0]))
        else:
            kwargs["type"] = type(f.default) if f.default is not None else str
        parser.add_argument(f"--{f.name}", **kwargs)
    given = vars(parser.parse_args(argv))  # only the flags on the command line
    values = {f.name: f.default for f in dataclasses.fields(cls)}
    preset = (presets or {}).get(given.get("dataset", values.get("dataset")), {})
    values.update(preset)
    values.update({k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
    return cls(**values), sorted(set(preset) - set(given))


def seed_all(seed):
    """Seed python `random`, numpy and torch (decision D8)."""
    import random
    import numpy as np
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def mix_seed(*parts):
    """A 63-bit seed derived from integers; different tuples give unrelated streams."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


# ----------------------------------------------------------------------------------- data

def _load_stream(name, split):
    import datasets
    path = Path(name).expanduser()
    if path.is_file() or any(ch in name for ch in "*?["):
        # a single file or a glob: its contents are the split, whatever it is called
        builder = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}.get(path.suffix, "parquet")
        return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True)
    return datasets.load_dataset(str(path) if path.exists() else name, split=split, streaming=True)


def open_dataset(name, split, image_column="image", label_column="label"):
    """Open a dataset as a streamed `datasets.IterableDataset` with images left undecoded.

    `name` is a Hugging Face Hub dataset id, a local folder (image folder or parquet files in the
    Hub layout), a parquet file or a glob of them. Raises HVPError with one line on any problem,
    before a model is built. Returns (dataset, has_labels).
    """
    import datasets
    try:
        ds = _load_stream(name, split)
    except ValueError as e:
        if "split" in str(e).lower():
            raise HVPError(f"dataset {name!r} has no split {split!r} ({str(e).splitlines()[0]})") from None
        raise HVPError(f"cannot open dataset {name!r}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, HTTP...)
        where = "a local path" if Path(name).expanduser().exists() else "not a local path nor a reachable Hub dataset"
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HVPError(f"cannot open dataset {name!r} ({where}): {msg}") from None
    features = ds.features
    if features is None:  # some Hub streams only know their columns after the first example
        try:
            columns = list(next(iter(ds)).keys())
        except Exception as e:
            raise HVPError(f"cannot read dataset {name!r}: {e}") from None
    else:
        columns = list(features)
    if image_column not in columns:
        raise HVPError(f"dataset {name!r} has no image column {image_column!r} (columns: {columns}); "
                       f"pass --image_column")
    if features is not None and isinstance(features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    return ds, label_column in columns


def num_examples(ds, split):
    """Size of a split from the dataset card, or by one pass over a single light column."""
    splits = ds.info.splits or {}
    if split in splits and splits[split].num_examples:
        return splits[split].num_examples
    column = [c for c in (ds.column_names or []) if c != "image"][:1] or ds.column_names[:1]
    return sum(1 for _ in ds.select_columns(column))


def shard_for_rank(ds, rank, world_size, num_workers=1):
    """This rank's disjoint part of the stream (split_dataset_by_node). Parquet files are split into
    row groups (`reshard`) when there are too few files for every process and loader worker."""
    from datasets.distributed import split_dataset_by_node
    if ds.num_shards % world_size or ds.num_shards < world_size * max(1, num_workers):
        ds = ds.reshard()
    if world_size > 1 and ds.num_shards % world_size:
        print(f"warning: {ds.num_shards} shards do not divide by {world_size} processes: every "
              "process reads the whole stream and keeps every n-th example", file=sys.stderr)
    return split_dataset_by_node(ds, rank=rank, world_size=world_size) if world_size > 1 else ds


def open_image(cell):
    """Open a dataset image cell (PIL image, {'bytes','path'} dict, bytes or path) without decoding
    its pixels (PIL opens lazily: header only). Returns None when it cannot be opened. A PIL image
    is returned as it is, loaded or not."""
    from PIL import Image
    try:
        if isinstance(cell, Image.Image):
            return cell
        if isinstance(cell, dict):
            return Image.open(io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"])
        if isinstance(cell, (bytes, bytearray)):
            return Image.open(io.BytesIO(cell))
        return Image.open(cell)
    except Exception:  # not an image, unreadable path: the caller skips and counts it
        return None


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


def decode_image(value):
    """Decode a dataset image cell (PIL image, {'bytes','path'} dict, bytes or path) to an upright
    (EXIF orientation applied) RGB PIL image, at full size. Returns None when it cannot be decoded."""
    image = open_image(value)
    loaded = None if image is None else load_image(image)
    return None if loaded is None else loaded[0]


class ViewStream(torch.utils.data.IterableDataset):
    """A rank's stream of transformed samples for one epoch: {**transform(image), label, skipped}.

    - Every sample's augmentation uses its own generator seeded from (seed, epoch, rank, worker,
      index), so the stream is reproducible and resuming is exact (see `epoch_batches`).
    - The rank's shards are cycled, so every worker always has data and the training loop
      decides when an epoch ends (a fixed number of steps on every rank: DDP needs that).
    - Undecodable images are skipped; `skipped` counts them in the batch that follows.
    """

    def __init__(self, ds, transform, image_column, label_column, seed, rank, batch_size, cycle=True):
        super().__init__()
        self.ds, self.transform, self.seed, self.rank = ds, transform, seed, rank
        self.image_column, self.label_column, self.batch_size, self.cycle = image_column, label_column, batch_size, cycle
        self.epoch, self.skip_batches = 0, 0

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # The loader takes batches round-robin from workers 0, 1, ..., so whole rounds are skipped
        # here and the remaining skip_batches % num_workers batches by `epoch_batches`.
        skip = self.skip_batches // num_workers * self.batch_size
        index, produced, skipped = 0, 0, 0
        for cycle in itertools.count():
            self.ds.set_epoch(self.epoch + 1_000_003 * cycle)
            empty = True
            for example in self.ds:
                empty = False
                i, index = index, index + 1
                image = decode_image(example[self.image_column])
                if image is None:
                    skipped += produced >= skip
                    continue
                produced += 1
                if produced <= skip:
                    continue
                generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, self.rank, worker, i))
                sample = self.transform(image, generator)
                label = example.get(self.label_column) if self.label_column else None
                sample["label"] = -1 if label is None else int(label)
                sample["skipped"] = skipped
                skipped = 0
                yield sample
            if empty or not self.cycle:
                return


def epoch_batches(loader, epoch, skip_batches=0):
    """Iterator over one epoch of a ViewStream loader, starting after `skip_batches` batches: exactly
    the batches an uninterrupted epoch would give from there on (for resuming mid-epoch)."""
    loader.dataset.epoch, loader.dataset.skip_batches = epoch, skip_batches
    batches = iter(loader)
    for _ in range(skip_batches % max(1, loader.num_workers)):
        next(batches)
    return batches


def training_batches(loader, steps_per_epoch, start_step=0, grad_accum=1, lookahead=16):
    """Yield (epoch, micro-batch) from optimizer step `start_step` on, epoch after epoch, forever.
    The next epoch's loader is started `lookahead` micro-batches before the current one ends, so
    worker start-up and shuffle-buffer filling happen while the model trains."""
    per_epoch = steps_per_epoch * grad_accum
    epoch, done = divmod(start_step * grad_accum, per_epoch)
    current, upcoming = epoch_batches(loader, epoch, done), None
    while True:
        for i in range(done, per_epoch):
            if upcoming is None and per_epoch - i <= lookahead:
                upcoming = epoch_batches(loader, epoch + 1)
            yield epoch, next(current)
        current, upcoming, epoch, done = upcoming, None, epoch + 1, 0


def make_loader(stream, batch_size, num_workers, num_shards, pin_memory=False):
    """DataLoader over a ViewStream. Workers never outnumber the rank's shards (an idle worker
    would break the round-robin order that resuming relies on)."""
    workers = max(0, min(num_workers, num_shards))
    return torch.utils.data.DataLoader(stream, batch_size=batch_size, num_workers=workers,
                                       pin_memory=pin_memory, drop_last=False,
                                       persistent_workers=False, prefetch_factor=4 if workers else None)


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
    aug.size, flip if recorded. Stays uint8 (4x less to move between processes)."""
    import torchvision.transforms.v2.functional as TF
    top, left, h, w = (int(v) for v in params[:4])
    mode = TF.InterpolationMode.BICUBIC if aug.interpolation == "bicubic" else TF.InterpolationMode.BILINEAR
    view = TF.resized_crop(image, top, left, h, w, [aug.size, aug.size], interpolation=mode, antialias=True)
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

    crops="worker": the crops are made here (crop_view: torchvision resized_crop, antialiased):
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
                out[name] = torch.stack([crop_view(src, p, aug) for p, aug in zip(params, self.groups[name])])
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


def collate_views(samples):
    """Stack a list of MultiViewTransform outputs (plus any scalars the stream adds, e.g. "label",
    "skipped") into one batch, batch-major: tensors are stacked ((B, ...)), Python numbers become
    tensors ((B,)), anything else is kept as a list. Device-mode "image"s, whose sizes differ, are
    zero-padded at the bottom and right to the batch's largest h and w: "image" (B, 3, H, W) uint8
    (channels-last memory, as PIL decodes: 3-4x cheaper to fill than planar), plus "image_size"
    (B, 2) int64 = each image's own (h, w). Meant to run in the loader workers
    (DataLoader collate_fn): in a worker the big tensors are allocated in shared memory, so that
    handing the batch to the training process copies nothing."""
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


def views_from_batch(batch, name, size, interpolation, mean=IMAGENET_MEAN, std=IMAGENET_STD, sync_free=None):
    """Normalised float views (B, n, 3, size, size) of group `name` on the device of the batch's
    pixels, from a batch of either mode (collate_views of MultiViewTransform outputs): worker mode
    (batch[name] holds the uint8 crops) -> photometric(batch[name], params); device mode
    (batch["image"], "image_size", "image_box") -> crop_views, then photometric. size and
    interpolation: the group's (MultiViewTransform.geometry(name)). The parameters
    batch[name + "_params"] may stay on the CPU (they usually do: photometric then reads what it
    needs from them without waiting for the device)."""
    params = batch[name + "_params"]
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


class EvalTransform:
    """Resize the shorter side to size / crop_pct, centre-crop `size`, normalise (k-NN, linear)."""

    def __init__(self, size, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875, interpolation="bicubic"):
        self.size, self.mean, self.std, self.crop_pct, self.interpolation = size, mean, std, crop_pct, interpolation

    def __call__(self, image, generator=None):
        import torchvision.transforms.v2.functional as TF
        mode = TF.InterpolationMode.BICUBIC if self.interpolation == "bicubic" else TF.InterpolationMode.BILINEAR
        x = TF.resize(TF.pil_to_tensor(image), int(self.size / self.crop_pct), interpolation=mode, antialias=True)
        x = TF.center_crop(x, [self.size, self.size]).float().div_(255)
        return {"image": TF.normalize(x, list(self.mean), list(self.std))}


def resize_views(x, factor):
    """Downscale a (..., C, H, W) batch by `factor` for a cheaper selection forward (decision D6)."""
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
    by cost[g0,l] + cost[g1,l]: exactly the exhaustive search over C(L_loader, L) subsets (D4).
    Global pairs are compared in product(evens, odds) order, first wins ties.
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
    top_w, top_i = local_w.topk(num_locals, dim=2)
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


STATS_BINS = 10  # histogram bins over [0, 1] of the IoU and area distributions in selection_stats


def selection_stats(params, hard_pair, hard_score, random_score):
    """Decision D9 statistics for a batch: mean score, crop IoU and crop area of the selected pair
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


# ----------------------------------------------------------------------------------- models

ARCH_ALIASES = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224",
                "vit_base": "vit_base_patch16_224", "vit_large": "vit_large_patch16_224"}


def create_backbone(arch, image_size=224, small_stem=False, drop_path_rate=0.0, **model_args):
    """A timm backbone without classifier (num_classes=0). ViTs accept any image size
    (dynamic_img_size), so global and local crops and reduced-resolution selection share one model.
    small_stem (28-64 px inputs): ResNet-style models get a 3x3 stride-1 first conv and no max-pool;
    ViTs get patch size 4 (<= 48 px) or 8."""
    import timm
    name = ARCH_ALIASES.get(arch, arch)
    if not timm.is_model(name):
        raise HVPError(f"unknown --arch {arch!r}: not a timm model name (try resnet18, resnet50, vit_small, "
                       f"vit_base, or any name from timm.list_models())")
    kwargs = dict(num_classes=0, **model_args)
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    is_vit = timm.models.is_model_in_modules(name, ["vision_transformer", "deit", "eva", "beit"])
    if is_vit:
        kwargs.setdefault("img_size", image_size)
        kwargs.setdefault("dynamic_img_size", True)
        if small_stem:
            kwargs.setdefault("patch_size", 4 if image_size <= 48 else 8)
    model = timm.create_model(name, **kwargs)
    if small_stem and not is_vit:
        conv, pool = getattr(model, "conv1", None), getattr(model, "maxpool", None)
        if not isinstance(conv, nn.Conv2d) or pool is None:
            raise HVPError(f"--small_stem supports ResNet-style (conv1 + maxpool) and ViT models, not {arch!r}")
        model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
        model.hvp_small_stem = True
    return model


def export_backbone(backbone, out_dir, data_config, tag):
    """Write `model.safetensors` + timm `config.json` to `out_dir` atomically. Standard backbones
    load with `timm.create_model("local-dir:<out_dir>", pretrained=True)` (or "hf-hub:<id>" once
    pushed); small-stem ResNets need `load_backbone` (timm cannot express that stem)."""
    import copy
    import timm
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model_config = {"pretrained_cfg": {"tag": tag}}
    if getattr(backbone, "hvp_small_stem", False):
        model_config["hvp_small_stem"] = True
    # a CPU copy in the standard memory format: safetensors refuses channels_last tensors
    plain = copy.deepcopy(backbone).to("cpu", memory_format=torch.contiguous_format)
    timm.models.save_for_hf(plain, tmp, model_config=model_config, safe_serialization=True, data_config=data_config)
    _replace_dir(tmp, out_dir)
    return out_dir


def load_backbone(source):
    """Load a backbone from an export folder (config.json + model.safetensors), a checkpoint folder,
    a training output folder, or a timm/Hub name ("hf-hub:org/name"). Returns (model, config dict)."""
    import timm
    from safetensors.torch import load_file
    path = Path(source).expanduser()
    if str(source).startswith("timm/"):
        model = timm.create_model(str(source), pretrained=True, num_classes=0)
        return model, {"architecture": str(source), "pretrained_cfg": model.pretrained_cfg}
    if str(source).startswith("hf-hub:"):  # downloaded, then loaded like a local export (small stems too)
        path = download_hub_backbone(str(source))
    for candidate in (path, path / "backbone"):
        if (candidate / "config.json").is_file() and (candidate / "model.safetensors").is_file():
            path = candidate
            break
    else:
        ckpt = latest_checkpoint(path) if path.is_dir() else None
        if ckpt is not None and (ckpt / "backbone" / "config.json").is_file():
            path = ckpt / "backbone"
        else:
            raise HVPError(f"no backbone found at {source!r}: expected a folder with config.json and "
                           "model.safetensors, a checkpoint folder, a training output folder, or hf-hub:<id>")
    config = json.loads((path / "config.json").read_text())
    if config.get("hvp_small_stem"):
        args = {k: v for k, v in config.get("model_args", {}).items() if k not in ("num_classes", "in_chans", "global_pool")}
        model = create_backbone(config["architecture"], small_stem=True, **args)
        model.load_state_dict(load_file(path / "model.safetensors"))
    else:
        model = timm.create_model(f"local-dir:{path}", pretrained=True, num_classes=0)
    return model, config


# ----------------------------------------------------------------------------------- checkpoints

def _flatten(obj, tensors, prefix):
    """Split a nested state into JSON-able structure + a flat {key: tensor} dict (no pickle)."""
    if torch.is_tensor(obj):
        key = f"{len(tensors)}:{prefix}"  # the counter keeps keys unique whatever the dict keys are
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _flatten(v, tensors, f"{prefix}.{k}" if prefix else k) for k, v in obj.items()}
        return {"__items__": [[k, _flatten(v, tensors, f"{prefix}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {prefix!r}")


def _unflatten(obj, tensors):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: _unflatten(v, tensors) for k, v in obj["__items__"]}
        if "__list__" in obj:
            items = [_unflatten(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj["tuple"] else items
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    return obj


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(tmp, final):
    """Move a finished folder into place; an existing one is swapped out first, then removed."""
    for f in Path(tmp).iterdir():
        _fsync(f)
    old = None
    if final.exists():
        old = final.with_name(final.name + f".old-{os.getpid()}")
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def save_checkpoint(output_dir, step, state, backbone=None, data_config=None, tag="hvp", keep=2):
    """Write `output_dir/checkpoint-<step>/` atomically: state.safetensors (every tensor),
    state.json (everything else), backbone/ (timm export). A kill at any moment leaves either the
    old or the new checkpoint complete, never a half-written latest one."""
    from safetensors.torch import save_file
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step:08d}"
    tmp = output_dir / f".tmp-checkpoint-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {}
    skeleton = _flatten(state, tensors, "")
    save_file(tensors, tmp / "state.safetensors")
    (tmp / "state.json").write_text(json.dumps(skeleton))
    if backbone is not None:
        export_backbone(backbone, tmp / "backbone", data_config, tag)
    _replace_dir(tmp, final)
    old = sorted(p for p in output_dir.iterdir() if CHECKPOINT_RE.match(p.name))
    for p in old[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(output_dir):
    """The newest complete checkpoint folder in output_dir (or output_dir itself if it is one)."""
    output_dir = Path(output_dir)
    if (output_dir / "state.json").is_file():
        return output_dir
    if not output_dir.is_dir():
        return None
    done = [p for p in output_dir.iterdir() if CHECKPOINT_RE.match(p.name) and (p / "state.json").is_file()
            and (p / "state.safetensors").is_file()]
    return max(done, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)), default=None)


def load_checkpoint(path):
    """Read a checkpoint written by save_checkpoint. Only safetensors and JSON are parsed."""
    from safetensors.torch import load_file
    path = Path(path)
    try:
        return _unflatten(json.loads((path / "state.json").read_text()), load_file(path / "state.safetensors"))
    except Exception as e:
        raise HVPError(f"cannot read checkpoint {path}: {e}") from None


def cleanup_partial_checkpoints(output_dir):
    for p in Path(output_dir).glob(".tmp-checkpoint-*"):
        shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------------- training plumbing

def make_accelerator(mixed_precision, grad_accum, report_to, output_dir):
    """Accelerator for CUDA, or CPU (also several CPU processes over gloo under accelerate launch)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    on_cpu = not torch.cuda.is_available()
    trackers = None if report_to in ("", "none") else report_to.split(",")
    return Accelerator(cpu=on_cpu, mixed_precision=mixed_precision or None,
                       gradient_accumulation_steps=grad_accum, log_with=trackers,
                       project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir)))


def cosine(step, total_steps, start, end=0.0, warmup_steps=0, warmup_start=0.0):
    """Linear warmup from warmup_start to start, then cosine from start to end."""
    if step < warmup_steps:
        return warmup_start + (start - warmup_start) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(1.0, progress)))


class StopRequest:
    """Turns SIGTERM into a flag the loop checks between steps, so it can save and exit cleanly."""

    def __init__(self):
        self.requested = False
        try:
            signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            pass

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self, accelerator):
        """True on every process if any process got SIGTERM."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


class MetricsLog:
    """metrics.jsonl (one JSON object per logged step) + the Accelerate tracker, main process only."""

    def __init__(self, accelerator, output_dir):
        self.accelerator = accelerator
        self.path = Path(output_dir) / "metrics.jsonl"
        self.file = open(self.path, "a") if accelerator.is_main_process else None

    def log(self, record):
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "epoch")}
        self.accelerator.log(numbers, step=record["step"])

    def close(self):
        if self.file is not None:
            self.file.close()


def write_run_info(output_dir, config):
    """Record the resolved config, versions and the script itself next to the results."""
    import platform
    info = {"config": dataclasses.asdict(config), "argv": sys.argv, "processes": int(os.environ.get("WORLD_SIZE", 1)),
            "python": platform.python_version(), "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    for mod in ("timm", "accelerate", "datasets"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            pass
    Path(output_dir, "config.json").write_text(json.dumps(info, indent=2))


def save_view_grid(path, views, hard_pair, mean=IMAGENET_MEAN, std=IMAGENET_STD, max_images=8):
    """PNG grid: one row per image, all its candidate views; the selected pair is framed green."""
    import torchvision
    views = views[:max_images].float().cpu()
    B, N = views.shape[:2]
    x = views * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    x = F.pad(x.clamp(0, 1), (2, 2, 2, 2), value=0.0)
    chosen = torch.zeros(B, N, dtype=torch.bool)
    chosen[torch.arange(B)[:, None], hard_pair[:B].cpu()] = True
    frame = torch.zeros_like(x[0, 0])
    frame[1, :2], frame[1, -2:], frame[1, :, :2], frame[1, :, -2:] = 1, 1, 1, 1
    mask = frame.sum(0, keepdim=True) > 0
    x = torch.where(chosen[:, :, None, None, None] & mask, frame, x)
    torchvision.utils.save_image(x.flatten(0, 1), path, nrow=N, padding=2)


# ----------------------------------------------------------------------------------- k-NN

@torch.no_grad()
def extract_features(forward, loader, accelerator, desc="features"):
    """Run `forward` over a loader of {"image", "label"} batches on every process and gather the
    (features, labels) of all processes onto every process."""
    from tqdm.auto import tqdm
    feats, labels = [], []
    for batch in tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process, leave=False):
        with accelerator.autocast():
            f = forward(batch["image"].to(accelerator.device, non_blocking=True))
        feats.append(f.float())
        labels.append(batch["label"].to(accelerator.device))
    device = accelerator.device
    feats = torch.cat(feats) if feats else torch.zeros(0, 0, device=device)
    labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    if accelerator.num_processes > 1:  # ranks hold different counts: pad, gather, strip the padding
        count = accelerator.gather(torch.tensor([len(labels)], device=device))
        dim = int(accelerator.gather(torch.tensor([feats.shape[1]], device=device)).max())
        if feats.shape[1] != dim:  # this rank had no data
            feats = torch.zeros(0, dim, device=device)
        feats = accelerator.gather(accelerator.pad_across_processes(feats, dim=0))
        labels = accelerator.gather(accelerator.pad_across_processes(labels, dim=0, pad_index=-1))
        longest = len(labels) // len(count)
        keep = torch.cat([torch.arange(longest, device=device) < c for c in count])
        feats, labels = feats[keep], labels[keep]
    return feats, labels


@torch.no_grad()
def knn_classify(train_feats, train_labels, test_feats, k=20, temperature=0.07, num_classes=None, chunk=1024):
    """Weighted k-NN (the DINO protocol): cosine similarity on L2-normalised features, the k nearest
    training samples vote for their class with weight exp(sim / T). Returns class scores (M, C)."""
    num_classes = num_classes or int(train_labels.max()) + 1
    train = F.normalize(train_feats.float(), dim=1)
    k = min(k, len(train))
    out = []
    for start in range(0, len(test_feats), chunk):
        test = F.normalize(test_feats[start:start + chunk].float(), dim=1)
        sim, idx = (test @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(test), num_classes, device=test.device)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        out.append(votes)
    return torch.cat(out)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, k=20, temperature=0.07):
    """Top-1 and top-5 accuracy (%) of the weighted k-NN classifier."""
    num_classes = int(torch.cat([train_labels, test_labels]).max()) + 1
    scores = knn_classify(train_feats, train_labels, test_feats, k, temperature, num_classes)
    top = scores.topk(min(5, num_classes), dim=1).indices
    top1 = (top[:, 0] == test_labels).float().mean().item() * 100
    top5 = (top == test_labels[:, None]).any(1).float().mean().item() * 100
    return top1, top5


def eval_loader(dataset, split, image_column, label_column, image_size, accelerator, batch_size, num_workers,
                mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """A non-shuffled, non-augmented loader over this process's part of a labelled split."""
    ds, has_labels = open_dataset(dataset, split, image_column, label_column)
    if not has_labels:
        raise HVPError(f"dataset {dataset!r} split {split!r} has no label column {label_column!r}")
    ds = shard_for_rank(ds, accelerator.process_index, accelerator.num_processes, num_workers)
    stream = ViewStream(ds, EvalTransform(image_size, mean, std), image_column, label_column,
                        seed=0, rank=accelerator.process_index, batch_size=batch_size, cycle=False)
    return make_loader(stream, batch_size, num_workers, ds.num_shards, pin_memory=torch.cuda.is_available())


def knn_eval(forward, accelerator, dataset, train_split, test_split, image_column, label_column, image_size,
             batch_size=256, num_workers=2, k=20, temperature=0.07, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """k-NN accuracy of frozen features: memory bank = train split, queries = test split."""
    loaders = [eval_loader(dataset, s, image_column, label_column, image_size, accelerator, batch_size,
                           num_workers, mean, std) for s in (train_split, test_split)]
    train_feats, train_labels = extract_features(forward, loaders[0], accelerator, f"k-NN {train_split}")
    test_feats, test_labels = extract_features(forward, loaders[1], accelerator, f"k-NN {test_split}")
    top1, top5 = knn_accuracy(train_feats, train_labels, test_feats, test_labels, k, temperature)
    return {"knn_top1": top1, "knn_top5": top5, "k": k, "temperature": temperature,
            "train_samples": len(train_labels), "test_samples": len(test_labels)}


# ----------------------------------------------------------------------------------- self-distillation (DINO, iBOT)
# Multi-crop augmentation, the DINO head, the teacher's EMA and centre, and the cross-entropy table
# that both the DINO/iBOT loss and the hard-view selection are computed from.

def dino_augs(cfg):
    """DINO's two global transforms and its local transform (bicubic crops, flip, colour jitter
    0.4/0.4/0.2/0.1 with p 0.8, grayscale 0.2). Global 1: always blurred. Global 2: blur 0.1,
    solarize 0.2. Local: blur 0.5. DINO blurs every crop with sigma 0.1-2 and kernel 9 at 224 px
    and 96 px alike; ViewAug scales blur with size/224, so the local blur is stated for 224 px
    from its 96 px value (and scales down with smaller crops)."""
    common = dict(flip_p=0.5, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2, interpolation="bicubic")
    global1 = ViewAug(size=cfg.image_size, scale=cfg.global_scale, blur_p=1.0, solarize_p=0.0, **common)
    global2 = ViewAug(size=cfg.image_size, scale=cfg.global_scale, blur_p=0.1, solarize_p=0.2, **common)
    local = ViewAug(size=cfg.local_size, scale=cfg.local_scale, blur_p=0.5, blur_sigma=(0.1 * 224 / 96, 2.0 * 224 / 96),
                        blur_kernel=21, **common)
    return global1, global2, local


def multicrop_transform(cfg):
    """G candidate globals alternating transform 1 (even index) / 2 (odd index), then L_loader locals."""
    global1, global2, local = dino_augs(cfg)
    groups = {"globals": [global1, global2] * (cfg.global_views // 2)}
    if cfg.local_views:
        groups["locals"] = [local] * cfg.local_views
    return MultiViewTransform(groups)


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


@torch.no_grad()
def ema_update(teacher, student, momentum):
    """teacher <- momentum * teacher + (1 - momentum) * student, parameters only (buffers such as
    BatchNorm statistics are the teacher's own)."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)


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


def clock(enabled, device):
    """Wall clock for the timing split; synchronises the GPU only on the steps that are logged."""
    if enabled and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# ----------------------------------------------------------------------------------- Hugging Face Hub
#
# Push (--push_to_hub): the backbone export (model.safetensors + timm config.json) and a model card
# (README.md) go to a Hub model repo from a background thread of the main process, so that
# `timm.create_model("hf-hub:<user>/<repo>", pretrained=True)` gives the backbone in one line. The
# full training state stays local, or goes to last-checkpoint/ on the repo's "training-state" branch
# with --hub_push_state. Load: "hf-hub:<user>/<repo>[@revision]" wherever a backbone is accepted
# (load_backbone, eval scripts, --init_from). The token is found by huggingface_hub itself (HF_TOKEN,
# `hf auth login`); this code only checks that one exists, so it can never print or write it.

HUB_STATE_BRANCH = "training-state"
HUB_LICENSE = "mit"  # the licence of this code; weights trained on other data may need another
HUB_DATASETS = {DEFAULT_DATASET: "zalando-datasets/fashion_mnist"}  # local copies of Hub datasets (card metadata)
_HVP_SETTINGS = ("num_views", "global_views", "local_views", "local_crops_number")  # + every hvp_* field


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def download_hub_backbone(source):
    """Download config.json + model.safetensors of "hf-hub:<user>/<repo>[@revision]" into the
    Hugging Face cache, both from the same commit. Returns the local folder holding them."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, HFValidationError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
    repo_id, _, revision = source[len("hf-hub:"):].partition("@")
    where = constants.ENDPOINT
    try:
        config = Path(hf_hub_download(repo_id, "config.json", revision=revision or None, library_name="hvp"))
        hf_hub_download(repo_id, "model.safetensors", revision=config.parent.name, library_name="hvp")
    except HFValidationError:
        raise HVPError(f"{source!r} is not a Hub model id: use hf-hub:<user or org>/<name>[@revision]") from None
    except RepositoryNotFoundError:
        raise HVPError(f"no model repo {repo_id!r} on {where} (check the name; a private repo needs "
                       "`hf auth login` or HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise HVPError(f"model repo {repo_id!r} on {where} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:  # no connection (or HF_HUB_OFFLINE=1) and not in the cache
        raise HVPError(f"cannot download {source!r}: {where} is unreachable or HF_HUB_OFFLINE is set, "
                       "and the files are not in the local cache") from None
    except EntryNotFoundError:
        raise HVPError(f"model repo {repo_id!r} has no config.json + model.safetensors: not a timm backbone") from None
    except (HfHubHTTPError, OSError) as e:
        raise HVPError(f"cannot download {source!r} from {where}: {_first_line(e)}") from None
    return config.parent


def init_backbone(backbone, source):
    """--init_from: load the weights of anything `load_backbone` accepts (export folder, training
    output, checkpoint, hf-hub:<id>) into `backbone`, which must have the same architecture."""
    pretrained, _ = load_backbone(source)
    try:
        backbone.load_state_dict(pretrained.state_dict())
    except RuntimeError as e:
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), _first_line(e))
        raise HVPError(f"--init_from {source!r} does not fit --arch/--small_stem: {detail[:200]}") from None
    return backbone


def _card_value(value):
    """Config values as shown on a public model card: local paths by their last component."""
    if isinstance(value, str) and os.sep in value and Path(value).expanduser().exists():
        return Path(value).name
    return list(value) if isinstance(value, tuple) else value


def model_card(repo_id, method, config, step, results=None, processes=1, precision="no", license=HUB_LICENSE):
    """The model card README.md: Hub metadata (library timm, tags, dataset, licence), what was
    trained and how, the hard-view settings, the final evaluation numbers and how to load it."""
    from huggingface_hub import ModelCardData
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    dataset = str(cfg.get("dataset", ""))
    is_hub_id = not Path(dataset).expanduser().exists() and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", dataset)
    hub_dataset = HUB_DATASETS.get(dataset) or (dataset if is_hub_id else None)
    dataset_name = (hub_dataset or Path(dataset).name).split("/")[-1]
    tags = ["image-feature-extraction", "self-supervised", "hard-view-pretraining", method.lower(), dataset_name]
    metadata = ModelCardData(library_name="timm", license=license, tags=list(dict.fromkeys(filter(None, tags))),
                             datasets=[hub_dataset] if hub_dataset else None, pipeline_tag="image-feature-extraction")
    hvp_settings = {k: v for k, v in cfg.items() if k in _HVP_SETTINGS or k.startswith("hvp_")}
    shown = {k: _card_value(v) for k, v in cfg.items()}
    arch, size = cfg.get("arch", "?"), cfg.get("image_size", "?")
    if cfg.get("small_stem"):
        load = (f'import hvp_utils  # the HVP repository\'s shared file: timm cannot express the small stem\n'
                f'model, config = hvp_utils.load_backbone("hf-hub:{repo_id}")')
    else:
        load = (f'import timm\n\nmodel = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()\n'
                f'transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=model))\n'
                f'features = model(transform(image).unsqueeze(0))  # (1, model.num_features); `image` is a PIL image')
    numbers = {k: v for k, v in (results or {}).items() if isinstance(v, (int, float))}
    results_text = ("| metric | value |\n|---|---|\n" + "".join(
        f"| {k} | {v:.2f} |\n" if isinstance(v, float) else f"| {k} | {v} |\n" for k, v in numbers.items())
        if numbers else "No evaluation was run at the end of training.\n")
    data_note = (f"`{dataset_name}` (a local copy of [{hub_dataset}](https://huggingface.co/datasets/{hub_dataset}))"
                 if hub_dataset and hub_dataset != dataset else f"`{hub_dataset or dataset_name}`")
    body = f"""
# {method} + Hard View Pretraining: {arch} on {dataset_name}

A `{arch}` backbone (no classifier head) pretrained with self-supervised **{method}** and **Hard View
Pretraining** (HVP; Ferreira et al., *Beyond Random Augmentations: Pretraining with Hard Views*,
ICLR 2025) on {data_note}, {size} px, for {step} optimizer steps on {processes} process(es)
(mixed precision: {precision}). HVP draws more augmented views than the method needs, scores the
candidate pairs with the method's own loss in one no-gradient forward, and trains on the hardest.

## Usage

```python
{load}
```

k-NN evaluation with the HVP repository: `python eval/knn.py --backbone hf-hub:{repo_id} --dataset <dataset>`

## Results

Frozen features, evaluated on the `{cfg.get("eval_split", "test")}` split at the end of training:

{results_text}
## Hard-view settings

```json
{json.dumps(hvp_settings, indent=2, default=str)}
```

## Training configuration

```json
{json.dumps(shown, indent=2, default=str)}
```

## Citation

```bibtex
@inproceedings{{ferreira2025hvp,
  title     = {{Beyond Random Augmentations: Pretraining with Hard Views}},
  author    = {{Ferreira, Fabio and Rapant, Ivo and Franke, J{{\\"o}}rg K. H. and Hutter, Frank}},
  booktitle = {{International Conference on Learning Representations (ICLR)}},
  year      = {{2025}}
}}
```
"""
    return f"---\n{metadata.to_yaml()}\n---\n{body}"


def _link_tree(src, dst):
    """Copy a folder by hard links where possible (instant, no space). Exports and checkpoints are
    only ever replaced by renames, never changed in place, so a link keeps the content it saw."""
    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    shutil.copytree(src, dst, copy_function=link)


class HubPusher:
    """--push_to_hub: uploads backbone exports with their model card from a background thread.

    Only the main process pushes; elsewhere (and without --push_to_hub) every method does nothing.
    `push()` returns at once: it links the export into <output_dir>/.hub-push-<step> and queues it;
    a newer push replaces a queued one that has not started. A failed upload is retried (`retries`
    tries, waits growing from `retry_wait` s; the environment variable HVP_HUB_RETRY_WAIT overrides
    it) and reported on stderr, while training goes on and the local files stay as they are. When the
    last push fails, its files are kept in <output_dir>/hub_upload with the command to upload them by
    hand. `close()` waits for the queued pushes and returns True if the last one reached the Hub.
    """

    def __init__(self, repo_id, method, config, output_dir, private=False, every=0, push_state=False,
                 processes=1, precision="no", enabled=True, retries=3, retry_wait=10.0):
        self.repo_id, self.method, self.config, self.output_dir = repo_id, method, config, Path(output_dir)
        self.private, self.every, self.push_state, self.enabled = private, every, push_state, enabled
        self.processes, self.precision, self.retries = processes, precision, retries
        self.retry_wait = float(os.environ.get("HVP_HUB_RETRY_WAIT", retry_wait))
        self.last_step, self.ok, self._thread = 0, None, None
        import queue
        self._jobs = queue.Queue()
        if enabled and self.output_dir.is_dir():  # leftovers of a run that was killed mid-push
            for stale in self.output_dir.glob(".hub-push-*"):
                shutil.rmtree(stale, ignore_errors=True)

    @classmethod
    def from_config(cls, cfg, accelerator, method):
        """Check --push_to_hub/--hub_model_id/--hub_private/--hub_every/--hub_push_state on every
        process before training (one-line HVPError) and return the pusher."""
        given = [f for f in ("hub_model_id", "hub_private", "hub_every", "hub_push_state") if getattr(cfg, f, None)]
        if not cfg.push_to_hub:
            if given:
                raise HVPError(f"--{given[0]} only takes effect with --push_to_hub")
            return cls(None, method, cfg, cfg.output_dir, enabled=False)
        from huggingface_hub import constants, get_token
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id
        if constants.HF_HUB_OFFLINE:
            raise HVPError("--push_to_hub cannot push with HF_HUB_OFFLINE=1 set")
        if cfg.hub_every < 0:
            raise HVPError(f"--hub_every must be >= 0 (0 = push only at the end), got {cfg.hub_every}")
        if get_token() is None:
            raise HVPError("--push_to_hub needs a Hugging Face token with write access: run `hf auth login` or set "
                           "HF_TOKEN" + ("" if cfg.hub_model_id else " (and pass --hub_model_id <user>/<name>, or the "
                                         "repo is <your user>/<--output_dir folder name>)"))
        repo_id = cfg.hub_model_id or re.sub(r"[^\w.-]+", "-", Path(cfg.output_dir).resolve().name).strip("-.")
        try:
            validate_repo_id(repo_id)
        except HFValidationError:
            what = "--hub_model_id" if cfg.hub_model_id else "a repo name inferred from --output_dir"
            raise HVPError(f"{what} {repo_id!r} is not a valid Hub repo id: pass --hub_model_id <user or org>/<name> "
                           "(letters, digits, '-', '_', '.')") from None
        enabled = accelerator.is_main_process
        if enabled:
            when = f"every {cfg.hub_every} steps (at checkpoints) and at the end" if cfg.hub_every else "at the end"
            print(f"hub: pushing the backbone to {constants.ENDPOINT}/{repo_id} {when}", flush=True)
        return cls(repo_id, method, cfg, cfg.output_dir, cfg.hub_private, cfg.hub_every,
                   getattr(cfg, "hub_push_state", False), accelerator.num_processes,
                   accelerator.mixed_precision, enabled)

    def due(self, step):
        """True when --hub_every steps have passed since the last push."""
        return self.enabled and self.every > 0 and step - self.last_step >= self.every

    def push(self, export_dir, step, results=None, state_dir=None):
        """Queue a push of `export_dir` (a backbone export) as the state of training at `step`, with
        `results` (dict of final evaluation numbers) in the model card and, with --hub_push_state,
        `state_dir` (a checkpoint folder) to the training-state branch. Returns immediately."""
        if not self.enabled:
            return
        folder = self.output_dir / f".hub-push-{step:08d}"
        shutil.rmtree(folder, ignore_errors=True)
        _link_tree(export_dir, folder / "backbone")
        if self.push_state and state_dir is not None:
            _link_tree(state_dir, folder / "state")
        self.last_step = step
        self._jobs.put({"folder": folder, "step": step, "results": results})
        if self._thread is None:
            import threading
            self._thread = threading.Thread(target=self._work, name="hub-push", daemon=True)
            self._thread.start()

    def close(self):
        """Wait for queued pushes (retries included). True if the last push succeeded, None if none."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None
        return self.ok

    def _work(self):
        import queue
        while True:
            job = self._jobs.get()
            if job is None:
                return
            while True:  # only the newest queued export matters
                try:
                    newer = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if newer is None:
                    self._jobs.put(None)
                    break
                shutil.rmtree(job["folder"], ignore_errors=True)
                job = newer
            self.ok = self._push_with_retries(job)

    def _push_with_retries(self, job):
        step, error = job["step"], None
        for attempt in range(1, self.retries + 1):
            try:
                url, commit = self._upload(job)
            except Exception as e:  # any network or server failure: report it, never stop training
                error = _first_line(e)
                if attempt < self.retries:
                    wait = self.retry_wait * 4 ** (attempt - 1)
                    print(f"hub: push of step {step} to {self.repo_id} failed (try {attempt}/{self.retries}): {error}; "
                          f"retrying in {wait:g} s", file=sys.stderr, flush=True)
                    time.sleep(wait)
                continue
            print(f"hub: pushed step {step} to {url} (commit {commit[:8]})", flush=True)
            shutil.rmtree(job["folder"], ignore_errors=True)
            shutil.rmtree(self.output_dir / "hub_upload", ignore_errors=True)  # an older failed push, now superseded
            return True
        kept = self.output_dir / "hub_upload"
        shutil.rmtree(kept, ignore_errors=True)
        os.rename(job["folder"], kept)
        print(f"hub: push of step {step} to {self.repo_id} failed after {self.retries} tries: {error}. The local "
              f"checkpoints are intact; upload later with: hf upload {self.repo_id} {kept / 'backbone'} .",
              file=sys.stderr, flush=True)
        return False

    def _upload(self, job):
        from huggingface_hub import HfApi
        api = HfApi(library_name="hvp")
        self._write_card(job)  # first, so that a folder kept after a failure is complete
        repo = api.create_repo(self.repo_id, private=self.private, exist_ok=True)
        if repo.repo_id != self.repo_id:  # a bare name resolves to <user>/<name>
            self.repo_id = repo.repo_id
            self._write_card(job)
        message = f"HVP {self.method}: backbone at step {job['step']}"
        commit = api.upload_folder(repo_id=self.repo_id, folder_path=job["folder"] / "backbone",
                                   commit_message=message)
        if (job["folder"] / "state").is_dir():
            api.create_branch(self.repo_id, branch=HUB_STATE_BRANCH, exist_ok=True)
            api.upload_folder(repo_id=self.repo_id, folder_path=job["folder"] / "state", path_in_repo="last-checkpoint",
                              revision=HUB_STATE_BRANCH, delete_patterns="*",  # drop files of older checkpoints
                              commit_message=f"HVP {self.method}: training state at step {job['step']}")
        return str(repo), commit.oid

    def _write_card(self, job):
        card = job["folder"] / "backbone" / "README.md"
        card.unlink(missing_ok=True)  # never write through a hard link into the export
        card.write_text(model_card(self.repo_id, self.method, self.config, job["step"], job["results"],
                                   self.processes, self.precision))
