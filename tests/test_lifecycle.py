"""The run lifecycle the four scripts share (hvp_run.Run): one teacher on every process, every example once
per epoch, resume across nodes, preemption, one run per folder, checks before the model is built.
Real subprocesses and the real CLI; SimSiam stands in for all scripts where the lifecycle is the point."""
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import hvp_run
import hvp_utils as hvp
from conftest import (REPO, TINY_TRAIN, assert_same_tensors, probe_records, run_script, run_two_processes,
                      script_env, two_process_command)
from test_data import uneven_parquet
from test_train_dino import TINY_DINO
from test_train_ibot import TINY_IBOT


def simsiam(output_dir, dataset, *extra):
    return ["train_simsiam.py", "--dataset", dataset, "--output_dir", output_dir, *TINY_TRAIN, "--eval_split", "",
            *map(str, extra)]


def steps_logged(output_dir):
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if "loss" in r]


def final_model(output_dir):
    return hvp_run.load_checkpoint(hvp_run.latest_checkpoint(output_dir))["model"]


def wait_for(predicate, proc, seconds=240):
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.05)
    return False


# ----------------------------------------------------------------------------------- several processes

@pytest.mark.heavy
@pytest.mark.parametrize("script,flags", [("train_dino.py", TINY_DINO), ("train_ibot.py", TINY_IBOT)])
def test_two_processes_start_with_one_teacher_and_keep_it(tiny_dataset, tmp_path, script, flags):
    out = tmp_path / "run"
    run_two_processes([script, "--dataset", tiny_dataset, "--output_dir", out, *flags, "--max_steps", 3,
                       "--batch_size", 4, "--num_workers", 2, "--eval_split", ""])
    start, end = probe_records(out, "start")[0], probe_records(out, "end")[0]
    for states in (start, end):  # students, teachers and centres: the same on both processes
        assert any(k.startswith("teacher.") for k in states[0])
        assert_same_tensors(states[0], states[1])
    moved = [k for k in start[0] if k.startswith("teacher.") and not torch.equal(start[0][k], end[0][k])]
    assert moved, "the teacher follows the student (EMA)"


@pytest.mark.heavy
def test_two_processes_train_on_every_row_of_uneven_shards_once_per_epoch(tmp_path):
    """Parquet shards of 30, 90 and 181 rows (labels number the rows), 2 processes of 2 loader workers
    each, batch 8: 18 steps per epoch, each process trains 144 rows of its own, none twice, none on
    both. (Without loader workers the same plan is read in one process: tests/test_data.py.)"""
    data = uneven_parquet(tmp_path / "uneven", sizes=(30, 90, 181), row_group_size=16)
    out = tmp_path / "run"
    run_two_processes(simsiam(out, data, "--epochs", 1, "--num_views", 2, "--image_size", 16, "--num_workers", 2))
    states, labels = probe_records(out)
    trained = {rank: sum(labels[rank], []) for rank in (0, 1)}
    assert len(trained[0]) == len(trained[1]) == 18 * 8
    assert len(set(trained[0])) == len(trained[0]) and len(set(trained[1])) == len(trained[1])
    assert not set(trained[0]) & set(trained[1])
    assert_same_tensors(states[0], states[1], buffers=False)


@pytest.mark.heavy
def test_sigterm_to_the_process_group_saves_and_resuming_on_per_rank_folders_equals_an_uninterrupted_run(
        tiny_dataset, tmp_path):
    """SIGTERM as SLURM or Ctrl-C deliver it (to the whole process group, loader workers included)
    during a 2-process run: it saves after the step; resuming it where each process has its own
    output folder (nodes without a shared file system: only rank 0's holds the checkpoint) neither
    hangs nor starts a process afresh, and ends with the parameters of an uninterrupted run. (SIGTERM to
    the main process alone: tests/test_train_dino.py, which also checks the teacher and centre.)"""
    extra = ("--max_steps", 12, "--num_workers", 2, "--save_every", 100)
    run_two_processes(simsiam(tmp_path / "full", tiny_dataset, *extra))

    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen(two_process_command(simsiam(interrupted, tiny_dataset, *extra)), cwd=REPO,
                            env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    arrived = wait_for(lambda: (interrupted / "metrics.jsonl").exists() and len(steps_logged(interrupted)) >= 3, proc)
    assert arrived, "the run must be mid-way when the signal comes for this test to mean anything"
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=240)
    assert "SIGTERM: saved" in stdout, stderr[-3000:]
    assert "DataLoader worker" not in stderr, "the loader workers outlived the signal"
    stopped_at = hvp_run.load_checkpoint(hvp_run.latest_checkpoint(interrupted))["step"]
    assert 3 <= stopped_at < 12

    resumed = run_two_processes(simsiam(interrupted, tiny_dataset, *extra, "--resume"), timeout=300,
                                HVP_PROBE_PER_RANK_DIR="1")
    assert f"resumed at step {stopped_at}" in resumed.stdout
    assert_same_tensors(final_model(tmp_path / "full"), final_model(interrupted))
    states, _ = probe_records(interrupted)
    assert_same_tensors(states[0], states[1], buffers=False)
    assert not (tmp_path / "interrupted-rank1").exists(), "only the main process writes"
    assert steps_logged(interrupted) == list(range(1, 13))


# ----------------------------------------------------------------------------------- one run per folder

def test_a_folder_in_use_is_a_one_line_error_and_the_lock_of_a_dead_run_is_free(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    held = hvp_run.RunLock(out)  # another run holds the folder
    result = run_script(simsiam(out, tiny_dataset, "--max_steps", 1), check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {out} is in use by another run (pid {os.getpid()}")
    assert not (out / "metrics.jsonl").exists()
    held.release()
    (out / ".lock").write_text("pid 999999 on another-host, started long ago")  # left by a killed run
    run_script(simsiam(out, tiny_dataset, "--max_steps", 1))


@pytest.mark.heavy
def test_after_a_kill_resume_logs_each_step_once_and_falls_back_from_a_damaged_checkpoint(tiny_dataset, tmp_path):
    extra = ("--max_steps", 10, "--save_every", 2, "--num_workers", 2)
    run_script(simsiam(tmp_path / "full", tiny_dataset, *extra))

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, *map(str, simsiam(killed, tiny_dataset, *extra))], cwd=REPO,
                            env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    arrived = wait_for(lambda: (killed / "checkpoint-00000004").is_dir() and len(steps_logged(killed)) >= 5, proc)
    proc.kill()  # SIGKILL: no chance to save
    proc.communicate(timeout=60)
    assert arrived
    latest = hvp_run.latest_checkpoint(killed)
    tensors = latest / "state.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-64:] = bytes(64)  # damaged in place, same size
    tensors.write_bytes(bytes(data))
    (killed / "backbone.tmp-4242").mkdir()  # what an export interrupted by the kill leaves
    (killed / "backbone.tmp-4242" / "model.safetensors").write_bytes(b"partial")

    resumed = run_script(simsiam(killed, tiny_dataset, *extra, "--resume"))
    assert f"warning: {latest.name} is damaged (state.safetensors does not match its checksum)" in resumed.stdout
    assert "resuming from the previous good checkpoint" in resumed.stdout
    assert not (killed / "backbone.tmp-4242").exists()
    assert steps_logged(killed) == list(range(1, 11)), "every step once, none replayed twice"
    assert_same_tensors(final_model(tmp_path / "full"), final_model(killed))


def test_auto_resume_starts_a_new_run_or_continues_one(tiny_dataset, tmp_path):
    out = tmp_path / "auto"
    first = run_script(simsiam(out, tiny_dataset, "--max_steps", 2, "--resume", "auto"))
    assert "resumed" not in first.stdout
    second = run_script(simsiam(out, tiny_dataset, "--max_steps", 3, "--resume", "auto"))
    assert "resumed at step 2" in second.stdout
    again = run_script(simsiam(out, tiny_dataset, "--max_steps", 3), check=False)  # neither --resume nor auto
    assert again.returncode == 2 and "pass --resume" in again.stderr, "an existing run is never overwritten"


# ----------------------------------------------------------------------------------- checked before the model

@pytest.mark.parametrize("case", ["resume_nothing", "eval_split", "output_under_a_file", "recipe"])
def test_problems_found_before_the_model_is_built_are_one_line_errors_and_write_nothing(tiny_dataset, tmp_path, case):
    out = tmp_path / "out"
    extra, message = {
        "resume_nothing": (["--resume"], f"error: --resume: {out} does not exist, there is no run to continue"),
        "eval_split": (["--eval_split", "validation"], f"error: dataset '{tiny_dataset}' has no split 'validation'"),
        "output_under_a_file": ([], "error: cannot create --output_dir"),
        "recipe": (["--recipe", "no_such_recipe"], "error: unknown --recipe 'no_such_recipe' (recipes: "),
    }[case]
    if case == "output_under_a_file":
        (tmp_path / "a_file").write_text("")
        out = tmp_path / "a_file" / "out"
    args = simsiam(out, tiny_dataset, "--max_steps", 1)
    if case == "eval_split":
        args.remove("--eval_split")
        args.remove("")
    result = run_script(args + extra, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_resuming_with_another_architecture_names_the_mismatch(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    run_script(simsiam(out, tiny_dataset, "--max_steps", 1))
    result = run_script(simsiam(out, tiny_dataset, "--max_steps", 2, "--resume", "--arch", "resnet18"), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --resume: {hvp_run.latest_checkpoint(out)} holds a model with --arch test_resnet; this command asks "
        "for --arch resnet18")


def test_an_output_folder_without_room_for_a_checkpoint_stops_at_start(tiny_dataset, tmp_path, monkeypatch):
    import train_simsiam as ts
    args = simsiam(tmp_path / "out", tiny_dataset, "--arch", "resnet18")  # its checkpoint needs more than 5 MiB
    cfg, notes = hvp_run.parse_config(ts.Config, [str(a) for a in args[1:]])
    run = hvp_run.Run(cfg, "SimSiam", ts.MODEL_FIELDS, notes)
    model = ts.SimSiam(hvp_run.create_backbone("resnet18", 28, True), 64, 16)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 5 * 2**20, 5 * 2**20))
    with pytest.raises(hvp_run.HVPError, match=r"has 0\.00 GiB free; a checkpoint needs about 0\.\d\d GiB"):
        run.start({"model": model}, ts.hvp.MultiViewTransform({"views": [ts.simsiam_aug(cfg)] * 2}),
                  export=model.backbone)
    run.lock.release()


# ----------------------------------------------------------------------------------- the Run API

def test_every_config_field_the_run_reads_is_declared_in_run_config():
    source = (REPO / "hvp_run" / "lifecycle.py").read_text()
    read = set(re.findall(r"\bcfg\.(\w+)", source))
    declared = {f.name for f in dataclasses.fields(hvp_run.RunConfig)}
    assert "getattr(cfg" not in source and len(read) > 20
    assert read <= declared, f"read but not declared in RunConfig: {sorted(read - declared)}"


def test_global_batch_sets_the_runs_grad_accum_and_leaves_the_callers_config_as_given(tiny_dataset, tmp_path):
    import train_simsiam as ts
    args = simsiam(tmp_path / "out", tiny_dataset, "--global_batch", 16, "--batch_size", 8)
    cfg, notes = hvp_run.parse_config(ts.Config, [str(a) for a in args[1:]])
    run = hvp_run.Run(cfg, "SimSiam", ts.MODEL_FIELDS, notes)
    assert (run.grad_accum, run.global_batch, run.steps_per_epoch) == (2, 16, 96 // 16)
    assert cfg.grad_accum == 1, "the caller's config is not changed"
    assert run.resolved_config().grad_accum == 2


def test_config_json_records_the_grad_accum_a_global_batch_gives(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    result = run_script(simsiam(out, tiny_dataset, "--global_batch", 16, "--batch_size", 8, "--max_steps", 1))
    assert "global batch 16 (8 x 1 x 2 accumulated)" in result.stdout
    info = json.loads((out / "config.json").read_text())
    assert info["config"]["grad_accum"] == 2 and info["run"]["grad_accum"] == 2
    assert info["run"]["global_batch"] == 16 and info["run"]["steps_per_epoch"] == 6


def test_a_run_trains_from_a_loader_of_the_users_own(tiny_dataset, tmp_path):
    """run.start(..., loader=f) instead of a transform: f(epoch) gives the batches (here made by hand
    from 8 random images); the run takes as many as its steps need, logs, checkpoints and exports."""
    import numpy as np
    from PIL import Image
    import train_simsiam as ts
    out = tmp_path / "out"
    cfg, notes = hvp_run.parse_config(ts.Config, [str(a) for a in simsiam(out, tiny_dataset, "--max_steps", 3,
                                                                          "--num_views", 2)[1:]])
    run = hvp_run.Run(cfg, "SimSiam", ts.MODEL_FIELDS, notes)
    model = ts.SimSiam(hvp_run.create_backbone("test_resnet", 28, True), 64, 16)
    model, optimizer = run.prepare(model, torch.optim.SGD(model.parameters(), lr=0.05))
    unwrapped = run.accelerator.unwrap_model(model)
    transform = ts.hvp.MultiViewTransform({"views": [ts.simsiam_aug(cfg)] * 2})
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)) for _ in range(8)]
    served = []

    def my_loader(epoch):
        for i in range(run.steps_per_epoch):
            served.append((epoch, i))
            yield ts.hvp.collate_views([transform(image, torch.Generator().manual_seed(i)) for image in images])

    before = {k: v.clone() for k, v in unwrapped.state_dict().items()}
    run.start({"model": unwrapped, "optimizer": optimizer}, export=unwrapped.backbone, loader=my_loader)
    for step in run.steps():
        record, _ = ts.train_step(model, optimizer, step.micro_batches, cfg, run.accelerator, step.index, step.epoch,
                                  step.log_now)
        run.log(step, record)
    run.finish()
    assert served == [(0, 0), (0, 1), (0, 2)]
    assert steps_logged(out) == [1, 2, 3]
    assert any(not torch.equal(before[k], v) for k, v in unwrapped.state_dict().items()), "the model trained"
    assert hvp_run.load_checkpoint(hvp_run.latest_checkpoint(out))["step"] == 3 and (out / "backbone").is_dir()


@pytest.mark.parametrize("requested,omp,on_cpu,cores,per_node,workers,expected", [
    (0, None, True, 2, 1, 1, (2, 1)),     # 2 cores, one loader worker: 2 threads, 1 in the selection forward
    (0, None, True, 16, 2, 3, (8, 5)),    # 16 cores shared by 2 processes, 3 workers each
    (0, None, True, 2, 1, 4, (2, 1)),     # more workers than cores: still one thread for the selection
    (0, None, True, 2, 1, 0, (2, None)),  # no workers: every thread throughout
    (0, "4", True, 16, 1, 1, (None, None)),   # OMP_NUM_THREADS set: torch's own count (it reads the variable)
    (0, None, False, 16, 1, 1, (None, None)),  # CUDA: torch's own count
    (3, "4", True, 2, 1, 1, (3, None)),   # --threads wins over everything, throughout
])
def test_torch_threads_are_the_processes_share_of_its_cores_and_fewer_beside_its_loader_workers(
        requested, omp, on_cpu, cores, per_node, workers, expected):
    assert hvp_run.torch_threads(requested, omp, on_cpu, cores, per_node, workers) == expected


def test_threads_sets_the_count_inside_the_block_and_restores_it():
    before = torch.get_num_threads()
    inside = 2 if before != 2 else 1
    with hvp.threads(inside):
        assert torch.get_num_threads() == inside
    assert torch.get_num_threads() == before
    with hvp.threads(None):
        assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), hvp.threads(inside):
        raise RuntimeError("the count comes back after an error too")
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("workers,expected", [(1, (2, 1, 19)), (0, (2, None, 0))])
def test_a_cpu_run_beside_loader_workers_selects_on_fewer_threads_and_lowers_the_workers_priority(
        tiny_dataset, tmp_path, monkeypatch, workers, expected):
    """On 2 cores (no OMP_NUM_THREADS, no --threads), the run trains on 2 threads; with a loader
    worker the selection forward gets 1 (the worker works on the other core meanwhile) and the
    worker runs at niceness +19, so that it takes only what the training process leaves."""
    import train_simsiam as ts
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    args = simsiam(tmp_path / "out", tiny_dataset, "--num_workers", workers, "--threads", 0)
    cfg, notes = hvp_run.parse_config(ts.Config, [str(a) for a in args[1:]])
    run = hvp_run.Run(cfg, "SimSiam", ts.MODEL_FIELDS, notes)
    assert (run.threads, run.select_threads, run.worker_nice) == expected
    assert {k: run._derived()[k] for k in ("threads", "select_threads", "worker_nice")} == dict(
        zip(("threads", "select_threads", "worker_nice"), expected))
