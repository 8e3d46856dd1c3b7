"""Data loading: dataset sources, per-rank sharding, broken images, exact resume of the stream."""
import hashlib
import io

import pytest
import torch
from PIL import Image

import hvp_utils as hvp
from conftest import SHIPPED


def tiny_aug():
    return hvp.MultiViewTransform({"views": [hvp.ViewAug(size=8)] * 2})


def stream_of(dataset, batch_size=4, rank=0, world=1, seed=0, split="train", cycle=True, workers=0):
    ds, has_labels = hvp.open_dataset(str(dataset), split)
    ds = hvp.shard_for_rank(ds, rank, world, workers)
    shards = ds.num_shards
    ds = ds.shuffle(seed=seed, buffer_size=64)
    return hvp.ViewStream(ds, tiny_aug(), "image", "label" if has_labels else None, seed, rank, batch_size, cycle), shards


def image_ids(dataset, split, rank, world):
    """Hashes of the raw image bytes this rank reads (one pass, no cycling)."""
    ds, _ = hvp.open_dataset(str(dataset), split)
    return [hashlib.md5(ex["image"]["bytes"]).hexdigest() for ex in hvp.shard_for_rank(ds, rank, world)]


def test_shipped_dataset_is_the_default_and_has_its_card():
    assert hvp.DEFAULT_DATASET == str(SHIPPED)
    ds, has_labels = hvp.open_dataset(hvp.DEFAULT_DATASET, "train")
    assert has_labels and hvp.num_examples(ds, "train") == 10000
    assert hvp.num_examples(hvp.open_dataset(hvp.DEFAULT_DATASET, "test")[0], "test") == 2000
    assert (SHIPPED / "LICENSE").read_text().count("Zalando") >= 1


def test_dataset_size_is_counted_when_there_is_no_card(tiny_dataset):
    ds, _ = hvp.open_dataset(str(tiny_dataset), "train")
    assert hvp.num_examples(ds, "train") == 96


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_reads_a_disjoint_part_and_together_everything(tiny_dataset, world):
    parts = [image_ids(tiny_dataset, "train", r, world) for r in range(world)]
    everything = image_ids(tiny_dataset, "train", 0, 1)
    assert all(len(p) == len(everything) // world for p in parts)  # nobody reads the whole stream
    assert sorted(sum(parts, [])) == sorted(everything)


def test_a_single_parquet_file_and_a_glob_are_accepted(tiny_dataset):
    file = tiny_dataset / "data" / "test-00000-of-00001.parquet"
    for name in (str(file), str(tiny_dataset / "data" / "test-*.parquet")):
        ds, has_labels = hvp.open_dataset(name, "ignored")
        assert has_labels and sum(1 for _ in ds) == 48


@pytest.mark.parametrize("name,message", [
    ("/no/such/folder", "cannot open dataset '/no/such/folder'"),
    ("nobody-has/this-dataset-xyz", "cannot open dataset 'nobody-has/this-dataset-xyz'"),
])
def test_missing_dataset_is_a_one_line_error(name, message):
    with pytest.raises(hvp.HVPError) as err:
        hvp.open_dataset(name, "train")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_split_and_image_column_are_one_line_errors(tiny_dataset):
    with pytest.raises(hvp.HVPError, match="no split 'validation'"):
        hvp.open_dataset(str(tiny_dataset), "validation")
    with pytest.raises(hvp.HVPError, match="no image column 'img'.*--image_column"):
        hvp.open_dataset(str(tiny_dataset), "train", image_column="img")


@pytest.fixture
def image_folder(tmp_path):
    """An image folder with two classes, odd image modes, and one corrupt file."""
    for cls, modes in {"cat": ["RGB", "L", "P"], "dog": ["RGBA", "CMYK", "LA"]}.items():
        (tmp_path / cls).mkdir()
        for i, mode in enumerate(modes):
            img = Image.new("RGB", (20 + i, 18), (40 * i, 100, 200)).convert(mode)
            img.save(tmp_path / cls / f"{i}.{'jpg' if mode == 'CMYK' else 'png'}")
    (tmp_path / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return tmp_path


def test_image_folder_with_odd_modes_and_a_corrupt_file_is_skipped_and_counted(image_folder):
    stream, shards = stream_of(image_folder, batch_size=5, cycle=False)
    samples = list(stream)
    assert len(samples) == 6
    assert sum(s["skipped"] for s in samples) == 1
    assert all(s["views"].shape == (2, 3, 8, 8) for s in samples)
    assert sorted({s["label"] for s in samples}) == [0, 1]


def test_loader_batches_are_batch_major_with_params(tiny_dataset):
    stream, shards = stream_of(tiny_dataset, batch_size=4)
    batch = next(iter(hvp.make_loader(stream, 4, 0, shards)))
    assert batch["views"].shape == (4, 2, 3, 8, 8)
    assert batch["views_params"].shape == (4, 2, len(hvp.PARAM_NAMES))
    assert batch["label"].shape == (4,) and batch["label"].dtype == torch.long


@pytest.mark.parametrize("workers", [0, 2])
def test_resuming_the_stream_mid_epoch_gives_exactly_the_remaining_batches(tiny_dataset, workers):
    def batches(skip, count):
        stream, shards = stream_of(tiny_dataset, batch_size=4, seed=3, workers=workers)
        assert shards >= workers
        it = hvp.epoch_batches(hvp.make_loader(stream, 4, workers, shards), epoch=1, skip_batches=skip)
        return [next(it) for _ in range(count)]

    full = batches(0, 8)
    resumed = batches(3, 5)
    for a, b in zip(full[3:], resumed):
        assert torch.equal(a["views"], b["views"]) and torch.equal(a["label"], b["label"])
        assert torch.equal(a["views_params"], b["views_params"])


def test_epochs_reshuffle_and_cycle_past_the_end(tiny_dataset):
    def first_labels(epoch, n):
        stream, shards = stream_of(tiny_dataset, batch_size=8)
        it = hvp.epoch_batches(hvp.make_loader(stream, 8, 0, shards), epoch)
        return torch.cat([next(it)["label"] for _ in range(n)])

    assert not torch.equal(first_labels(0, 2), first_labels(1, 2))
    assert len(first_labels(0, 20)) == 160  # 96 images: the stream wraps around instead of ending


def test_training_batches_cross_epochs_and_resume_exactly(tiny_dataset):
    """96 images, batch 8, 2 grad-accumulation micro-steps: 6 optimizer steps per epoch."""
    def run(start_step, count):
        stream, shards = stream_of(tiny_dataset, batch_size=8, seed=1, workers=2)
        gen = hvp.training_batches(hvp.make_loader(stream, 8, 2, shards), steps_per_epoch=6,
                                   start_step=start_step, grad_accum=2, lookahead=3)
        return [next(gen) for _ in range(count)]

    full = run(0, 30)  # 2.5 epochs of micro-batches
    assert [e for e, _ in full] == [0] * 12 + [1] * 12 + [2] * 6
    resumed = run(4, 22)  # resume at optimizer step 4 = micro-batch 8
    for (e1, a), (e2, b) in zip(full[8:], resumed):
        assert e1 == e2 and torch.equal(a["views"], b["views"]) and torch.equal(a["views_params"], b["views_params"])
