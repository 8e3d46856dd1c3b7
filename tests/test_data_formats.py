"""Data as users name it: webdataset .tar shards (one, a glob, a brace list, a folder), save_to_disk
folders, CSV files naming images, columns found by their type, a one-line error for an unreachable
Hub, and which rows an epoch leaves out."""
import collections
import io
import subprocess
import sys
import tarfile

import datasets
import pytest
from PIL import Image

import hvp_utils as hvp
import hvp_run
from conftest import free_port, REPO, script_env


def png(i):
    out = io.BytesIO()
    Image.new("RGB", (12, 10), (i * 37 % 256, 80, 160)).save(out, "PNG")
    return out.getvalue()


def write_shards(folder, sizes, name="train-{:03d}.tar", extension="png"):
    """Webdataset shards: sample k is <key>.<extension> (an image) and <key>.cls (the integer k), so
    a test can tell which samples were read."""
    folder.mkdir(parents=True, exist_ok=True)
    k = 0
    for shard, n in enumerate(sizes):
        with tarfile.open(folder / name.format(shard), "w") as tar:
            for _ in range(n):
                for ext, data in ((extension, png(k)), ("cls", str(k).encode()), ("json", b'{"w": 12}')):
                    info = tarfile.TarInfo(f"images/sample{k:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                k += 1
    return folder


def labelled_dataset(n, **columns):
    """A `datasets.Dataset` of n tiny images in an 'img' column (the CIFAR-10 layout on the Hub) and
    a ClassLabel 'label' numbering the rows, plus any extra columns given as (values, feature)."""
    features = {"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=n)}
    data = {"img": [Image.open(io.BytesIO(png(i))) for i in range(n)], "label": list(range(n))}
    for column, (values, feature) in columns.items():
        data[column], features[column] = values, feature
    return datasets.Dataset.from_dict(data, features=datasets.Features(features))


def all_labels(source, batch_size=4, world=1, workers=0, epoch=0):
    """The labels a training epoch gives, every process, every worker."""
    aug = hvp.MultiViewTransform({"views": [hvp.ViewAug(size=8)] * 2})
    batches = source.num_rows // (batch_size * world)
    labels = []
    for rank in range(world):
        stream = hvp_run.BatchStream(source, aug, batch_size, epoch, 0, rank, world, batches, shuffle_buffer=8)
        for batch in hvp_run.epoch_batches(lambda e, s: hvp_run.make_loader(stream, workers), epoch):
            assert int(batch["skipped"]) == 0, "every image decodes"
            labels += batch["label"].tolist()
    return labels


# ----------------------------------------------------------------------------------- webdataset

def test_a_webdataset_tar_shard_is_read_with_its_image_and_cls_label(tmp_path):
    write_shards(tmp_path, [7])
    source = hvp_run.open_source(str(tmp_path / "train-000.tar"), "train")
    assert (source.kind, source.num_rows, source.image_column, source.label_column) == ("webdataset", 7, "png", "cls")
    rows = list(source.read(0, 2, 5))
    assert [label for _, label in rows] == [2, 3, 4]
    assert hvp_run.decode_image(rows[0][0]).getpixel((0, 0)) == (2 * 37, 80, 160)


@pytest.mark.parametrize("pattern", ["train-{000..003}.tar", "train-*.tar", "train-{000,001}.tar"])
def test_tar_shards_named_by_a_brace_list_or_a_glob_are_one_split(tmp_path, pattern):
    write_shards(tmp_path, [5, 3, 6, 2])
    source = hvp_run.open_source(str(tmp_path / pattern), "train")
    sizes = [5, 3] if "," in pattern else [5, 3, 6, 2]
    assert [p[2] for p in source.pieces] == sizes
    assert sorted(all_labels(source, batch_size=1)) == list(range(sum(sizes)))


def test_every_tar_sample_is_trained_once_across_processes_and_workers(tmp_path):
    write_shards(tmp_path, [9, 4, 11, 8])
    source = hvp_run.open_source(str(tmp_path / "train-{000..003}.tar"), "train")
    labels = all_labels(source, batch_size=4, world=2, workers=2)
    assert len(labels) == len(set(labels)) == 32


def test_tar_shards_with_jpg_images_are_read_too(tmp_path):
    write_shards(tmp_path, [3], extension="jpg")
    source = hvp_run.open_source(str(tmp_path / "train-000.tar"), "train")
    assert source.image_column == "jpg" and sorted(all_labels(source, batch_size=1)) == [0, 1, 2]


def test_a_folder_of_tar_shards_is_a_dataset_with_splits(tmp_path):
    write_shards(tmp_path, [4, 4])
    write_shards(tmp_path, [3], name="test-{:03d}.tar")
    train, test = (hvp_run.open_source(str(tmp_path), split) for split in ("train", "test"))
    assert (train.kind, train.num_rows, test.num_rows) == ("webdataset", 8, 3)


def test_a_brace_list_naming_a_missing_shard_is_a_one_line_error(tmp_path):
    write_shards(tmp_path, [2, 2])
    with pytest.raises(hvp_run.HVPError, match=r"no file '.*train-002\.tar'$"):
        hvp_run.open_source(str(tmp_path / "train-{000..002}.tar"), "train")


def test_a_tar_label_that_is_not_an_integer_is_a_one_line_error(tmp_path):
    write_shards(tmp_path, [2])
    with pytest.raises(hvp_run.HVPError, match=r"\.json member of its first sample is not an integer"):
        hvp_run.open_source(str(tmp_path / "train-000.tar"), "train", label_column="json")


# ----------------------------------------------------------------------------------- save_to_disk, arrow, csv

def test_a_save_to_disk_folder_is_a_dataset(tmp_path):
    labelled_dataset(30).save_to_disk(tmp_path / "saved", max_shard_size="1KB")
    source = hvp_run.open_source(str(tmp_path / "saved"), "whatever")
    assert (source.kind, source.num_rows, source.image_column, source.label_column) == ("arrow", 30, "img", "label")
    assert len(source.files) > 1, "several Arrow files, as save_to_disk shards a big dataset"
    labels = all_labels(source, batch_size=2, world=2, workers=2)  # 7 batches of 2 each, 2 rows left out
    assert len(labels) == len(set(labels)) == 28 and set(labels) <= set(range(30))


def test_a_dataset_dict_saved_to_disk_has_its_splits(tmp_path):
    datasets.DatasetDict({"train": labelled_dataset(12), "test": labelled_dataset(5)}).save_to_disk(tmp_path)
    assert hvp_run.open_source(str(tmp_path), "test").num_rows == 5
    with pytest.raises(hvp_run.HVPError, match=r"no split 'validation' \(it has: test, train\)$"):
        hvp_run.open_source(str(tmp_path), "validation")


def test_arrow_rows_are_read_from_their_record_batch(tmp_path):
    labelled_dataset(25).save_to_disk(tmp_path)
    source = hvp_run.open_source(str(tmp_path), "train")
    source.pieces = [[0, 10, 15]]  # a record batch starting at row 10
    assert [label for _, label in source.read(0, 3, 6)] == [13, 14, 15]


def test_a_csv_naming_images_relative_to_it_with_text_labels(tmp_path):
    for part, names in {"a": ["cat", "dog"], "b": ["emu"]}.items():
        (tmp_path / part / "images").mkdir(parents=True)
        lines = ["file,label"]
        for i, name in enumerate(names):
            Image.open(io.BytesIO(png(i))).save(tmp_path / part / "images" / f"{i}.png")
            lines.append(f"images/{i}.png,{name}")
        (tmp_path / part / "meta.csv").write_text("\n".join(lines) + "\n")
    source = hvp_run.open_source(str(tmp_path / "*" / "meta.csv"), "train", image_column="file")
    assert source.num_rows == 3 and source.class_names == ["cat", "dog", "emu"]
    assert sorted(all_labels(source, batch_size=1)) == [0, 1, 2]


def test_a_json_lines_file_naming_images_with_integer_labels(tmp_path):
    lines = []
    for i in range(4):
        Image.open(io.BytesIO(png(i))).save(tmp_path / f"{i}.png")
        lines.append(f'{{"image": "{i}.png", "label": {10 + i}}}')
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    source = hvp_run.open_source(str(tmp_path / "train.jsonl"), "train")
    assert source.num_rows == 4 and source.label_column == "label" and source.class_names is None
    assert sorted(all_labels(source, batch_size=2)) == [10, 11, 12, 13]


def test_an_unsupported_file_is_a_one_line_error_naming_the_supported_forms(tmp_path):
    (tmp_path / "images.zip").write_bytes(b"PK")
    with pytest.raises(hvp_run.HVPError) as err:
        hvp_run.open_source(str(tmp_path / "images.zip"), "train")
    message = str(err.value)
    assert "'images.zip' is not a supported file" in message and "\n" not in message
    assert all(form in message for form in ("Hub dataset id", "image folder", "save_to_disk", ".parquet", ".tar",
                                            ".csv"))


# ----------------------------------------------------------------------------------- columns found by type

def test_the_one_image_column_is_used_when_there_is_no_image_column(tmp_path, capsys):
    labelled_dataset(6).to_parquet(tmp_path / "cifar.parquet")
    capsys.readouterr()  # the writer's progress bar
    for split in ("train", "test"):  # a split and its evaluation split: said once
        source = hvp_run.open_source(str(tmp_path / "cifar.parquet"), split)
        assert source.image_column == "img" and source.label_column == "label"
    notes = capsys.readouterr().err.strip().splitlines()
    assert notes == [f"note: dataset {str(tmp_path / 'cifar.parquet')!r} has no 'image' column: using its image "
                     "column 'img' (--image_column)"]


def test_an_image_column_named_by_the_user_is_not_guessed(tmp_path):
    labelled_dataset(6).to_parquet(tmp_path / "cifar.parquet")
    with pytest.raises(hvp_run.HVPError, match=r"no image column 'picture' \(columns: \['img', 'label'\]\)"):
        hvp_run.open_source(str(tmp_path / "cifar.parquet"), "train", image_column="picture")


def test_the_one_class_label_column_is_used_when_there_is_no_label_column(tmp_path):
    data = labelled_dataset(6).rename_column("label", "fine")
    data.to_parquet(tmp_path / "data.parquet")
    source = hvp_run.open_source(str(tmp_path / "data.parquet"), "train")
    assert source.label_column == "fine" and [label for _, label in source.read(0, 0, 6)] == list(range(6))


def test_several_image_columns_are_a_one_line_error_listing_them(tmp_path):
    pictures = [Image.new("RGB", (4, 4))] * 6
    labelled_dataset(6, mask=(pictures, datasets.Image())).to_parquet(tmp_path / "data.parquet")
    with pytest.raises(hvp_run.HVPError, match=r"no image column 'image' \(image columns: \['img', 'mask'\]\); "
                                               r"pass --image_column$"):
        hvp_run.open_source(str(tmp_path / "data.parquet"), "train")


def test_several_class_label_columns_are_a_one_line_error_listing_them(tmp_path):
    coarse = ([0, 1] * 3, datasets.ClassLabel(names=["a", "b"]))
    labelled_dataset(6, coarse=coarse).rename_column("label", "fine").save_to_disk(tmp_path)
    with pytest.raises(hvp_run.HVPError, match=r"several class-label columns \['fine', 'coarse'\]: pass --label_"):
        hvp_run.open_source(str(tmp_path), "train")
    assert hvp_run.open_source(str(tmp_path), "train", label_column="coarse").label_column == "coarse"


def test_no_label_column_leaves_the_split_unlabelled(tmp_path):
    labelled_dataset(6).remove_columns("label").save_to_disk(tmp_path)
    assert hvp_run.open_source(str(tmp_path), "train").label_column is None


# ----------------------------------------------------------------------------------- unreachable Hub

def test_an_unreachable_hub_fails_in_seconds_with_one_line():
    """The Hub at a closed local port: `datasets` alone retries for about 30 s, a line per try."""
    env = script_env(HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    env.pop("HF_HUB_OFFLINE")
    env.pop("HF_DATASETS_OFFLINE")
    code = ("import sys, time, hvp_run\n"
            "start = time.time()\n"
            "try:\n"
            "    hvp_run.open_source('someone/some-images', 'train')\n"
            "except hvp_run.HVPError as e:\n"
            "    print(e, file=sys.stderr)\n"
            "print(round(time.time() - start, 1))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert float(result.stdout) < 5, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"cannot open dataset 'someone/some-images': the Hugging Face Hub ({env['HF_ENDPOINT']}) cannot be reached "
        "([Errno 111] Connection refused); for a cached copy set HF_HUB_OFFLINE=1"]


# ----------------------------------------------------------------------------------- the rows an epoch leaves out

def left_out(sizes, epoch, world=1, batch_size=8):
    batches = sum(sizes) // (batch_size * world)
    planned = {(p, i) for rank in range(world)
               for p, first, end in hvp_run.epoch_ranges(sizes, epoch, 0, rank, world, 0, 1, batch_size, batches)
               for i in range(first, end)}
    return frozenset((p, i) for p, n in enumerate(sizes) for i in range(n)) - planned


@pytest.mark.parametrize("world", [1, 2])
def test_the_rows_left_out_differ_every_epoch_with_one_row_group_per_file(world):
    """3 files of one row group each: 300 rows, 4 of them left out of an epoch."""
    epochs = [left_out([100, 100, 100], epoch, world) for epoch in range(20)]
    assert all(len(rows) == 300 % (8 * world) for rows in epochs)
    assert len(set(epochs)) == 20
    assert max(collections.Counter(row for rows in epochs for row in rows).values()) <= 4  # was 7 or more


def test_every_row_has_the_same_chance_to_be_left_out_whatever_its_piece_size():
    sizes = [12, 60, 228]  # 300 rows; batch 16: 12 left out each epoch, 4% of the rows
    per_piece = collections.Counter(p for epoch in range(2000) for p, _ in left_out(sizes, epoch, batch_size=16))
    rates = [per_piece[p] / (2000 * n) for p, n in enumerate(sizes)]
    assert all(abs(rate - 0.04) < 0.01 for rate in rates), rates


def test_a_run_on_files_given_directly_evaluates_no_k_nn_on_its_own_training_rows(tmp_path):
    # one split only: the "test" queries would be the memory bank itself (a top-1 of about 100 %)
    from conftest import TINY_TRAIN, run_script
    write_shards(tmp_path / "shards", [16, 16])
    result = run_script(["train_simsiam.py", "--dataset", tmp_path / "shards" / "train-{000..001}.tar",
                         "--output_dir", tmp_path / "out", "--max_steps", 2, *TINY_TRAIN])
    assert "has one split only (files given directly): no k-NN evaluation" in result.stdout
    assert "k-NN (k=" not in result.stdout and not (tmp_path / "out" / "knn.json").exists()


def test_a_parquet_folder_in_the_hub_layout_opens_without_datasets(tmp_path):
    # the GPU machine has no `datasets`: its splits are then found by file name, read with pyarrow alone
    from conftest import write_parquet_split
    write_parquet_split(tmp_path, "train", 24, 8)
    write_parquet_split(tmp_path, "test", 12, 6)
    code = ("import sys\n"
            "class Refuse:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.partition('.')[0] == 'datasets': raise ImportError('no datasets here')\n"
            "sys.meta_path.insert(0, Refuse())\n"
            "import hvp_run\n"
            f"train, test = (hvp_run.open_source({str(tmp_path)!r}, s) for s in ('train', 'test'))\n"
            "print(train.num_rows, test.num_rows, train.kind, 'datasets' in sys.modules)\n"
            f"hvp_run.open_source({str(tmp_path)!r}, 'validation')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=script_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.split() == ["24", "12", "parquet", "False"]
    assert result.stderr.strip().splitlines()[-1].endswith("has no split 'validation' (it has: test, train)")


def test_a_bare_hub_folder_opens_without_importing_datasets_as_datasets_opens_it(tmp_path, monkeypatch):
    """Nothing but data/<split>-NNNNN-of-NNNNN.parquet (the tests' tiny datasets): the same Source as
    through `datasets`, which is not imported for it (half a second of every run's start); any other
    folder still goes through `datasets`."""
    from hvp_run import data
    from conftest import write_parquet_split
    folder = tmp_path / "bare"
    write_parquet_split(folder, "train", 24, 8)
    write_parquet_split(folder, "test", 12, 6)
    (folder / ".cache").mkdir()  # hidden entries do not count
    fast = [hvp_run.open_source(str(folder), s) for s in ("train", "test")]
    assert data._bare_hub_folder(folder, "train") == [str(folder.resolve() / "data" / "train-00000-of-00001.parquet")]
    monkeypatch.setattr(data, "_bare_hub_folder", lambda path, split: None)
    data._OPEN.clear()
    assert fast == [hvp_run.open_source(str(folder), s) for s in ("train", "test")]
    monkeypatch.undo()
    assert data._bare_hub_folder(folder, "validation") is None  # a split it lacks: datasets' error
    (folder / "README.md").write_text("---\nconfigs: []\n---\n")  # a card may map the files otherwise
    assert data._bare_hub_folder(folder, "train") is None
    (folder / "README.md").unlink()
    (folder / "data" / "dev-00000-of-00001.parquet").write_bytes(b"")  # a split name datasets maps to another
    assert data._bare_hub_folder(folder, "train") is None
    code = ("import sys, hvp_run\n"
            f"hvp_run.open_source({str(tmp_path / 'tiny')!r}, 'train')\n"
            "print('datasets' in sys.modules)\n")
    write_parquet_split(tmp_path / "tiny", "train", 8, 8)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=script_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.split() == ["False"], result.stderr[-2000:]
