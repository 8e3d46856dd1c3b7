"""Run a training script and, at its end, write every process's own model parameters to
<output_dir>/params-rank<r>.safetensors, so a test can compare the ranks of a DDP run.

    accelerate launch ... tests/rank_params_probe.py train_simsiam.py --output_dir X ...
"""
import importlib
import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hvp_utils as hvp  # noqa: E402

script, args = sys.argv[1], sys.argv[2:]
output_dir = Path(args[args.index("--output_dir") + 1])
make_accelerator = hvp.make_accelerator


def probed_accelerator(*a, **kw):
    accelerator = make_accelerator(*a, **kw)
    end_training = accelerator.end_training

    def dump_then_end():
        model = accelerator.unwrap_model(accelerator._models[0])
        params = {name: p.detach().contiguous().clone() for name, p in model.named_parameters()}
        save_file(params, output_dir / f"params-rank{accelerator.process_index}.safetensors")
        end_training()

    accelerator.end_training = dump_then_end
    return accelerator


hvp.make_accelerator = probed_accelerator
sys.argv = [script, *args]
module = importlib.import_module(Path(script).stem)
hvp.run_main(module.main)
