"""Shared fixtures: offline Hugging Face settings, a tiny copy of the shipped dataset, a runner for
the training scripts as real subprocesses."""
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


def run_script(args, timeout=300, check=True, **popen):
    """Run a repository script (`python <args>`) in the repository, return CompletedProcess."""
    result = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=script_env(), capture_output=True,
                            text=True, timeout=timeout, **popen)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


# Small, fast settings shared by the training-script tests.
TINY_TRAIN = ["--arch", "resnet18", "--small_stem", "--image_size", "28", "--batch_size", "8",
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
