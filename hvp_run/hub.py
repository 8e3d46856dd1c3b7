"""Hugging Face Hub: model cards and the background push of exports (and optionally the training
state)."""
import dataclasses
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path


from .config import DEFAULT_DATASET, HVPError
from .models import is_vit_arch
from .checkpoints import _first_line


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

HUB_STATE_BRANCH = "training-state"


HUB_LICENSE = "mit"  # the licence of this code; weights trained on other data may need another


HUB_DATASETS = {DEFAULT_DATASET: "zalando-datasets/fashion_mnist"}  # local copies of Hub datasets (card metadata)


_HVP_SETTINGS = ("num_views", "global_views", "local_views", "local_crops_number")  # + every hvp_* field


def _card_value(value):
    """Config values as shown on a public model card: local paths by their last component."""
    if isinstance(value, str) and os.sep in value and Path(value).expanduser().exists():
        return Path(value).name
    return list(value) if isinstance(value, tuple) else value


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
    return snippets, note


def model_card(repo_id, method, config, step, results=None, processes=1, precision="no", license=HUB_LICENSE,
               export_config=None):
    """The model card README.md: Hub metadata (library, tags, dataset, licence), what was trained and
    how, the hard-view settings, the final evaluation numbers and how to load it. `export_config` is the
    export's config.json (a dict): with it the card also shows how to build the model by architecture
    name with the export's exact model_args. Library "timm" where plain timm loads the export, else
    HUB_CUSTOM_LIBRARY: a card without library_name would be taken for a transformers model (config.json)."""
    from huggingface_hub import ModelCardData
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    dataset = str(cfg.get("dataset", ""))
    is_hub_id = not Path(dataset).expanduser().exists() and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", dataset)
    hub_dataset = HUB_DATASETS.get(dataset) or (dataset if is_hub_id else None)
    dataset_name = (hub_dataset or Path(dataset).name).split("/")[-1]
    tags = ["image-feature-extraction", "self-supervised", "hard-view-pretraining", method.lower(), dataset_name]
    custom = _needs_hvp_code(cfg, export_config)
    if custom:
        tags.insert(0, "pytorch")
    metadata = ModelCardData(library_name=HUB_CUSTOM_LIBRARY if custom else "timm", license=license,
                             tags=list(dict.fromkeys(filter(None, tags))),
                             datasets=[hub_dataset] if hub_dataset else None, pipeline_tag="image-feature-extraction")
    hvp_settings = {k: v for k, v in cfg.items() if k in _HVP_SETTINGS or k.startswith("hvp_")}
    shown = {k: _card_value(v) for k, v in cfg.items()}
    arch, size = cfg.get("arch", "?"), cfg.get("image_size", "?")
    snippets, load_note = _usage(repo_id, cfg, export_config)
    load = "\n```\n\n```python\n".join(snippets)
    numbers = {k: v for k, v in (results or {}).items() if isinstance(v, (int, float))}
    results_text = ("| metric | value |\n|---|---|\n" + "".join(
        f"| {k} | {v:.2f} |\n" if isinstance(v, float) else f"| {k} | {v} |\n" for k, v in numbers.items())
        if numbers else "No evaluation was run at the end of training.\n")
    data_note = (f"`{dataset_name}` (a local copy of [{hub_dataset}](https://huggingface.co/datasets/{hub_dataset}))"
                 if hub_dataset and hub_dataset != dataset else f"`{hub_dataset or dataset_name}`")
    body = f"""
# {method} + Hard View Pretraining: {arch} on {dataset_name}

A `{arch}` backbone (no classifier head) pretrained with self-supervised **{method}** and **Hard View
Pretraining** (HVP; Ferreira et al., *Beyond Random Augmentations: Pretraining with Hard Views*,
ICLR 2025) on {data_note}, {size} px, for {step} optimizer steps on {processes} process(es)
(mixed precision: {precision}). HVP draws more augmented views than the method needs, scores the
candidate pairs with the method's own loss in one no-gradient forward, and trains on the hardest.

## Usage

```python
{load}
```

{load_note}

k-NN evaluation with the HVP repository: `python eval/knn.py --backbone hf-hub:{repo_id} --dataset <dataset>`

## Results

Frozen features, evaluated on the `{cfg.get("eval_split", "test")}` split at the end of training:

{results_text}
## Hard-view settings

```json
{json.dumps(hvp_settings, indent=2, default=str)}
```

## Training configuration

```json
{json.dumps(shown, indent=2, default=str)}
```

## Citation

```bibtex
@inproceedings{{ferreira2025hvp,
  title     = {{Beyond Random Augmentations: Pretraining with Hard Views}},
  author    = {{Ferreira, Fabio and Rapant, Ivo and Franke, J{{\\"o}}rg K. H. and Hutter, Frank}},
  booktitle = {{International Conference on Learning Representations (ICLR)}},
  year      = {{2025}}
}}
```
"""
    return f"---\n{metadata.to_yaml()}\n---\n{body}"


def _link_tree(src, dst):
    """Copy a folder by hard links where possible (instant, no space). Exports and checkpoints are
    only ever replaced by renames, never changed in place, so a link keeps the content it saw."""
    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    shutil.copytree(src, dst, copy_function=link)


class HubPusher:
    """--push_to_hub: uploads backbone exports with their model card from a background thread.

    Only the main process pushes; elsewhere (and without --push_to_hub) every method does nothing.
    `push()` returns at once: it links the export into <output_dir>/.hub-push-<step> and queues it;
    a newer push replaces a queued one that has not started. A failed upload is retried (`retries`
    tries, waits growing from `retry_wait` s; the environment variable HVP_HUB_RETRY_WAIT overrides
    it) and reported on stderr, while training goes on and the local files stay as they are. When the
    last push fails, its files are kept in <output_dir>/hub_upload with the command to upload them by
    hand. `close()` waits for the queued pushes and returns True if the last one reached the Hub.
    """

    def __init__(self, repo_id, method, config, output_dir, private=False, every=0, push_state=False,
                 processes=1, precision="no", enabled=True, retries=3, retry_wait=10.0):
        self.repo_id, self.method, self.config, self.output_dir = repo_id, method, config, Path(output_dir)
        self.private, self.every, self.push_state, self.enabled = private, every, push_state, enabled
        self.processes, self.precision, self.retries = processes, precision, retries
        self.retry_wait = float(os.environ.get("HVP_HUB_RETRY_WAIT", retry_wait))
        self.last_step, self.ok, self._thread = 0, None, None
        import queue
        self._jobs = queue.Queue()
        if enabled and self.output_dir.is_dir():  # leftovers of a run that was killed mid-push
            for stale in self.output_dir.glob(".hub-push-*"):
                shutil.rmtree(stale, ignore_errors=True)

    @classmethod
    def from_config(cls, cfg, accelerator, method):
        """Check --push_to_hub/--hub_model_id/--hub_private/--hub_every/--hub_push_state on every
        process before training (one-line HVPError) and return the pusher."""
        given = [f for f in ("hub_model_id", "hub_private", "hub_every", "hub_push_state") if getattr(cfg, f, None)]
        if not cfg.push_to_hub:
            if given:
                raise HVPError(f"--{given[0]} only takes effect with --push_to_hub")
            return cls(None, method, cfg, cfg.output_dir, enabled=False)
        from huggingface_hub import constants, get_token
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id
        if constants.HF_HUB_OFFLINE:
            raise HVPError("--push_to_hub cannot push with HF_HUB_OFFLINE=1 set")
        if cfg.hub_every < 0:
            raise HVPError(f"--hub_every must be >= 0 (0 = push only at the end), got {cfg.hub_every}")
        if get_token() is None:  # whether a token exists; its value is not kept
            raise HVPError("--push_to_hub needs a Hugging Face token with write access: run `hf auth login` or set "
                           "HF_TOKEN" + ("" if cfg.hub_model_id else " (and pass --hub_model_id <user>/<name>, or the "
                                         "repo is <your user>/<--output_dir folder name>)"))
        repo_id = cfg.hub_model_id or re.sub(r"[^\w.-]+", "-", Path(cfg.output_dir).resolve().name).strip("-.")
        try:
            validate_repo_id(repo_id)
        except HFValidationError:
            what = "--hub_model_id" if cfg.hub_model_id else "a repo name inferred from --output_dir"
            raise HVPError(f"{what} {repo_id!r} is not a valid Hub repo id: pass --hub_model_id <user or org>/<name> "
                           "(letters, digits, '-', '_', '.')") from None
        enabled = accelerator.is_main_process
        if enabled:
            when = f"every {cfg.hub_every} steps (at checkpoints) and at the end" if cfg.hub_every else "at the end"
            print(f"hub: pushing the backbone to {constants.ENDPOINT}/{repo_id} {when}", flush=True)
        return cls(repo_id, method, cfg, cfg.output_dir, cfg.hub_private, cfg.hub_every,
                   getattr(cfg, "hub_push_state", False), accelerator.num_processes,
                   accelerator.mixed_precision, enabled)

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
        self._jobs.put({"folder": folder, "step": step, "results": results})
        if self._thread is None:
            import threading
            self._thread = threading.Thread(target=self._work, name="hub-push", daemon=True)
            self._thread.start()

    def close(self):
        """Wait for queued pushes (retries included). True if the last push succeeded, None if none."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None
        return self.ok

    def _work(self):
        import queue
        while True:
            job = self._jobs.get()
            if job is None:
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
            self.ok = self._push_with_retries(job)

    def _push_with_retries(self, job):
        step, error = job["step"], None
        for attempt in range(1, self.retries + 1):
            try:
                url, commit = self._upload(job)
            except Exception as e:  # any network or server failure: report it, never stop training
                error = _first_line(e)
                if attempt < self.retries:
                    wait = self.retry_wait * 4 ** (attempt - 1)
                    print(f"hub: push of step {step} to {self.repo_id} failed (try {attempt}/{self.retries}): {error}; "
                          f"retrying in {wait:g} s", file=sys.stderr, flush=True)
                    time.sleep(wait)
                continue
            print(f"hub: pushed step {step} to {url} (commit {commit[:8]})", flush=True)
            shutil.rmtree(job["folder"], ignore_errors=True)
            shutil.rmtree(self.output_dir / "hub_upload", ignore_errors=True)  # an older failed push, now superseded
            return True
        kept = self.output_dir / "hub_upload"
        shutil.rmtree(kept, ignore_errors=True)
        os.rename(job["folder"], kept)
        print(f"hub: push of step {step} to {self.repo_id} failed after {self.retries} tries: {error}. The local "
              f"checkpoints are intact; upload later with: hf upload {self.repo_id} {kept / 'backbone'} .",
              file=sys.stderr, flush=True)
        return False

    def _upload(self, job):
        from huggingface_hub import HfApi
        api = HfApi(library_name="hvp")
        self._write_card(job)  # first, so that a folder kept after a failure is complete
        repo = api.create_repo(self.repo_id, private=self.private, exist_ok=True)
        if repo.repo_id != self.repo_id:  # a bare name resolves to <user>/<name>
            self.repo_id = repo.repo_id
            self._write_card(job)
        message = f"HVP {self.method}: backbone at step {job['step']}"
        commit = api.upload_folder(repo_id=self.repo_id, folder_path=job["folder"] / "backbone",
                                   commit_message=message)
        if (job["folder"] / "state").is_dir():
            api.create_branch(self.repo_id, branch=HUB_STATE_BRANCH, exist_ok=True)
            api.upload_folder(repo_id=self.repo_id, folder_path=job["folder"] / "state", path_in_repo="last-checkpoint",
                              revision=HUB_STATE_BRANCH, delete_patterns="*",  # drop files of older checkpoints
                              commit_message=f"HVP {self.method}: training state at step {job['step']}")
        return str(repo), commit.oid

    def _write_card(self, job):
        card = job["folder"] / "backbone" / "README.md"
        card.unlink(missing_ok=True)  # never write through a hard link into the export
        config = job["folder"] / "backbone" / "config.json"
        card.write_text(model_card(self.repo_id, self.method, self.config, job["step"], job["results"],
                                   self.processes, self.precision,
                                   export_config=json.loads(config.read_text()) if config.is_file() else None))
