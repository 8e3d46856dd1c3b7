"""Datasets as the training loop reads them: a split opened as pieces of known size (parquet row
groups, image files, `datasets` shards), split row-exactly over processes and loader workers."""
import atexit
import dataclasses
import io
import itertools
import os
import signal
import sys
from pathlib import Path

import torch

from hvp_utils import collate_views, load_image
from .config import _first_error_line, HVPError, mix_seed


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
