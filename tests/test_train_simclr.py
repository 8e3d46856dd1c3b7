"""train_simclr.py end to end, as a user runs it (real subprocesses, the real CLI)."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import hvp_run
from conftest import probe_records, run_script, run_two_processes

# Small and fast: the standard ResNet stem at 32 px leaves 8 x 8 maps after the stem.
TINY = ["--arch", "resnet18", "--no-small_stem", "--image_size", "32", "--batch_size", "8",
        "--proj_hidden_dim", "64", "--proj_dim", "16", "--num_workers", "0", "--log_every", "1",
        "--report_to", "none", "--mixed_precision", "no"]


def train_args(output_dir, dataset, *extra):
    return ["train_simclr.py", "--dataset", dataset, "--output_dir", output_dir, *TINY, *map(str, extra)]


def records(output_dir):
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def final_model(output_dir):
    return hvp_run.load_checkpoint(hvp_run.latest_checkpoint(output_dir))["model"]


def test_smoke_run_selects_hard_pairs_logs_exports_the_backbone_and_prints_knn(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    result = run_script(train_args(out, tiny_dataset, "--max_steps", 2))
    logged = records(out)
    assert [r["step"] for r in logged] == [1, 2]
    for key in ("step", "epoch", "loss", "lr", "images_per_s", "select_s", "train_s",
                "hard_score", "random_score", "hard_iou", "random_iou", "hard_area", "random_area"):
        assert key in logged[-1], key
    # the selected pair is the per-sample maximum over candidates that include the plain pair (0, 1)
    assert all(r["hard_score"] >= r["random_score"] > 0 for r in logged)
    assert "k-NN (k=20, T=0.07)" in result.stdout and json.loads((out / "knn.json").read_text())["knn_top1"] > 0
    backbone, config = hvp_run.load_backbone(out)
    assert config["architecture"] == "resnet18" and config["pretrained_cfg"]["tag"] == "hvp_simclr"
    assert json.loads((out / "config.json").read_text())["config"]["temperature"] == 0.1
    grid = np.asarray(Image.open(next((out / "grids").glob("*.png"))).convert("RGB")).astype(float)
    green = (grid[..., 1] > 200) & (grid[..., 0] < 50) & (grid[..., 2] < 50)
    assert grid.std() > 20 and green.sum() > 0, "the view grid shows images with the selected pair framed"


def test_two_views_is_plain_simclr_without_a_selection_pass(tiny_dataset, tmp_path):
    """No selection statistics and no selection time in any record (an HVP run logs both: the smoke test)."""
    result = run_script(train_args(tmp_path / "plain", tiny_dataset, "--max_steps", 2, "--num_views", 2))
    assert "SimCLR | resnet18" in result.stdout, "the banner says plain SimCLR (no '+ HVP')"
    logged = records(tmp_path / "plain")
    assert [r["step"] for r in logged] == [1, 2]
    for r in logged:
        assert not any(k.startswith(("hard_", "random_")) for k in r) and r["select_s"] < 0.01, r
    assert not (tmp_path / "plain" / "grids").exists(), "no selection, no view grid"


@pytest.mark.parametrize("extra,message", [
    (["--num_views", "1"], "error: --num_views must be at least 2"),
    (["--temperature", "0"], "error: --temperature must be positive"),
])
def test_bad_input_is_a_one_line_error_and_writes_nothing(tiny_dataset, tmp_path, extra, message):
    result = run_script(train_args(tmp_path / "out", tiny_dataset, "--max_steps", 1, *extra), check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_resuming_from_a_checkpoint_gives_the_same_parameters_as_an_uninterrupted_run(tiny_dataset, tmp_path):
    extra = ("--max_steps", 4, "--save_every", 2, "--num_workers", 2, "--hvp_select_res", 0.5)
    full = tmp_path / "full"
    run_script(train_args(full, tiny_dataset, *extra))
    # the same run as if it had been killed right after step 2: only the step-2 checkpoint survives
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copytree(full / "checkpoint-00000002", killed / "checkpoint-00000002")
    resumed = run_script(train_args(killed, tiny_dataset, *extra, "--resume"))
    assert "resumed at step 2" in resumed.stdout
    assert [r["step"] for r in records(killed)] == [3, 4]
    expected, again = final_model(full), final_model(killed)
    assert expected.keys() == again.keys()
    for name in expected:
        assert torch.equal(expected[name], again[name]), name


@pytest.mark.heavy
def test_two_process_cpu_ddp_runs_hvp_and_keeps_parameters_identical_across_ranks(tiny_dataset, tmp_path):
    out = tmp_path / "ddp"
    result = run_two_processes(train_args(out, tiny_dataset, "--max_steps", 2, "--num_workers", 2))
    assert "2 process(es)" in result.stdout and "k-NN" in result.stdout
    states, _ = probe_records(out)
    for name, value in states[0].items():
        if not any(part in name for part in ("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(value, states[1][name]), name
    assert [r["step"] for r in records(out)] == [1, 2] and "hard_score" in records(out)[-1]

