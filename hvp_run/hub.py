"""Hugging Face Hub: model cards, the checks before a push, uploads with retries and deadlines, and
the background push of training exports. eval/finetune.py pushes its fine-tuned models through the
same functions (`hub_repo_id`, `push_folder`, `render_card`)."""
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path


from .config import DEFAULT_DATASET, HVPError
from .models import is_vit_arch
from .checkpoints import _first_line, HUB_LICENSE


# ----------------------------------------------------------------------------------- Hugging Face Hub
#
# Push (--push_to_hub): the backbone export (model.safetensors + timm config.json) and a model card
# (README.md) go to a Hub model repo from a background thread of the main process, so that
# `timm.create_model("hf-hub:<user>/<repo>", pretrained=True)` gives the backbone in one line. The
# full training state stays local, or goes to last-checkpoint/ on the repo's "training-state" branch
# with --hub_push_state. Load: "hf-hub:<user>/<repo>[@revision]" wherever a backbone is accepted
# (load_backbone, eval scripts, --init_from). The token: huggingface_hub finds it (HF_TOKEN, `hf auth
# login`) and sends it to the Hub. This code only asks huggingface_hub whether one exists
# (`get_token() is None`, so that a missing token stops the run before training instead of failing the
# first push) and drops the answer; it never passes the token on, prints, logs or writes it. The
# tests check stdout, stderr, the output folder (model card, config.json) and every uploaded file
# against a fake token.
#
# Every wait on the Hub has an end: each request may stay silent for at most HUB_TIMEOUT_S seconds
# (huggingface_hub's own client has no timeout for uploads), and the final wait for a push at most
# HUB_CLOSE_TIMEOUT_S seconds, cut short by SIGTERM or Ctrl-C; an abandoned push leaves its files
# in <output_dir>/hub_upload with the command that uploads them later.

HUB_STATE_BRANCH = "training-state"


HUB_TIMEOUT_S = 60.0  # seconds a Hub request may stay silent before it fails (env HVP_HUB_TIMEOUT)


HUB_CLOSE_TIMEOUT_S = 300.0  # seconds the end of a run waits for its last push (env HVP_HUB_CLOSE_TIMEOUT)


HUB_DATASETS = {DEFAULT_DATASET: "zalando-datasets/fashion_mnist"}  # local copies of Hub datasets (card metadata)


_HVP_SETTINGS = ("num_views", "global_views", "local_views", "local_crops_number")  # + every hvp_* field


def card_value(value):
    """Config values as shown on a public model card: local paths by their last component."""
    if isinstance(value, str) and os.sep in value and Path(value).expanduser().exists():
        return Path(value).name
    return list(value) if isinstance(value, tuple) else value


def card_dataset(dataset):
    """(Hub dataset id or None, short name) of a --dataset, for a card's metadata and text: the shipped
    subset counts as its Hub original; a local path has no Hub id."""
    dataset = str(dataset)
    is_hub_id = not Path(dataset).expanduser().exists() and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", dataset)
    hub_dataset = HUB_DATASETS.get(dataset) or (dataset if is_hub_id else None)
    return hub_dataset, (hub_dataset or Path(dataset).name).split("/")[-1]


def counted(n, word, plural=None):
    """'1 step', '2 steps', '2 processes'."""
    return f"{n} {word if n == 1 else plural or word + 's'}"


def render_card(card_data, template, **values):
    """A model card's text: `card_data` (huggingface_hub.ModelCardData) as its YAML metadata, which is
    valid by construction, and the Jinja2 `template` (ModelCard.from_template) filled with `values`."""
    from huggingface_hub import ModelCard
    return str(ModelCard.from_template(card_data, template_str=template, **values))


HUB_CUSTOM_LIBRARY = "hvp"  # card library_name of exports that plain timm cannot build (small-stem ResNets)


_DATA_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")  # timm's data config


def _py(value, tuples=False):
    """A config.json value as Python source; with `tuples`, JSON lists as tuples (timm's data config)."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        items = ", ".join(_py(v, tuples) for v in value)
        return f"({items}{',' if len(value) == 1 else ''})" if tuples else f"[{items}]"
    return repr(value)


def _needs_hvp_code(cfg, export_config):
    """True for exports that plain timm cannot build: the small-stem ResNets (create_backbone replaces
    their stem, which config.json cannot describe). Small-stem ViTs are plain timm ViTs (patch size,
    image size in config.json's model_args)."""
    if export_config is not None:
        return bool(export_config.get("hvp_small_stem"))
    if not cfg.get("small_stem"):
        return False
    return not is_vit_arch(str(cfg.get("arch")))


def _usage(repo_id, cfg, export_config):
    """The card's loading instructions: a list of Python snippets, each defining `model`, and a note."""
    transform = ('transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))\n'
                 'features = model(transform(image).unsqueeze(0))  # (1, model.num_features); `image` is a PIL image')
    weights = f'hf_hub_download("{repo_id}", "model.safetensors")'
    hvp_load = f'hvp_run.load_backbone("hf-hub:{repo_id}")'
    arch = (export_config or {}).get("architecture")
    model_args = (export_config or {}).get("model_args") or {}
    pretrained = (export_config or {}).get("pretrained_cfg") or {}
    data = ", ".join(f"{k}={_py(pretrained[k], tuples=True)}" for k in _DATA_KEYS if pretrained.get(k) is not None)
    args = "".join(f"{k}={_py(v)}, " for k, v in model_args.items()).rstrip()
    if _needs_hvp_code(cfg, export_config):
        snippets = [f'import timm\nimport hvp_run  # hvp_run/ and hvp_utils.py of the HVP repository, on the Python path\n\n'
                    f'model, config = {hvp_load}\nmodel = model.eval()\n{transform}']
        if arch:
            snippets.append(
                f'import timm\nimport torch.nn as nn\nfrom huggingface_hub import hf_hub_download\n'
                f'from safetensors.torch import load_file\n\n'
                f'# without the HVP code: timm\'s {arch} with this export\'s model_args and data config (config.json),\n'
                f'# given the small stem (3x3 stride-1 first conv, no max-pool), then the weights\n'
                f'model = timm.create_model(\n    "{arch}",\n    pretrained_cfg_overlay=dict({data}),\n    {args}\n)\n'
                f'model.conv1 = nn.Conv2d(model.conv1.in_channels, model.conv1.out_channels, 3, 1, 1, bias=False)\n'
                f'model.maxpool = nn.Identity()\n'
                f'model.load_state_dict(load_file({weights}))\nmodel = model.eval()')
        note = (f"This backbone has the HVP small stem (a 3x3 stride-1 first convolution and no max-pool, for "
                f"small images), which timm's `{arch or cfg.get('arch')}` does not have and `config.json` cannot "
                f"describe: `timm.create_model(\"hf-hub:{repo_id}\", pretrained=True)` fails on the shape of "
                f"`conv1.weight`. Load it as above (a local copy: `hvp_run.load_backbone(\"<folder>\")`).")
        return snippets, note
    snippets = [f'import timm\n\nmodel = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()\n{transform}']
    if arch:
        vit = any(k in model_args for k in ("img_size", "patch_size", "dynamic_img_size"))
        why = ("\n    # without img_size and patch_size timm builds its default 224 px patch-16 ViT and silently"
               "\n    # resamples these weights into it" if vit else "")
        snippets.append(
            f'import timm\nfrom huggingface_hub import hf_hub_download\n\n'
            f'# by architecture name, with the weights file (here from the Hub; any local copy works)\n'
            f'model = timm.create_model(\n    "{arch}",\n    pretrained=True,\n'
            f'    pretrained_cfg_overlay=dict(\n        file={weights},\n'
            + (f'        {data},  # the data config\n' if data else '') + '    ),\n'
            f'    # this export\'s model_args (config.json), which "hf-hub:"/"local-dir:" pass by themselves{why}\n'
            f'    {args}\n).eval()')
    note = (f'A local copy (`hf download {repo_id} --local-dir <folder>`) loads with '
            f'`timm.create_model("local-dir:<folder>", pretrained=True)`; with the HVP repository, '
            f'`{hvp_load}` gives the same model.')
    resample = (export_config or {}).get("hvp_pos_embed_resample") if export_config else cfg.get("pos_embed_resample")
    if resample == "dino":  # the export keeps the resampling it was trained with; plain timm cannot
        size = (pretrained.get("input_size") or [cfg.get("image_size", "?")])[-1]
        note = note[:-len(" gives the same model.")] + (
            f" gives the same weights. They are the same model at the export's own resolution ({size} px) only: "
            "for other image sizes plain timm resamples the position embedding with antialiasing, while "
            "`load_backbone` resamples it as DINO and iBOT do (bicubic, no antialiasing), as in training.")
    return snippets, note


TRAINING_CARD = """---
{{ card_data }}
---

# {{ method }} + Hard View Pretraining: {{ arch }} on {{ dataset_name }}

A `{{ arch }}` backbone (no classifier head) pretrained with self-supervised **{{ method }}** and **Hard View
Pretraining** (HVP; Ferreira et al., *Beyond Random Augmentations: Pretraining with Hard Views*,
ICLR 2025) on {{ data_note }}, {{ size }} px, for {{ steps }} on {{ processes }}
(mixed precision: {{ precision }}). HVP draws more augmented views than the method needs, scores the
candidate pairs with the method's own loss in one no-gradient forward, and trains on the hardest.

## Usage

```python
{{ load }}
```

{{ load_note }}

k-NN evaluation with the HVP repository: `python eval/knn.py --backbone hf-hub:{{ repo_id }} --dataset <dataset>`

## Results

{{ results_text }}
## Hard-view settings

```json
{{ hvp_settings }}
```

## Training configuration

```json
{{ shown }}
```

## Citation

```bibtex
@inproceedings{ferreira2025hvp,
  title     = {Beyond Random Augmentations: Pretraining with Hard Views},
  author    = {Ferreira, Fabio and Rapant, Ivo and Franke, J{\\"o}rg K. H. and Hutter, Frank},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2025}
}
```
"""


def model_card(repo_id, method, config, step, results=None, processes=1, precision="no", license=HUB_LICENSE,
               export_config=None):
    """The model card README.md: Hub metadata (library, tags, dataset, licence, the k-NN accuracy as
    model-index results), what was trained and how, the hard-view settings, the final evaluation numbers
    and how to load it. `export_config` is the export's config.json (a dict): with it the card also
    shows how to build the model by architecture name with the export's exact model_args. Library
    "timm" where plain timm loads the export, else HUB_CUSTOM_LIBRARY: a card without library_name
    would be taken for a transformers model (config.json)."""
    from huggingface_hub import EvalResult, ModelCardData
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    dataset = str(cfg.get("dataset", ""))
    hub_dataset, dataset_name = card_dataset(dataset)
    tags = ["image-feature-extraction", "self-supervised", "hard-view-pretraining", method.lower(), dataset_name]
    custom = _needs_hvp_code(cfg, export_config)
    if custom:
        tags.insert(0, "pytorch")
    numbers = {k: v for k, v in (results or {}).items() if isinstance(v, (int, float))}
    split = cfg.get("eval_split", "test")
    evaluated = bool(numbers) and bool(split)
    eval_results = [EvalResult(
        task_type="image-classification", task_name=f"k-NN classification of frozen features (k={numbers.get('k', 20)})",
        dataset_type=hub_dataset or dataset_name, dataset_name=dataset_name, dataset_split=split,
        metric_type="accuracy", metric_name="k-NN top-1 accuracy (%)", metric_value=round(numbers["knn_top1"], 2),
    )] if evaluated and "knn_top1" in numbers else None
    metadata = ModelCardData(library_name=HUB_CUSTOM_LIBRARY if custom else "timm", license=license,
                             tags=list(dict.fromkeys(filter(None, tags))),
                             datasets=[hub_dataset] if hub_dataset else None, pipeline_tag="image-feature-extraction",
                             model_name=repo_id if eval_results else None, eval_results=eval_results)
    snippets, load_note = _usage(repo_id, cfg, export_config)
    if evaluated:
        results_text = (f"Frozen features, evaluated on the `{split}` split at the end of training:\n\n"
                        "| metric | value |\n|---|---|\n" + "".join(
                            f"| {k} | {v:.2f} |\n" if isinstance(v, float) else f"| {k} | {v} |\n"
                            for k, v in numbers.items()))
    else:
        results_text = "No evaluation was run at the end of training.\n"
    data_note = (f"`{dataset_name}` (a local copy of [{hub_dataset}](https://huggingface.co/datasets/{hub_dataset}))"
                 if hub_dataset and hub_dataset != dataset else f"`{hub_dataset or dataset_name}`")
    hvp_settings = {k: v for k, v in cfg.items() if k in _HVP_SETTINGS or k.startswith("hvp_")}
    return render_card(
        metadata, TRAINING_CARD, method=method, arch=cfg.get("arch", "?"), dataset_name=dataset_name,
        data_note=data_note, size=cfg.get("image_size", "?"), steps=counted(step, "optimizer step"),
        processes=counted(processes, "process", "processes"), precision=precision,
        load="\n```\n\n```python\n".join(snippets), load_note=load_note, repo_id=repo_id, results_text=results_text,
        hvp_settings=json.dumps(hvp_settings, indent=2, default=str),
        shown=json.dumps({k: card_value(v) for k, v in cfg.items()}, indent=2, default=str))


# ----------------------------------------------------------------------------------- push

def hub_repo_id(cfg, folder):
    """Check --push_to_hub and the --hub_* flags that `cfg` has (training: --hub_every and
    --hub_push_state too) on every process, before anything is trained or written: the repo id to push
    to (--hub_model_id, else the name of `folder`), or None without --push_to_hub. One-line HVPError."""
    given = [f for f in ("hub_model_id", "hub_private", "hub_every", "hub_push_state") if getattr(cfg, f, None)]
    if not cfg.push_to_hub:
        if given:
            raise HVPError(f"--{given[0]} only takes effect with --push_to_hub")
        return None
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id
    if constants.HF_HUB_OFFLINE:
        raise HVPError("--push_to_hub cannot push with HF_HUB_OFFLINE=1 set")
    if getattr(cfg, "hub_every", 0) < 0:
        raise HVPError(f"--hub_every must be >= 0 (0 = push only at the end), got {cfg.hub_every}")
    if get_token() is None:  # whether a token exists; its value is not kept
        raise HVPError("--push_to_hub needs a Hugging Face token with write access: run `hf auth login` or set "
                       "HF_TOKEN" + ("" if cfg.hub_model_id else " (and pass --hub_model_id <user>/<name>, or the "
                                     "repo is <your user>/<--output_dir folder name>)"))
    repo_id = cfg.hub_model_id or re.sub(r"[^\w.-]+", "-", Path(folder).resolve().name).strip("-.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        what = "--hub_model_id" if cfg.hub_model_id else "a repo name inferred from --output_dir"
        raise HVPError(f"{what} {repo_id!r} is not a valid Hub repo id: pass --hub_model_id <user or org>/<name> "
                       "(letters, digits, '-', '_', '.')") from None
    return repo_id


def _bound_hub_requests():
    """Give huggingface_hub's shared HTTP client a timeout: by default it has none, so an upload to a
    Hub that accepts the connection and never answers waits forever. Set before every try, because
    huggingface_hub replaces its client after some errors. Downloads pass their own timeouts
    (HF_HUB_ETAG_TIMEOUT, HF_HUB_DOWNLOAD_TIMEOUT)."""
    from huggingface_hub import get_session
    get_session().timeout = float(os.environ.get("HVP_HUB_TIMEOUT", HUB_TIMEOUT_S))


def push_folder(repo_id, folder, message, label, private=False, write_card=None, state=None, state_message="",
                tries=3, retry_wait=10.0, stop=None):
    """Upload `folder` as one commit to the model repo `repo_id` (created if needed) and, if given, the
    folder `state` to last-checkpoint/ on the training-state branch (commit `state_message`). A failed
    try is reported on stderr and tried up to `tries` times in all (waits growing 4x from `retry_wait` s;
    HVP_HUB_RETRY_WAIT overrides it); `stop` (a threading.Event) ends the waiting and the tries. `write_card(repo_id)` rewrites the
    card once a bare repo name has resolved to <user>/<name>. `label` names what is pushed in the
    messages ("step 5"). Returns (repo id, None) once the Hub has it, else (repo id, last error)."""
    from huggingface_hub import HfApi
    retry_wait, error = float(os.environ.get("HVP_HUB_RETRY_WAIT", retry_wait)), None
    for attempt in range(1, tries + 1):
        try:
            _bound_hub_requests()
            api = HfApi(library_name="hvp")
            repo = api.create_repo(repo_id, private=private, exist_ok=True)
            if repo.repo_id != repo_id:  # a bare name resolves to <user>/<name>
                repo_id = repo.repo_id
                if write_card is not None:
                    write_card(repo_id)
            commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=message)
            if state is not None:
                api.create_branch(repo_id, branch=HUB_STATE_BRANCH, exist_ok=True)
                api.upload_folder(repo_id=repo_id, folder_path=state, path_in_repo="last-checkpoint",
                                  revision=HUB_STATE_BRANCH, delete_patterns="*",  # drop files of older checkpoints
                                  commit_message=state_message or message)
        except Exception as e:  # any network or server failure: reported, the local files stay as they are
            error = _first_line(e)
            if attempt < tries and not (stop is not None and stop.is_set()):
                wait = retry_wait * 4 ** (attempt - 1)
                print(f"hub: push of {label} to {repo_id} failed (try {attempt}/{tries}): {error}; retrying in "
                      f"{wait:g} s", file=sys.stderr, flush=True)
                if stop is None:
                    time.sleep(wait)
                elif stop.wait(wait):
                    break
                continue
            break
        print(f"hub: pushed {label} to {repo} (commit {commit.oid[:8]})", flush=True)
        return repo_id, None
    return repo_id, error


def upload_later(repo_id, folder):
    """The end of every message about a push that did not happen: the command that does it."""
    return f"upload it later with: hf upload {repo_id} {folder} ."


def _link_tree(src, dst):
    """Copy a folder by hard links where possible (instant, no space). Exports and checkpoints are
    only ever replaced by renames, never changed in place, so a link keeps the content it saw."""
    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    shutil.copytree(src, dst, copy_function=link)


@contextlib.contextmanager
def _stop_signals(on_signal):
    """While waiting on the Hub at the end of a run, SIGTERM and SIGINT call on_signal(name) instead
    of their usual handlers (the training loop's only sets a flag that nothing reads any more, so the
    signal would be swallowed). Main thread only: elsewhere signals cannot be handled."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.getsignal(sig) for sig in signals}
    for sig in signals:
        signal.signal(sig, lambda signum, frame: on_signal(signal.Signals(signum).name))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


class HubPusher:
    """--push_to_hub: uploads backbone exports with their model card from a background thread.

    Only the main process pushes; elsewhere (and without --push_to_hub) every method does nothing.
    `push()` returns at once: it links the export into <output_dir>/.hub-push-<step> and queues it;
    a newer push replaces a queued one that has not started. A failed upload is tried up to `tries`
    times in all (waits growing from `retry_wait` s; the environment variable HVP_HUB_RETRY_WAIT overrides
    it) and reported on stderr, while training goes on and the local files stay as they are. When the
    last push fails, its files are kept in <output_dir>/hub_upload with the command to upload them by
    hand. `close()` waits for the queued pushes, at most `close_timeout` s (HVP_HUB_CLOSE_TIMEOUT
    overrides it) and only until a SIGTERM or Ctrl-C, and returns True if the last one reached the
    Hub, False if it failed or was abandoned (the caller exits non-zero), None if nothing was pushed.
    `license` is the weights' licence on the card and in the pushed config.json.
    """

    def __init__(self, repo_id, method, config, output_dir, private=False, every=0, push_state=False,
                 processes=1, precision="no", enabled=True, tries=3, retry_wait=10.0, license=HUB_LICENSE,
                 close_timeout=HUB_CLOSE_TIMEOUT_S):
        self.repo_id, self.method, self.config, self.output_dir = repo_id, method, config, Path(output_dir)
        self.private, self.every, self.push_state, self.enabled = private, every, push_state, enabled
        self.processes, self.precision, self.tries, self.license = processes, precision, tries, license
        self.retry_wait = float(os.environ.get("HVP_HUB_RETRY_WAIT", retry_wait))
        self.close_timeout = float(os.environ.get("HVP_HUB_CLOSE_TIMEOUT", close_timeout))
        self.last_step, self.ok, self._thread, self._newest = 0, None, None, None
        import queue
        self._jobs = queue.Queue()
        self._lock = threading.Lock()  # the worker's last file moves vs. close() abandoning the push
        self._abandon = threading.Event()
        if enabled and self.output_dir.is_dir():  # leftovers of a run that was killed mid-push
            for stale in self.output_dir.glob(".hub-push-*"):
                shutil.rmtree(stale, ignore_errors=True)

    @classmethod
    def from_config(cls, cfg, accelerator, method):
        """Check --push_to_hub/--hub_model_id/--hub_private/--hub_every/--hub_push_state on every
        process before training (one-line HVPError) and return the pusher."""
        repo_id = hub_repo_id(cfg, cfg.output_dir)
        license = cfg.hub_license
        if repo_id is None:
            return cls(None, method, cfg, cfg.output_dir, enabled=False, license=license)
        enabled = accelerator.is_main_process
        if enabled:
            from huggingface_hub import constants
            when = f"every {cfg.hub_every} steps (at checkpoints) and at the end" if cfg.hub_every else "at the end"
            print(f"hub: pushing the backbone to {constants.ENDPOINT}/{repo_id} {when}", flush=True)
        return cls(repo_id, method, cfg, cfg.output_dir, cfg.hub_private, cfg.hub_every,
                   getattr(cfg, "hub_push_state", False), accelerator.num_processes,
                   accelerator.mixed_precision, enabled, license=license)

    def due(self, step):
        """True when --hub_every steps have passed since the last push."""
        return self.enabled and self.every > 0 and step - self.last_step >= self.every

    def push(self, export_dir, step, results=None, state_dir=None):
        """Queue a push of `export_dir` (a backbone export) as the state of training at `step`, with
        `results` (dict of final evaluation numbers) in the model card and, with --hub_push_state,
        `state_dir` (a checkpoint folder) to the training-state branch. Returns immediately."""
        if not self.enabled:
            return
        folder = self.output_dir / f".hub-push-{step:08d}"
        shutil.rmtree(folder, ignore_errors=True)
        _link_tree(export_dir, folder / "backbone")
        if self.push_state and state_dir is not None:
            _link_tree(state_dir, folder / "state")
        self.last_step = step
        self._newest = {"folder": folder, "step": step, "results": results}
        self._jobs.put(self._newest)
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="hub-push", daemon=True)
            self._thread.start()

    def close(self, timeout=None):
        """Wait for the queued pushes (tries included), at most `timeout` s (default close_timeout)
        and only until a SIGTERM/SIGINT. Past either, the push is abandoned: its files stay in
        <output_dir>/hub_upload and one line says how to upload them. True if the last push reached
        the Hub, False if it failed or was abandoned, None if there was none."""
        if self._thread is None:
            return self.ok
        self._jobs.put(None)
        limit = self.close_timeout if timeout is None else timeout
        signalled = []
        with _stop_signals(signalled.append):
            if self._thread.is_alive():
                print(f"hub: waiting for the push of step {self._newest['step']} to {self.repo_id} (at most "
                      f"{limit:g} s; SIGTERM or Ctrl-C abandons it)", flush=True)
            end = time.monotonic() + limit
            while self._thread.is_alive() and not signalled and time.monotonic() < end:
                self._thread.join(min(0.2, max(0.0, end - time.monotonic())))
        if self._thread.is_alive():
            reason = f"{signalled[0]} received" if signalled else f"not done after {limit:g} s"
            self._give_up(reason)
        self._thread = None
        return self.ok

    def _give_up(self, reason):
        """Abandon the running push: keep the newest export in hub_upload (the worker, still waiting
        on the Hub, no longer moves files) and say how to upload it later."""
        with self._lock:
            self._abandon.set()
            job = self._newest
            if not job["folder"].is_dir():  # the worker finished it just now (and set self.ok)
                return
            self.ok = False
            if not (job["folder"] / "backbone" / "README.md").exists():  # queued, never started
                self._write_card(job)
            kept = self.output_dir / "hub_upload"
            shutil.rmtree(kept, ignore_errors=True)
            os.rename(job["folder"], kept)  # (open files of a push still running stay readable)
            for older in self.output_dir.glob(".hub-push-*"):  # queued or running pushes it supersedes
                shutil.rmtree(older, ignore_errors=True)
        print(f"hub: {reason}: push of step {job['step']} to {self.repo_id} abandoned. The local checkpoints are "
              f"intact; {upload_later(self.repo_id, kept / 'backbone')}", file=sys.stderr, flush=True)

    def _work(self):
        import queue
        while True:
            job = self._jobs.get()
            if job is None or self._abandon.is_set():
                return
            while True:  # only the newest queued export matters
                try:
                    newer = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if newer is None:
                    self._jobs.put(None)
                    break
                shutil.rmtree(job["folder"], ignore_errors=True)
                job = newer
            self._push_with_retries(job)

    def _push_with_retries(self, job):
        step, folder = job["step"], job["folder"]
        self._write_card(job)  # first, so that a folder kept after a failure is complete
        state = folder / "state"
        self.repo_id, error = push_folder(
            self.repo_id, folder / "backbone", f"HVP {self.method}: backbone at step {step}", f"step {step}",
            self.private, lambda repo_id: self._write_card(job), state if state.is_dir() else None,
            f"HVP {self.method}: training state at step {step}", self.tries, self.retry_wait, self._abandon)
        with self._lock:
            if self._abandon.is_set():  # close() gave up on this push and kept its files
                return
            kept = self.output_dir / "hub_upload"
            shutil.rmtree(kept, ignore_errors=True)  # with a success: an older failed push, now superseded
            if error is None:
                shutil.rmtree(folder, ignore_errors=True)
            else:
                os.rename(folder, kept)
            self.ok = error is None
        if error is not None:
            print(f"hub: push of step {step} to {self.repo_id} failed after {self.tries} tries: {error}. The local "
                  f"checkpoints are intact; {upload_later(self.repo_id, kept / 'backbone')}",
                  file=sys.stderr, flush=True)

    def _write_card(self, job):
        """README.md of a queued export, and its config.json's licence made the card's (both written
        as new files: never through a hard link into the export)."""
        backbone = job["folder"] / "backbone"
        config_path = backbone / "config.json"
        export_config = json.loads(config_path.read_text()) if config_path.is_file() else None
        if export_config is not None and export_config.get("pretrained_cfg", {}).get("license") != self.license:
            export_config.setdefault("pretrained_cfg", {})["license"] = self.license
            config_path.unlink()
            config_path.write_text(json.dumps(export_config, indent=2))
        card = backbone / "README.md"
        card.unlink(missing_ok=True)
        card.write_text(model_card(self.repo_id, self.method, self.config, job["step"], job["results"],
                                   self.processes, self.precision, self.license, export_config))
