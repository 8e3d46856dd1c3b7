"""Training checkpoints (safetensors, a sha256 manifest written last, fall-back to the previous one),
the timm-loadable backbone export, and loading a backbone from any source (run folder, checkpoint,
export, hf-hub:<id>)."""
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch

from .config import _first_error_line, HVPError
from .models import create_backbone, set_pos_embed_resample


HUB_LICENSE = "mit"  # the licence of this code, and by default of the weights it trains (config.json, model card)


def export_backbone(backbone, out_dir, data_config, tag, license=HUB_LICENSE):
    """Write `model.safetensors` + timm `config.json` to `out_dir` atomically. ResNets with the standard
    stem and every ViT (patch size, image size etc. are in config.json's model_args) load with
    `timm.create_model("local-dir:<out_dir>", pretrained=True)` (or "hf-hub:<id>" once pushed);
    small-stem ResNets need `load_backbone` (config.json cannot describe the replaced stem).
    `license` replaces the one timm copies from its own model registry (apache-2.0 for most
    architectures), which says nothing about weights trained here."""
    import copy
    import timm
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model_config = {"pretrained_cfg": {"tag": tag, "license": license}}
    if getattr(backbone, "hvp_small_stem", False):
        model_config["hvp_small_stem"] = True
    if getattr(backbone, "hvp_pos_embed_resample", "timm") != "timm":  # plain timm ignores it (same at the native size)
        model_config["hvp_pos_embed_resample"] = backbone.hvp_pos_embed_resample
    # a CPU copy in the standard memory format: safetensors refuses channels_last tensors
    plain = copy.deepcopy(backbone).to("cpu", memory_format=torch.contiguous_format)
    timm.models.save_for_hf(plain, tmp, model_config=model_config, safe_serialization=True, data_config=data_config)
    _replace_dir(tmp, out_dir)
    return out_dir


def load_backbone(source):
    """Load a backbone from an export folder (config.json + model.safetensors), a checkpoint folder,
    a training output folder, or a timm/Hub name ("hf-hub:org/name"). Returns (model, config dict)."""
    import timm
    from safetensors.torch import load_file
    path = Path(source).expanduser()
    if str(source).startswith("timm/"):
        model = timm.create_model(str(source), pretrained=True, num_classes=0)
        return model, {"architecture": str(source), "pretrained_cfg": model.pretrained_cfg}
    if str(source).startswith("hf-hub:"):  # downloaded, then loaded like a local export (small stems too)
        path = download_hub_backbone(str(source))
    for candidate in (path, path / "backbone"):
        if (candidate / "config.json").is_file() and (candidate / "model.safetensors").is_file():
            path = candidate
            break
    else:
        ckpt = latest_checkpoint(path) if path.is_dir() else None
        if ckpt is not None and (ckpt / "backbone" / "config.json").is_file():
            path = ckpt / "backbone"
        else:
            raise HVPError(f"no backbone found at {source!r}: expected a folder with config.json and "
                           "model.safetensors, a checkpoint folder, a training output folder, or hf-hub:<id>")
    config = json.loads((path / "config.json").read_text())
    if config.get("hvp_small_stem"):
        args = {k: v for k, v in config.get("model_args", {}).items() if k not in ("num_classes", "in_chans", "global_pool")}
        model = create_backbone(config["architecture"], small_stem=True, **args)
        model.load_state_dict(load_file(path / "model.safetensors"))
        # the export's data config, as timm sets it for the exports it loads (resolve_data_config(model=...))
        model.pretrained_cfg = model.default_cfg = dict(config.get("pretrained_cfg", {}),
                                                        architecture=config["architecture"])
    else:
        model = timm.create_model(f"local-dir:{path}", pretrained=True, num_classes=0)
    if config.get("hvp_pos_embed_resample"):
        set_pos_embed_resample(model, config["hvp_pos_embed_resample"])
    return model, config


# ----------------------------------------------------------------------------------- checkpoints

def _flatten(obj, tensors, prefix):
    """Split a nested state into JSON-able structure + a flat {key: tensor} dict (no pickle)."""
    if torch.is_tensor(obj):
        key = f"{len(tensors)}:{prefix}"  # the counter keeps keys unique whatever the dict keys are
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _flatten(v, tensors, f"{prefix}.{k}" if prefix else k) for k, v in obj.items()}
        return {"__items__": [[k, _flatten(v, tensors, f"{prefix}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {prefix!r}")


def _unflatten(obj, tensors):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: _unflatten(v, tensors) for k, v in obj["__items__"]}
        if "__list__" in obj:
            items = [_unflatten(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj["tuple"] else items
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    return obj


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(tmp, final):
    """Move a finished folder into place; an existing one is swapped out first, then removed."""
    for f in Path(tmp).iterdir():
        _fsync(f)
    old = None
    if final.exists():
        old = final.with_name(final.name + f".old-{os.getpid()}")
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


MANIFEST = "manifest.json"  # sha256 and size of every file of a checkpoint, written last


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_manifest(folder):
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (Path(folder) / MANIFEST).write_text(json.dumps({"files": manifest}, indent=1))


def checkpoint_problem(path):
    """None if the checkpoint folder is intact (every file of its manifest present with its size and
    sha256), else a short reason. Checkpoints from before manifests were written pass unchecked."""
    path = Path(path)
    if not (path / "state.json").is_file() or not (path / "state.safetensors").is_file():
        return "state.json or state.safetensors is missing"
    if not (path / MANIFEST).is_file():
        return None
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable {MANIFEST} ({_first_error_line(e)})"
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, not {want['bytes']}"
        if _sha256(f) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


def save_checkpoint(output_dir, step, state, backbone=None, data_config=None, tag="hvp", keep=2,
                    license=HUB_LICENSE):
    """Write `output_dir/checkpoint-<step>/` atomically: state.safetensors (every tensor),
    state.json (everything else), backbone/ (timm export; the weights' `license` in its config.json),
    manifest.json (sizes and checksums). A kill at any moment leaves either the old or the new
    checkpoint complete, never a half-written latest one; a file damaged later is found by
    `checkpoint_problem`."""
    from safetensors.torch import save_file
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step:08d}"
    tmp = output_dir / f".tmp-checkpoint-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {}
    skeleton = _flatten(state, tensors, "")
    save_file(tensors, tmp / "state.safetensors")
    (tmp / "state.json").write_text(json.dumps(skeleton))
    if backbone is not None:
        export_backbone(backbone, tmp / "backbone", data_config, tag, license)
    _write_manifest(tmp)
    _replace_dir(tmp, final)
    old = sorted(p for p in output_dir.iterdir() if CHECKPOINT_RE.match(p.name))
    for p in old[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    return final


def checkpoints(output_dir):
    """Checkpoint folders in output_dir, newest first (output_dir itself if it is one)."""
    output_dir = Path(output_dir)
    if (output_dir / "state.json").is_file():
        return [output_dir]
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if CHECKPOINT_RE.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)), reverse=True)


def latest_checkpoint(output_dir):
    """The newest complete checkpoint folder in output_dir (or output_dir itself if it is one)."""
    return next((p for p in checkpoints(output_dir) if (p / "state.json").is_file()
                 and (p / "state.safetensors").is_file()), None)


def load_checkpoint(path):
    """Read a checkpoint written by save_checkpoint. Only safetensors and JSON are parsed."""
    from safetensors.torch import load_file
    path = Path(path)
    try:
        return _unflatten(json.loads((path / "state.json").read_text()), load_file(path / "state.safetensors"))
    except Exception as e:
        raise HVPError(f"cannot read checkpoint {path}: {_first_error_line(e)}") from None


def checkpoint_config(path):
    """The training configuration stored in a checkpoint (without reading its tensors)."""
    skeleton = json.loads((Path(path) / "state.json").read_text())
    return _unflatten(skeleton.get("config", {}), {})


def cleanup_partial_checkpoints(output_dir):
    """Remove what a killed run can leave behind: half-written checkpoints and exports, folders
    swapped out by an interrupted replace, links queued for a Hub push."""
    for pattern in (".tmp-checkpoint-*", "*.tmp-*", "*.old-*", ".hub-push-*"):
        for p in Path(output_dir).glob(pattern):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def download_hub_backbone(source):
    """Download config.json + model.safetensors of "hf-hub:<user>/<repo>[@revision]" into the
    Hugging Face cache, both from the same commit. Returns the local folder holding them."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, HFValidationError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
    repo_id, _, revision = source[len("hf-hub:"):].partition("@")
    where = constants.ENDPOINT
    try:
        config = Path(hf_hub_download(repo_id, "config.json", revision=revision or None, library_name="hvp"))
        hf_hub_download(repo_id, "model.safetensors", revision=config.parent.name, library_name="hvp")
    except HFValidationError:
        raise HVPError(f"{source!r} is not a Hub model id: use hf-hub:<user or org>/<name>[@revision]") from None
    except RepositoryNotFoundError:
        raise HVPError(f"no model repo {repo_id!r} on {where} (check the name; a private repo needs "
                       "`hf auth login` or HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise HVPError(f"model repo {repo_id!r} on {where} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:  # no connection (or HF_HUB_OFFLINE=1) and not in the cache
        raise HVPError(f"cannot download {source!r}: {where} is unreachable or HF_HUB_OFFLINE is set, "
                       "and the files are not in the local cache") from None
    except EntryNotFoundError:
        raise HVPError(f"model repo {repo_id!r} has no config.json + model.safetensors: not a timm backbone") from None
    except (HfHubHTTPError, OSError) as e:
        raise HVPError(f"cannot download {source!r} from {where}: {_first_line(e)}") from None
    return config.parent


def init_backbone(backbone, source):
    """--init_from: load the weights of anything `load_backbone` accepts (export folder, training
    output, checkpoint, hf-hub:<id>) into `backbone`, which must have the same architecture."""
    pretrained, _ = load_backbone(source)
    try:
        backbone.load_state_dict(pretrained.state_dict())
    except RuntimeError as e:
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), _first_line(e))
        raise HVPError(f"--init_from {source!r} does not fit --arch/--small_stem: {detail[:200]}") from None
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"backbone initialised from {source}", flush=True)
    return backbone
