"""Data loading: dataset sources, the exact split of every epoch across processes and workers,
broken images, exact resume of the stream."""
import collections
import itertools
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import hvp_utils as hvp
import hvp_run
from conftest import SHIPPED


def tiny_aug():
    return hvp.MultiViewTransform({"views": [hvp.ViewAug(size=8)] * 2})


def uneven_parquet(folder, sizes=(100, 300, 601), row_group_size=64):
    """Parquet shards of the given sizes whose label column numbers the rows 0..N-1 (so a test can
    count which rows were read), images from the shipped subset."""
    source = pq.read_table(SHIPPED / "data" / "train-00000-of-00001.parquet")
    (folder / "data").mkdir(parents=True)
    start = 0
    for i, n in enumerate(sizes):
        table = source.slice(start % 9000, n).set_column(1, "label", pa.array(range(start, start + n), pa.int64()))
        pq.write_table(table.replace_schema_metadata(source.schema.metadata),
                       folder / "data" / f"train-{i:05d}-of-{len(sizes):05d}.parquet", row_group_size=row_group_size)
        start += n
    return folder


def batches_of(source, batch_size, epoch=0, rank=0, world=1, batches=None, workers=0, skip=0, seed=0, transform=None):
    stream = hvp_run.BatchStream(source, transform or tiny_aug(), batch_size, epoch, seed, rank, world, batches, skip,
                             shuffle_buffer=64)
    return list(hvp_run.epoch_batches(lambda e, s: hvp_run.make_loader(stream, workers), epoch, skip))


def test_shipped_dataset_is_the_default_and_has_row_counts_from_its_parquet_footers():
    assert hvp_run.DEFAULT_DATASET == str(SHIPPED)
    train = hvp_run.open_source(hvp_run.DEFAULT_DATASET, "train")
    assert train.kind == "parquet" and train.label_column == "label" and train.num_rows == 10000
    assert len(train.pieces) == 16  # one piece per row group
    assert hvp_run.open_source(hvp_run.DEFAULT_DATASET, "test").num_rows == 2000
    assert (SHIPPED / "LICENSE").read_text().count("Zalando") >= 1


def test_a_single_parquet_file_and_a_glob_are_accepted(tiny_dataset):
    file = tiny_dataset / "data" / "test-00000-of-00001.parquet"
    for name in (str(file), str(tiny_dataset / "data" / "test-*.parquet")):
        source = hvp_run.open_source(name, "ignored")
        assert source.label_column == "label" and source.num_rows == 48


@pytest.mark.parametrize("name,message", [
    ("/no/such/folder", "cannot open dataset '/no/such/folder'"),
    ("nobody-has/this-dataset-xyz", "cannot open dataset 'nobody-has/this-dataset-xyz'"),
    ("/no/such/*.parquet", "cannot open dataset '/no/such/*.parquet': no file matches"),
])
def test_missing_dataset_is_a_one_line_error(name, message):
    with pytest.raises(hvp_run.HVPError) as err:
        hvp_run.open_source(name, "train")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_split_and_image_column_are_one_line_errors(tiny_dataset):
    with pytest.raises(hvp_run.HVPError, match="no split 'validation' \\(it has: test, train\\)"):
        hvp_run.open_source(str(tiny_dataset), "validation")
    with pytest.raises(hvp_run.HVPError, match="no image column 'img'.*--image_column"):
        hvp_run.open_source(str(tiny_dataset), "train", image_column="img")


@pytest.mark.parametrize("sizes", [(100, 300, 601), (7, 1, 30, 12), (64,)])
@pytest.mark.parametrize("world,workers,batch_size", [(1, 1, 8), (2, 1, 8), (2, 2, 8), (3, 4, 5), (4, 3, 16)])
def test_every_row_is_planned_once_per_epoch_across_processes_and_workers(sizes, world, workers, batch_size):
    total = sum(sizes)
    batches = total // (batch_size * world)  # as the training scripts: steps per epoch x grad_accum
    for epoch in range(3):
        seen, per_worker = [], []
        for rank in range(world):
            for worker in range(workers):
                ranges = hvp_run.epoch_ranges(list(sizes), epoch, 0, rank, world, worker, workers, batch_size, batches)
                rows = [(p, i) for p, first, end in ranges for i in range(first, end)]
                seen += rows
                per_worker.append(len(rows))
        assert len(seen) == len(set(seen)), "a row is planned twice"
        assert len(seen) == world * batches * batch_size, "every process trains its full quota"
        assert total - len(seen) < world * batch_size, "less than one global batch is left out"
        assert all(n % batch_size == 0 for n in per_worker), "workers get whole batches"
        assert max(per_worker) - min(per_worker) <= batch_size, "workers share a process's batches evenly"


def test_the_rows_left_out_of_an_epoch_differ_between_epochs():
    sizes = [10] * 10
    left_out = []
    for epoch in range(4):
        ranges = hvp_run.epoch_ranges(sizes, epoch, 0, 0, 1, 0, 1, 8, 100 // 8)
        planned = {(p, i) for p, first, end in ranges for i in range(first, end)}
        left_out.append(frozenset(set(itertools.product(range(10), range(10))) - planned))
    assert len(set(left_out)) > 1


def test_evaluation_reads_every_row_once_in_order_whatever_the_split():
    sizes = [5, 17, 3, 40]
    for world, workers in ((1, 1), (2, 3), (3, 2), (7, 4)):
        rows = []
        for rank in range(world):
            for worker in range(workers):
                ranges = hvp_run.epoch_ranges(sizes, 0, 0, rank, world, worker, workers, 4, None)
                rows += [(p, i) for p, first, end in ranges for i in range(first, end)]
        assert rows == [(p, i) for p, n in enumerate(sizes) for i in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_two_processes_train_on_disjoint_rows_of_uneven_shards_and_read_only_their_own(tmp_path, workers):
    """1001 rows in shards of 100/300/601, 2 processes, batch 8: each trains on 62 x 8 rows of its
    own, no row twice, and reads (almost) nothing but its own rows."""
    source = hvp_run.open_source(str(uneven_parquet(tmp_path)), "train")
    batches = source.num_rows // 16
    read_by = collections.Counter()
    original_read = source.read

    def counting_read(piece, start, stop):
        read_by[rank] += stop - start
        return original_read(piece, start, stop)

    labels = {}
    for rank in range(2):
        source.read = counting_read  # workers are forked: count in-process only with workers=0
        trained = batches_of(source, 8, rank=rank, world=2, batches=batches, workers=workers)
        assert len(trained) == batches and all(len(b["label"]) == 8 for b in trained)
        labels[rank] = torch.cat([b["label"] for b in trained]).tolist()
    assert len(set(labels[0])) == len(labels[0]) == batches * 8
    assert not set(labels[0]) & set(labels[1])
    if workers == 0:
        assert read_by[0] == read_by[1] == batches * 8, "each process reads exactly its own rows"


def test_image_folder_with_odd_modes_and_a_corrupt_file_is_read_in_eval_mode(tmp_path):
    for cls, modes in {"cat": ["RGB", "L", "P"], "dog": ["RGBA", "CMYK", "LA"]}.items():
        (tmp_path / cls).mkdir()
        for i, mode in enumerate(modes):
            img = Image.new("RGB", (20 + i, 18), (40 * i, 100, 200)).convert(mode)
            img.save(tmp_path / cls / f"{i}.{'jpg' if mode == 'CMYK' else 'png'}")
    (tmp_path / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    source = hvp_run.open_source(str(tmp_path), "train")
    assert source.kind == "imagefolder" and source.class_names == ["cat", "dog"] and source.num_rows == 7
    batches = batches_of(source, 5)
    assert sum(int(b["skipped"]) for b in batches) == 1
    assert sum(len(b["label"]) for b in batches) == 6
    assert all(b["views"].shape[1:] == (2, 3, 8, 8) for b in batches)
    assert sorted(torch.cat([b["label"] for b in batches]).tolist()) == [0, 0, 0, 1, 1, 1]


def test_training_batches_replace_an_undecodable_image_and_stay_full(tmp_path):
    data = uneven_parquet(tmp_path, sizes=(40,))
    path = data / "data" / "train-00000-of-00001.parquet"
    table = pq.read_table(path)
    images = table.column("image").to_pylist()
    for i in (3, 4, 5):
        images[i] = {"bytes": b"not an image", "path": None}
    pq.write_table(table.set_column(0, "image", pa.array(images, type=table.schema.field("image").type)), path)
    source = hvp_run.open_source(str(data), "train")
    trained = batches_of(source, 8, batches=5, workers=0)
    assert all(len(b["label"]) == 8 for b in trained)
    assert sum(int(b["skipped"]) for b in trained) == 3
    labels = torch.cat([b["label"] for b in trained]).tolist()
    assert not {3, 4, 5} & set(labels), "a broken image's label never appears"


def test_loader_batches_are_batch_major_with_params(tiny_dataset):
    source = hvp_run.open_source(str(tiny_dataset), "train")
    batch = batches_of(source, 4, batches=2)[0]
    assert batch["views"].shape == (4, 2, 3, 8, 8) and batch["views"].dtype == torch.uint8
    assert batch["views_params"].shape == (4, 2, len(hvp.PARAM_NAMES))
    assert batch["label"].shape == (4,) and batch["label"].dtype == torch.long


def test_a_row_gets_the_same_views_whatever_the_number_of_processes_and_workers(tmp_path):
    source = hvp_run.open_source(str(uneven_parquet(tmp_path, sizes=(40, 56))), "train")

    def views_by_label(world, workers):
        out = {}
        for rank in range(world):
            for b in batches_of(source, 4, epoch=2, rank=rank, world=world, batches=96 // (4 * world), workers=workers):
                out.update({int(l): v for l, v in zip(b["label"], b["views_params"])})
        return out

    one, two = views_by_label(1, 0), views_by_label(2, 2)
    common = one.keys() & two.keys()
    assert len(common) == 96 and all(torch.equal(one[k], two[k]) for k in common)


@pytest.mark.parametrize("workers,crops", [(0, "worker"), (2, "worker"), (3, "worker"), (2, "device")])
def test_resuming_the_stream_mid_epoch_gives_exactly_the_remaining_batches(tiny_dataset, workers, crops):
    source = hvp_run.open_source(str(tiny_dataset), "train")
    transform = hvp.MultiViewTransform({"views": [hvp.ViewAug(size=8)] * 2}, crops=crops)
    pixels = "views" if crops == "worker" else "image"
    full = batches_of(source, 4, epoch=1, batches=20, workers=workers, seed=3, transform=transform)
    for skip in (3, 7):
        resumed = batches_of(source, 4, epoch=1, batches=20, workers=workers, seed=3, skip=skip, transform=transform)
        assert len(resumed) == len(full) - skip
        for a, b in zip(full[skip:], resumed):
            assert torch.equal(a[pixels], b[pixels]) and torch.equal(a["label"], b["label"])
            assert torch.equal(a["views_params"], b["views_params"])


def test_epochs_reshuffle(tiny_dataset):
    source = hvp_run.open_source(str(tiny_dataset), "train")
    first = [torch.cat([b["label"] for b in batches_of(source, 8, epoch=e, batches=12)]) for e in (0, 1)]
    assert sorted(first[0].tolist()) == sorted(first[1].tolist()) and not torch.equal(first[0], first[1])


def test_training_batches_cross_epochs_and_resume_exactly(tiny_dataset):
    """96 images, batch 8, 2 grad-accumulation micro-steps: 6 optimizer steps per epoch."""
    source = hvp_run.open_source(str(tiny_dataset), "train")

    def make_epoch_loader(epoch, skip):
        stream = hvp_run.BatchStream(source, tiny_aug(), 8, epoch, 1, 0, 1, 12, skip, shuffle_buffer=64)
        return hvp_run.make_loader(stream, 2)

    def run(start_step, count):
        gen = hvp_run.training_batches(make_epoch_loader, steps_per_epoch=6, start_step=start_step, grad_accum=2)
        return [next(gen) for _ in range(count)]

    full = run(0, 30)  # 2.5 epochs of micro-batches
    assert [e for e, _ in full] == [0] * 12 + [1] * 12 + [2] * 6
    resumed = run(4, 22)  # resume at optimizer step 4 = micro-batch 8
    for (e1, a), (e2, b) in zip(full[8:], resumed):
        assert e1 == e2 and torch.equal(a["views"], b["views"]) and torch.equal(a["views_params"], b["views_params"])


def test_default_workers_leave_a_core_for_the_training_loop():
    assert hvp_run.default_workers(1) >= 1
    assert hvp_run.default_workers(10_000) == 1


class _Niceness(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield torch.tensor(os.nice(0))  # os.nice(0) reads the process's niceness


def test_make_loader_lowers_its_workers_priority_when_asked():
    own = os.nice(0)
    assert [int(b) for b in hvp_run.make_loader(_Niceness(), 1)] == [own]
    assert [int(b) for b in hvp_run.make_loader(_Niceness(), 1, nice=5)] == [min(19, own + 5)]
    assert os.nice(0) == own  # the training process keeps its priority
