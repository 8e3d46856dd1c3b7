"""Datasets as the training loop reads them: a split opened as pieces of known size (parquet row
groups, Arrow record batches, webdataset shards, image files, `datasets` shards), split row-exactly
over processes and loader workers."""
import atexit
import dataclasses
import functools
import glob
import io
import itertools
import json
import os
import re
import signal
import sys
from pathlib import Path

import torch

from hvp_utils import collate_views, load_image
from .config import _first_error_line, HVPError, mix_seed


# ----------------------------------------------------------------------------------- data
#
# A split is read as *pieces* whose row counts are known before training starts: the row groups
# of parquet files (local, or hf:// files of a Hub dataset, from their footers), the record batches
# of the Arrow files of a `save_to_disk` folder, the shards of a webdataset (.tar files, their
# samples counted from the member headers), the files of an image folder (one row each), or, for
# any other format, the shards `datasets` streams (counted by one pass at start, said in the log).
#
# Every epoch the pieces are put in an order drawn from (--seed, epoch), the same on every process,
# and a start position s in that order is drawn too. Process r trains on the rows at positions
# [s + r q, s + (r + 1) q) of the order, wrapping round from its end to its start, q being its
# batches per epoch x --batch_size; its loader workers take consecutive whole batches of that range.
# So across processes and workers every example is read once per epoch, whatever the piece sizes.
# The N - processes x q rows left (fewer than one global batch) are not trained in that epoch: they
# are the rows just before s, consecutive in the order; as s and the order are drawn anew every
# epoch, every row is left out with the same chance, (N - processes x q) / N, in every epoch.
#
# What is read besides a worker's own rows: a parquet row group whole when the worker's range
# covers only part of it (so with one row group per file and few files a process reads several
# times its own rows: write files with smaller row groups); a streamed `datasets` shard, or a
# compressed or remote .tar shard, from its start (they cannot seek); the member headers of a local
# .tar shard before its rows. Arrow files are memory-mapped: only the range's rows are touched.
# Evaluation splits are read whole, in order, split across processes as evenly as possible.

SOURCE_KINDS = ("parquet", "arrow", "webdataset", "imagefolder", "datasets")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")
FORMS = ("a Hub dataset id, a folder (an image folder with one sub-folder per class, parquet files in the Hub "
         "layout, webdataset .tar shards, a Dataset.save_to_disk folder), or files (one, a glob, or a list like "
         "{a,b} or {000..009}): .parquet, webdataset .tar, .arrow, or .csv/.json/.jsonl naming image files")


@dataclasses.dataclass
class Source:
    """A dataset split as pieces with known row counts. JSON-able, so that one process can resolve
    it and hand it to the others; readable from any process or loader worker."""
    name: str                    # what the user passed as --dataset
    split: str
    kind: str                    # one of SOURCE_KINDS
    files: list                  # parquet/Arrow/.tar/image files; CSV/JSON files (kind "datasets") or []
    pieces: list                 # [file index or shard, row group (parquet) / first row (arrow) / 0, rows]
    image_column: str            # for .tar shards: the member extension holding the image
    label_column: str = None     # None: the split has no labels; for .tar shards: a member extension
    class_names: list = None     # label i is class_names[i] (image folder classes, text labels)

    @property
    def num_rows(self):
        return sum(p[2] for p in self.pieces)

    def read(self, piece, start, stop):
        """Rows [start, stop) of piece `piece` as (image cell, label or -1) pairs."""
        ref, group, _ = self.pieces[piece]
        columns = [self.image_column] + ([self.label_column] if self.label_column else [])
        if self.kind in ("parquet", "arrow"):
            if self.kind == "parquet":
                table = _parquet_file(self.files[ref]).read_row_group(group, columns=columns).slice(start, stop - start)
            else:
                table = _arrow_table(self.files[ref]).select(columns).slice(group + start, stop - start)
            images = table.column(self.image_column).to_pylist()
            labels = table.column(self.label_column).to_pylist() if self.label_column else [None] * len(images)
            yield from zip(images, map(self._label, labels))
        elif self.kind == "webdataset":
            def wanted(extension):  # the label, and every image (a sample may lack the usual extension)
                return extension in columns or extension.rpartition(".")[2] in IMAGE_EXTENSIONS
            for sample in _tar_samples(self.files[ref], start, stop, wanted):
                yield _tar_image(sample, self.image_column), self._label(sample.get(self.label_column))
        elif self.kind == "imagefolder":
            path = self.files[ref]
            label = self.class_names.index(_class_of(path)) if self.class_names else -1
            cell = {"path": path, "bytes": None} if "://" not in path else {"bytes": _read_bytes(path), "path": path}
            yield cell, label
        else:
            folder = os.path.dirname(self.files[ref]) if self.files else ""
            for example in itertools.islice(_datasets_shard(self.name, self.split, ref), start, stop):
                cell = example[self.image_column]
                if isinstance(cell, str) and "://" not in cell:  # CSV/JSON: paths relative to their file
                    cell = os.path.join(folder, cell)
                yield cell, self._label(example.get(self.label_column) if self.label_column else None)

    def _label(self, value):
        if value is None:
            return -1
        if isinstance(value, bytes):  # a .cls member of a .tar shard
            value = value.decode().strip()
        return self.class_names.index(value) if self.class_names else int(value)


_OPEN = {}  # per-process caches of open parquet/Arrow files and `datasets` streams (not shared with forked workers)
_NOTED = set()


def _note(message):
    """Say something once per process (a split and its evaluation split are opened alike)."""
    if message not in _NOTED:
        _NOTED.add(message)
        print(f"note: {message}", file=sys.stderr, flush=True)


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


def _arrow_table(path):
    """An Arrow file as `save_to_disk` writes it (IPC stream format), memory-mapped: nothing is read
    until rows are used."""
    import pyarrow as pa
    key = (os.getpid(), path)
    if key not in _OPEN:
        _OPEN[key] = pa.ipc.open_stream(pa.memory_map(path)).read_all()
    return _OPEN[key]


def _read_bytes(path):
    import fsspec
    with fsspec.open(path, "rb") as f:
        return f.read()


def _class_of(path):
    return path.replace("\\", "/").rsplit("/", 2)[-2]


def _tar_samples(path, start=0, stop=None, wanted=None):
    """The samples [start, stop) of a webdataset shard, in order: {extension: bytes} of the members
    whose extension `wanted` accepts (None: none; webdataset convention: a sample is a run of members
    named <key>.<extension>). Local uncompressed shards are skipped through by their headers; compressed
    or remote ones are read from the start (a tar stream cannot seek)."""
    import contextlib
    import tarfile
    if "://" in path:
        import fsspec
        stream = fsspec.open(path, "rb").open()
        tar = tarfile.open(fileobj=stream, mode="r|*")
    else:
        stream, tar = contextlib.nullcontext(), tarfile.open(path, "r:*")
    with stream, tar:
        index, key, sample = -1, None, None
        for member in tar:
            folder, _, base = member.name.rpartition("/")
            stem, dot, extension = base.partition(".")
            if not member.isfile() or not stem or not dot:
                continue
            if (folder, stem) != key:
                if sample is not None:
                    yield sample
                index, key, sample = index + 1, (folder, stem), None
                if stop is not None and index >= stop:
                    return
                if index >= start:
                    sample = {}
            extension = extension.lower()
            if sample is not None and wanted is not None and wanted(extension):
                sample[extension] = tar.extractfile(member).read()
        if sample is not None:
            yield sample


def _tar_count(path):
    return sum(1 for _ in _tar_samples(path))


def _tar_image(sample, extension):
    """The image of a sample: its `extension` member, or its one image member (shards may mix formats)."""
    data = sample.get(extension)
    if data is None:
        images = [v for k, v in sample.items() if k.rpartition(".")[2] in IMAGE_EXTENSIONS]
        data = images[0] if len(images) == 1 else None
    return None if data is None else {"bytes": data, "path": None}


def _datasets_stream(name, split):
    """The fallback reader: `datasets` streaming, one shard per piece."""
    import datasets
    key = (os.getpid(), name, split)
    if key not in _OPEN:
        path = Path(name).expanduser()
        if path.is_file() or _is_pattern(name):  # CSV/JSON files
            files = _data_files(name)
            builder = "csv" if files[0].endswith(".csv") else "json"
            ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
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


def _is_pattern(name):
    return any(ch in name for ch in "*?[{")


def _expand_braces(pattern):
    """Webdataset-style shard lists: 'train-{000..002}.tar' -> train-000.tar, train-001.tar,
    train-002.tar (zero-padded as written); 'a/{x,y}.tar' -> a/x.tar, a/y.tar."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", match.group(1))
    if numbers:
        first, last = numbers.groups()
        width = len(first) if first.startswith("0") else 0
        choices = [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
    else:
        choices = match.group(1).split(",")
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [name for choice in choices for name in _expand_braces(head + choice + tail)]


def _data_files(name):
    """The files --dataset names: one file, a glob, or a brace list (each name of which may be a glob)."""
    path = Path(name).expanduser()
    if path.is_file():
        return [str(path)]
    files = []
    for pattern in _expand_braces(str(path)):
        if any(ch in pattern for ch in "*?["):
            files += sorted(glob.glob(pattern))
        elif os.path.isfile(pattern):
            files.append(pattern)
        else:
            raise HVPError(f"cannot open dataset {name!r}: no file {pattern!r}")
    if not files:
        raise HVPError(f"cannot open dataset {name!r}: no file matches")
    return files


def _file_format(path):
    name = path.lower()
    for suffixes, form in (((".parquet",), "parquet"), ((".arrow",), "arrow"), ((".csv",), "csv"),
                           ((".json", ".jsonl"), "json"), ((".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tar.xz"), "tar")):
        if name.endswith(suffixes):
            return form
    return None


def _check_hub_reachable(name):
    """Fail in seconds, in one line, when the Hub cannot be reached (`datasets` would retry for half
    a minute, printing every try). Any answer of the Hub passes; in offline mode a cached copy may
    serve, so there is nothing to check."""
    import datasets
    import huggingface_hub
    from huggingface_hub import constants, errors
    if constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE:
        return
    try:
        huggingface_hub.HfApi().dataset_info(name, timeout=10)
    except Exception as e:
        kinds = {c.__name__ for c in type(e).__mro__}  # httpx and requests name their network errors alike
        if not isinstance(e, errors.HfHubHTTPError) and kinds & {"TransportError", "ConnectionError", "Timeout",
                                                                  "TimeoutError"}:
            raise HVPError(f"cannot open dataset {name!r}: the Hugging Face Hub ({constants.ENDPOINT}) cannot be "
                           f"reached ({_first_error_line(e)}); for a cached copy set HF_HUB_OFFLINE=1") from None


def open_source(name, split, image_column="image", label_column="label"):
    """Resolve --dataset into a Source: a Hugging Face Hub dataset id; a local folder (an image
    folder whose sub-folders are the classes, parquet files in the Hub layout, webdataset .tar
    shards, or a `Dataset.save_to_disk` folder); or .parquet, .tar, .arrow or CSV/JSON files naming
    image files, given as one file, a glob or a brace list. With --image_column left at 'image' and
    no such column, the one image column is used (likewise 'label' and the one class-label column).
    Raises HVPError with one line on any problem, before a model is built. (Files given directly,
    except CSV/JSON, and save_to_disk folders are read without `datasets`; other folders and Hub ids
    are resolved by it.)"""
    path = Path(name).expanduser()
    try:
        if path.is_file() or _is_pattern(name):
            return _files_source(name, _data_files(name), image_column, label_column)
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return _saved_source(name, split, path, image_column, label_column)
        files = _bare_hub_folder(path, split)
        if files:
            return _parquet_source(name, split, files, image_column, label_column)
        try:
            import datasets
            if not path.exists():
                _check_hub_reachable(name)
            builder = datasets.load_dataset_builder(str(path) if path.exists() else name)
        except ImportError:  # no `datasets` here: parquet files in the Hub layout are read with pyarrow alone
            files = _hub_layout_parquet(name, path, split)
            if files is None:
                raise
            return _parquet_source(name, split, files, image_column, label_column)
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
    if files and all(_file_format(f) == "tar" for f in files):
        return _tar_source(name, split, files, image_column, label_column)
    if builder.name == "imagefolder":
        if image_column != "image":
            raise HVPError(f"dataset {name!r} is an image folder: its image column is 'image', not {image_column!r}")
        classes = sorted({_class_of(f) for files_ in data_files.values() for f in files_})
        has_labels = label_column == "label" and len(classes) > 1
        return Source(name, split, "imagefolder", files, [[i, 0, 1] for i in range(len(files))], image_column,
                      "label" if has_labels else None, classes if has_labels else None)
    return _datasets_source(name, split, image_column, label_column)


_HUB_SHARD = re.compile(r"(train|validation|test)-\d{5}-of-\d{5}\.parquet")


def _bare_hub_folder(path, split):
    """The parquet files of `split` in a folder holding nothing but data/<split>-NNNNN-of-NNNNN.parquet
    shards of train, validation or test (as push_to_hub writes them, without a dataset card): the
    files `datasets` resolves there, found without importing it (half a second of every run's
    start). None for any other folder, or a split it lacks: `datasets` resolves those."""
    data = path / "data"
    if not data.is_dir() or [p.name for p in path.iterdir() if not p.name.startswith(".")] != ["data"]:
        return None
    shards = [p for p in data.iterdir() if not p.name.startswith(".")]  # hidden files (.cache, .lock) aside
    if not shards or not all(p.is_file() and _HUB_SHARD.fullmatch(p.name) for p in shards):
        return None
    return sorted(str(p.resolve()) for p in shards if p.name.startswith(split + "-")) or None


def _hub_layout_parquet(name, path, split):
    """The parquet files of `split` in a local folder in the Hub layout (data/<split>-00000-of-00002.parquet
    or <split>.parquet), found without `datasets`; None where the folder holds no parquet file."""
    found = sorted(str(f) for f in path.rglob("*.parquet")) if path.is_dir() else []
    if not found:
        return None
    splits = {f: Path(f).stem.split("-")[0] for f in found}
    files = [f for f in found if splits[f] == split]
    if not files:
        raise HVPError(f"dataset {name!r} has no split {split!r} (it has: {', '.join(sorted(set(splits.values())))})")
    return files


def _files_source(name, files, image_column, label_column):
    """Files given directly: their contents are the split, whatever it is called."""
    forms = {_file_format(f) for f in files}
    if None in forms or len(forms) > 1:
        odd = next((f for f in files if _file_format(f) is None), None)
        what = f"{Path(odd).name!r} is not a supported file" if odd else f"its files mix formats ({sorted(forms)})"
        raise HVPError(f"cannot open dataset {name!r}: {what}; --dataset takes {FORMS}")
    form, split = forms.pop(), "train"
    if form == "parquet":
        return _parquet_source(name, split, files, image_column, label_column)
    if form == "arrow":
        return _arrow_source(name, split, files, image_column, label_column)
    if form == "tar":
        return _tar_source(name, split, files, image_column, label_column)
    return _datasets_source(name, split, image_column, label_column, files)


def _pick_columns(name, columns, image_columns, label_columns, image_column, label_column):
    """(image column, label column or None). `image_columns` and `label_columns` are the columns
    that hold images and class labels by their type: with a flag left at its default ('image',
    'label') and no such column, the one column of that type is used, said in one line."""
    if image_column not in columns:
        if image_column != "image" or len(image_columns) != 1:
            found = f"image columns: {image_columns}" if len(image_columns) > 1 else f"columns: {columns}"
            raise HVPError(f"dataset {name!r} has no image column {image_column!r} ({found}); pass --image_column")
        image_column = image_columns[0]
        _note(f"dataset {name!r} has no 'image' column: using its image column {image_column!r} (--image_column)")
    if label_column not in columns:
        if label_column != "label" or not label_columns:
            return image_column, None
        if len(label_columns) > 1:
            raise HVPError(f"dataset {name!r} has no 'label' column but several class-label columns "
                           f"{label_columns}: pass --label_column (or --label_column none)")
        label_column = label_columns[0]
        _note(f"dataset {name!r} has no 'label' column: using its class-label column {label_column!r} (--label_column)")
    return image_column, label_column


def _table_columns(name, schema, image_column, label_column):
    """_pick_columns for parquet and Arrow files, whose column types `datasets` records in the
    schema's metadata; labels must be integers."""
    import pyarrow as pa
    try:
        features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
        types = {c: f.get("_type") for c, f in features.items() if isinstance(f, dict)}
    except (TypeError, KeyError, ValueError):  # not written by `datasets`
        types = {}
    image_column, label_column = _pick_columns(name, schema.names, [c for c in schema.names if types.get(c) == "Image"],
                                               [c for c in schema.names if types.get(c) == "ClassLabel"],
                                               image_column, label_column)
    if label_column and not pa.types.is_integer(schema.field(label_column).type):
        label_column = None
    return image_column, label_column


def _parquet_source(name, split, files, image_column, label_column):
    from concurrent.futures import ThreadPoolExecutor
    try:
        with ThreadPoolExecutor(16) as pool:  # remote footers: one request each, in parallel
            metas = list(pool.map(lambda f: _parquet_file(f).metadata, files))
    except Exception as e:
        raise HVPError(f"cannot read the parquet files of dataset {name!r}: {_first_error_line(e)}") from None
    image_column, label_column = _table_columns(name, _parquet_file(files[0]).schema_arrow, image_column, label_column)
    pieces = [[f, g, meta.row_group(g).num_rows] for f, meta in enumerate(metas) for g in range(meta.num_row_groups)]
    return Source(name, split, "parquet", list(files), [p for p in pieces if p[2]], image_column, label_column)


def _saved_source(name, split, folder, image_column, label_column):
    """A `Dataset.save_to_disk` folder (its contents are the split) or `DatasetDict.save_to_disk`
    folder (one sub-folder per split): Arrow files listed in each state.json."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        if split not in splits:
            raise HVPError(f"dataset {name!r} has no split {split!r} (it has: {', '.join(sorted(splits))})")
        folder = folder / split
    else:
        split = "train"
    state = json.loads((folder / "state.json").read_text())
    files = [str(folder / f["filename"]) for f in state["_data_files"]]
    return _arrow_source(name, split, files, image_column, label_column)


def _arrow_source(name, split, files, image_column, label_column):
    """Arrow files as `save_to_disk` writes them: their record batches are the pieces."""
    try:
        tables = [_arrow_table(f) for f in files]
    except Exception as e:
        raise HVPError(f"cannot read the Arrow files of dataset {name!r}: {_first_error_line(e)}") from None
    image_column, label_column = _table_columns(name, tables[0].schema, image_column, label_column)
    pieces = []
    for f, table in enumerate(tables):
        sizes = [batch.num_rows for batch in table.to_batches()]
        pieces += [[f, first, n] for first, n in zip(itertools.accumulate(sizes, initial=0), sizes) if n]
    return Source(name, split, "arrow", list(files), pieces, image_column, label_column)


def _tar_source(name, split, files, image_column, label_column):
    """Webdataset .tar shards: one piece per shard, its samples counted from the member headers.
    Columns are member extensions: the image is the sample's image member ('jpg', 'png', ...),
    the label a 'cls' member (an integer in text), as the webdataset convention has it."""
    from concurrent.futures import ThreadPoolExecutor
    if any("://" in f for f in files):
        _note(f"dataset {name!r}: counting the samples of its {len(files)} remote .tar shards once (a full read)")
    try:
        first = next(_tar_samples(files[0], 0, 1, wanted=lambda extension: True), None)
        with ThreadPoolExecutor(8) as pool:
            counts = list(pool.map(_tar_count, files))
    except Exception as e:
        raise HVPError(f"cannot read the .tar shards of dataset {name!r}: {_first_error_line(e)}") from None
    if first is None:
        raise HVPError(f"dataset {name!r}: its first .tar shard has no samples (<key>.<extension> members)")
    columns = sorted(first)
    image_column, label_column = _pick_columns(
        name, columns, [c for c in columns if c.rpartition(".")[2] in IMAGE_EXTENSIONS],
        ["cls"] if "cls" in columns else [], image_column, label_column)
    if label_column:
        if not first[label_column].decode(errors="replace").strip().lstrip("-").isdigit():
            raise HVPError(f"dataset {name!r}: the .{label_column} member of its first sample is not an integer "
                           f"label; pass --label_column (or --label_column none)")
    return Source(name, split, "webdataset", list(files), [[i, 0, n] for i, n in enumerate(counts) if n],
                  image_column, label_column)


def _datasets_source(name, split, image_column, label_column, files=None):
    """Any other format through `datasets`: its shards are the pieces, counted by one pass over a
    light column (the format has no row counts to read). Text labels (CSV, JSON) become class
    indices in sorted order. `files`: CSV/JSON files given directly, whose relative image paths
    are relative to the file."""
    import datasets
    try:
        ds = _datasets_stream(name, split)
        columns = list(ds.features) if ds.features is not None else list(next(iter(ds)).keys())
    except Exception as e:
        if "split" in str(e).lower():
            raise HVPError(f"dataset {name!r} has no split {split!r} ({_first_error_line(e)})") from None
        raise HVPError(f"cannot open dataset {name!r}: {_first_error_line(e)}") from None
    features = ds.features or {}
    image_column, label_column = _pick_columns(
        name, columns, [c for c in columns if isinstance(features.get(c), datasets.Image)],
        [c for c in columns if isinstance(features.get(c), datasets.ClassLabel)], image_column, label_column)
    light = label_column or next((c for c in columns if c != image_column), image_column)
    print(f"note: dataset {name!r} has no row counts to read ({ds.num_shards} shards): counting its rows once",
          file=sys.stderr, flush=True)
    counts, labels = [], set()
    for i in range(ds.num_shards):
        values = [row[light] for row in _datasets_shard(name, split, i).select_columns([light])]
        counts.append(len(values))
        if label_column:
            labels.update(v for v in values if v is not None)
    class_names = None
    if labels and all(isinstance(v, str) for v in labels):
        class_names = sorted(labels)
    elif not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        label_column = None  # neither integers nor class names
    if files and ds.num_shards != len(files):  # relative paths are resolved by shard = file
        files = None
    return Source(name, split, "datasets", list(files or []), [[i, 0, n] for i, n in enumerate(counts) if n],
                  image_column, label_column, class_names)


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
    (seed, epoch), and a start position s in it; the process's range is positions
    [s + rank q, s + (rank + 1) q) with q = batches x batch_size, wrapping round from the end of
    the order to its start; worker w gets batches//workers consecutive batches of it (one more for
    the first batches % workers workers). The rows left out are the N - world q before s, so every
    row has the same chance to be left out. Evaluation (batches None): every row once, in order,
    split evenly."""
    total = sum(piece_rows)
    if batches is None:
        first, end = total * rank // world, total * (rank + 1) // world
        n = end - first
        return rows_at(piece_rows, range(len(piece_rows)), first + n * worker // workers, first + n * (worker + 1) // workers)
    generator = torch.Generator().manual_seed(mix_seed(seed, epoch, "pieces"))
    order = torch.randperm(len(piece_rows), generator=generator).tolist()
    start = int(torch.randint(max(total, 1), (1,), generator=generator))
    mine = batches // workers + (worker < batches % workers)
    before = worker * (batches // workers) + min(worker, batches % workers)
    first = (start + (rank * batches + before) * batch_size) % max(total, 1)
    stop = first + mine * batch_size
    return rows_at(piece_rows, order, first, min(stop, total)) + rows_at(piece_rows, order, 0, stop - total)


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


def _init_worker(_worker_id=None, nice=0):
    """Loader workers ignore SIGTERM/SIGINT: a scheduler or a Ctrl-C signals the whole process group,
    and the main process needs its workers for the rest of the step before it saves. Workers end
    when the main process shuts its loaders down (always, see `_shut_down_loaders`) or dies.
    nice > 0 lowers the worker's priority by that much (os.nice)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if nice:
        os.nice(nice)


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


def make_loader(stream, num_workers, pin_memory=False, prefetch_factor=2, nice=0):
    """DataLoader over a BatchStream (its items are whole batches); nice > 0 lowers its workers'
    priority (on a CPU run they then use only what the training process leaves of the cores)."""
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                       worker_init_fn=functools.partial(_init_worker, nice=nice),
                                       persistent_workers=False,
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


def usable_cores():
    """The CPU cores this process may run on (its affinity where the OS tells it, else all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers(processes_per_node=1):
    """Loader workers per process when --num_workers is not given: the CPU cores this process may
    use, shared by the node's processes, minus one for the training loop itself (at least 1)."""
    return max(1, usable_cores() // max(1, processes_per_node) - 1)
