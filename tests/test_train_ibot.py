"""train_ibot.py end to end, as a user runs it (real subprocesses, the real CLI)."""
import json
import shutil

import pytest
import torch

import hvp_run
from conftest import run_script

# a ViT small enough for tests (timm's 6-block, 64-wide test ViT): 16 px globals (4 x 4 patches of 4 px), 8 px
# locals, 64-prototype heads (equal sizes: the teacher's patch tokens use its [CLS] last layer, the official default)
TINY_IBOT = ["--arch", "test_vit", "--small_stem", "--image_size", "16", "--local_size", "8", "--batch_size", "8",
             "--out_dim", "64", "--patch_out_dim", "64", "--hidden_dim", "64", "--bottleneck_dim", "32",
             "--global_views", "4", "--local_views", "4", "--local_crops_number", "2", "--pred_ratio", "0.4",
             "--num_workers", "0", "--log_every", "1", "--report_to", "none", "--mixed_precision", "no"]


def train_args(output_dir, dataset, *extra):
    return ["train_ibot.py", "--dataset", dataset, "--output_dir", output_dir, *TINY_IBOT, *map(str, extra)]


def records(output_dir):
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def final_state(output_dir):
    return hvp_run.load_checkpoint(hvp_run.latest_checkpoint(output_dir))


def test_smoke_run_selects_tuples_with_masks_logs_both_losses_exports_the_teacher_and_prints_knn(tiny_dataset, tmp_path):
    out = tmp_path / "vit"
    result = run_script(train_args(out, tiny_dataset, "--max_steps", 2))
    assert "iBOT + HVP | test_vit 16/8px patch 4 | globals 4 -> 2, locals 4 -> 2 | mask ratio 0.4" in result.stdout
    logged = records(out)
    assert [r["step"] for r in logged] == [1, 2]
    for key in ("loss", "cls_loss", "patch_loss", "mask_ratio", "teacher_temp", "teacher_patch_temp", "select_s",
                "hard_score", "random_score", "hard_iou", "hard_area", "hard_local_area"):
        assert key in logged[-1], key
    for r in logged:
        assert r["hard_score"] >= r["random_score"] - 1e-5  # the plain tuple is a candidate
        assert r["patch_loss"] > 0 and 0 < r["mask_ratio"] <= 0.4
        assert r["loss"] == pytest.approx(r["cls_loss"] + r["patch_loss"], rel=1e-5)
    assert "k-NN (k=20, T=0.07) on" in result.stdout and json.loads((out / "knn.json").read_text())["knn_top1"] > 0
    state = final_state(out)
    assert {"student", "teacher", "center", "patch_center", "optimizer", "step"} <= state.keys()
    assert state["center"].abs().sum() > 0 and state["patch_center"].abs().sum() > 0
    assert "mask_token" in state["student"] and state["student"]["mask_token"].abs().sum() > 0  # trained
    backbone, config = hvp_run.load_backbone(out)
    assert config["pretrained_cfg"]["tag"] == "hvp_ibot"
    for name, value in backbone.state_dict().items():
        assert torch.equal(value, state["teacher"]["backbone." + name]), name


@pytest.mark.parametrize("extra,message", [
    (["--arch", "resnet18"], "error: --arch 'resnet18' is not a timm VisionTransformer"),
    (["--global_views", "3"], "error: --global_views must be an even number >= 2"),
    (["--pred_ratio", "1.0"], "error: --pred_ratio must be in [0, 1)"),
    (["--pred_ratio", "0", "0.3", "--pred_ratio_var", "0", "0.4"], "error: --pred_ratio_var must be in [0, pred_ratio]"),
    (["--patch_out_dim", "48"], "error: --shared_head_teacher (the default) needs --patch_out_dim = --out_dim"),
])
def test_bad_input_is_a_one_line_error_and_writes_nothing(tiny_dataset, tmp_path, extra, message):
    result = run_script(train_args(tmp_path / "out", tiny_dataset, "--max_steps", 1, *extra), check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_resume_from_a_checkpoint_gives_the_same_student_teacher_and_centres(tiny_dataset, tmp_path):
    # half-resolution selection every other step, so both step kinds are resumed; with data workers
    # (their round-robin order must be resumed too); mask ratios drawn per view (iBOT's ViT-S recipe);
    # no label column, so no k-NN
    extra = ("--max_steps", 4, "--save_every", 2, "--warmup_epochs", 0.2, "--freeze_last_layer", 0.2,
             "--hvp_select_res", 0.5, "--hvp_every", 2, "--num_workers", 2, "--label_column", "none",
             "--pred_ratio", 0, 0.4, "--pred_ratio_var", 0, 0.1)
    full = tmp_path / "full"
    run_script(train_args(full, tiny_dataset, *extra))
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoint-00000004")
    result = run_script(train_args(resumed, tiny_dataset, *extra, "--resume"))
    assert "resumed at step 2" in result.stdout
    a, b = final_state(full), final_state(resumed)
    assert a["step"] == b["step"] == 4
    for part in ("student", "teacher"):
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), (part, name)
    assert torch.equal(a["center"], b["center"]) and torch.equal(a["patch_center"], b["patch_center"])

