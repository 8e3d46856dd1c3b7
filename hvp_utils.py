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
import atexit
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
    """Run `main()`, turning HVPError into a one-line message (printed by the main process only:
    every process raises the same one) and exit status 2."""
    try:
        main()
    except HVPError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


# ----------------------------------------------------------------------------------- config / CLI

@dataclasses.dataclass
class RunConfig:
    """The flags every training script shares (data, outputs, run lifecycle, Hub). Each script's
    Config adds its method's own fields and sets output_dir's default."""
    dataset: str = DEFAULT_DATASET  # Hub dataset id, local image folder, parquet file/folder/glob
    split: str = "train"  # split to pretrain on
    eval_split: str = "test"  # labelled split for k-NN queries (the train split is the memory bank); "" = no k-NN
    image_column: str = "image"  # dataset column holding images
    label_column: str = "label"  # dataset column holding labels (k-NN only)
    output_dir: str = "outputs/hvp"  # checkpoints, backbone export, metrics.jsonl, TensorBoard logs (one run per folder)
    recipe: str = ""  # a named published recipe (see RECIPES in the script) replacing the defaults of flags not given
    global_batch: int = 0  # if > 0: images per optimizer step over all processes; sets --grad_accum from the process count
    mixed_precision: str = ""  # auto (bf16 where native, else fp32) | no | fp16 | bf16; "" = as `accelerate launch` says
    num_workers: int = -1  # loader workers per process; -1 = the process's share of the CPU cores, minus one
    crops: str = "auto"  # where views are cut and resized: worker (loader workers), device (batched on the training device), auto (device on CUDA, worker on CPU)
    shuffle_buffer: int = 5000  # rows each loader worker shuffles among (pieces are shuffled too)
    seed: int = 0  # seeds every random source; a CPU run is reproducible
    log_every: int = 20  # steps between metrics.jsonl records
    save_every: int = 1000  # steps between checkpoints (plus one at the end and on SIGTERM/SIGINT)
    keep_checkpoints: int = 2  # checkpoints kept in output_dir
    resume: str = dataclasses.field(default="", metadata={"const": "yes"})  # --resume: continue the run in output_dir; --resume auto: continue one if there is one, else start
    knn_every: int = 0  # epochs between k-NN evaluations during training (0 = only at the end)
    knn_k: int = 20  # neighbours for k-NN
    report_to: str = "tensorboard"  # Accelerate tracker(s), comma-separated, or "none"
    init_from: str = ""  # start the backbone from these weights: export/output folder or hf-hub:<user>/<repo>
    push_to_hub: bool = False  # push the backbone (DINO/iBOT: the teacher's) + model card to the Hugging Face Hub
    hub_model_id: str = ""  # <user or org>/<name>; default <your user>/<--output_dir folder name>
    hub_private: bool = False  # create the Hub repo private
    hub_every: int = 0  # also push at the first checkpoint after every N steps (0 = only at the end)
    hub_push_state: bool = False  # also push the full training state to the repo's "training-state" branch


def check_run_config(cfg):
    """One-line errors for the shared flags (each script's check_config calls it)."""
    if cfg.mixed_precision not in ("", "auto", "no", "fp16", "bf16"):
        raise HVPError(f"--mixed_precision must be auto, no, fp16 or bf16, got {cfg.mixed_precision!r}")
    if cfg.crops not in ("auto", "worker", "device"):
        raise HVPError(f"--crops must be auto, worker or device, got {cfg.crops!r}")
    if cfg.resume not in ("", "yes", "auto"):
        raise HVPError(f"--resume takes no value or 'auto', got {cfg.resume!r}")
    if cfg.global_batch < 0 or cfg.log_every < 1 or cfg.save_every < 1 or cfg.shuffle_buffer < 1:
        raise HVPError("--global_batch must be >= 0 and --log_every, --save_every, --shuffle_buffer >= 1")


def _field_comments(cls):
    """The `# comment` after each dataclass field (of the class and its bases), used as --help text."""
    comments = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        for line in inspect.getsource(klass).splitlines():
            m = re.match(r"\s*(\w+)\s*:[^#]*#\s*(.*)$", line)
            if m:
                comments[m.group(1)] = m.group(2)
    return comments


def dataset_key(name):
    """One spelling per dataset: an existing local path as its absolute, resolved form; anything
    else (a Hub id) as given. Presets and model cards look datasets up by this key."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def parse_config(cls, argv=None, presets=None, recipes=None, description=None):
    """Turn a @dataclass into a CLI (one flag per field, its `# comment` as help).

    Values come, later ones winning, from: the dataclass defaults; the named --recipe (`recipes`:
    name -> values); the CPU preset of the dataset (`presets`: dataset -> values; used only without
    --recipe); the flags on the command line. A bool becomes --flag/--no-flag; a tuple takes as
    many values as its default has, except a tuple default of length 1, which means "one number or
    more" (e.g. --pred_ratio 0 0.3); a field with metadata {"const": v} may be given bare (--resume
    means --resume yes). Local dataset paths are stored resolved.
    Returns (config, notes): notes are start-up lines naming what a recipe or preset set.
    """
    parser = argparse.ArgumentParser(description=description)
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        kwargs = dict(default=argparse.SUPPRESS, help=f"{comments.get(f.name, '')} (default: {f.default})")
        if isinstance(f.default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(f.default, tuple):
            kwargs.update(nargs=len(f.default) if len(f.default) > 1 else "+", type=type(f.default[0]))
        else:
            kwargs["type"] = type(f.default) if f.default is not None else str
            if "const" in f.metadata:
                kwargs.update(nargs="?", const=f.metadata["const"])
        parser.add_argument(f"--{f.name}", **kwargs)
    given = vars(parser.parse_args(argv))  # only the flags on the command line
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    values = {f.name: f.default for f in dataclasses.fields(cls)}
    notes = []
    recipe_name = given.get("recipe", values.get("recipe", ""))
    if recipe_name:
        if recipe_name not in (recipes or {}):
            raise HVPError(f"unknown --recipe {recipe_name!r} (recipes: {', '.join(sorted(recipes or {})) or 'none'})")
        recipe = recipes[recipe_name]
        values.update(recipe)
        notes.append(f"recipe {recipe_name}: " + ", ".join(f"{k}={_show(v)}" for k, v in recipe.items() if k not in given))
    if "dataset" in values:
        dataset = given.get("dataset", values["dataset"])
        if dataset == DEFAULT_DATASET and not Path(dataset).exists():
            raise HVPError(f"the shipped dataset is not at {DEFAULT_DATASET} (it lives in data/ next to hvp_utils.py "
                           "in the HVP repository): pass --dataset <Hub id | image folder | parquet files>, e.g. "
                           "--dataset zalando-datasets/fashion_mnist")
        given["dataset"] = dataset_key(dataset)
        if not recipe_name:
            preset = {dataset_key(k): v for k, v in (presets or {}).items()}.get(given["dataset"], {})
            values.update(preset)
            used = [k for k in preset if k not in given]
            if used:
                what = "the shipped dataset" if dataset == DEFAULT_DATASET else Path(given["dataset"]).name
                notes.append(f"preset for {what}: " + ", ".join(f"{k}={_show(preset[k])}" for k in used))
    values.update(given)
    return cls(**values), notes


def _show(value):
    return " ".join(map(str, value)) if isinstance(value, tuple) else value


def seed_all(seed):
    """Seed python `random`, numpy and torch (DESIGN.md, D8)."""
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
#
# A split is read as *pieces* whose row counts are known before anything is read: the row groups
# of parquet files (local, or hf:// files of a Hub dataset, from their footers), the files of an
# image folder (one row each), or, for any other format, the shards `datasets` streams (counted by
# one pass at start, said in the log). Every epoch the pieces are put in an order drawn from
# (--seed, epoch), the same on every process. Process r trains on the rows at positions
# [r q, (r + 1) q) of that order, q being its batches per epoch x --batch_size, and its loader
# workers on consecutive whole batches of that range. So across processes and workers every example
# is read once per epoch, whatever the shard sizes, and nobody reads more than its own rows (plus
# the rest of the row group its range starts or ends in). The N - processes x q rows at the end of
# an epoch's order (fewer than one global batch) are not trained in that epoch; as the order changes
# every epoch, they are other rows every time. Evaluation splits are read whole, in order, split
# across processes as evenly as possible.

SOURCE_KINDS = ("parquet", "imagefolder", "datasets")


@dataclasses.dataclass
class Source:
    """A dataset split as pieces with known row counts. JSON-able, so that one process can resolve
    it and hand it to the others; readable from any process or loader worker."""
    name: str                    # what the user passed as --dataset
    split: str
    kind: str                    # one of SOURCE_KINDS
    files: list                  # parquet files, image files, or [] (kind "datasets")
    pieces: list                 # [file index or shard, row group (parquet) or 0, rows]
    image_column: str
    label_column: str = None     # None: the split has no (integer) labels
    class_names: list = None     # image folders: label i is the folder class_names[i]

    @property
    def num_rows(self):
        return sum(p[2] for p in self.pieces)

    def read(self, piece, start, stop):
        """Rows [start, stop) of piece `piece` as (image cell, label or -1) pairs."""
        ref, group, _ = self.pieces[piece]
        if self.kind == "parquet":
            columns = [self.image_column] + ([self.label_column] if self.label_column else [])
            table = _parquet_file(self.files[ref]).read_row_group(group, columns=columns).slice(start, stop - start)
            images = table.column(self.image_column).to_pylist()
            labels = table.column(self.label_column).to_pylist() if self.label_column else [-1] * len(images)
            yield from zip(images, (-1 if v is None else int(v) for v in labels))
        elif self.kind == "imagefolder":
            path = self.files[ref]
            label = self.class_names.index(_class_of(path)) if self.class_names else -1
            cell = {"path": path, "bytes": None} if "://" not in path else {"bytes": _read_bytes(path), "path": path}
            yield cell, label
        else:
            for example in itertools.islice(_datasets_shard(self.name, self.split, ref), start, stop):
                label = example.get(self.label_column) if self.label_column else None
                yield example[self.image_column], -1 if label is None else int(label)


_OPEN = {}  # per-process caches of open parquet files and `datasets` streams (not shared with forked workers)


def _parquet_file(path):
    import pyarrow.parquet as pq
    key = (os.getpid(), path)
    if key not in _OPEN:
        if "://" in path:
            import fsspec
            _OPEN[key] = pq.ParquetFile(fsspec.open(path, "rb").open())
        else:
            _OPEN[key] = pq.ParquetFile(path)
    return _OPEN[key]


def _read_bytes(path):
    import fsspec
    with fsspec.open(path, "rb") as f:
        return f.read()


def _class_of(path):
    return path.replace("\\", "/").rsplit("/", 2)[-2]


def _datasets_stream(name, split):
    """The fallback reader: `datasets` streaming, one shard per piece."""
    import datasets
    key = (os.getpid(), name, split)
    if key not in _OPEN:
        path = Path(name).expanduser()
        if path.is_file() or any(ch in name for ch in "*?["):
            builder = {".csv": "csv", ".json": "json", ".jsonl": "json"}.get(path.suffix, "parquet")
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True)
        else:
            ds = datasets.load_dataset(str(path) if path.exists() else name, split=split, streaming=True)
        image_columns = [c for c, f in (ds.features or {}).items() if isinstance(f, datasets.Image)]
        for column in image_columns:
            ds = ds.cast_column(column, datasets.Image(decode=False))
        _OPEN[key] = ds.reshard() if hasattr(ds, "reshard") else ds
    return _OPEN[key]


def _datasets_shard(name, split, index):
    ds = _datasets_stream(name, split)
    return ds.shard(num_shards=ds.num_shards, index=index)


def _first_error_line(e):
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def open_source(name, split, image_column="image", label_column="label"):
    """Resolve --dataset into a Source: a Hugging Face Hub dataset id, a local folder (parquet files
    in the Hub layout, or an image folder whose sub-folders are the classes), a parquet file or a
    glob of them. Raises HVPError with one line on any problem, before a model is built. (Parquet
    files given directly need pyarrow only; folders and Hub ids are resolved by `datasets`.)"""
    path = Path(name).expanduser()
    try:
        if path.is_file() or any(ch in name for ch in "*?["):
            import glob
            files = [str(path)] if path.is_file() else sorted(glob.glob(str(path)))
            if not files:
                raise HVPError(f"cannot open dataset {name!r}: no file matches")
            if not all(f.endswith(".parquet") for f in files):
                return _datasets_source(name, split, image_column, label_column)
            split = "train"  # a single file or a glob: its contents are the split, whatever it is called
            return _parquet_source(name, split, files, image_column, label_column)
        import datasets
        builder = datasets.load_dataset_builder(str(path) if path.exists() else name)
    except HVPError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, HTTP...)
        where = "a local path" if path.exists() else "not a local path nor a reachable Hub dataset"
        raise HVPError(f"cannot open dataset {name!r} ({where}): {_first_error_line(e)}") from None
    data_files = {str(k): list(v) for k, v in (builder.config.data_files or {}).items()}
    if split not in data_files:
        raise HVPError(f"dataset {name!r} has no split {split!r} (it has: {', '.join(sorted(data_files)) or 'none'})")
    files = data_files[split]
    if files and all(f.endswith(".parquet") for f in files):
        return _parquet_source(name, split, files, image_column, label_column)
    if builder.name == "imagefolder":
        if image_column != "image":
            raise HVPError(f"dataset {name!r} is an image folder: its image column is 'image', not {image_column!r}")
        classes = sorted({_class_of(f) for files_ in data_files.values() for f in files_})
        has_labels = label_column == "label" and len(classes) > 1
        return Source(name, split, "imagefolder", files, [[i, 0, 1] for i in range(len(files))], image_column,
                      "label" if has_labels else None, classes if has_labels else None)
    return _datasets_source(name, split, image_column, label_column)


def _parquet_source(name, split, files, image_column, label_column):
    import pyarrow as pa
    from concurrent.futures import ThreadPoolExecutor
    try:
        with ThreadPoolExecutor(16) as pool:  # remote footers: one request each, in parallel
            metas = list(pool.map(lambda f: _parquet_file(f).metadata, files))
    except Exception as e:
        raise HVPError(f"cannot read the parquet files of dataset {name!r}: {_first_error_line(e)}") from None
    schema = _parquet_file(files[0]).schema_arrow
    if image_column not in schema.names:
        raise HVPError(f"dataset {name!r} has no image column {image_column!r} (columns: {schema.names}); "
                       f"pass --image_column")
    has_labels = label_column in schema.names and pa.types.is_integer(schema.field(label_column).type)
    pieces = [[f, g, meta.row_group(g).num_rows] for f, meta in enumerate(metas) for g in range(meta.num_row_groups)]
    return Source(name, split, "parquet", list(files), [p for p in pieces if p[2]], image_column,
                  label_column if has_labels else None)


def _datasets_source(name, split, image_column, label_column):
    """Any other format through `datasets`: its shards are the pieces, counted by one pass over a
    light column (the format has no row counts to read)."""
    try:
        ds = _datasets_stream(name, split)
        columns = list(ds.features) if ds.features is not None else list(next(iter(ds)).keys())
    except Exception as e:
        if "split" in str(e).lower():
            raise HVPError(f"dataset {name!r} has no split {split!r} ({_first_error_line(e)})") from None
        raise HVPError(f"cannot open dataset {name!r}: {_first_error_line(e)}") from None
    if image_column not in columns:
        raise HVPError(f"dataset {name!r} has no image column {image_column!r} (columns: {columns}); pass --image_column")
    light = label_column if label_column in columns else next(c for c in columns if c != image_column) \
        if len(columns) > 1 else image_column
    print(f"note: dataset {name!r} has no row counts to read ({ds.num_shards} shards): counting its rows once",
          file=sys.stderr, flush=True)
    counts = [sum(1 for _ in _datasets_shard(name, split, i).select_columns([light])) for i in range(ds.num_shards)]
    return Source(name, split, "datasets", [], [[i, 0, n] for i, n in enumerate(counts) if n], image_column,
                  label_column if label_column in columns else None)


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


def rows_at(piece_rows, order, start, stop):
    """The rows at positions [start, stop) of the pieces concatenated in `order`, as
    [(piece, first row, end row)] ranges."""
    ranges, position = [], 0
    for piece in order:
        n = piece_rows[piece]
        first, end = max(start, position), min(stop, position + n)
        if first < end:
            ranges.append((piece, first - position, end - position))
        position += n
        if position >= stop:
            break
    return ranges


def epoch_ranges(piece_rows, epoch, seed, rank, world, worker, workers, batch_size, batches=None):
    """What one loader worker of one process reads in an epoch: [(piece, first row, end row)].

    Training (`batches` = this process's batches per epoch): pieces in an order drawn from
    (seed, epoch); the process's range is positions [rank q, (rank + 1) q) with q = batches x
    batch_size; worker w gets batches//workers consecutive batches of it (one more for the first
    batches % workers workers). Evaluation (batches None): every row once, in order, split evenly."""
    if batches is None:
        total = sum(piece_rows)
        first, end = total * rank // world, total * (rank + 1) // world
        n = end - first
        return rows_at(piece_rows, range(len(piece_rows)), first + n * worker // workers, first + n * (worker + 1) // workers)
    order = torch.randperm(len(piece_rows), generator=torch.Generator().manual_seed(mix_seed(seed, epoch, "pieces")))
    mine = batches // workers + (worker < batches % workers)
    before = worker * (batches // workers) + min(worker, batches % workers)
    first = (rank * batches + before) * batch_size
    return rows_at(piece_rows, order.tolist(), first, first + mine * batch_size)


def _shuffled(rows, buffer_size, rng):
    """Buffer shuffle of a row stream: every row comes out exactly once, in a random order."""
    buffer = []
    for row in rows:
        if len(buffer) < buffer_size:
            buffer.append(row)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = row
    rng.shuffle(buffer)
    yield from buffer


def _ignore_stop_signals(_worker_id=None):
    """Loader workers ignore SIGTERM/SIGINT: a scheduler or a Ctrl-C signals the whole process group,
    and the main process needs its workers for the rest of the step before it saves. Workers end
    when the main process shuts its loaders down (always, see `_shut_down_loaders`) or dies."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


_LIVE_LOADERS = __import__("weakref").WeakSet()


@atexit.register
def _shut_down_loaders():
    """Stop the loader workers still running at exit (after an error, say). Registered after
    multiprocessing's own exit handler, so it runs first: that handler would send the workers a
    SIGTERM they ignore, then wait for them forever."""
    for batches in list(_LIVE_LOADERS):
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


class BatchStream(torch.utils.data.IterableDataset):
    """One epoch of one process's batches, made in its loader workers (`epoch_ranges` says which rows).

    - Every row's augmentation draws from its own generator seeded from (seed, epoch, row), so a run
      is reproducible, resumes exactly, and a row gets the same views whatever the number of
      processes and workers.
    - Training (`batches` given): rows are shuffled within each worker by a buffer of
      `shuffle_buffer` rows, and every batch has exactly batch_size samples (equal batches on every
      process, which the NT-Xent gather and DDP rely on): an image that cannot be decoded is
      replaced by another view of a decodable image of the same batch, and counted in
      batch["skipped"]. `skip` batches are left out at the start (resuming mid-epoch; see
      `epoch_batches`).
    - Evaluation (`batches` None): every row once (each worker reads a consecutive block, the loader
      takes batches from the workers in turn); undecodable images are left out and counted.
    """

    def __init__(self, source, transform, batch_size, epoch=0, seed=0, rank=0, world=1, batches=None, skip=0,
                 shuffle_buffer=5000, collate=None):
        super().__init__()
        self.source, self.transform, self.batch_size, self.epoch, self.seed = source, transform, batch_size, epoch, seed
        self.rank, self.world, self.batches, self.skip, self.shuffle_buffer = rank, world, batches, skip, shuffle_buffer
        self.collate = collate or collate_views

    def __iter__(self):
        import random
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        piece_rows = [p[2] for p in self.source.pieces]
        offsets = list(itertools.accumulate(piece_rows, initial=0))
        ranges = epoch_ranges(piece_rows, self.epoch, self.seed, self.rank, self.world, worker, workers,
                              self.batch_size, self.batches)
        rows = ((offsets[piece] + i, *cell) for piece, first, end in ranges
                for i, cell in enumerate(self.source.read(piece, first, end), start=first))
        if self.batches is not None:
            rows = _shuffled(rows, self.shuffle_buffer, random.Random(mix_seed(self.seed, self.epoch, self.rank, worker)))
            # the loader takes batches round-robin from workers 0, 1, ...: whole rounds are skipped here
            # (without decoding), the remaining skip % workers batches by `epoch_batches`
            rows = itertools.islice(rows, self.skip // workers * self.batch_size, None)
        chunk, fallback = [], None
        for row in rows:
            chunk.append(row)
            if len(chunk) == self.batch_size:
                batch, fallback = self._batch(chunk, fallback)
                chunk = []
                if batch is not None:
                    yield batch
        if chunk and self.batches is not None:  # the plan gives whole batches: the data changed under us
            raise HVPError(f"dataset {self.source.name!r} has fewer rows than when the run started (a batch of "
                           f"{len(chunk)} rows at the end of epoch {self.epoch}): restart the run")
        if chunk:
            batch, _ = self._batch(chunk, fallback)
            if batch is not None:
                yield batch

    def _sample(self, cell, label, *key):
        """The transform's sample of one row (None if its image cannot be decoded). Device-mode
        transforms get the lazily opened image and decode what their views need."""
        image = open_image(cell) if getattr(self.transform, "crops", None) == "device" else decode_image(cell)
        if image is None:
            return None
        sample = self.transform(image, torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, *key)))
        if sample is not None:
            sample["label"] = label
        return sample

    def _batch(self, chunk, fallback):
        """Collate one planned batch; returns (batch or None, a decodable (cell, label, row) for later batches)."""
        samples, good = [], []
        for row, cell, label in chunk:
            sample = self._sample(cell, label, row)
            if sample is not None:
                samples.append(sample)
                good.append((cell, label, row))
        skipped = len(chunk) - len(good)
        if self.batches is not None and skipped:
            donors = good or ([fallback] if fallback is not None else [])
            if not donors:
                raise HVPError(f"none of the images of a whole batch of {self.source.name!r} can be decoded "
                               f"(rows {chunk[0][0]}...): is --image_column right?")
            for j in range(skipped):
                cell, label, row = donors[j % len(donors)]
                samples.append(self._sample(cell, label, row, "replacement", j))
        if not samples:
            return None, fallback
        batch = self.collate(samples)
        batch["skipped"] = torch.tensor(skipped)
        return batch, (good[-1] if good else fallback)


def make_loader(stream, num_workers, pin_memory=False, prefetch_factor=2):
    """DataLoader over a BatchStream (its items are whole batches)."""
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                       worker_init_fn=_ignore_stop_signals, persistent_workers=False,
                                       prefetch_factor=prefetch_factor if num_workers else None)


def epoch_batches(make_epoch_loader, epoch, skip=0):
    """Iterator over one epoch's batches after the first `skip`: exactly the batches an uninterrupted
    epoch gives from there on. make_epoch_loader(epoch, skip) -> DataLoader over a BatchStream."""
    loader = make_epoch_loader(epoch, skip)
    batches = iter(loader)
    _LIVE_LOADERS.add(batches)
    for _ in range(skip % max(1, loader.num_workers)):
        next(batches)
    return batches


def training_batches(make_epoch_loader, steps_per_epoch, start_step=0, grad_accum=1, lookahead=4, total_steps=None):
    """Yield (epoch, micro-batch) from optimizer step `start_step` on, epoch after epoch, until
    `total_steps` (None: forever). The next epoch's loader starts `lookahead` micro-batches before
    the current one ends, so worker start-up overlaps training (its workers and prefetched batches
    briefly exist beside the current ones); not after the last epoch."""
    per_epoch = steps_per_epoch * grad_accum
    end = None if total_steps is None else total_steps * grad_accum
    epoch, done = divmod(start_step * grad_accum, per_epoch)
    current, upcoming = epoch_batches(make_epoch_loader, epoch, done), None
    while True:
        for i in range(done, per_epoch):
            if end is not None and epoch * per_epoch + i >= end:
                return
            if upcoming is None and per_epoch - i <= lookahead and (end is None or (epoch + 1) * per_epoch < end):
                upcoming = epoch_batches(make_epoch_loader, epoch + 1)
            yield epoch, next(current)
        current, upcoming, epoch, done = upcoming, None, epoch + 1, 0


def default_workers(processes_per_node=1):
    """Loader workers per process when --num_workers is not given: the CPU cores this process may
    use, shared by the node's processes, minus one for the training loop itself (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, cores // max(1, processes_per_node) - 1)


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


def pixels_to_device(batch, device):
    """The batch with its pixels (device-mode "image", worker-mode uint8 views) moved to `device`
    (asynchronously from pinned memory); parameters and labels stay where they are."""
    moved = dict(batch)
    for key, value in batch.items():
        if torch.is_tensor(value) and value.dtype == torch.uint8 and value.dim() >= 4:
            moved[key] = value.to(device, non_blocking=True)
    return moved


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


def export_backbone(backbone, out_dir, data_config, tag):
    """Write `model.safetensors` + timm `config.json` to `out_dir` atomically. ResNets with the standard
    stem and every ViT (patch size, image size etc. are in config.json's model_args) load with
    `timm.create_model("local-dir:<out_dir>", pretrained=True)` (or "hf-hub:<id>" once pushed);
    small-stem ResNets need `load_backbone` (config.json cannot describe the replaced stem)."""
    import copy
    import timm
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model_config = {"pretrained_cfg": {"tag": tag}}
    if getattr(backbone, "hvp_small_stem", False):
        model_config["hvp_small_stem"] = True
    if getattr(backbone, "hvp_pos_embed_resample", "timm") != "timm":  # plain timm ignores it (same at the native size)
        model_config["hvp_pos_embed_resample"] = backbone.hvp_pos_embed_resample
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
        # the export's data config, as timm sets it for the exports it loads (resolve_data_config(model=...))
        model.pretrained_cfg = model.default_cfg = dict(config.get("pretrained_cfg", {}),
                                                        architecture=config["architecture"])
    else:
        model = timm.create_model(f"local-dir:{path}", pretrained=True, num_classes=0)
    if config.get("hvp_pos_embed_resample"):
        set_pos_embed_resample(model, config["hvp_pos_embed_resample"])
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
MANIFEST = "manifest.json"  # sha256 and size of every file of a checkpoint, written last


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_manifest(folder):
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (Path(folder) / MANIFEST).write_text(json.dumps({"files": manifest}, indent=1))


def checkpoint_problem(path):
    """None if the checkpoint folder is intact (every file of its manifest present with its size and
    sha256), else a short reason. Checkpoints from before manifests were written pass unchecked."""
    path = Path(path)
    if not (path / "state.json").is_file() or not (path / "state.safetensors").is_file():
        return "state.json or state.safetensors is missing"
    if not (path / MANIFEST).is_file():
        return None
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable {MANIFEST} ({_first_error_line(e)})"
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, not {want['bytes']}"
        if _sha256(f) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


def save_checkpoint(output_dir, step, state, backbone=None, data_config=None, tag="hvp", keep=2):
    """Write `output_dir/checkpoint-<step>/` atomically: state.safetensors (every tensor),
    state.json (everything else), backbone/ (timm export), manifest.json (sizes and checksums). A
    kill at any moment leaves either the old or the new checkpoint complete, never a half-written
    latest one; a file damaged later is found by `checkpoint_problem`."""
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
    _write_manifest(tmp)
    _replace_dir(tmp, final)
    old = sorted(p for p in output_dir.iterdir() if CHECKPOINT_RE.match(p.name))
    for p in old[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    return final


def checkpoints(output_dir):
    """Checkpoint folders in output_dir, newest first (output_dir itself if it is one)."""
    output_dir = Path(output_dir)
    if (output_dir / "state.json").is_file():
        return [output_dir]
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if CHECKPOINT_RE.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)), reverse=True)


def latest_checkpoint(output_dir):
    """The newest complete checkpoint folder in output_dir (or output_dir itself if it is one)."""
    return next((p for p in checkpoints(output_dir) if (p / "state.json").is_file()
                 and (p / "state.safetensors").is_file()), None)


def load_checkpoint(path):
    """Read a checkpoint written by save_checkpoint. Only safetensors and JSON are parsed."""
    from safetensors.torch import load_file
    path = Path(path)
    try:
        return _unflatten(json.loads((path / "state.json").read_text()), load_file(path / "state.safetensors"))
    except Exception as e:
        raise HVPError(f"cannot read checkpoint {path}: {_first_error_line(e)}") from None


def checkpoint_config(path):
    """The training configuration stored in a checkpoint (without reading its tensors)."""
    skeleton = json.loads((Path(path) / "state.json").read_text())
    return _unflatten(skeleton.get("config", {}), {})


def cleanup_partial_checkpoints(output_dir):
    """Remove what a killed run can leave behind: half-written checkpoints and exports, folders
    swapped out by an interrupted replace, links queued for a Hub push."""
    for pattern in (".tmp-checkpoint-*", "*.tmp-*", "*.old-*", ".hub-push-*"):
        for p in Path(output_dir).glob(pattern):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------- k-NN

@torch.no_grad()
def extract_features(forward, loader, accelerator, desc="features"):
    """Run `forward` over a loader of {"image", "label", "skipped"} batches on every process and
    gather the (features, labels) of all processes onto every process. Returns (features, labels,
    number of images that could not be decoded, over all processes)."""
    feats, labels, skipped = [], [], 0
    for batch in _bar_over(loader, desc, accelerator.is_local_main_process):
        with accelerator.autocast():
            f = forward(batch["image"].to(accelerator.device, non_blocking=True))
        feats.append(f.float())
        labels.append(batch["label"].to(accelerator.device))
        skipped += int(batch.get("skipped", 0))
    device = accelerator.device
    feats = torch.cat(feats) if feats else torch.zeros(0, 0, device=device)
    labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    if accelerator.num_processes > 1:  # ranks hold different counts: pad, gather, strip the padding
        count = accelerator.gather(torch.tensor([len(labels)], device=device))
        skipped = int(accelerator.reduce(torch.tensor([skipped], device=device), reduction="sum").item())
        dim = int(accelerator.gather(torch.tensor([feats.shape[1]], device=device)).max())
        if feats.shape[1] != dim:  # this rank had no data
            feats = torch.zeros(0, dim, device=device)
        feats = accelerator.gather(accelerator.pad_across_processes(feats, dim=0))
        labels = accelerator.gather(accelerator.pad_across_processes(labels, dim=0, pad_index=-1))
        longest = len(labels) // len(count)
        keep = torch.cat([torch.arange(longest, device=device) < c for c in count])
        feats, labels = feats[keep], labels[keep]
    return feats, labels, skipped


def _bar_over(loader, desc, enabled):
    bar = progress_bar(None, desc=desc, enabled=enabled)
    for batch in loader:
        yield batch
        bar.update(1)
    bar.close()


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


def eval_loader(source, image_size, accelerator, batch_size, num_workers, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """A loader over this process's part of an evaluation split: every image once, in order, resized
    and centre-cropped (EvalTransform), not augmented."""
    stream = BatchStream(source, EvalTransform(image_size, mean, std), batch_size, rank=accelerator.process_index,
                         world=accelerator.num_processes)
    return make_loader(stream, num_workers, pin_memory=torch.cuda.is_available())


def knn_eval(forward, accelerator, train_source, test_source, image_size, batch_size=256, num_workers=2, k=20,
             temperature=0.07, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """k-NN accuracy of frozen features: memory bank = the train Source, queries = the test Source."""
    train_feats, train_labels, skipped_train = extract_features(
        forward, eval_loader(train_source, image_size, accelerator, batch_size, num_workers, mean, std), accelerator,
        f"k-NN {train_source.split}")
    test_feats, test_labels, skipped_test = extract_features(
        forward, eval_loader(test_source, image_size, accelerator, batch_size, num_workers, mean, std), accelerator,
        f"k-NN {test_source.split}")
    top1, top5 = knn_accuracy(train_feats, train_labels, test_feats, test_labels, k, temperature)
    return {"knn_top1": top1, "knn_top5": top5, "k": k, "temperature": temperature,
            "train_samples": len(train_labels), "test_samples": len(test_labels),
            "skipped_images": skipped_train + skipped_test}


# ----------------------------------------------------------------------------------- run lifecycle
#
# What happens around the training steps, the same for every method and written once: checks that
# fail in a second instead of after hours, one run per output folder, the resume decision, state
# shared from the main process, metrics, checkpoints, stop on a signal, k-NN, export and push.

def native_bf16(device):
    """True where bf16 autocast runs on native bf16 units: CUDA GPUs that support it, CPUs with
    AVX512-BF16 or AMX-BF16. (Elsewhere CPUs emulate it, 1.7-3.3x slower than fp32 on Ice Lake.)"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    caps = getattr(torch.cpu, "get_capabilities", lambda: {})()
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def resolve_precision(mixed_precision, device):
    """--mixed_precision: "auto" is bf16 where it is native (see native_bf16), otherwise fp32 ("no");
    "" leaves it to `accelerate launch --mixed_precision` (or its config). Returns (value for
    Accelerate, or None; a note saying why, or "")."""
    if mixed_precision != "auto":
        return mixed_precision or None, ""
    if native_bf16(device):
        return "bf16", f"auto: this {'GPU' if device.type == 'cuda' else 'CPU'} has native bf16"
    return "no", f"auto: fp32, this {'GPU' if device.type == 'cuda' else 'CPU'} has no native bf16 (emulated bf16 is slower)"


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
    """Linear warm-up from warmup_start that reaches `start` at its last step (step warmup_steps - 1,
    as DINO's and iBOT's np.linspace warm-ups), then a cosine from start to end over the rest."""
    if step < warmup_steps:
        return warmup_start + (start - warmup_start) * step / max(1, warmup_steps - 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(1.0, progress)))


def linear_warmup(epoch, start, end, epochs):
    """A per-epoch linear warm-up from `start` that reaches `end` at epoch epochs - 1 (DINO's and
    iBOT's teacher temperatures: np.linspace over the warm-up epochs), then stays there."""
    if epoch >= epochs - 1:
        return end
    return start + (end - start) * epoch / (epochs - 1)


def progress_bar(total, initial=0, desc="", enabled=True):
    """tqdm that honours TQDM_DISABLE and, outside a terminal (CI logs, files), redraws at most
    every 30 s instead of once per step."""
    from tqdm.auto import tqdm
    off = os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    return tqdm(total=total, initial=initial, desc=desc, disable=off or not enabled, dynamic_ncols=True,
                mininterval=0.1 if sys.stderr.isatty() else 30.0)


class RunLock:
    """One run per output folder: an exclusive lock on <folder>/.lock (flock), held by the main
    process for the whole run. The kernel drops it when the process ends, however it ends, so a
    lock left by a killed run is simply free again. On file systems without flock, a pid file:
    a lock whose process is gone on this host is taken over."""

    def __init__(self, folder):
        import fcntl
        import socket
        self.path = Path(folder) / ".lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        me = f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}"
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise HVPError(f"{folder} is in use by another run ({holder}): wait for it to end, or choose "
                           "another --output_dir") from None
        except OSError:  # no flock here
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").split()
            if len(holder) > 3 and holder[3].rstrip(",") == socket.gethostname() and _alive(int(holder[1])):
                os.close(self.fd)
                raise HVPError(f"{folder} is in use by another run ({' '.join(holder)}): wait for it to end, or "
                               "choose another --output_dir") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, me.encode(), 0)

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StopRequest:
    """SIGTERM and SIGINT (as a scheduler, systemd or a terminal's Ctrl-C send them to the whole
    process group) become a flag; the run saves after the current step and exits 0. A second
    Ctrl-C more than 3 s after the first quits at once, without saving.

    Processes agree on the step to stop at without a host-device sync: each step starts an
    asynchronous all-reduce of its flag over a CPU (gloo) group and reads the one of the step
    before, so every process sees a request at the same step, one step after it arrived."""

    def __init__(self, accelerator):
        self.requested, self.first_at, self.signal_name = False, None, None
        self.accelerator, self.group, self.pending = accelerator, None, None
        if accelerator.num_processes > 1:
            import torch.distributed as dist
            self.group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._handle)
        except ValueError:  # not the main thread
            pass

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.first_at is not None and time.monotonic() - self.first_at > 3:
            raise KeyboardInterrupt
        if not self.requested and self.accelerator.is_main_process:
            print(f"\n{signal.Signals(signum).name}: saving after this step, then stopping"
                  + (" (Ctrl-C again quits without saving)" if signum == signal.SIGINT else ""), file=sys.stderr, flush=True)
        self.requested, self.signal_name = True, self.signal_name or signal.Signals(signum).name
        self.first_at = self.first_at or time.monotonic()

    def agreed(self):
        """Call once per step on every process: True on all of them at the same step once any got a signal."""
        if self.group is None:
            return self.requested
        import torch.distributed as dist
        stop = False
        if self.pending is not None:
            work, flag = self.pending
            work.wait()
            stop = bool(flag.item() > 0)
        flag = torch.tensor([float(self.requested)])
        self.pending = (dist.all_reduce(flag, group=self.group, async_op=True), flag)
        return stop

    def close(self):
        if self.pending is not None:
            self.pending[0].wait()
            self.pending = None


def tracker_name(key):
    """TensorBoard (or other tracker) name of a metrics.jsonl key, grouped by prefix; None for what
    is not a time series (constants such as k or sample counts, histograms)."""
    if key in ("step", "epoch", "k", "temperature", "train_samples", "test_samples") or key.endswith("_hist"):
        return None
    if key.startswith(("hard_", "random_")):
        return f"hvp/{key}"
    if key.startswith("knn_"):
        return f"knn/{key[4:]}"
    if key in ("images_per_s", "select_s", "train_s"):
        return f"speed/{key}"
    if key == "skipped_images":
        return f"data/{key}"
    return f"train/{key}"


class MetricsLog:
    """metrics.jsonl (one JSON object per logged step) + the Accelerate trackers, main process only.
    Opening it at `resume_step` first drops the records of later steps (replayed after a resume),
    so every step appears once."""

    def __init__(self, accelerator, output_dir, resume_step=0):
        self.accelerator = accelerator
        self.path = Path(output_dir) / "metrics.jsonl"
        self.file = None
        if accelerator.is_main_process:
            if self.path.exists():
                kept = [line for line in self.path.read_text().splitlines()
                        if line.strip() and _record_step(line) <= resume_step]
                tmp = self.path.with_name(f"metrics.jsonl.tmp-{os.getpid()}")
                tmp.write_text("".join(line + "\n" for line in kept))
                os.replace(tmp, self.path)
            self.file = open(self.path, "a")

    def log(self, record):
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        scalars = {tracker_name(k): v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and tracker_name(k)}
        if scalars:
            self.accelerator.log(scalars, step=record["step"])

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


def _record_step(line):
    try:
        return json.loads(line).get("step", 0)
    except ValueError:  # a line cut by a kill
        return float("inf")


def write_run_info(output_dir, config):
    """Record the resolved config, versions and the command line next to the results."""
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


def broadcast_state(state, accelerator):
    """Give every process the main process's version of a nested state (tensors, dicts, lists,
    numbers): the structure travels first, then each tensor. Returns the state received."""
    from accelerate.utils import broadcast_object_list
    import torch.distributed as dist
    tensors = {}
    skeleton = _flatten(state, tensors, "") if accelerator.is_main_process else None
    shapes = {k: (str(t.dtype).removeprefix("torch."), list(t.shape)) for k, t in tensors.items()}
    box = [skeleton, shapes]
    broadcast_object_list(box, from_process=0)
    skeleton, shapes = box
    device = accelerator.device if dist.get_backend() == "nccl" else torch.device("cpu")
    received = {}
    for key, (dtype, shape) in shapes.items():
        t = tensors[key].to(device) if key in tensors else torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        dist.broadcast(t, src=0)
        received[key] = t
    return _unflatten(skeleton, received)


def broadcast_object(accelerator, value):
    """The main process's `value` (a picklable object), on every process."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def on_main(accelerator, fn):
    """fn() on the main process only, its result handed to every process; an HVPError there stops
    every process with the same line (instead of leaving the others waiting at the next collective)."""
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except HVPError as e:
            error = str(e)
    result, error = broadcast_object(accelerator, (result, error))
    if error is not None:
        raise HVPError(error)
    return result


def _state_of(obj):
    return obj.detach() if torch.is_tensor(obj) else obj.state_dict()


def _load_state(obj, state):
    if torch.is_tensor(obj):
        obj.copy_(state)
    else:
        obj.load_state_dict(state)


def _same(a, b):
    """Config values compared across a JSON round trip (tuples come back as lists)."""
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


class Run:
    """The lifecycle of one training run, shared by the four scripts:

        run = hvp.Run(cfg, "DINO", MODEL_FIELDS)    # accelerator, every check that needs no model
        ...build the models (the same on every process: torch is seeded with --seed until start)...
        model, optimizer = run.prepare(model, optimizer)
        run.start({"student": ..., "teacher": ..., "optimizer": optimizer}, transform, export=teacher.backbone)
        for epoch, micro_batches in run.steps():
            record = train_step(...)                 # the method's step; run.log_now says if it is logged
            run.log(record)
        run.finish()                                  # final checkpoint, k-NN, export, Hub push

    Checked before any model is built, each failing with one line (exit status 2) on every process:
    the output folder (writable, not used by another run, resumable or new as --resume says), the
    Hub settings, the dataset, its training split and the labelled evaluation split. The decisions
    (which checkpoint, which step) are made by the main process and shared; at start the main
    process's state (fresh or resumed) is sent to every process, so no process needs to read the
    checkpoint and all start identical (students and teachers alike), with or without a shared file
    system. Only the main process writes to --output_dir.
    """

    def __init__(self, cfg, method, model_fields=(), notes=()):
        self.cfg, self.method, self.model_fields, self.notes = cfg, method, tuple(model_fields), list(notes)
        self.tag = f"hvp_{method.lower()}"
        self.output_dir = Path(cfg.output_dir)
        world = int(os.environ.get("WORLD_SIZE", 1))
        if getattr(cfg, "global_batch", 0):
            per_step = cfg.batch_size * world
            if cfg.global_batch % per_step:
                raise HVPError(f"--global_batch {cfg.global_batch} is not a multiple of --batch_size {cfg.batch_size} "
                               f"x {world} process(es)")
            cfg.grad_accum = cfg.global_batch // per_step
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        precision, self.precision_note = resolve_precision(cfg.mixed_precision, device)
        self.accelerator = acc = make_accelerator(precision, cfg.grad_accum, cfg.report_to, self.output_dir)
        self.rank, self.world, self.device, self.is_main = acc.process_index, acc.num_processes, acc.device, acc.is_main_process
        if self.device.type == "cuda":  # TF32 matmuls/convolutions (fp32 runs) and the fastest kernels for fixed shapes
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        self.lock, self.stopped, self.state, self.step = None, False, {}, 0
        self.pusher = self._everywhere(lambda: HubPusher.from_config(cfg, acc, method))
        self.source = Source(**self._on_main(lambda: dataclasses.asdict(
            open_source(cfg.dataset, cfg.split, cfg.image_column, cfg.label_column))))
        self.eval_source = self._on_main(self._open_eval_split)
        self.eval_source = Source(**self.eval_source) if self.eval_source else None
        self.decision = self._on_main(self._claim_output_dir)
        self.global_batch = cfg.batch_size * self.world * cfg.grad_accum
        self.steps_per_epoch = self.source.num_rows // self.global_batch
        if self.steps_per_epoch == 0:
            raise HVPError(f"split {cfg.split!r} has {self.source.num_rows} images, fewer than one global batch "
                           f"({self.global_batch})")
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.num_workers = cfg.num_workers if cfg.num_workers >= 0 else default_workers(
            int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        # where views are cut: batched on a GPU; on a CPU the workers' resizes are cheaper (bench_data.py)
        self.crops = cfg.crops if cfg.crops != "auto" else ("device" if self.device.type == "cuda" else "worker")
        torch.manual_seed(cfg.seed)  # the same initial weights on every process

    @property
    def resuming(self):
        """True when this run continues from a checkpoint (decided at construction)."""
        return self.decision["checkpoint"] is not None

    # --- agreement between processes

    def _on_main(self, fn):
        return on_main(self.accelerator, fn)

    def _everywhere(self, fn):
        """fn() on every process; if it raises HVPError anywhere, every process stops."""
        result, error = None, None
        try:
            result = fn()
        except HVPError as e:
            error = str(e)
        if self.world > 1:
            failed = self.accelerator.reduce(torch.tensor([float(error is not None)], device=self.device), "sum")
            if failed.item() and error is None:
                error = "another process stopped at start (its error is printed above)"
        if error is not None:
            raise HVPError(error)
        return result

    def _claim_output_dir(self):
        """Main process: the output folder is writable and ours; which checkpoint to resume from.
        A folder that does not exist yet is created (and locked) by `start`, so that bad input
        found before then leaves nothing behind."""
        cfg, out = self.cfg, self.output_dir
        if not out.exists():
            parent = next(p for p in [out, *out.parents] if p.exists())
            if not (parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)):
                raise HVPError(f"cannot create --output_dir {out}: {parent} is not a writable folder")
            if cfg.resume == "yes":
                raise HVPError(f"--resume: {out} does not exist, there is no run to continue (a new run starts "
                               "without --resume; --resume auto continues a run if there is one)")
            return {"checkpoint": None, "step": 0, "notes": []}
        self._lock_output_dir()
        found = checkpoints(out)
        if not found:
            if cfg.resume == "yes":
                raise HVPError(f"--resume: no checkpoint in {out} to continue (a new run starts without --resume; "
                               "--resume auto continues a run if there is one)")
            return {"checkpoint": None, "step": 0, "notes": []}
        if not cfg.resume:
            raise HVPError(f"{out} already holds a run ({found[0].name}): pass --resume to continue it, or choose "
                           "another --output_dir")
        notes = []
        for ckpt in found:
            problem = checkpoint_problem(ckpt)
            if problem is None:
                break
            notes.append(f"warning: {ckpt.name} is damaged ({problem}): not resuming from it")
        else:
            raise HVPError(f"--resume: every checkpoint in {out} is damaged (last problem: {problem})")
        if notes:
            notes.append(f"resuming from the previous good checkpoint, {ckpt.name}")
        saved = checkpoint_config(ckpt)
        mine = dataclasses.asdict(cfg)
        differ = [f for f in self.model_fields if f in saved and not _same(saved[f], mine[f])]
        if differ:
            raise HVPError(f"--resume: {ckpt} holds a model with " + ", ".join(f"--{f} {saved[f]}" for f in differ)
                           + "; this command asks for " + ", ".join(f"--{f} {mine[f]}" for f in differ))
        quiet = {"resume", "output_dir", "max_steps", "epochs", "num_workers", "log_every", "save_every", "knn_every",
                 "report_to", "push_to_hub", "hub_model_id", "hub_private", "hub_every", "hub_push_state", "init_from"}
        changed = [f"{f} {saved[f]} -> {mine[f]}" for f in mine if f in saved and f not in quiet and not _same(saved[f], mine[f])]
        if changed:
            notes.append("note: resuming with changed settings: " + ", ".join(changed))
        step = json.loads((ckpt / "state.json").read_text())["step"]
        return {"checkpoint": str(ckpt), "step": step, "notes": notes}

    def _lock_output_dir(self):
        out = self.output_dir
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f".write-test-{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            raise HVPError(f"cannot write to --output_dir {out}: {e.strerror or e}") from None
        self.lock = RunLock(out)
        cleanup_partial_checkpoints(out)

    def _open_eval_split(self):
        cfg = self.cfg
        if not cfg.eval_split:
            return None
        if not self.source.label_column:
            print(f"note: split {cfg.split!r} has no integer label column {cfg.label_column!r}: no k-NN evaluation",
                  flush=True)
            return None
        source = open_source(cfg.dataset, cfg.eval_split, cfg.image_column, cfg.label_column)
        if not source.label_column:
            raise HVPError(f"evaluation split {cfg.eval_split!r} of {cfg.dataset!r} has no integer label column "
                           f"{cfg.label_column!r} for the k-NN evaluation (--eval_split '' skips it)")
        return dataclasses.asdict(source)

    # --- start

    def prepare(self, *objects):
        """accelerator.prepare (DDP, autocast, fp16 scaler) of the trained model and its optimizer."""
        return self.accelerator.prepare(*objects)

    def start(self, state, transform, export, evaluate=None, banner="", data_config=None):
        """Begin (or resume) training.

        state: what a checkpoint holds, {name: module, optimizer or tensor}; export: the backbone
        written as the timm export (and pushed); evaluate: the backbone k-NN evaluates (default
        export); transform: the training views of one image, transform(image, generator) -> dict;
        banner: the method's part of the start-up line."""
        cfg, acc = self.cfg, self.accelerator
        self.state, self.export, self.evaluate = dict(state), export, evaluate or export
        if acc.scaler is not None:
            self.state["scaler"] = acc.scaler
        self.data_config = data_config or {"input_size": (3, cfg.image_size, cfg.image_size), "interpolation": "bicubic",
                                           "crop_pct": 0.875, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
        self.step = self.decision["step"]
        self._on_main(self._load_and_check_room)
        if self.world > 1:  # everyone starts from the main process's state, fresh or resumed
            received = broadcast_state({k: _state_of(v) for k, v in self.state.items()}, acc)
            for name, value in received.items():
                _load_state(self.state[name], value)
        seed_all(cfg.seed + self.rank)
        self.metrics = MetricsLog(acc, self.output_dir, self.step)
        if self.is_main:
            write_run_info(self.output_dir, cfg)
        hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in dataclasses.asdict(cfg).items()}
        purge = {"tensorboard": {"purge_step": self.step + 1}} if self.step and "tensorboard" in cfg.report_to else {}
        acc.init_trackers(self.tag, config=hparams, init_kwargs=purge)
        if self.is_main:
            self._print_banner(banner)
        self._stop = StopRequest(acc)
        pin = self.device.type == "cuda"
        batches = self.steps_per_epoch * cfg.grad_accum

        def epoch_loader(epoch, skip):
            stream = BatchStream(self.source, transform, cfg.batch_size, epoch, cfg.seed, self.rank, self.world,
                                 batches, skip, cfg.shuffle_buffer)
            return make_loader(stream, self.num_workers, pin_memory=pin)

        self._batches = training_batches(epoch_loader, self.steps_per_epoch, self.step, cfg.grad_accum,
                                         total_steps=self.total_steps)
        self.bar = progress_bar(self.total_steps, self.step, self.method, self.is_main)
        self.skipped, self._last_log = 0, (time.perf_counter(), self.step)

    def _load_and_check_room(self):
        """Main process: load the chosen checkpoint into the state; check there is room for the next."""
        if self.lock is None:
            self._lock_output_dir()
        ckpt = self.decision["checkpoint"]
        for note in self.decision["notes"]:
            print(note, flush=True)
        if ckpt is not None:
            saved = load_checkpoint(ckpt)
            for name, obj in self.state.items():
                if name not in saved or saved[name] is None:
                    if name == "scaler":
                        continue
                    raise HVPError(f"--resume: {ckpt} has no {name!r} state (saved by another script?)")
                try:
                    _load_state(obj, saved[name])
                except (RuntimeError, ValueError, KeyError) as e:
                    raise HVPError(f"--resume: {ckpt} does not fit this {name}: {_first_error_line(e)[:300]}") from None
        size = sum(t.numel() * t.element_size() for obj in self.state.values()
                   for t in _tensors_in(_state_of(obj))) + sum(p.numel() * p.element_size() for p in self.export.state_dict().values())
        free = shutil.disk_usage(self.output_dir).free
        if free < 1.2 * size + 2**20:
            raise HVPError(f"--output_dir {self.output_dir} has {free / 2**30:.2f} GiB free; a checkpoint needs "
                           f"about {size / 2**30:.2f} GiB")

    def _print_banner(self, banner):
        cfg = self.cfg
        precision = self.accelerator.mixed_precision
        line = (f"{self.method} {banner} | {self.world} process(es) on {self.device.type} | global batch "
                f"{self.global_batch} ({cfg.batch_size} x {self.world} x {cfg.grad_accum} accumulated) | "
                f"{self.steps_per_epoch} steps/epoch | {self.total_steps} steps | precision {precision}"
                + (f" ({self.precision_note})" if self.precision_note else "")
                + f" | {self.num_workers} loader workers, crops on the {self.crops}"
                + (f" | resumed at step {self.step}" if self.step else ""))
        print(line, flush=True)
        for note in self.notes:
            print(note, flush=True)
        if self.device.type == "cuda" and precision == "no":
            print("warning: training on CUDA in fp32 (TF32 matmuls); bf16 is usually ~2x faster: pass "
                  "--mixed_precision bf16 (or accelerate launch --mixed_precision bf16)", flush=True)

    # --- the loop

    def steps(self):
        """Yield (epoch, micro_batches) for each remaining optimizer step. micro_batches yields the
        step's --grad_accum batches and seeds torch from (seed, rank, step, micro-step) before each,
        so drop-path and other randomness inside a step replay exactly after a resume. Between
        steps: progress bar, periodic checkpoint and k-NN, and the stop check."""
        cfg = self.cfg
        while self.step < self.total_steps:
            last = self.step + 1 == self.total_steps
            self.log_now = (self.step + 1) % cfg.log_every == 0 or last
            self.grid_now = self.log_now and self.is_main and self.step % self.steps_per_epoch < cfg.log_every
            self._used = 0
            yield self.step // self.steps_per_epoch, self._micro_batches()
            if self._used != cfg.grad_accum:
                raise RuntimeError(f"the training step used {self._used} of its {cfg.grad_accum} micro-batches")
            self.step += 1
            self.bar.update(1)
            if self.step % cfg.save_every == 0 and self.step < self.total_steps:
                self.save()
            if cfg.knn_every and self.step % (cfg.knn_every * self.steps_per_epoch) == 0 and self.step < self.total_steps:
                result = self.knn()
                if result:
                    self.metrics.log({"step": self.step, "epoch": self.step / self.steps_per_epoch, **result})
            if self._stop.agreed():
                self.stopped = True
                return

    def _micro_batches(self):
        for micro in range(self.cfg.grad_accum):
            _, batch = next(self._batches)
            # seeded after the fetch: starting a loader draws from torch's generator too
            torch.manual_seed(mix_seed(self.cfg.seed, self.rank, self.step, micro))
            self.skipped += int(batch["skipped"])
            self._used += 1
            yield batch

    def log(self, record):
        """Write a logged step's record (call when run.log_now): `loss` (a tensor) is averaged over
        processes and must be finite; tensors become numbers; speed and skipped images are added."""
        if not self.log_now:
            return
        loss = self.accelerator.reduce(record.pop("loss").detach().float(), reduction="mean").item()
        if not math.isfinite(loss):
            raise HVPError(f"loss became {loss} at step {self.step + 1}: training diverged; the last checkpoint in "
                           f"{self.output_dir} is intact (try a lower --lr)")
        (since, from_step), now = self._last_log, time.perf_counter()
        full = {"step": self.step + 1, "epoch": round((self.step + 1) / self.steps_per_epoch, 4), "loss": loss}
        for key, value in record.items():
            full[key] = float(value) if torch.is_tensor(value) and value.numel() == 1 else value
        full.update(images_per_s=(self.step + 1 - from_step) * self.global_batch / (now - since),
                    skipped_images=self.skipped)
        self.metrics.log(full)
        self.bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{full['images_per_s']:.0f}")
        self._last_log = (now, self.step + 1)

    def save_grid(self, name, views, chosen):
        """grids/step-<step><name>.png: a few images' candidate views, the chosen ones framed (main process)."""
        if self.is_main:
            (self.output_dir / "grids").mkdir(exist_ok=True)
            save_view_grid(self.output_dir / "grids" / f"step-{self.step + 1:08d}{name}.png", views, chosen)

    # --- checkpoints, evaluation, the end

    def save(self):
        """Checkpoint the state (main process), refresh <output_dir>/backbone, push when due."""
        self.accelerator.wait_for_everyone()
        path = self.output_dir / f"checkpoint-{self.step:08d}"
        if self.is_main:
            state = {name: _state_of(obj) for name, obj in self.state.items()}
            state.update(step=self.step, config=dataclasses.asdict(self.cfg))
            save_checkpoint(self.output_dir, self.step, state, self.export, self.data_config, self.tag,
                            self.cfg.keep_checkpoints)
            tmp = self.output_dir / f"backbone.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            _link_tree(path / "backbone", tmp)  # the checkpoint's export, by hard links
            _replace_dir(tmp, self.output_dir / "backbone")
            if self.pusher.due(self.step) and self.step < self.total_steps:
                self.pusher.push(self.output_dir / "backbone", self.step, state_dir=path)
        self.accelerator.wait_for_everyone()
        return path

    def knn(self):
        """k-NN accuracy of the evaluated backbone (train split = memory bank, eval split = queries)."""
        if self.eval_source is None:
            return None
        cfg, model = self.cfg, self.evaluate
        was_training = model.training
        model.eval()
        result = knn_eval(model, self.accelerator, self.source, self.eval_source, cfg.image_size,
                          batch_size=2 * cfg.batch_size, num_workers=self.num_workers, k=cfg.knn_k)
        model.train(was_training)
        return result

    def finish(self):
        """Final checkpoint; then, unless stopped by a signal: k-NN (knn.json), export, Hub push."""
        cfg = self.cfg
        self.bar.close()
        self._batches = None  # ends the loader workers before evaluation starts its own
        path = self.save()
        result = None
        if self.stopped:
            if self.is_main:
                print(f"{self._stop.signal_name}: saved {path}; continue with the same command and --resume", flush=True)
        else:
            result = self.knn()
            if result is not None and self.is_main:
                self.metrics.log({"step": self.step, "epoch": self.step / self.steps_per_epoch, **result})
                (self.output_dir / "knn.json").write_text(json.dumps(result, indent=2))
                skipped = f" ({result['skipped_images']} images could not be decoded)" if result["skipped_images"] else ""
                print(f"k-NN (k={cfg.knn_k}, T=0.07) on {Path(cfg.dataset).name or cfg.dataset} [{cfg.eval_split}]: "
                      f"top-1 {result['knn_top1']:.2f} %, top-5 {result['knn_top5']:.2f} %{skipped}", flush=True)
            if self.is_main:
                export = self.output_dir / "backbone"
                print(f"{'teacher ' if 'teacher' in self.state else ''}backbone exported to {export} (timm: "
                      f"create_model('local-dir:{export}', pretrained=True))", flush=True)
            self.pusher.push(self.output_dir / "backbone", self.step, results=result, state_dir=path)
        self.pusher.close()
        self.metrics.close()
        self._stop.close()
        self.accelerator.end_training()
        if self.lock is not None:
            self.lock.release()
        return result


def _tensors_in(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_in(v)


# ----------------------------------------------------------------------------------- self-distillation (DINO, iBOT)
# Multi-crop augmentation, the DINO head, the teacher's EMA and centre, and the cross-entropy table
# that both the DINO/iBOT loss and the hard-view selection are computed from.

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
# (load_backbone, eval scripts, --init_from). The token: huggingface_hub finds it (HF_TOKEN, `hf auth
# login`) and sends it to the Hub. This code only asks huggingface_hub whether one exists
# (`get_token() is None`, so that a missing token stops the run before training instead of failing the
# first push) and drops the answer; it never passes the token on, prints, logs or writes it. The
# tests check stdout, stderr, the output folder (model card, config.json) and every uploaded file
# against a fake token.

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
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"backbone initialised from {source}", flush=True)
    return backbone


def _card_value(value):
    """Config values as shown on a public model card: local paths by their last component."""
    if isinstance(value, str) and os.sep in value and Path(value).expanduser().exists():
        return Path(value).name
    return list(value) if isinstance(value, tuple) else value


HUB_CUSTOM_LIBRARY = "hvp"  # card library_name of exports that plain timm cannot build (small-stem ResNets)
_DATA_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")  # timm's data config


def _py(value, tuples=False):
    """A config.json value as Python source; with `tuples`, JSON lists as tuples (timm's data config)."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        items = ", ".join(_py(v, tuples) for v in value)
        return f"({items}{',' if len(value) == 1 else ''})" if tuples else f"[{items}]"
    return repr(value)


def _needs_hvp_code(cfg, export_config):
    """True for exports that plain timm cannot build: the small-stem ResNets (create_backbone replaces
    their stem, which config.json cannot describe). Small-stem ViTs are plain timm ViTs (patch size,
    image size in config.json's model_args)."""
    if export_config is not None:
        return bool(export_config.get("hvp_small_stem"))
    if not cfg.get("small_stem"):
        return False
    return not is_vit_arch(str(cfg.get("arch")))


def _usage(repo_id, cfg, export_config):
    """The card's loading instructions: a list of Python snippets, each defining `model`, and a note."""
    transform = ('transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))\n'
                 'features = model(transform(image).unsqueeze(0))  # (1, model.num_features); `image` is a PIL image')
    weights = f'hf_hub_download("{repo_id}", "model.safetensors")'
    hvp_load = f'hvp_utils.load_backbone("hf-hub:{repo_id}")'
    arch = (export_config or {}).get("architecture")
    model_args = (export_config or {}).get("model_args") or {}
    pretrained = (export_config or {}).get("pretrained_cfg") or {}
    data = ", ".join(f"{k}={_py(pretrained[k], tuples=True)}" for k in _DATA_KEYS if pretrained.get(k) is not None)
    args = "".join(f"{k}={_py(v)}, " for k, v in model_args.items()).rstrip()
    if _needs_hvp_code(cfg, export_config):
        snippets = [f'import timm\nimport hvp_utils  # hvp_utils.py of the HVP repository, on the Python path\n\n'
                    f'model, config = {hvp_load}\nmodel = model.eval()\n{transform}']
        if arch:
            snippets.append(
                f'import timm\nimport torch.nn as nn\nfrom huggingface_hub import hf_hub_download\n'
                f'from safetensors.torch import load_file\n\n'
                f'# without the HVP code: timm\'s {arch} with this export\'s model_args and data config (config.json),\n'
                f'# given the small stem (3x3 stride-1 first conv, no max-pool), then the weights\n'
                f'model = timm.create_model(\n    "{arch}",\n    pretrained_cfg_overlay=dict({data}),\n    {args}\n)\n'
                f'model.conv1 = nn.Conv2d(model.conv1.in_channels, model.conv1.out_channels, 3, 1, 1, bias=False)\n'
                f'model.maxpool = nn.Identity()\n'
                f'model.load_state_dict(load_file({weights}))\nmodel = model.eval()')
        note = (f"This backbone has the HVP small stem (a 3x3 stride-1 first convolution and no max-pool, for "
                f"small images), which timm's `{arch or cfg.get('arch')}` does not have and `config.json` cannot "
                f"describe: `timm.create_model(\"hf-hub:{repo_id}\", pretrained=True)` fails on the shape of "
                f"`conv1.weight`. Load it as above (a local copy: `hvp_utils.load_backbone(\"<folder>\")`).")
        return snippets, note
    snippets = [f'import timm\n\nmodel = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()\n{transform}']
    if arch:
        vit = any(k in model_args for k in ("img_size", "patch_size", "dynamic_img_size"))
        why = ("\n    # without img_size and patch_size timm builds its default 224 px patch-16 ViT and silently"
               "\n    # resamples these weights into it" if vit else "")
        snippets.append(
            f'import timm\nfrom huggingface_hub import hf_hub_download\n\n'
            f'# by architecture name, with the weights file (here from the Hub; any local copy works)\n'
            f'model = timm.create_model(\n    "{arch}",\n    pretrained=True,\n'
            f'    pretrained_cfg_overlay=dict(\n        file={weights},\n'
            + (f'        {data},  # the data config\n' if data else '') + '    ),\n'
            f'    # this export\'s model_args (config.json), which "hf-hub:"/"local-dir:" pass by themselves{why}\n'
            f'    {args}\n).eval()')
    note = (f'A local copy (`hf download {repo_id} --local-dir <folder>`) loads with '
            f'`timm.create_model("local-dir:<folder>", pretrained=True)`; with the HVP repository, '
            f'`{hvp_load}` gives the same model.')
    return snippets, note


def model_card(repo_id, method, config, step, results=None, processes=1, precision="no", license=HUB_LICENSE,
               export_config=None):
    """The model card README.md: Hub metadata (library, tags, dataset, licence), what was trained and
    how, the hard-view settings, the final evaluation numbers and how to load it. `export_config` is the
    export's config.json (a dict): with it the card also shows how to build the model by architecture
    name with the export's exact model_args. Library "timm" where plain timm loads the export, else
    HUB_CUSTOM_LIBRARY: a card without library_name would be taken for a transformers model (config.json)."""
    from huggingface_hub import ModelCardData
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    dataset = str(cfg.get("dataset", ""))
    is_hub_id = not Path(dataset).expanduser().exists() and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", dataset)
    hub_dataset = HUB_DATASETS.get(dataset) or (dataset if is_hub_id else None)
    dataset_name = (hub_dataset or Path(dataset).name).split("/")[-1]
    tags = ["image-feature-extraction", "self-supervised", "hard-view-pretraining", method.lower(), dataset_name]
    custom = _needs_hvp_code(cfg, export_config)
    if custom:
        tags.insert(0, "pytorch")
    metadata = ModelCardData(library_name=HUB_CUSTOM_LIBRARY if custom else "timm", license=license,
                             tags=list(dict.fromkeys(filter(None, tags))),
                             datasets=[hub_dataset] if hub_dataset else None, pipeline_tag="image-feature-extraction")
    hvp_settings = {k: v for k, v in cfg.items() if k in _HVP_SETTINGS or k.startswith("hvp_")}
    shown = {k: _card_value(v) for k, v in cfg.items()}
    arch, size = cfg.get("arch", "?"), cfg.get("image_size", "?")
    snippets, load_note = _usage(repo_id, cfg, export_config)
    load = "\n```\n\n```python\n".join(snippets)
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

{load_note}

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
        if get_token() is None:  # whether a token exists; its value is not kept
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
        config = job["folder"] / "backbone" / "config.json"
        card.write_text(model_card(self.repo_id, self.method, self.config, job["step"], job["results"],
                                   self.processes, self.precision,
                                   export_config=json.loads(config.read_text()) if config.is_file() else None))
