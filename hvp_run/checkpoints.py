"""Training checkpoints (safetensors, a sha256 manifest written last, fall-back to the previous one),
the timm-loadable backbone export, and loading a backbone from any source (run folder, checkpoint,
export, hf-hub:<id>)."""
import collections
import copy
import errno
import hashlib
import json
import os
import re
import shutil
import sys
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
    if not str(source).startswith("hf-hub:"):  # the Hub client checks what it downloads itself
        check_export(path)
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


def _mismatch(folder, files):
    """The first of `files` ({name: {"bytes", "sha256"}}, as a manifest lists them) that `folder`
    does not hold as listed, as a short reason; None if every one matches."""
    for name, want in files.items():
        f = Path(folder) / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, not {want['bytes']}"
        if _sha256(f) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


def checkpoint_problem(path):
    """None if the checkpoint folder is intact (every file of its manifest present with its size and
    sha256), else a short reason. The manifest is written last, so a checkpoint without one is
    incomplete (or was changed by hand)."""
    path = Path(path)
    if not (path / "state.json").is_file() or not (path / "state.safetensors").is_file():
        return "state.json or state.safetensors is missing"
    if not (path / MANIFEST).is_file():
        return f"{MANIFEST} is missing, so its files cannot be checked"
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable {MANIFEST} ({_first_error_line(e)})"
    return _mismatch(path, files)


def check_export(path):
    """Check a local backbone export against the checkpoint manifest that lists its files: that of
    the checkpoint holding it, or, for a run's <output_dir>/backbone (hard links of a checkpoint's
    export), those of the checkpoints beside it (the export matches one of them). A damaged file is
    an HVPError naming it. An export beside checkpoints that do not list it (an older version's run)
    loads with a one-line warning; one with no checkpoint beside it (made by hand, copied out of its
    run, downloaded) has nothing to be checked against and loads as it is."""
    path = Path(path)
    owners = [path.parent] if (path.parent / MANIFEST).is_file() else checkpoints(path.parent)
    prefix, listed = f"{path.name}/", []
    for owner in owners:
        try:
            files = json.loads((owner / MANIFEST).read_text())["files"]
        except (OSError, ValueError, KeyError):  # no manifest (or no checkpoint at all): nothing to check against
            continue
        export_files = {name[len(prefix):]: want for name, want in files.items() if name.startswith(prefix)}
        if export_files:
            listed.append((owner, export_files))
    if not listed:
        if owners:
            print(f"warning: the checkpoint manifests beside {path} do not list its files (a run of an older "
                  "version): loading it unchecked", file=sys.stderr, flush=True)
        return
    owner, export_files = listed[0]  # the newest: normally what <output_dir>/backbone links to
    problem = _mismatch(path, export_files)
    # an export from an older checkpoint still kept (a kill between a save and the refresh) is fine too
    if problem is None or any(_mismatch(path, files) is None for _, files in listed[1:]):
        return
    raise HVPError(f"the backbone export {path} is damaged: {problem} (checked against {owner / MANIFEST})")


def save_checkpoint(output_dir, step, state, backbone=None, data_config=None, tag="hvp", keep=2,
                    license=HUB_LICENSE):
    """Write `output_dir/checkpoint-<step>/` atomically: state.safetensors (every tensor),
    state.json (everything else), backbone/ (timm export; the weights' `license` in its config.json),
    manifest.json (sizes and checksums). A kill at any moment leaves either the old or the new
    checkpoint complete, never a half-written latest one; a file damaged later is found by
    `checkpoint_problem`. A full disk is an HVPError naming the folder and the room needed, with
    nothing of the new checkpoint left behind."""
    from safetensors.torch import save_file
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step:08d}"
    tmp = output_dir / f".tmp-checkpoint-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tensors = {}
    skeleton = _flatten(state, tensors, "")
    try:
        tmp.mkdir(parents=True)
        save_file(tensors, tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps(skeleton))
        if backbone is not None:
            export_backbone(backbone, tmp / "backbone", data_config, tag, license)
        _write_manifest(tmp)
        _replace_dir(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind
        if not _out_of_room(e):
            raise
        need = _nbytes(tensors) + (_nbytes(backbone.state_dict()) if backbone is not None else 0)
        free = shutil.disk_usage(output_dir).free
        raise HVPError(f"the disk of {output_dir} is full: {final.name} needs about {need / 2**30:.2f} GiB, "
                       f"{free / 2**30:.2f} GiB are free; the earlier checkpoints are intact: make room, then "
                       "continue with --resume") from None
    old = sorted(p for p in output_dir.iterdir() if CHECKPOINT_RE.match(p.name))
    for p in old[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    return final


def _out_of_room(error):
    """True for a write that failed on a full disk or quota. safetensors reports it as its own
    error type, with the OS error number in the text."""
    codes = (errno.ENOSPC, errno.EDQUOT)
    if isinstance(error, OSError):
        return error.errno in codes
    return isinstance(error, Exception) and any(f"(os error {code})" in str(error) for code in codes)


TENSOR_OVERHEAD = 256  # bytes per saved tensor beside its data: its name and shape in the headers and JSON


def _nbytes(obj):
    """Bytes the tensors in a nested state take in a checkpoint."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size() + TENSOR_OVERHEAD
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def checkpoint_bytes(state, export=None):
    """About the bytes `save_checkpoint` writes for `state` ({name: module, optimizer, tensor or
    plain value}) and the backbone `export`: every tensor of the state, an optimizer's as it will be
    once every parameter has its own (most create it at their first step), the export's weights,
    and the JSON beside them."""
    total = 64 * 2**10  # state.json's structure and config, the manifest, the export's config.json
    for obj in state.values():
        if isinstance(obj, torch.optim.Optimizer):
            total += _optimizer_bytes(obj)
        elif hasattr(obj, "state_dict"):
            total += _nbytes(obj.state_dict())
        else:
            total += _nbytes(obj)
    return total + (_nbytes(export.state_dict()) if export is not None else 0)


def _optimizer_bytes(optimizer):
    """Bytes of an optimizer's state once every parameter has its own."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the real one
    total = 0
    for group in optimizer.param_groups:
        new_state = None
        for param in group["params"]:
            if optimizer.state.get(param):
                total += _nbytes(optimizer.state[param])
                continue
            if new_state is None:
                new_state = _new_state_bytes(optimizer, group, param)
            per_element, per_param = new_state
            total += per_element * param.numel() + per_param
    return total


def _new_state_bytes(optimizer, group, param):
    """(bytes per parameter element, bytes per parameter) of the state the first step of
    `optimizer` gives a parameter of `group`: measured by stepping a copy of it once over a
    3-element stand-in, so that any optimizer class counts right (a state tensor the size of the
    stand-in is one the size of the parameter; others, such as a step count, keep their size)."""
    stand_in = torch.zeros(3, dtype=param.dtype, device=param.device, requires_grad=True)
    stand_in.grad = torch.zeros_like(stand_in)
    probe = copy.copy(optimizer)  # the same class and settings, with its own groups and state
    probe.param_groups = [dict(group, params=[stand_in])]
    probe.state = collections.defaultdict(dict)
    try:  # the class's step: the instance may hold a patched one bound to the real optimizer (accelerate)
        type(optimizer).step(probe)
    except Exception:  # one that cannot step this way: assume Adam's two moments
        return 2 * param.element_size(), 2 * TENSOR_OVERHEAD
    per_element = per_param = 0
    for value in probe.state[stand_in].values():
        if torch.is_tensor(value) and value.numel() == stand_in.numel():
            per_element += value.element_size()
            per_param += TENSOR_OVERHEAD
        else:
            per_param += _nbytes(value)
    return per_element, per_param


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
