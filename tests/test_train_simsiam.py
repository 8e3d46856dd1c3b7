"""train_simsiam.py end to end, as a user runs it (real subprocesses, the real CLI)."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import hvp_run
from conftest import TINY_TRAIN, assert_same_tensors, run_script, write_parquet_split


def train_args(output_dir, dataset, *extra):
    return ["train_simsiam.py", "--dataset", dataset, "--output_dir", output_dir, *TINY_TRAIN, *map(str, extra)]


def records(output_dir):
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def test_smoke_run_logs_metrics_exports_the_backbone_and_prints_knn(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    result = run_script(train_args(out, tiny_dataset, "--max_steps", 3))
    logged = records(out)
    assert [r["step"] for r in logged] == [1, 2, 3]
    for key in ("step", "epoch", "loss", "lr", "images_per_s", "select_s", "train_s",
                "hard_score", "random_score", "hard_iou", "random_iou", "hard_area", "random_area"):
        assert key in logged[-1], key
    # the selected pair is the per-sample maximum over candidates that include the plain pair (0, 1)
    assert all(r["hard_score"] >= r["random_score"] for r in logged)
    assert "k-NN (k=20, T=0.07)" in result.stdout and json.loads((out / "knn.json").read_text())["knn_top1"] > 0
    backbone, config = hvp_run.load_backbone(out)
    assert config["architecture"] == "test_resnet" and config["pretrained_cfg"]["tag"] == "hvp_simsiam"
    assert (out / "config.json").exists()
    grid = np.asarray(Image.open(next((out / "grids").glob("*.png"))).convert("RGB")).astype(float)
    assert grid.std() > 20, "the view grid shows images, not a blank canvas"
    green = (grid[..., 1] > 200) & (grid[..., 0] < 50) & (grid[..., 2] < 50)
    assert green.sum() > 0, "the selected pair is framed in green"
    checkpoint = hvp_run.latest_checkpoint(out)
    files = sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file())
    assert files == ["backbone/config.json", "backbone/model.safetensors", "manifest.json", "state.json",
                     "state.safetensors"]
    assert hvp_run.checkpoint_problem(checkpoint) is None


def test_two_views_is_plain_simsiam_without_a_selection_pass(tiny_dataset, tmp_path):
    """No selection statistics and no selection time in any record (an HVP run logs both: the smoke test)."""
    result = run_script(train_args(tmp_path / "plain", tiny_dataset, "--max_steps", 2, "--num_views", 2))
    assert "SimSiam | test_resnet" in result.stdout, "the banner says plain SimSiam (no '+ HVP')"
    logged = records(tmp_path / "plain")
    assert [r["step"] for r in logged] == [1, 2]
    for r in logged:
        assert not any(k.startswith(("hard_", "random_")) for k in r) and r["select_s"] < 0.01, r
    assert not (tmp_path / "plain" / "grids").exists(), "no selection, no view grid"


def test_reduced_resolution_selection_and_hvp_every_run(tiny_dataset, tmp_path):
    run_script(train_args(tmp_path / "r", tiny_dataset, "--max_steps", 4, "--hvp_select_res", 0.5, "--hvp_every", 2))
    logged = records(tmp_path / "r")
    # a record is written after its step: records 1 and 3 are steps 0 and 2, the selecting ones
    assert ["hard_score" in r for r in logged] == [True, False, True, False]


@pytest.mark.parametrize("extra,message", [
    (["--num_views", "1"], "error: --num_views must be at least 2"),
    (["--arch", "no_such_net"], "error: unknown --arch 'no_such_net'"),
    (["--dataset", "/no/such/dataset"], "error: cannot open dataset '/no/such/dataset'"),
    (["--hvp_select_res", "0"], "error: --hvp_select_res must be in (0, 1]"),
])
def test_bad_input_is_a_one_line_error_and_writes_nothing(tiny_dataset, tmp_path, extra, message):
    args = train_args(tmp_path / "out", tiny_dataset, "--max_steps", 1)
    for i in range(0, len(extra), 2):  # later flags win in argparse
        args += [extra[i], extra[i + 1]]
    result = run_script(args, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_corrupt_image_is_skipped_counted_and_training_goes_on(tmp_path):
    data = tmp_path / "data_with_corrupt_image"
    write_parquet_split(data, "train", 16, 4)
    write_parquet_split(data, "test", 16, 4)
    path = data / "data" / "train-00000-of-00001.parquet"
    table = pq.read_table(path)
    images = table.column("image").to_pylist()
    images[5] = {"bytes": b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "path": None}
    column = __import__("pyarrow").array(images, type=table.schema.field("image").type)
    pq.write_table(table.set_column(0, "image", column), path)
    run_script(train_args(tmp_path / "out", data, "--max_steps", 3))
    assert records(tmp_path / "out")[-1]["skipped_images"] >= 1


def test_the_no_argument_main_job_runs_to_its_knn_line(tmp_path):
    """The README's main job, shortened to 2 steps: shipped dataset, CPU preset, k-NN at the end."""
    result = run_script(["train_simsiam.py", "--max_steps", "2", "--output_dir", tmp_path / "main", "--report_to", "none"],
                        timeout=600)
    assert "preset for the shipped dataset" in result.stdout
    assert "k-NN (k=20, T=0.07) on fashion_mnist_small [test]: top-1" in result.stdout


def test_photometric_in_the_loader_worker_trains_exactly_as_in_the_training_process(tiny_dataset, tmp_path):
    """On a CPU with loader workers, the workers also apply the photometric step (collate_views with
    apply_photometric): the same views, so the same weights as a run without workers, where the
    training process applies it (both with 1 torch thread)."""
    for workers in (0, 1):
        run_script(train_args(tmp_path / f"w{workers}", tiny_dataset, "--max_steps", 3, "--num_workers", workers,
                              "--threads", 1, "--save_every", 3))
    derived = {w: json.loads((tmp_path / f"w{w}" / "config.json").read_text())["run"] for w in (0, 1)}
    assert derived[0]["photometric"] == "device" and derived[1]["photometric"] == "worker"
    states = [hvp_run.load_checkpoint(hvp_run.latest_checkpoint(tmp_path / f"w{w}"))["model"] for w in (0, 1)]
    assert_same_tensors(*states)
