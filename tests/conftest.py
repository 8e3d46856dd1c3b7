"""Shared fixtures: offline Hugging Face settings, a tiny copy of the shipped dataset, a runner for
the training scripts as real subprocesses; and how the suite shares the machine's cores (below)."""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Read by huggingface_hub / datasets at import time: set before anything imports them.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# Uploads take the Git LFS path (preupload -> LFS batch API -> PUT -> commit), which tests/hub_server.py
# implements, not Xet (hf_xet is installed and would be used otherwise; the test server has no Xet storage).
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hvp-test-hf-"))
os.environ["TOKENIZERS_PARALLELISM"] = "false"
sys.path.insert(0, str(REPO))

SHIPPED = REPO / "data" / "fashion_mnist_small"


# ----------------------------------------------------------------------------------- every core, heavy tests first
# `python -m pytest tests` runs on every core (pytest-xdist, one worker per core) unless told otherwise:
# `-n 0` or `-n 3` choose, and `-p no:xdist` still works because nothing in pytest.ini names xdist's flags.
# --dist worksteal: each worker starts on its own half of the tests, in order, and one that runs out takes
# over the end of another's. Tests marked heavy come first, so the two workers end on short tests, and the
# heavy ones (the GPU check's dry run, shared by three tests; the runs of two processes each) start one
# after another on the first worker instead of crowding the cores together. (xdist_group marks are not
# used: with pytest 9.2, --dist loadgroup no longer keeps a group on one worker, pytest-xdist#1386.)

@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    if not config.pluginmanager.hasplugin("xdist") or hasattr(config, "workerinput"):
        return  # without xdist, or in a worker (it runs what the controller sends it)
    if config.option.numprocesses is None:
        # the cores this process may use (xdist's "auto" counts physical cores with psutil: 1 on a 2-vCPU
        # machine whose vCPUs are one core's two threads)
        config.option.numprocesses = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else (os.cpu_count() or 1)
    if config.option.dist == "no":  # xdist then drops it again for -n 0
        config.option.dist = "worksteal"


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)  # stable: heavy ones first, in order


def pytest_runtest_setup(item):
    # One torch thread per worker (the workers already fill the cores), also after a test whose Run
    # chose its own count; the training scripts' subprocesses get OMP_NUM_THREADS=1 from script_env.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch
        torch.set_num_threads(1)
    # Accelerate's state is one per process, fixed by the first Accelerator: a test that builds one in
    # this process (a Run, an eval script's main) must not inherit the precision of whichever test ran
    # before it on this worker.
    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState
        AcceleratorState._reset_state(reset_partial_state=True)


def write_parquet_split(folder, split, rows, row_group_size):
    """Write rows of the shipped dataset as `folder/data/<split>-00000-of-00001.parquet`, keeping the
    Hugging Face feature metadata so `image` still decodes as an Image column."""
    import pyarrow.parquet as pq
    source = pq.ParquetFile(SHIPPED / "data" / f"{split}-00000-of-00001.parquet")
    table = source.read().slice(0, rows) if isinstance(rows, int) else source.read().take(rows)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(table.replace_schema_metadata(source.schema_arrow.metadata),
                   folder / "data" / f"{split}-00000-of-00001.parquet", row_group_size=row_group_size)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """96 train / 48 test images of the shipped subset, 8 row groups each (so 2 processes x 2 workers
    each get their own shards), without a dataset card (the size is counted)."""
    folder = tmp_path_factory.mktemp("tiny_fmnist")
    write_parquet_split(folder, "train", 96, 12)
    write_parquet_split(folder, "test", 48, 6)
    return folder


def script_env(**extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def assert_same_tensors(a, b, buffers=True):
    """Equal tensors (two state dicts); buffers=False skips BatchNorm statistics (each CPU process
    normalises its own batch)."""
    import torch
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        if buffers or not any(part in name for part in ("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(a[name], b[name]), name


def run_script(args, timeout=300, check=True, **popen):
    """Run a repository script (`python <args>`) in the repository, return CompletedProcess."""
    result = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=script_env(), capture_output=True,
                            text=True, timeout=timeout, **popen)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


# Small, fast settings shared by the training-script tests: timm's 0.4M-parameter test ResNet (its deep
# stem at stride 1) trains a step in about a tenth of ResNet-18's time.
TINY_TRAIN = ["--arch", "test_resnet", "--small_stem", "--image_size", "28", "--batch_size", "8",
              "--proj_dim", "64", "--pred_dim", "16", "--num_workers", "0", "--log_every", "1",
              "--report_to", "none", "--mixed_precision", "no"]


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_process_command(script_args):
    """`accelerate launch` of 2 CPU processes (DDP over gloo) running a training script through
    tests/rank_params_probe.py, which records each process's state and trained labels."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), "tests/rank_params_probe.py", *map(str, script_args)]


def run_two_processes(script_args, timeout=400, check=True, **env):
    """A test that calls this (or two_process_command) is marked heavy."""
    result = subprocess.run(two_process_command(script_args), cwd=REPO, env=script_env(**env), capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"2-process run failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def probe_records(output_dir, when="end"):
    """What rank_params_probe.py recorded: ({rank: {tensor name: tensor}}, {rank: [label lists]})."""
    import json
    from safetensors.torch import load_file
    folder = Path(output_dir).parent / (Path(output_dir).name + "-probe")
    states = {r: load_file(folder / f"state-{when}-rank{r}.safetensors") for r in (0, 1)}
    labels = {r: json.loads((folder / f"labels-rank{r}.json").read_text()) for r in (0, 1)
              if (folder / f"labels-rank{r}.json").exists()}
    return states, labels
