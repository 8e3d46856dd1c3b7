"""Faults around the run's files: a disk that fills while saving, the room a run needs, a file system
without flock, checkpoints and exports damaged on disk. Each is one line or one warning, and leaves
the files of earlier checkpoints and of other runs as they were."""
import errno
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

import hvp_run
from conftest import run_script, TINY_TRAIN

DATA = {"input_size": (3, 32, 32), "interpolation": "bicubic", "crop_pct": 0.875, "mean": (0.5,) * 3, "std": (0.5,) * 3}


def simsiam_args(output_dir, dataset, *extra):
    return ["train_simsiam.py", "--dataset", dataset, "--output_dir", output_dir, *TINY_TRAIN, "--eval_split", "",
            *map(str, extra)]


def simsiam_run(output_dir, dataset, *extra):
    """A SimSiam Run built in this process, with its model and SGD optimizer (momentum: state per parameter)."""
    import train_simsiam as ts
    argv = simsiam_args(output_dir, dataset, "--arch", "resnet18", "--small_stem", *extra)[1:]  # the model below
    cfg, notes = hvp_run.parse_config(ts.Config, [str(a) for a in argv])
    run = hvp_run.Run(cfg, "SimSiam", ts.MODEL_FIELDS, notes)
    model = ts.SimSiam(hvp_run.create_backbone("resnet18", 28, True), 64, 16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    transform = ts.hvp.MultiViewTransform({"views": [ts.simsiam_aug(cfg)] * 2})
    return run, model, optimizer, transform


def folder_bytes(folder):
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def no_room(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def no_room_in_safetensors(*args, **kwargs):
    from safetensors import SafetensorError  # what safetensors raises: its own type, the OS error in the text
    raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28) at path "x"')


# ----------------------------------------------------------------------------------- a disk that fills

@pytest.mark.parametrize("failure", [no_room, no_room_in_safetensors])
def test_a_full_disk_while_saving_is_one_line_naming_the_folder_and_the_room_needed(tmp_path, monkeypatch, failure):
    import safetensors.torch
    hvp_run.save_checkpoint(tmp_path, 1, {"step": 1, "w": torch.ones(1000)})
    monkeypatch.setattr(safetensors.torch, "save_file", failure)
    with pytest.raises(hvp_run.HVPError) as error:
        hvp_run.save_checkpoint(tmp_path, 2, {"step": 2, "w": torch.zeros(2**18)})
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"the disk of {tmp_path} is full: checkpoint-00000002 needs about 0.00 GiB, ")
    assert "GiB are free; the earlier checkpoints are intact: make room, then continue with --resume" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000001"], "no temporary folder stays"
    assert hvp_run.checkpoint_problem(tmp_path / "checkpoint-00000001") is None
    assert torch.equal(hvp_run.load_checkpoint(tmp_path / "checkpoint-00000001")["w"], torch.ones(1000))


def test_other_write_errors_while_saving_stay_what_they_are_and_leave_no_temporary_folder(tmp_path, monkeypatch):
    import safetensors.torch

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(safetensors.torch, "save_file", read_only)
    with pytest.raises(PermissionError):
        hvp_run.save_checkpoint(tmp_path, 1, {"w": torch.ones(3)})
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_at_a_runs_save_stops_the_run_with_that_line(tiny_dataset, tmp_path, monkeypatch):
    import safetensors.torch
    out = tmp_path / "out"
    run, model, optimizer, transform = simsiam_run(out, tiny_dataset, "--max_steps", 2)
    run.start({"model": model, "optimizer": optimizer}, transform, export=model.backbone)
    try:
        monkeypatch.setattr(safetensors.torch, "save_file", no_room)
        with pytest.raises(hvp_run.HVPError, match=f"^the disk of {out} is full: checkpoint-00000000 needs about "
                                                   r"0\.\d\d GiB"):
            run.save()
        assert not [p.name for p in out.iterdir() if "tmp" in p.name or p.name.startswith("checkpoint")]
    finally:
        run.lock.release()


# ----------------------------------------------------------------------------------- room for the checkpoints

@pytest.mark.parametrize("make_optimizer", [lambda params: torch.optim.AdamW(params, lr=1e-3),
                                            lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9)],
                         ids=["adamw", "sgd_momentum"])
def test_the_room_estimate_made_before_the_first_step_matches_a_written_checkpoint(tmp_path, make_optimizer):
    """Optimizers create their state at the first step, after the start-up check: it is counted anyway."""
    backbone = hvp_run.create_backbone("test_resnet", 32)
    model = torch.nn.Sequential(backbone, torch.nn.Linear(backbone.num_features, 64))
    optimizer = make_optimizer(model.parameters())
    estimate = hvp_run.checkpoints.checkpoint_bytes({"model": model, "optimizer": optimizer, "step": 0}, backbone)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    path = hvp_run.save_checkpoint(tmp_path, 1, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                                 "step": 1}, backbone, DATA, "hvp_test")
    written = folder_bytes(path)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert written > 2.9 * weights, "the model, the optimizer's state (one or two tensors a weight) and the export"
    assert abs(estimate - written) <= 0.1 * written, (estimate, written)


@pytest.mark.parametrize("checkpoints_of_room", [2.6, 3.3])
def test_the_start_up_check_wants_room_for_one_checkpoint_more_than_are_kept(tiny_dataset, tmp_path, monkeypatch,
                                                                            checkpoints_of_room):
    """--keep_checkpoints 2: a save writes the third before removing the first."""
    out = tmp_path / "out"
    run, model, optimizer, transform = simsiam_run(out, tiny_dataset, "--keep_checkpoints", 2)
    state = {"model": model, "optimizer": optimizer}
    free = int(checkpoints_of_room * hvp_run.checkpoints.checkpoint_bytes(state, model.backbone))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**13, 10**13 - free, free))
    try:
        if checkpoints_of_room < 3:
            with pytest.raises(hvp_run.HVPError, match=r"GiB free; a checkpoint needs about 0\.\d\d GiB and this run "
                                                       r"needs room for 3 more \(--keep_checkpoints 2"):
                run.start(state, transform, export=model.backbone)
        else:
            run.start(state, transform, export=model.backbone)
    finally:
        run.lock.release()


# ----------------------------------------------------------------------------------- a file system without flock

@pytest.fixture
def no_flock(monkeypatch, tmp_path):
    """flock fails in tmp_path as it does on some network file systems (elsewhere, such as in the
    datasets cache, it works)."""
    import fcntl
    flock = fcntl.flock

    def unsupported_in_tmp_path(fd, operation):
        fd = fd if isinstance(fd, int) else fd.fileno()
        if Path(os.readlink(f"/proc/self/fd/{fd}")).is_relative_to(tmp_path):
            raise OSError(errno.ENOLCK, "No locks available")
        return flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", unsupported_in_tmp_path)


def test_without_flock_a_lock_file_holds_the_folder_until_the_run_ends(tmp_path, no_flock, capsys):
    first = hvp_run.RunLock(tmp_path)
    lock_file = tmp_path / ".lock-noflock"
    note = capsys.readouterr().out.strip()
    assert note == (f"note: the file system of {tmp_path} has no flock (No locks available): this run holds "
                    f"{lock_file} instead, removed when it ends")
    holder = lock_file.read_text()
    assert holder.startswith(f"pid {os.getpid()} on {socket.gethostname()}, started ")
    with pytest.raises(hvp_run.HVPError) as error:
        hvp_run.RunLock(tmp_path)
    assert str(error.value) == (f"{tmp_path} is in use by another run ({holder}; this file system has no flock, so "
                                f"{lock_file} is the lock): wait for it to end, or choose another --output_dir; if "
                                f"that run has ended, delete {lock_file}")
    first.release()
    assert not lock_file.exists()
    hvp_run.RunLock(tmp_path).release()


def test_without_flock_a_run_on_another_host_is_refused_and_its_temporary_checkpoint_kept(tiny_dataset, tmp_path,
                                                                                          no_flock):
    """Its process cannot be seen from this host: alive or not, the folder stays its own."""
    out = tmp_path / "out"
    writing = out / ".tmp-checkpoint-00000004-4242"  # the other run's save in progress
    writing.mkdir(parents=True)
    (writing / "state.safetensors").write_bytes(b"half")
    (out / ".lock-noflock").write_text("pid 4242 on another-host, started 2026-01-01 00:00:00")
    with pytest.raises(hvp_run.HVPError, match=r"in use by another run \(pid 4242 on another-host, .*; if that run "
                                               f"has ended, delete {out / '.lock-noflock'}$"):
        simsiam_run(out, tiny_dataset, "--resume", "auto")
    assert (writing / "state.safetensors").read_bytes() == b"half"


def test_without_flock_the_lock_file_of_a_run_that_died_on_this_host_is_taken_over(tmp_path, no_flock):
    lock_file = tmp_path / ".lock-noflock"
    lock_file.write_text(f"pid 999999 on {socket.gethostname()}, started 2026-01-01 00:00:00")
    lock = hvp_run.RunLock(tmp_path)
    assert lock_file.read_text().startswith(f"pid {os.getpid()} on ")
    lock.release()


# ----------------------------------------------------------------------------------- damaged files

def test_a_checkpoint_without_its_manifest_is_incomplete(tmp_path):
    path = hvp_run.save_checkpoint(tmp_path, 3, {"w": torch.ones(4)})
    (path / "manifest.json").unlink()
    assert hvp_run.checkpoint_problem(path) == "manifest.json is missing, so its files cannot be checked"


def test_resume_passes_over_a_damaged_checkpoint_whose_manifest_is_missing(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    run_script(simsiam_args(out, tiny_dataset, "--max_steps", 2, "--save_every", 1))
    latest = out / "checkpoint-00000002"
    (latest / "manifest.json").unlink()
    tensors = latest / "state.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-64] + bytes(64))
    resumed = run_script(simsiam_args(out, tiny_dataset, "--max_steps", 3, "--save_every", 1, "--resume"))
    assert "warning: checkpoint-00000002 is damaged (manifest.json is missing" in resumed.stdout
    assert "resuming from the previous good checkpoint, checkpoint-00000001" in resumed.stdout
    assert "resumed at step 1" in resumed.stdout


def run_folder_with_export(folder):
    """What a run leaves: a checkpoint with its export, and <folder>/backbone linked to that export."""
    backbone = hvp_run.create_backbone("test_resnet", 32).eval()
    path = hvp_run.save_checkpoint(folder, 5, {"step": 5}, backbone, DATA, "hvp_test")
    hvp_run.hub._link_tree(path / "backbone", folder / "backbone")
    return path


def damage(file):
    data = bytearray(file.read_bytes())
    data[-16:] = bytes(16)  # the same size, other values
    file.write_bytes(bytes(data))


def test_an_intact_run_export_loads_without_a_word(tmp_path, capsys):
    run_folder_with_export(tmp_path)
    hvp_run.load_backbone(tmp_path)
    hvp_run.load_backbone(tmp_path / "checkpoint-00000005")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("source", ["run_folder", "checkpoint"])
def test_a_damaged_export_is_a_one_line_error_naming_the_file(tmp_path, source):
    checkpoint = run_folder_with_export(tmp_path)
    damage(tmp_path / "backbone" / "model.safetensors")  # a hard link: the checkpoint's export too
    folder = {"run_folder": tmp_path / "backbone", "checkpoint": checkpoint / "backbone"}[source]
    with pytest.raises(hvp_run.HVPError) as error:
        hvp_run.load_backbone(folder.parent)
    assert str(error.value) == (f"the backbone export {folder} is damaged: model.safetensors does not match its "
                                f"checksum (checked against {checkpoint / 'manifest.json'})")


def test_a_run_export_copied_and_then_damaged_is_found_too(tmp_path):
    checkpoint = run_folder_with_export(tmp_path)
    shutil.rmtree(tmp_path / "backbone")
    shutil.copytree(checkpoint / "backbone", tmp_path / "backbone")  # where hard links are not possible
    config = json.loads((tmp_path / "backbone" / "config.json").read_text())
    (tmp_path / "backbone" / "config.json").write_text(json.dumps(dict(config, num_features=1)))
    with pytest.raises(hvp_run.HVPError, match=r"is damaged: config\.json has \d+ bytes, not \d+ \(checked"):
        hvp_run.load_backbone(tmp_path)
    hvp_run.load_backbone(checkpoint)  # the checkpoint's own export is intact


def test_an_export_without_checkpoints_beside_it_loads_as_it_is(tmp_path, capsys):
    backbone = hvp_run.create_backbone("test_resnet", 32).eval()
    hvp_run.export_backbone(backbone, tmp_path / "backbone", DATA, "hvp_test")  # by hand, or copied out of its run
    loaded, _ = hvp_run.load_backbone(tmp_path / "backbone")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(backbone(x), loaded.eval()(x))
    assert capsys.readouterr().err == ""  # nothing to check it against, nothing to warn about


def test_an_export_beside_checkpoints_that_do_not_list_it_loads_with_a_one_line_warning(tmp_path, capsys):
    backbone = hvp_run.create_backbone("test_resnet", 32).eval()
    hvp_run.save_checkpoint(tmp_path, 1, {"step": 1})  # a checkpoint without an export, as an older version's
    hvp_run.export_backbone(backbone, tmp_path / "backbone", DATA, "hvp_test")
    hvp_run.load_backbone(tmp_path / "backbone")
    assert capsys.readouterr().err.splitlines() == [
        f"warning: the checkpoint manifests beside {tmp_path / 'backbone'} do not list its files (a run of an older "
        "version): loading it unchecked"]
