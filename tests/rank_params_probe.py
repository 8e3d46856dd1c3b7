"""Run a training script and record, on every process, what a test needs to compare the ranks of a
multi-process run:

- <output_dir>/state-start-rank<r>.safetensors and state-end-rank<r>.safetensors: every tensor of
  the run's state (student, teacher, centres, ...) right after start and at the end;
- <output_dir>/labels-rank<r>.json: the labels of every batch the process trained on, in order.

With HVP_PROBE_PER_RANK_DIR=1, processes other than rank 0 use <output_dir>-rank<r> as their
output folder, as nodes without a shared file system would.

    accelerate launch ... tests/rank_params_probe.py train_simsiam.py --output_dir X ...
"""
import dataclasses
import importlib
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hvp_run  # noqa: E402

script, args = sys.argv[1], sys.argv[2:]
output_dir = Path(args[args.index("--output_dir") + 1])
record_dir = output_dir.parent / (output_dir.name + "-probe")
rank = int(os.environ.get("RANK", 0))
labels = []


def dump(run, when):
    tensors = {}
    for name, obj in run.state.items():
        state = obj if torch.is_tensor(obj) else obj.state_dict()
        for key, value in (state.items() if isinstance(state, dict) else [("", state)]):
            if torch.is_tensor(value) and name != "optimizer":
                tensors[f"{name}.{key}"] = value.detach().cpu().contiguous().clone()
    record_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, record_dir / f"state-{when}-rank{rank}.safetensors")


original_init, original_start, original_finish = hvp_run.Run.__init__, hvp_run.Run.start, hvp_run.Run.finish
original_steps = hvp_run.Run.steps


def init(self, cfg, *a, **kw):
    if os.environ.get("HVP_PROBE_PER_RANK_DIR") and rank > 0:
        cfg = dataclasses.replace(cfg, output_dir=f"{cfg.output_dir}-rank{rank}")
    original_init(self, cfg, *a, **kw)


def start(self, *a, **kw):
    original_start(self, *a, **kw)
    dump(self, "start")


def recorded(micro_batches):
    for batch in micro_batches:
        labels.append(batch["label"].tolist())
        yield batch


def steps(self):
    for step in original_steps(self):
        yield dataclasses.replace(step, micro_batches=recorded(step.micro_batches))


def finish(self):
    dump(self, "end")
    (record_dir / f"labels-rank{rank}.json").write_text(json.dumps(labels))
    return original_finish(self)


# the public methods only: the set-up, the steps (each step's batches pass through `recorded`) and the end
hvp_run.Run.__init__, hvp_run.Run.start, hvp_run.Run.steps, hvp_run.Run.finish = init, start, steps, finish
sys.argv = [script, *args]
module = importlib.import_module(Path(script).stem)
hvp_run.run_main(module.main)
