"""train_dino.py end to end, as a user runs it (real subprocesses, the real CLI)."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

import hvp_run
from conftest import REPO, run_script, script_env

# a ViT small enough for tests (timm's 6-block, 64-wide test ViT): 16 px globals, 8 px locals, 4 px patches,
# a 64-prototype head
TINY_DINO = ["--arch", "test_vit", "--small_stem", "--image_size", "16", "--local_size", "8", "--batch_size", "8",
             "--out_dim", "64", "--hidden_dim", "64", "--bottleneck_dim", "32", "--global_views", "4",
             "--local_views", "4", "--local_crops_number", "2", "--num_workers", "0", "--log_every", "1",
             "--report_to", "none", "--mixed_precision", "no"]


def train_args(output_dir, dataset, *extra):
    return ["train_dino.py", "--dataset", dataset, "--output_dir", output_dir, *TINY_DINO, *map(str, extra)]


def records(output_dir):
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def final_state(output_dir):
    return hvp_run.load_checkpoint(hvp_run.latest_checkpoint(output_dir))


def test_vit_smoke_run_selects_tuples_logs_exports_the_teacher_and_prints_knn(tiny_dataset, tmp_path):
    out = tmp_path / "vit"
    result = run_script(train_args(out, tiny_dataset, "--max_steps", 2))
    assert "DINO + HVP | test_vit 16/8px | globals 4 -> 2, locals 4 -> 2" in result.stdout
    logged = records(out)
    assert [r["step"] for r in logged] == [1, 2]
    for key in ("loss", "lr", "weight_decay", "momentum", "teacher_temp", "select_s", "train_s", "hard_score",
                "random_score", "hard_iou", "random_iou", "hard_area", "random_area", "hard_local_area"):
        assert key in logged[-1], key
    # the chosen tuple is the per-sample maximum over candidates that include the plain tuple
    # (scores equal in exact arithmetic may differ in float32 by summation order: a relative slack)
    assert all(r["hard_score"] >= r["random_score"] * (1 - 1e-6) for r in logged)
    assert "k-NN (k=20, T=0.07) on" in result.stdout and json.loads((out / "knn.json").read_text())["knn_top1"] > 0
    assert f"teacher backbone exported to {out / 'backbone'}" in result.stdout
    assert sorted(p.name for p in (out / "grids").glob("*.png")) == ["step-00000001-globals.png",
                                                                     "step-00000001-locals.png"]
    state = final_state(out)
    assert {"student", "teacher", "center", "optimizer", "step"} <= state.keys()
    assert state["center"].abs().sum() > 0, "the centre is updated"
    # the exported backbone is the teacher's
    backbone, config = hvp_run.load_backbone(out)
    assert config["pretrained_cfg"]["tag"] == "hvp_dino"
    for name, value in backbone.state_dict().items():
        assert torch.equal(value, state["teacher"]["backbone." + name]), name


def test_resnet_run_selecting_every_other_step_at_half_resolution_from_a_limited_set(tiny_dataset, tmp_path):
    out = tmp_path / "resnet"
    run_script(train_args(out, tiny_dataset, "--max_steps", 3, "--arch", "test_resnet", "--hvp_select_res", 0.5,
                          "--hvp_every", 2, "--hvp_limit", 3))
    # a record is written after its step: records 1 and 3 are steps 0 and 2, the selecting ones
    assert ["hard_score" in r for r in records(out)] == [True, False, True]


def test_two_globals_and_all_locals_is_plain_dino_without_a_selection_pass(tiny_dataset, tmp_path):
    out = tmp_path / "plain"
    result = run_script(train_args(out, tiny_dataset, "--max_steps", 2, "--global_views", 2, "--local_views", 2))
    assert "DINO | test_vit" in result.stdout
    for r in records(out):
        assert "hard_score" not in r and r["select_s"] < 0.01


@pytest.mark.parametrize("extra,message", [
    (["--global_views", "3"], "error: --global_views must be an even number >= 2"),
    (["--local_crops_number", "5"], "error: --local_crops_number must be in [0, --local_views = 4]"),
])
def test_bad_input_is_a_one_line_error_and_writes_nothing(tiny_dataset, tmp_path, extra, message):
    result = run_script(train_args(tmp_path / "out", tiny_dataset, "--max_steps", 1, *extra), check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.heavy
def test_sigterm_then_resume_gives_the_same_student_teacher_and_centre(tiny_dataset, tmp_path):
    # views cut on the training device (--crops device, the CUDA default): resuming is exact there too;
    # 8 steps, so that the signal sent after the second still finds the run going
    extra = ("--max_steps", 8, "--num_workers", 2, "--save_every", 100, "--warmup_epochs", 0.2,
             "--freeze_last_layer", 0.2, "--crops", "device")
    run_script(train_args(tmp_path / "full", tiny_dataset, *extra))

    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, *map(str, train_args(interrupted, tiny_dataset, *extra))], cwd=REPO,
                            env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (interrupted / "metrics.jsonl").exists() and len(records(interrupted)) >= 2:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    assert "SIGTERM: saved" in stdout
    stopped_at = final_state(interrupted)["step"]
    assert 2 <= stopped_at < 8, "the signal must arrive mid-run for this test to mean anything"

    resumed = run_script(train_args(interrupted, tiny_dataset, *extra, "--resume"))
    assert f"resumed at step {stopped_at}" in resumed.stdout
    full, again = final_state(tmp_path / "full"), final_state(interrupted)
    for part in ("student", "teacher"):
        assert full[part].keys() == again[part].keys()
        for name in full[part]:
            assert torch.equal(full[part][name], again[part][name]), (part, name)
    assert torch.equal(full["center"], again["center"])
    assert [r["step"] for r in records(interrupted)] == list(range(1, 9))

