"""experiments/ (study, report, view grid) and the benchmarks' shared measurement code."""
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import REPO, TINY_TRAIN, run_script, write_parquet_split
from test_train_ibot import TINY_IBOT

sys.path.insert(0, str(REPO))
from bench import common  # noqa: E402


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------- bench/common.py

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CPU peak memory reads /proc/self")
def test_peak_memory_sees_a_temporary_allocation_and_not_an_empty_step():
    device = torch.device("cpu")

    def allocate():
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, freed on return
        return float(x[0])

    assert 56 <= common.peak_memory_mb(allocate, device) <= 96
    assert common.peak_memory_mb(lambda: None, device) < 16


# ----------------------------------------------------------------------------------- experiments/study.py

def last_value(command, flag, default=None):
    values = [command[i + 1] for i, c in enumerate(command[:-1]) if c == flag]
    return values[-1] if values else default


def fake_training(command, hvp_seconds_per_step, plain_seconds_per_step):
    """Stand-in for a pretraining subprocess: writes what a finished run leaves behind."""
    run_dir = Path(last_value(command, "--output_dir"))
    run_dir.mkdir(parents=True, exist_ok=True)
    max_steps = int(last_value(command, "--max_steps", 20))
    plain = last_value(command, "--num_views") == "2" or last_value(command, "--global_views") == "2"
    per_step = plain_seconds_per_step if plain else hvp_seconds_per_step
    (run_dir / "config.json").write_text(json.dumps({"config": {"batch_size": 10, "grad_accum": 1}}))
    records = [{"step": s, "images_per_s": 10 / per_step} for s in range(5, max_steps + 1, 5)]
    if max_steps % 5:
        records.append({"step": max_steps, "images_per_s": 10 / per_step})
    (run_dir / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n")
    (run_dir / "knn.json").write_text(json.dumps({"knn_top1": 50.0 + (not plain), "knn_top5": 90.0}))


def fake_study(monkeypatch, name):
    """experiments/study.py with its subprocesses replaced: HVP steps take 0.3 s, plain ones 0.2 s,
    every linear probe reports 60 % (best) / 59 % (last). Returns (module, list of the commands run)."""
    study, commands = load_module("experiments/study.py", name), []

    def fake_run(command, log_path):
        commands.append(command)
        if "eval/linear.py" in command:
            Path(last_value(command, "--output")).write_text(json.dumps({"best_top1": 60.0, "final_top1": 59.0}))
        else:
            fake_training(command, hvp_seconds_per_step=0.3, plain_seconds_per_step=0.2)

    monkeypatch.setattr(study, "run", fake_run)
    return study, commands


def test_study_runs_hvp_plain_and_equal_compute_plain_then_skips_what_is_done(tmp_path, monkeypatch):
    study, commands = fake_study(monkeypatch, "study_under_test")
    argv = ["study.py", "--methods", "simsiam", "dino", "--seeds", "3", "--out", str(tmp_path / "runs")]
    monkeypatch.setattr(sys, "argv", argv)
    study.main()
    rows = [json.loads(line) for line in (tmp_path / "runs" / "runs.jsonl").read_text().splitlines()]
    assert [(r["method"], r["variant"], r["seed"]) for r in rows] == [
        (m, v, 3) for m in ("simsiam", "dino") for v in ("hvp", "plain", "plain_eqc")]
    trainings = [c for c in commands if "eval/linear.py" not in c]
    assert len(trainings) == 6 and len(commands) == 12
    simsiam_hvp, simsiam_plain, simsiam_eqc, dino_hvp, dino_plain, dino_eqc = map(" ".join, trainings)
    assert "train_simsiam.py" in simsiam_hvp and "--num_views 4" in simsiam_hvp and "--seed 3" in simsiam_hvp
    assert "--num_views 2" in simsiam_plain and "--max_steps" not in simsiam_plain
    # equal compute: 20 plain steps x (0.3 s / 0.2 s per step) = 30 steps
    assert simsiam_eqc.endswith("--max_steps 30 --seed 3 --output_dir " + str(tmp_path / "runs/simsiam/plain_eqc-seed3")
                                + " --report_to none")
    # DINO's plain run keeps 2 globals and exactly the L = 2 locals it trains on (no local selection)
    assert "--global_views 2 --local_views 2" in dino_plain
    assert rows[2]["steps"] == 30 and rows[0]["train_s"] == pytest.approx(20 * 0.3)
    assert rows[0]["linear_top1"] == 60.0 and rows[0]["linear_top1_final"] == 59.0
    # a second start finds everything in runs.jsonl and runs nothing
    commands.clear()
    study.main()
    assert commands == []


def test_study_on_other_data_passes_the_shipped_presets_so_the_cpu_budget_means_the_same(tmp_path, monkeypatch):
    study, commands = fake_study(monkeypatch, "study_under_test_data")
    monkeypatch.setattr(sys, "argv", ["study.py", "--methods", "dino", "--seeds", "0", "--out", str(tmp_path),
                                      "--dataset", "/some/fashion_mnist_full"])
    study.main()
    train, linear = commands[0], commands[1]
    assert last_value(train, "--dataset") == "/some/fashion_mnist_full" and "--small_stem" in train
    assert last_value(train, "--patch_size") == "8" and last_value(train, "--out_dim") == "1024"  # budget after preset
    assert last_value(linear, "--optimizer") == "sgd" and last_value(linear, "--epochs") == "20"


def test_training_time_reads_throughput_records(tmp_path):
    study = load_module("experiments/study.py", "study_under_test3")
    (tmp_path / "config.json").write_text(json.dumps({"config": {"batch_size": 32, "grad_accum": 2}, "processes": 3}))
    records = [{"step": 10, "images_per_s": 192.0}, {"step": 10, "epoch": 1, "knn_top1": 5.0},
               {"step": 15, "images_per_s": 96.0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)))
    seconds, steps = study.training_time(tmp_path)  # global batch 32 x 2 x 3 = 192 images per step
    assert steps == 15 and seconds == pytest.approx(10 * 192 / 192 + 5 * 192 / 96)


# ----------------------------------------------------------------------------------- experiments/report.py

def write_study(folder):
    rows = []
    knn = {"hvp": [70.0, 71.0, 69.0], "plain": [69.5, 70.0, 69.6], "plain_eqc": [72.0, 72.5, 71.5]}
    for variant, values in knn.items():
        for seed, value in enumerate(values):
            rows.append({"method": "simsiam", "variant": variant, "seed": seed, "steps": 100, "train_s": 50.0,
                         "flags": "--num_views 4" if variant == "hvp" else "--num_views 2",
                         "knn_top1": value, "linear_top1": value + 1, "linear_top1_final": value})
    (folder / "runs.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    for seed in range(3):
        run = folder / "simsiam" / f"hvp-seed{seed}"
        run.mkdir(parents=True)
        records = []
        for step in range(1, 10):
            stats = {"step": step, "epoch": step / 9, "hard_score": -0.5, "random_score": -0.7, "hard_iou": 0.3,
                     "random_iou": 0.5, "hard_area": 0.4, "random_area": 0.5}
            for kind in ("hard", "random"):
                stats[f"{kind}_iou_hist"] = [1] * 10
                stats[f"{kind}_area_hist"] = [2] * 10
            records.append(stats)
        (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n")
    (folder / "raw_pixels_knn.json").write_text(json.dumps({"image_size": 32, "knn": {"20": {"top1": 81.15}}}))


def test_report_states_each_verdict_from_the_numbers_and_writes_plots(tmp_path):
    write_study(tmp_path)
    out = tmp_path / "doc" / "RESULTS.md"
    out.parent.mkdir()
    run_script(["experiments/report.py", "--runs", tmp_path, "--output", out, "--notes", tmp_path / "none.md"])
    text = out.read_text()
    # equal epochs: per-seed differences +0.5, +1.0, -0.6 -> mean +0.30, HVP higher in 2/3, within the seeds' std 1.00
    assert ("Did HVP beat plain at equal epochs (k-NN top-1)? **yes**: HVP − baseline = +0.30 points mean over seeds "
            "[0, 1, 2] (per seed: +0.50, +1.00, -0.60; HVP higher in 2/3) (gap smaller than the seed-to-seed std 1.00") in text
    assert "Did HVP beat plain at equal compute (k-NN top-1)? **no**: HVP − baseline = -2.00 points" in text
    assert "| simsiam | HVP | 0, 1, 2 | 100 | 50 | 70.00 ± 1.00 | 71.00 ± 1.00 | 70.00 ± 1.00 |" in text
    assert "81.15 %" in text
    files = out.parent / "results_files"
    for name in ("selection_over_training.png", "iou_area_distributions.png"):
        assert f"results_files/{name}" in text
        with Image.open(files / name) as image:
            assert image.format == "PNG" and image.width > 200
    assert (files / "runs.jsonl").read_text() == (tmp_path / "runs.jsonl").read_text()


SHIPPED_RESULTS = REPO / "experiments" / "results_files"


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def markdown_links(text):
    return re.findall(r"\]\(([^)]+)\)", text)


def test_report_rebuilds_the_committed_results_from_the_shipped_folder(tmp_path):
    shipped = folder_bytes(SHIPPED_RESULTS)
    out = tmp_path / "RESULTS.md"
    result = run_script(["experiments/report.py", "--runs", SHIPPED_RESULTS, "--output", out])
    text = out.read_text()
    assert text == (REPO / "experiments" / "RESULTS.md").read_text()
    assert folder_bytes(SHIPPED_RESULTS) == shipped  # the shipped folder is only read
    # every shipped input ends up next to the rebuilt document, unchanged, and every link resolves
    assert folder_bytes(tmp_path / "results_files") == shipped
    for link in markdown_links(text):
        assert (tmp_path / link).is_file(), link
    # what the shipped folder cannot give is said, on stderr and in the document: here only that the
    # selection plots are shown as drawn by the study's own report (its per-step metrics are not shipped)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: not redrawn: the two selection plots.")
    assert "selection.jsonl" in warnings[0] and str(SHIPPED_RESULTS) in warnings[0]
    assert "- **Not redrawn: the two selection plots.**" in text and "Raw-pixel floor" in text
    assert "1 input(s) missing" in result.stdout


def test_report_names_every_missing_input_and_still_writes_the_rest(tmp_path):
    runs = tmp_path / "shipped"
    runs.mkdir()
    for name, data in folder_bytes(SHIPPED_RESULTS).items():
        if name not in ("raw_pixels_knn.json", "selection_over_training.png", "iou_area_distributions.png",
                        "grid-ibot.png", "grid-ibot-locals.png"):
            (runs / name).write_bytes(data)
    out = tmp_path / "doc" / "RESULTS.md"
    result = run_script(["experiments/report.py", "--runs", runs, "--output", out, "--notes", tmp_path / "none.md"])
    text = out.read_text()
    left_out = ["the raw-pixel k-NN floor", "the selection plots", "the example hard views of ibot",
                "the setup and discussion section"]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == len(left_out), result.stderr
    for what, warning in zip(left_out, warnings):
        assert warning.startswith(f"warning: left out: {what}")
        assert f"- **Left out: {what}" in text
    assert str(runs / "raw_pixels_knn.json") in warnings[0] and str(runs / "grid-ibot.png") in warnings[2]
    assert "eval/knn.py --raw_pixels" in warnings[0] and "experiments/view_grid.py" in warnings[2]
    assert "Raw-pixel floor (" not in text and "## What the selection picks" not in text
    assert "![grid-ibot" not in text
    assert "## Verdicts" in text and "grid-dino-locals.png" in text  # everything else is still there
    assert "4 input(s) missing" in result.stdout


def test_a_report_copies_the_selection_statistics_so_its_folder_alone_redraws_the_plots(tmp_path):
    (tmp_path / "study").mkdir()
    write_study(tmp_path / "study")
    Image.new("RGB", (40, 20)).save(tmp_path / "study" / "grid-simsiam.png")
    first, second = tmp_path / "a" / "RESULTS.md", tmp_path / "b" / "RESULTS.md"
    notes = tmp_path / "notes.md"
    notes.write_text("## Setup\n\nnotes")
    run_script(["experiments/report.py", "--runs", tmp_path / "study", "--output", first, "--notes", notes])
    copies = first.parent / "results_files"
    assert {"runs.jsonl", "raw_pixels_knn.json", "selection.jsonl", "grid-simsiam.png"} <= set(folder_bytes(copies))
    result = run_script(["experiments/report.py", "--runs", copies, "--output", second, "--notes", notes])
    assert "warning:" not in result.stderr and "missing" not in result.stdout
    assert second.read_text() == first.read_text() and "Inputs missing" not in first.read_text()
    assert (second.parent / "results_files" / "selection.jsonl").read_text() == (copies / "selection.jsonl").read_text()
    for name in ("selection_over_training.png", "iou_area_distributions.png"):
        with Image.open(second.parent / "results_files" / name) as image:  # redrawn, not copied
            assert image.format == "PNG" and image.width > 200


def test_report_without_a_study_is_a_one_line_error(tmp_path):
    result = run_script(["experiments/report.py", "--runs", tmp_path], check=False)
    assert result.returncode == 2 and "runs.jsonl not found" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------- experiments/view_grid.py

@pytest.mark.parametrize("script,flags,views,zoom", [
    ("train_simsiam.py", TINY_TRAIN + ["--num_views", "3"], 3, 2),
    ("train_ibot.py", TINY_IBOT, 4, 1),
])
def test_view_grid_draws_every_candidate_view_from_a_checkpoint(tiny_dataset, tmp_path, script, flags, views, zoom):
    run = tmp_path / "run"
    run_script([script, "--dataset", tiny_dataset, "--output_dir", run, "--max_steps", 1, *flags])
    grid = tmp_path / "grid.png"
    result = run_script(["experiments/view_grid.py", "--run", run, "--num_images", 5, "--zoom", zoom, "--output", grid])
    assert "wrote" in result.stdout
    size = zoom * int(flags[flags.index("--image_size") + 1])
    with Image.open(grid) as image:  # 5 rows of `views` tiles (each view padded by 2 + 2, grid padding 2)
        assert image.size == (views * (size + 6) + 2, 5 * (size + 6) + 2)
    if script == "train_ibot.py":
        assert (tmp_path / "grid-locals.png").exists()


def test_view_grid_shows_the_first_decodable_images_of_the_split_in_order(tmp_path):
    import types
    import pyarrow as pa
    import pyarrow.parquet as pq
    import hvp_run
    data = tmp_path / "data"
    write_parquet_split(data, "train", 12, 4)
    path = data / "data" / "train-00000-of-00001.parquet"
    table = pq.read_table(path)
    images = table.column("image").to_pylist()
    images[2] = {"bytes": b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "path": None}
    pq.write_table(table.set_column(0, "image", pa.array(images, type=table.schema.field("image").type)), path)
    labels = table.column("label").to_pylist()
    view_grid = load_module("experiments/view_grid.py", "view_grid_under_test")
    cfg = types.SimpleNamespace(dataset=str(data), split="train", image_column="image", label_column="label", seed=0)
    batch = view_grid.first_batch(cfg, hvp_run.EvalTransform(28), 5, "", "")
    assert batch["image"].shape == (5, 3, 28, 28) and int(batch["skipped"]) == 1
    assert batch["label"].tolist() == [labels[i] for i in (0, 1, 3, 4, 5)]


def test_view_grid_without_a_checkpoint_is_a_one_line_error(tmp_path):
    result = run_script(["experiments/view_grid.py", "--run", tmp_path], check=False)
    assert result.returncode == 2 and "holds no training checkpoint" in result.stderr
