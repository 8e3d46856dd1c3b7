"""What a run does with what users get wrong or change between runs: bad flags, flags from a file,
the launcher's precision, resuming from a path or with another script, another layout or a signal
to one process, and errors before the first step that leave nothing behind. Real subprocesses and the
real CLI where the behaviour is the script's; parse_config in-process where it is the parser's."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import hvp_run
import train_simsiam as ts
from conftest import REPO, run_script, script_env, SHIPPED, TINY_TRAIN, two_process_command
from test_data import uneven_parquet
from test_train_simclr import TINY as TINY_SIMCLR


def simsiam(output_dir, dataset, *extra):
    return ["train_simsiam.py", "--dataset", dataset, "--output_dir", output_dir, *TINY_TRAIN, "--eval_split", "",
            *map(str, extra)]


def last_error_line(result):
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ----------------------------------------------------------------------------------- the command line

def test_a_wrong_type_is_one_error_line_without_the_usage(capsys):
    with pytest.raises(SystemExit) as stop:
        hvp_run.parse_config(ts.Config, ["--epochs", "x"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == "error: argument --epochs: invalid int value: 'x' (see --help)\n"


def test_a_flag_is_never_taken_for_a_longer_one_it_begins(capsys):
    with pytest.raises(SystemExit) as stop:
        hvp_run.parse_config(ts.Config, ["--output", "somewhere"])  # not --output_dir
    assert stop.value.code == 2
    assert capsys.readouterr().err == "error: unrecognized arguments: --output somewhere (see --help)\n"


def test_help_lists_the_recipe_names(capsys):
    with pytest.raises(SystemExit):
        hvp_run.parse_config(ts.Config, ["--help"], presets=ts.PRESETS, recipes=ts.RECIPES)
    recipe_help = " ".join(capsys.readouterr().out.split()).rsplit("--recipe RECIPE", 1)[1].split(" --", 1)[0]
    assert ts.RECIPES and all(name in recipe_help for name in ts.RECIPES), recipe_help


def test_a_runs_config_json_reads_back_as_its_flags_and_command_line_flags_win(tmp_path):
    from hvp_run.lifecycle import write_run_info
    cfg, _ = hvp_run.parse_config(ts.Config, ["--arch", "resnet18", "--crop_scale", "0.3", "0.9", "--lr", "0.2",
                                              "--no-fix_pred_lr", "--output_dir", str(tmp_path / "a"), "--resume"])
    write_run_info(tmp_path, cfg, {"grad_accum": 1})
    again, notes = hvp_run.parse_config(ts.Config, ["--config", str(tmp_path / "config.json"), "--epochs", "3"])
    assert again == ts.Config(**{**vars(cfg), "epochs": 3, "resume": ""}), "--resume is what to do, not a setting"
    assert notes == [f"flags from {tmp_path / 'config.json'} (those given on the command line win)"]


def test_a_config_file_with_another_scripts_flags_is_a_one_line_error(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"config": {"epochs": 2, "temperature": 0.1}}))
    with pytest.raises(hvp_run.HVPError, match=r"c\.json has flags this script does not take: temperature$"):
        hvp_run.parse_config(ts.Config, ["--config", str(tmp_path / "c.json")])


# ----------------------------------------------------------------------------------- precision

@pytest.mark.parametrize("launcher,argv,expected", [
    ("bf16", [], "bf16"),                            # accelerate launch --mixed_precision bf16 beats the preset's auto
    ("fp16", [], "fp16"),
    ("bf16", ["--mixed_precision", "no"], "no"),     # the script's own flag beats the launcher
    ("no", [], "auto"),                              # the launcher's "no" is also its default: the preset fills it in
    (None, [], "auto"),
])
def test_the_precision_accelerate_launch_chose_wins_over_the_shipped_datasets_preset(monkeypatch, launcher, argv,
                                                                                     expected):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    if launcher:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    assert ts.PRESETS[hvp_run.DEFAULT_DATASET]["mixed_precision"] == "auto"
    cfg, notes = hvp_run.parse_config(ts.Config, argv, presets=ts.PRESETS)
    assert cfg.mixed_precision == expected
    assert ("mixed_precision=auto" in notes[0]) == (expected == "auto")


def test_a_run_on_the_shipped_dataset_trains_in_the_launchers_bf16(tmp_path):
    out = tmp_path / "out"
    args = ["train_simsiam.py", "--output_dir", out, *TINY_TRAIN[:-2], "--eval_split", "", "--max_steps", 1]
    assert "--mixed_precision" not in args and "--dataset" not in args
    result = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=script_env(ACCELERATE_MIXED_PRECISION="bf16"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| precision bf16 |" in result.stdout
    info = json.loads((out / "config.json").read_text())
    assert info["config"]["dataset"] == str(SHIPPED.resolve())
    assert info["config"]["mixed_precision"] == "bf16" and info["run"]["precision"] == "bf16"


# ----------------------------------------------------------------------------------- nothing left behind

@pytest.fixture
def undecodable_folder(tmp_path):
    """An image folder of two classes whose 16 files are not images."""
    for name in ("a", "b"):
        (tmp_path / "bad" / name).mkdir(parents=True)
        for i in range(8):
            (tmp_path / "bad" / name / f"{i}.png").write_bytes(b"not an image")
    return tmp_path / "bad"


@pytest.mark.parametrize("workers", [0, 2])
def test_a_new_run_that_fails_before_its_first_step_leaves_no_folder(undecodable_folder, tmp_path, workers):
    out = tmp_path / "runs" / "new"  # neither folder exists
    result = run_script(simsiam(out, undecodable_folder, "--max_steps", 2, "--num_workers", workers), check=False)
    assert last_error_line(result).startswith(
        f"error: none of the images of a whole batch of '{undecodable_folder}' can be decoded")
    assert "| 2 steps |" in result.stdout, "the run had started: its banner, config.json and metrics.jsonl were out"
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("case", ["undecodable", "no_global_batch"])
def test_a_new_run_in_an_existing_folder_that_fails_before_its_first_step_leaves_only_what_was_there(
        undecodable_folder, tiny_dataset, tmp_path, case):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    dataset, extra, message = {
        "undecodable": (undecodable_folder, [], "error: none of the images of a whole batch"),
        "no_global_batch": (tiny_dataset, ["--batch_size", 128], "error: split 'train' has 96 images, fewer than one"),
    }[case]
    result = run_script(simsiam(out, dataset, "--max_steps", 2, *extra), check=False)
    assert last_error_line(result).startswith(message)
    assert listing(out) == ["notes.txt"], "no .lock, config.json, metrics.jsonl or logs"


def test_a_resumed_run_that_fails_before_its_first_step_keeps_its_folder(undecodable_folder, tiny_dataset, tmp_path):
    out = tmp_path / "out"
    run_script(simsiam(out, tiny_dataset, "--max_steps", 2))
    before, metrics = listing(out), (out / "metrics.jsonl").read_text()
    result = run_script(simsiam(out, undecodable_folder, "--max_steps", 4, "--resume"), check=False)
    assert last_error_line(result).startswith("error: none of the images of a whole batch")
    assert listing(out) == before and (out / "metrics.jsonl").read_text() == metrics
    assert hvp_run.load_checkpoint(hvp_run.latest_checkpoint(out))["step"] == 2


# ----------------------------------------------------------------------------------- resuming

def test_resuming_with_another_methods_script_names_the_method_and_its_script(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    run_script(simsiam(out, tiny_dataset, "--max_steps", 1))
    result = run_script(["train_simclr.py", "--dataset", tiny_dataset, "--output_dir", out, *TINY_SIMCLR,
                         "--eval_split", "", "--max_steps", 2, "--resume"], check=False)
    assert last_error_line(result) == "error: --resume: checkpoint-00000001 holds a SimSiam run; resume it with train_simsiam.py"
    state = json.loads((out / "checkpoint-00000001" / "state.json").read_text())
    assert (state["method"], state["script"]) == ("SimSiam", "train_simsiam.py")


def test_resume_takes_a_checkpoint_path_and_continues_in_its_folder(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    run_script(simsiam(out, tiny_dataset, "--max_steps", 2, "--save_every", 1))
    without_output_dir = simsiam(out, tiny_dataset, "--max_steps", 3)
    del without_output_dir[3:5]
    assert "--output_dir" not in without_output_dir
    older = run_script(without_output_dir + ["--resume", out / "checkpoint-00000001"], check=False)
    assert last_error_line(older) == (
        f"error: --resume: checkpoint-00000001 is not the newest checkpoint in {out} (checkpoint-00000002 is): "
        "resume the newest, or continue from checkpoint-00000001 in another folder with --output_dir")
    resumed = run_script(without_output_dir + ["--resume", out / "checkpoint-00000002"])
    assert "resumed at step 2" in resumed.stdout
    assert hvp_run.load_checkpoint(hvp_run.latest_checkpoint(out))["step"] == 3


def test_resume_takes_another_runs_folder_and_continues_it_in_a_new_output_dir(tiny_dataset, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    run_script(simsiam(first, tiny_dataset, "--max_steps", 2))
    before = listing(first)
    result = run_script(simsiam(second, tiny_dataset, "--max_steps", 3, "--resume", first))
    assert "resumed at step 2" in result.stdout and f"continuing from {first / 'checkpoint-00000002'}" in result.stdout
    assert hvp_run.load_checkpoint(hvp_run.latest_checkpoint(second))["step"] == 3
    assert listing(first) == before, "the run resumed from is read, not written"
    again = run_script(simsiam(second, tiny_dataset, "--max_steps", 4, "--resume", first), check=False)
    assert last_error_line(again).endswith(f"--output_dir {second} already holds a run: continue from {first} in a new folder")


def test_resume_of_a_path_that_holds_no_checkpoint_is_a_one_line_error(tiny_dataset, tmp_path):
    result = run_script(simsiam(tmp_path / "out", tiny_dataset, "--resume", tmp_path / "nothing"), check=False)
    assert last_error_line(result) == (f"error: --resume takes no value, 'auto', or a checkpoint or run folder; "
                                       f"'{tmp_path / 'nothing'}' is neither a checkpoint-N folder nor a folder holding one")
    assert not (tmp_path / "out").exists()


def test_resuming_mid_epoch_with_other_loader_workers_says_what_happens_to_that_epoch(tmp_path):
    """96 numbered rows, 12 steps of 8 per epoch; stopped after 5 steps with 2 loader workers, resumed
    with 1: the note says the rest of the epoch comes from the new plan, and so it does."""
    data = uneven_parquet(tmp_path / "rows", sizes=(40, 56), row_group_size=8)
    out = tmp_path / "out"
    probe, labels = ["tests/rank_params_probe.py"], tmp_path / "out-probe" / "labels-rank0.json"
    run_script(probe + simsiam(out, data, "--epochs", 1, "--max_steps", 5, "--num_workers", 2, "--num_views", 2))
    trained = sum(json.loads(labels.read_text()), [])
    resumed = run_script(probe + simsiam(out, data, "--epochs", 1, "--num_workers", 1, "--num_views", 2, "--resume"))
    trained += sum(json.loads(labels.read_text()), [])
    assert ("note: resuming mid-epoch 0 (step 5 of 12) with another data layout (loader workers 2 -> 1): its last 7 "
            "steps take their rows from the new layout's plan, so in epoch 0 some rows are trained twice and some not "
            "at all; every later epoch trains every example once") in resumed.stdout
    assert len(trained) == 96 and len(set(trained)) < 96, "what the note says"


# ----------------------------------------------------------------------------------- signals

@pytest.mark.heavy
@pytest.mark.heavy
def test_sigterm_to_a_process_other_than_the_main_one_names_the_signal_when_it_saves(tiny_dataset, tmp_path):
    import psutil
    out = tmp_path / "run"
    proc = subprocess.Popen(two_process_command(simsiam(out, tiny_dataset, "--max_steps", 200, "--save_every", 1000)),
                            cwd=REPO, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline, rank1 = time.time() + 240, None
        while time.time() < deadline and proc.poll() is None and rank1 is None:
            time.sleep(0.2)
            if (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count('"loss"') >= 2:
                rank1 = next((p for p in psutil.Process(proc.pid).children(recursive=True)
                              if "rank_params_probe.py" in " ".join(p.cmdline()) and p.environ().get("RANK") == "1"),
                             None)
        assert rank1 is not None, "the run must be mid-way when the signal comes"
        os.kill(rank1.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-3000:]
    stopped_at = hvp_run.load_checkpoint(hvp_run.latest_checkpoint(out))["step"]
    assert stopped_at < 200
    assert f"SIGTERM: saved {out / f'checkpoint-{stopped_at:08d}'}; continue with the same command and --resume" in stdout
    assert "None: saved" not in stdout


def test_a_script_that_ends_normally_exits_at_once_as_python_would(tmp_path):
    """run_main ends the program's own main() with exit_now: status 0, buffered output flushed, the
    non-daemon threads joined and the atexit functions run first. main() of another module (a script's
    main called in-process, as the GPU check and the tests do) returns to its caller."""
    script = tmp_path / "ends.py"
    script.write_text(f"""import atexit, sys, threading, time
sys.path.insert(0, {str(REPO)!r})
import hvp_run
from pathlib import Path
out = Path({str(tmp_path)!r})

def late():
    time.sleep(0.3)
    (out / "thread.txt").write_text("joined")

def main():
    atexit.register(lambda: (out / "atexit.txt").write_text("ran"))
    threading.Thread(target=late).start()
    sys.stdout.write("no newline, still buffered")

hvp_run.run_main(main)
(out / "after.txt").write_text("main returned to the module: no fast exit")
""")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                            env={k: v for k, v in script_env().items() if k != "PYTHONUNBUFFERED"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == "no newline, still buffered"
    assert (tmp_path / "thread.txt").read_text() == "joined" and (tmp_path / "atexit.txt").read_text() == "ran"
    assert not (tmp_path / "after.txt").exists()
    returned = []
    hvp_run.run_main(lambda: returned.append(True))  # this module's function: pytest goes on
    assert returned == [True]
