"""The scripts' shared flags (`RunConfig`), their command line, one-line errors and seeds."""
import argparse
import dataclasses
import hashlib
import inspect
import json
import os
import re
import sys
from pathlib import Path

import torch


REPO_DIR = Path(__file__).resolve().parent.parent  # the repository: hvp_run/ lies in it


DEFAULT_DATASET = str(REPO_DIR / "data" / "fashion_mnist_small")


class HVPError(Exception):
    """A user-facing error: printed as one line, exit status 2, nothing half-written."""


UNDO_ON_ERROR = []  # functions run_main calls when main() stops with an HVPError (a new Run removes its files)


def run_main(main):
    """Run `main()`, turning HVPError into a one-line message (printed by the main process only:
    every process raises the same one) and exit status 2, after undoing what UNDO_ON_ERROR's
    functions undo. When main() is the program's own (`python script.py`), a normal end exits at
    once (exit_now)."""
    UNDO_ON_ERROR.clear()  # only what this main() set up
    try:
        main()
        if getattr(sys.modules["__main__"], "__file__", None) == main.__code__.co_filename:
            exit_now()
    except HVPError as e:
        for undo in list(UNDO_ON_ERROR):
            undo()
        message = str(e)
        if message.startswith("Caught HVPError in DataLoader worker"):  # torch adds the worker's traceback
            message = message.rstrip().splitlines()[-1].split("HVPError: ", 1)[-1]
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def exit_now():
    """End the process with status 0 as Python would, less its teardown of the modules: importing timm
    imports torchvision and with it torch._dynamo and triton, whose objects take the interpreter
    0.7 to 1 s to dismantle at exit (a 3-step script run: 4.5-4.8 s -> 3.8 s on 2 Xeon cores). The
    non-daemon threads are joined and the atexit functions run first, as at a normal exit; files
    must be closed by then (the scripts close theirs)."""
    import atexit
    import threading
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`) or stream: Python's own exit ignores it too
            pass
    os._exit(0)


# ----------------------------------------------------------------------------------- config / CLI

@dataclasses.dataclass
class RunConfig:
    """The flags every training script shares (data, outputs, run lifecycle, Hub). Each script's
    Config adds its method's own fields and sets output_dir's default."""
    dataset: str = DEFAULT_DATASET  # Hub dataset id, local image folder, parquet file/folder/glob
    split: str = "train"  # split to pretrain on
    eval_split: str = "test"  # labelled split for k-NN queries (the train split is the memory bank); "" = no k-NN
    image_column: str = "image"  # dataset column holding images
    label_column: str = "label"  # dataset column holding labels (k-NN only)
    output_dir: str = "outputs/hvp"  # checkpoints, backbone export, metrics.jsonl, TensorBoard logs (one run per folder)
    recipe: str = ""  # a named published recipe (see RECIPES in the script) replacing the defaults of flags not given
    image_size: int = 224  # training crop size (also the k-NN evaluation size and the export's input size)
    epochs: int = 100  # length of the run (steps per epoch = examples // global batch)
    max_steps: int = 0  # if > 0, stop after this many optimizer steps (the schedules span them)
    batch_size: int = 64  # images per process per micro-step; global batch = this x processes x grad_accum
    grad_accum: int = 1  # micro-steps per optimizer step (or set --global_batch)
    global_batch: int = 0  # if > 0: images per optimizer step over all processes; sets --grad_accum from the process count
    mixed_precision: str = ""  # auto (bf16 where native, else fp32) | no | fp16 | bf16; "" = as `accelerate launch` says
    num_workers: int = -1  # loader workers per process; -1 = the process's share of the CPU cores, minus one
    threads: int = 0  # torch CPU threads per process; 0 = OMP_NUM_THREADS if set, else (CPU runs) the process's share of the cores, less its loader workers in the selection forward
    crops: str = "auto"  # where views are cut and resized: worker (loader workers), device (batched on the training device), auto (device on CUDA, worker on CPU)
    shuffle_buffer: int = 5000  # rows each loader worker shuffles among (pieces are shuffled too)
    seed: int = 0  # seeds every random source; a CPU run is reproducible
    log_every: int = 20  # steps between metrics.jsonl records
    save_every: int = 1000  # steps between checkpoints (plus one at the end and on SIGTERM/SIGINT)
    keep_checkpoints: int = 2  # checkpoints kept in output_dir
    resume: str = dataclasses.field(default="", metadata={"const": "yes"})  # --resume: continue the run in output_dir; --resume auto: one if there is one, else start; --resume PATH: from a checkpoint-N or run folder
    knn_every: int = 0  # epochs between k-NN evaluations during training (0 = only at the end)
    knn_k: int = 20  # neighbours for k-NN
    report_to: str = "tensorboard"  # Accelerate tracker(s), comma-separated, or "none"
    init_from: str = ""  # start the backbone from these weights: export/output folder or hf-hub:<user>/<repo>
    push_to_hub: bool = False  # push the backbone (DINO/iBOT: the teacher's) + model card to the Hugging Face Hub
    hub_model_id: str = ""  # <user or org>/<name>; default <your user>/<--output_dir folder name>
    hub_private: bool = False  # create the Hub repo private
    hub_every: int = 0  # also push at the first checkpoint after every N steps (0 = only at the end)
    hub_push_state: bool = False  # also push the full training state to the repo's "training-state" branch
    hub_license: str = "mit"  # licence of the trained weights: the model card and the export's config.json, a Hub licence id such as apache-2.0


def check_run_config(cfg):
    """One-line errors for the shared flags (each script's check_config calls it)."""
    if cfg.mixed_precision not in ("", "auto", "no", "fp16", "bf16"):
        raise HVPError(f"--mixed_precision must be auto, no, fp16 or bf16, got {cfg.mixed_precision!r}")
    if cfg.crops not in ("auto", "worker", "device"):
        raise HVPError(f"--crops must be auto, worker or device, got {cfg.crops!r}")
    if not cfg.hub_license.strip():
        raise HVPError("--hub_license must name the weights' licence (a Hub licence id such as mit or apache-2.0)")
    if cfg.global_batch < 0 or cfg.threads < 0 or cfg.log_every < 1 or cfg.save_every < 1 or cfg.shuffle_buffer < 1:
        raise HVPError("--global_batch and --threads must be >= 0 and --log_every, --save_every, --shuffle_buffer >= 1")


def run_folder_of(path):
    """The run folder a --resume PATH names: the folder itself, or the one a checkpoint lies in (by
    its name, so that nodes without the path agree)."""
    path = Path(path).expanduser()
    return path.parent if re.fullmatch(r"checkpoint-\d+", path.name) or (path / "state.json").is_file() else path


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (not its whole usage), exit status 2."""

    def error(self, message):
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def _config_file(path, fields):
    """--config FILE: the flags stored in a JSON file (a run's config.json, or a plain {flag: value}
    object). --resume is left out: it says what to do with a folder, not how to train."""
    try:
        stored = json.loads(Path(path).expanduser().read_text())
    except (OSError, ValueError) as e:
        raise HVPError(f"--config: cannot read {path}: {_first_error_line(e)}") from None
    stored = stored.get("config", stored) if isinstance(stored, dict) else None
    if not isinstance(stored, dict):
        raise HVPError(f"--config: {path} holds no JSON object of flags")
    unknown = sorted(set(stored) - set(fields))
    if unknown:
        raise HVPError(f"--config: {path} has flags this script does not take: {', '.join(unknown)}")
    return {k: tuple(v) if isinstance(fields[k].default, tuple) and isinstance(v, list) else v
            for k, v in stored.items() if k != "resume"}


def _launcher_precision():
    """The precision `accelerate launch` (its --mixed_precision or config file) chose, if it chose
    one: it passes it as ACCELERATE_MIXED_PRECISION. Its "no" is also what it passes when nothing
    was chosen, so only fp16 and bf16 count as a choice."""
    value = os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower()
    return value if value in ("fp16", "bf16") else None


def _field_comments(cls):
    """The `# comment` after each dataclass field (of the class and its bases), used as --help text."""
    comments = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        for line in inspect.getsource(klass).splitlines():
            m = re.match(r"\s*(\w+)\s*:[^#]*#\s*(.*)$", line)
            if m:
                comments[m.group(1)] = m.group(2)
    return comments


def dataset_key(name):
    """One spelling per dataset: an existing local path as its absolute, resolved form; anything
    else (a Hub id) as given. Presets and model cards look datasets up by this key."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def parse_config(cls, argv=None, presets=None, recipes=None, description=None):
    """Turn a @dataclass into a CLI (one flag per field, its `# comment` as help).

    Values come, later ones winning, from: the dataclass defaults; the named --recipe (`recipes`:
    name -> values); the CPU preset of the dataset (`presets`: dataset -> values; used only without
    --recipe; its max_steps only without --epochs); --config FILE (a run's config.json, or a
    {flag: value} JSON object); the precision `accelerate launch` chose (its fp16 or bf16 replaces a
    --mixed_precision not on the command line); the flags on the command line. A bool becomes
    --flag/--no-flag; a tuple takes as many values as its default has, except a tuple default of
    length 1, which means "one number or more" (e.g. --pred_ratio 0 0.3); a field with metadata
    {"const": v} may be given bare (--resume means --resume yes). Local dataset paths are stored
    resolved; --resume PATH without --output_dir continues in the run folder PATH names. A bad flag
    is a one-line error (exit status 2); flags are never abbreviated.
    Returns (config, notes): notes are start-up lines naming what a recipe, preset or --config file
    set. --help shows each flag's default and, where the shipped dataset's preset replaces
    it, the preset's value (what a run without arguments uses).
    """
    shipped = {dataset_key(k): v for k, v in (presets or {}).items()}.get(dataset_key(DEFAULT_DATASET), {})
    epilog = ("Defaults: the method's published settings; on the shipped dataset (the default --dataset) a CPU preset "
              "replaces some of them, shown as '; <value> on the shipped dataset'. --recipe replaces them with a "
              "published recipe's values.") if shipped else None
    parser = _OneLineParser(description=description, epilog=epilog, allow_abbrev=False)
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                        help="read the flags from FILE (a run's config.json, or a JSON object of flag: value); "
                             "flags given here win")
    comments = _field_comments(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if "recipe" in fields and recipes:
        comments["recipe"] = f"{comments.get('recipe', '')}: {', '.join(sorted(recipes))}"
    for f in fields.values():
        preset = (f"; {_show(shipped[f.name])} on the shipped dataset"
                  if f.name in shipped and shipped[f.name] != f.default else "")
        kwargs = dict(default=argparse.SUPPRESS, help=f"{comments.get(f.name, '')} (default: {f.default}{preset})")
        if isinstance(f.default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(f.default, tuple):
            kwargs.update(nargs=len(f.default) if len(f.default) > 1 else "+", type=type(f.default[0]))
        else:
            kwargs["type"] = type(f.default) if f.default is not None else str
            if "const" in f.metadata:
                kwargs.update(nargs="?", const=f.metadata["const"])
        parser.add_argument(f"--{f.name}", **kwargs)
    given = vars(parser.parse_args(argv))  # only the flags on the command line
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    values = {f.name: f.default for f in dataclasses.fields(cls)}
    notes = []
    launcher = _launcher_precision()
    if launcher and "mixed_precision" in fields and "mixed_precision" not in given:
        given["mixed_precision"] = launcher  # the launcher's explicit choice beats presets, recipes and files
    if "config" in given:
        path = given.pop("config")
        stored = {k: v for k, v in _config_file(path, fields).items() if k not in given}
        given.update(stored)
        notes.append(f"flags from {path} (those given on the command line win)")
    resume = given.get("resume", "")
    if resume not in ("", "yes", "auto") and "output_dir" in fields and "output_dir" not in given:
        given["output_dir"] = str(run_folder_of(resume))  # --resume PATH continues in its own folder
    recipe_name = given.get("recipe", values.get("recipe", ""))
    if recipe_name:
        if recipe_name not in (recipes or {}):
            raise HVPError(f"unknown --recipe {recipe_name!r} (recipes: {', '.join(sorted(recipes or {})) or 'none'})")
        recipe = recipes[recipe_name]
        values.update(recipe)
        used = [k for k in recipe if k not in given]
        if used:
            notes.append(f"recipe {recipe_name}: " + ", ".join(f"{k}={_show(recipe[k])}" for k in used))
    if "dataset" in values:
        dataset = given.get("dataset", values["dataset"])
        if dataset == DEFAULT_DATASET and not Path(dataset).exists():
            raise HVPError(f"the shipped dataset is not at {DEFAULT_DATASET} (it lives in data/ next to hvp_run/ "
                           "in the HVP repository): pass --dataset <Hub id | image folder | parquet files>, e.g. "
                           "--dataset zalando-datasets/fashion_mnist")
        given["dataset"] = dataset_key(dataset)
        if not recipe_name:
            preset = {dataset_key(k): v for k, v in (presets or {}).items()}.get(given["dataset"], {})
            if "epochs" in given:  # a preset's max_steps shortens its own epochs, not the ones you give
                preset = {k: v for k, v in preset.items() if k != "max_steps"}
            values.update(preset)
            used = [k for k in preset if k not in given]
            if used:
                what = "the shipped dataset" if dataset == DEFAULT_DATASET else Path(given["dataset"]).name
                notes.append(f"preset for {what}: " + ", ".join(f"{k}={_show(preset[k])}" for k in used))
    values.update(given)
    return cls(**values), notes


def _show(value):
    return " ".join(map(str, value)) if isinstance(value, tuple) else value


def seed_all(seed):
    """Seed python `random`, numpy and torch (DESIGN.md, D8)."""
    import random
    import numpy as np
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def mix_seed(*parts):
    """A 63-bit seed derived from integers; different tuples give unrelated streams."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _first_error_line(e):
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def progress_bar(total, initial=0, desc="", enabled=True):
    """tqdm that honours TQDM_DISABLE and, outside a terminal (CI logs, files), redraws at most
    every 30 s instead of once per step."""
    from tqdm.auto import tqdm
    off = os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    return tqdm(total=total, initial=initial, desc=desc, disable=off or not enabled, dynamic_ncols=True,
                mininterval=0.1 if sys.stderr.isatty() else 30.0)
