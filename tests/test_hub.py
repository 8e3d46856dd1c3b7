"""Hugging Face Hub push and load, end to end against a local Hub (tests/hub_server.py).

Everything that talks to the Hub runs in a fresh subprocess whose environment points
`huggingface_hub` at the local server before it is imported (HF_ENDPOINT, HF_HUB_OFFLINE=0,
HF_HUB_DISABLE_XET=1 from conftest.py, so that model.safetensors goes the Git LFS way) and gives it a
private cache (HF_HOME) and a dummy token (HF_TOKEN). The real `huggingface_hub` and timm code then
runs over HTTP both ways; nothing leaves 127.0.0.1.
"""
import hashlib
import json
import re
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import torch

import hvp_utils as hvp
import hvp_run
from conftest import REPO, script_env
from hub_server import HubServer

TOKEN = "hf_hvpTestTokenThatMustNeverLeak0123456789"
TINY_HUB_TRAIN = ["--arch", "test_resnet", "--image_size", "32", "--batch_size", "8", "--num_workers", "0",
                  "--proj_dim", "64", "--pred_dim", "32", "--report_to", "none", "--mixed_precision", "no"]


@pytest.fixture
def hub():
    server = HubServer().start()
    yield server
    server.stop()


def hub_env(hub_url, hf_home, token=TOKEN, **extra):
    """The environment of a subprocess whose huggingface_hub talks to `hub_url`."""
    env = script_env(HF_ENDPOINT=hub_url, HF_HOME=str(hf_home), HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1",
                     HVP_HUB_RETRY_WAIT="0.1", **extra)
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    return env


def run_with_hub(args, hub_url, hf_home, token=TOKEN, timeout=300, **extra_env):
    """Run `python <args>` in the repository with huggingface_hub pointed at `hub_url`."""
    env = hub_env(hub_url, hf_home, token, **extra_env)
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def train(output_dir, dataset, *extra):
    return ["train_simsiam.py", "--dataset", dataset, "--output_dir", output_dir, *TINY_HUB_TRAIN, *map(str, extra)]


def ok(result):
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def files_containing(folder, needle):
    return [p for p in folder.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def stored_anywhere(hub, needle):
    """True if any git object or LFS object the server holds contains `needle`."""
    return any(needle.encode() in content for content in [*hub.blobs.values(), *hub.lfs.values()])


def upload_modes(hub, repo, branch="main"):
    """How the files came in the commits to a branch: {path: {"lfs" and/or "regular"}}."""
    modes = {}
    for entry in hub.commit_log:
        if entry["repo"] == repo and entry["branch"] == branch:
            modes.setdefault(entry["path"], set()).add(entry["mode"])
    return modes


LOAD_IN_A_FRESH_PROCESS = r"""
import json, sys
import timm, torch
from huggingface_hub import HfApi, ModelCard
import hvp_utils as hvp
import hvp_run

repo, local = sys.argv[1], sys.argv[2]
x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    from_timm = timm.create_model(f"hf-hub:{repo}", pretrained=True).eval()(x)
    from_hvp = hvp_run.load_backbone(f"hf-hub:{repo}")[0].eval()(x)
    from_local = hvp_run.load_backbone(local)[0].eval()(x)
api = HfApi()
info = api.model_info(repo)
print(json.dumps({
    "timm_equals_local": torch.equal(from_timm, from_local), "hvp_equals_local": torch.equal(from_hvp, from_local),
    "feature_shape": list(from_timm.shape),
    "main_files": sorted(s.rfilename for s in info.siblings),
    "card_library": info.card_data.library_name if info.card_data else None,
    "branches": sorted(b.name for b in api.list_repo_refs(repo).branches),
    "state_files": sorted(api.list_repo_files(repo, revision="training-state")),
    "card_tags": ModelCard.load(repo).data.tags,
}))
"""


def test_a_pushed_backbone_loads_in_a_fresh_process_with_timm_and_gives_identical_features(hub, tiny_dataset, tmp_path):
    out = tmp_path / "run"
    trained = ok(run_with_hub(train(out, tiny_dataset, "--max_steps", 2, "--save_every", 1, "--push_to_hub",
                                    "--hub_model_id", "hvp-tester/hvp-simsiam-tiny", "--hub_every", 1,
                                    "--hub_push_state"), hub.url, tmp_path / "hf-train"))
    repo = "hvp-tester/hvp-simsiam-tiny"
    assert f"hub: pushed step 2 to {hub.url}/{repo}" in trained.stdout
    assert hub.commits(repo) == ["HVP SimSiam: backbone at step 2", "HVP SimSiam: backbone at step 1", "initial commit"]

    # a fresh process with its own cache and no token (the repo is public)
    loaded = ok(run_with_hub(["-c", LOAD_IN_A_FRESH_PROCESS, repo, out / "backbone"], hub.url, tmp_path / "hf-load",
                             token=None))
    facts = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert facts["timm_equals_local"] and facts["hvp_equals_local"] and facts["feature_shape"] == [4, 96]
    # the backbone, its timm config and the card on main; the training state only on its own branch
    assert facts["main_files"] == [".gitattributes", "README.md", "config.json", "model.safetensors"]
    assert facts["branches"] == ["main", "training-state"]
    assert "last-checkpoint/state.safetensors" in facts["state_files"]
    assert facts["card_library"] == "timm" and "hard-view-pretraining" in facts["card_tags"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".hub-push", "hub_upload"))) == []
    # weights and training state went the Git LFS way, config and card as regular files
    assert upload_modes(hub, repo) == {"config.json": {"regular"}, "README.md": {"regular"},
                                       "model.safetensors": {"lfs"}}
    assert upload_modes(hub, repo, "training-state")["last-checkpoint/state.safetensors"] == {"lfs"}
    assert hub.file(repo, "model.safetensors") == (out / "backbone" / "model.safetensors").read_bytes()

    # the token authenticated the pushes and appears nowhere else, not even on the storage host
    assert hub.tokens_seen == {TOKEN}
    assert hub.storage_requests and not any(had_token for _, _, had_token in hub.storage_requests)
    assert files_containing(out, TOKEN) == []
    for text in (trained.stdout, trained.stderr, loaded.stdout, loaded.stderr):
        assert TOKEN not in text
    assert not stored_anywhere(hub, TOKEN)


def test_the_model_card_has_hub_metadata_settings_results_and_a_usage_snippet(hub, tiny_dataset, tmp_path):
    from huggingface_hub import ModelCard
    from train_simsiam import Config
    cfg = Config(dataset=hvp_run.DEFAULT_DATASET, arch="resnet18", image_size=64, num_views=4, hvp_select_res=0.5)
    text = hvp_run.model_card("me/hvp-simsiam", "SimSiam", cfg, step=156, processes=2, precision="bf16",
                          results={"knn_top1": 81.25, "knn_top5": 98.5, "k": 20})
    card = ModelCard(text)
    assert card.data.library_name == "timm" and card.data.license == "mit"
    assert card.data.pipeline_tag == "image-feature-extraction"
    assert {"self-supervised", "hard-view-pretraining", "simsiam", "fashion_mnist"} <= set(card.data.tags)
    assert card.data.datasets == ["zalando-datasets/fashion_mnist"]
    assert 'timm.create_model("hf-hub:me/hvp-simsiam", pretrained=True)' in card.text
    assert "| knn_top1 | 81.25 |" in card.text and '"hvp_select_res": 0.5' in card.text
    assert '"lr": 0.05' in card.text and "156 optimizer steps on 2 processes" in card.text
    assert str(hvp_run.REPO_DIR) not in card.text, "no local paths on a public card"
    small = hvp_run.model_card("me/tiny", "DINO", dict(arch="vit_small", small_stem=True, dataset="/no/such/dir"), 1)
    assert 'hvp_run.load_backbone("hf-hub:me/tiny")' in ModelCard(small).text
    # a small-stem ViT is a plain timm ViT (patch and image size in config.json); a small-stem ResNet is not
    assert ModelCard(small).data.library_name == "timm" and 'timm.create_model("hf-hub:me/tiny"' in small
    resnet = ModelCard(hvp_run.model_card("me/r", "SimCLR", dict(arch="resnet18", small_stem=True, dataset="x/y"), 1))
    assert resnet.data.library_name == hvp_run.HUB_CUSTOM_LIBRARY and "timm" not in resnet.data.tags
    assert 'timm.create_model("hf-hub:me/r", pretrained=True)' in resnet.text and "fails" in resnet.text


def test_the_card_counts_steps_and_processes_in_words():
    text = hvp_run.model_card("me/one", "SimSiam", dict(arch="resnet18", dataset="x/y"), step=1, processes=1)
    assert "for 1 optimizer step on 1 process\n" in text and "(s)" not in text


def test_the_k_nn_accuracy_is_model_index_metadata_of_the_card():
    from huggingface_hub import ModelCard
    card = ModelCard(hvp_run.model_card("me/hvp-simsiam", "SimSiam", dict(arch="resnet18", dataset="x/y"), step=3,
                                        results={"knn_top1": 81.254, "knn_top5": 98.5, "k": 20}))
    assert "model-index:" in card.content.split("---")[1]
    (result,) = card.data.eval_results
    assert card.data.model_name == "me/hvp-simsiam" and result.metric_type == "accuracy"
    assert (result.metric_value, result.dataset_type, result.dataset_split) == (81.25, "x/y", "test")
    assert result.task_type == "image-classification" and "k=20" in result.task_name


def test_a_run_without_evaluation_names_no_split_and_claims_no_results():
    from huggingface_hub import ModelCard
    card = ModelCard(hvp_run.model_card("me/x", "DINO", dict(arch="vit_small", dataset="x/y", eval_split=""), 2))
    assert "No evaluation was run at the end of training." in card.text
    assert "evaluated on the" not in card.text and card.data.eval_results is None


def test_the_card_of_a_dino_resampling_export_says_timm_matches_it_only_at_its_own_resolution():
    export_config = {"architecture": "vit_small_patch16_224", "hvp_pos_embed_resample": "dino",
                     "pretrained_cfg": {"input_size": [3, 96, 96]}}
    cfg = dict(arch="vit_small", dataset="x/y", image_size=96, pos_embed_resample="dino")
    dino = hvp_run.model_card("me/d", "DINO", cfg, 1, export_config=export_config)
    assert "same model at the export's own resolution (96 px) only" in dino and "antialiasing" in dino
    plain = hvp_run.model_card("me/p", "DINO", dict(cfg, pos_embed_resample="timm"), 1,
                               export_config={k: v for k, v in export_config.items() if k != "hvp_pos_embed_resample"})
    assert "gives the same model." in plain and "antialiasing" not in plain


def test_the_weights_licence_on_the_card_and_in_the_pushed_config_agree(tmp_path):
    from huggingface_hub import ModelCard
    export = hvp_run.export_backbone(hvp_run.create_backbone("test_resnet", 32), tmp_path / "backbone", {}, "t")
    assert json.loads((export / "config.json").read_text())["pretrained_cfg"]["license"] == hvp_run.HUB_LICENSE == "mit"
    assert ModelCard(hvp_run.model_card("me/x", "SimSiam", dict(arch="test_resnet"), 1)).data.license == "mit"
    before = (export / "config.json").read_bytes()
    pusher = hvp_run.HubPusher("me/x", "SimSiam", {"arch": "test_resnet"}, tmp_path, license="cc-by-4.0")
    staged = {"folder": tmp_path / "staged", "step": 1, "results": None}
    hvp_run.hub._link_tree(export, staged["folder"] / "backbone")
    pusher._write_card(staged)  # what every push does before it uploads
    assert ModelCard.load(staged["folder"] / "backbone" / "README.md").data.license == "cc-by-4.0"
    config = json.loads((staged["folder"] / "backbone" / "config.json").read_text())
    assert config["pretrained_cfg"]["license"] == "cc-by-4.0"
    assert (export / "config.json").read_bytes() == before, "the export itself is not written through the link"


def test_hub_license_is_the_licence_of_the_checkpoints_export_and_of_the_pushed_card(hub, tiny_dataset, tmp_path):
    out = tmp_path / "run"
    ok(run_with_hub(train(out, tiny_dataset, "--max_steps", 1, "--eval_split", "", "--push_to_hub", "--hub_model_id",
                          "hvp-tester/licensed", "--hub_license", "apache-2.0"), hub.url, tmp_path / "hf"))
    for export in (out / "backbone", hvp_run.latest_checkpoint(out) / "backbone"):
        assert json.loads((export / "config.json").read_text())["pretrained_cfg"]["license"] == "apache-2.0"
    assert json.loads(hub.file("hvp-tester/licensed", "config.json"))["pretrained_cfg"]["license"] == "apache-2.0"
    assert "\nlicense: apache-2.0\n" in hub.file("hvp-tester/licensed", "README.md").decode()


TRAINING_DATA_CONFIG = {"input_size": (3, 32, 32), "interpolation": "bicubic", "crop_pct": 0.875,
                        "mean": hvp.IMAGENET_MEAN, "std": hvp.IMAGENET_STD}  # what the training scripts export

PUSH_THE_SAME_EXPORT_TWICE = r"""
import sys
import hvp_utils as hvp
import hvp_run
for step in (1, 2):
    pusher = hvp_run.HubPusher("hvp-tester/lfs", "SimSiam", {"arch": "test_resnet", "image_size": 32}, sys.argv[1], tries=1)
    pusher.push(sys.argv[2], step=step)
    print("pushed:", pusher.close())
"""

DOWNLOAD_IN_A_FRESH_PROCESS = r"""
import json, sys
from pathlib import Path
import torch
from huggingface_hub import hf_hub_download
import hvp_utils as hvp
import hvp_run
repo, local = sys.argv[1], sys.argv[2]
weights = Path(hf_hub_download(repo, "model.safetensors"))
x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    same = torch.equal(hvp_run.load_backbone(f"hf-hub:{repo}")[0].eval()(x), hvp_run.load_backbone(local)[0].eval()(x))
print(json.dumps({"bytes": weights.read_bytes() == (Path(local) / "model.safetensors").read_bytes(),
                  "cache_blob": weights.resolve().name, "features_equal": same}))
"""


def test_the_weights_go_through_git_lfs_and_a_fresh_download_gives_identical_weights(hub, tmp_path):
    export = hvp_run.export_backbone(hvp_run.create_backbone("test_resnet", 32), tmp_path / "backbone", TRAINING_DATA_CONFIG,
                                 "hvp_simsiam")
    weights = (export / "model.safetensors").read_bytes()
    sha = hashlib.sha256(weights).hexdigest()
    result = ok(run_with_hub(["-c", PUSH_THE_SAME_EXPORT_TWICE, tmp_path, export], hub.url, tmp_path / "hf-push"))
    assert result.stdout.count("pushed: True") == 2
    repo = "hvp-tester/lfs"

    # preupload said "lfs" for the weights: LFS batch request, upload of exactly these bytes to the storage
    # host (the server checks size and sha256), verify, then a commit that names the object (lfsFile)
    paths = [path for _, path, _ in hub.requests]
    batch, verify = f"/{repo}.git/info/lfs/objects/batch", f"/{repo}.git/info/lfs/objects/verify"
    assert paths.index(f"/api/models/{repo}/preupload/main") < paths.index(batch) < paths.index(verify) \
        < paths.index(f"/api/models/{repo}/commit/main")
    assert upload_modes(hub, repo) == {"config.json": {"regular"}, "README.md": {"regular"}, "model.safetensors": {"lfs"}}
    assert [(m, p) for m, p, _ in hub.storage_requests] == [("PUT", f"/lfs-upload/{sha}")], \
        "uploaded once: the second push found the object stored and the file unchanged"
    assert hub.commits(repo) == ["HVP SimSiam: backbone at step 2", "HVP SimSiam: backbone at step 1", "initial commit"]
    assert hub.stored_in_lfs(repo, "model.safetensors") and not hub.stored_in_lfs(repo, "config.json")
    assert hub.lfs[sha] == weights and hub.file(repo, "model.safetensors") == weights

    # a fresh process with its own cache and no token: the same bytes (cached under their sha256, taken from
    # X-Linked-Etag as on the Hub) and the same features
    loaded = ok(run_with_hub(["-c", DOWNLOAD_IN_A_FRESH_PROCESS, repo, export], hub.url, tmp_path / "hf-load",
                             token=None))
    facts = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert facts == {"bytes": True, "cache_blob": sha, "features_equal": True}
    assert ("GET", f"/lfs-objects/{sha}") in [(m, p.split("?")[0]) for m, p, _ in hub.storage_requests]
    assert not any(had_token for _, _, had_token in hub.storage_requests), "the token stays on the Hub host"
    assert not stored_anywhere(hub, TOKEN) and TOKEN not in result.stdout + result.stderr


def call(url, method="POST", body=None, token=TOKEN):
    """One request to the test server: (status, response body bytes)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_the_test_hub_accepts_only_lfs_uploads_whose_bytes_match_their_oid(hub):
    hub.add_files("hvp-tester/strict", {"config.json": b"{}"})
    content = b"safetensors bytes" * 100
    sha = hashlib.sha256(content).hexdigest()
    commit_url = f"{hub.url}/api/models/hvp-tester/strict/commit/main"

    def commit(key, value):
        lines = [{"key": "header", "value": {"summary": "s"}}, {"key": key, "value": value}]
        return call(commit_url, body="\n".join(map(json.dumps, lines)).encode())[0]

    status, preupload = call(f"{hub.url}/api/models/hvp-tester/strict/preupload/main", body={"files": [
        {"path": "w/model.safetensors", "size": 9, "sample": ""}, {"path": "notes.txt", "size": 9, "sample": ""},
        {"path": "big.bin", "size": 10 * 1024 * 1024, "sample": ""}]})
    assert status == 200
    assert [f["uploadMode"] for f in json.loads(preupload)["files"]] == ["lfs", "regular", "lfs"]
    assert commit("file", {"path": "model.safetensors", "content": "eA==", "encoding": "base64"}) == 400
    assert commit("lfsFile", {"path": "model.safetensors", "algo": "sha256", "oid": sha, "size": len(content)}) == 422

    batch_url = f"{hub.url}/hvp-tester/strict.git/info/lfs/objects/batch"
    status, batch = call(batch_url, body={"operation": "upload", "transfers": ["basic"], "hash_algo": "sha256",
                                          "objects": [{"oid": sha, "size": len(content)}]})
    upload = json.loads(batch)["objects"][0]["actions"]["upload"]["href"]
    assert status == 200 and upload.startswith(hub.storage_url)
    assert call(f"{hub.storage_url}/lfs-upload/{'0' * 64}", "PUT", content, token=None)[0] == 403, "not granted"
    assert call(upload, "PUT", content[:-1] + b"!", token=None)[0] == 400, "wrong sha256"
    assert call(upload, "PUT", content[1:], token=None)[0] == 400, "wrong size"
    assert call(upload, "PUT", content, token=None)[0] == 200
    assert call(batch_url.replace("batch", "verify"), body={"oid": sha, "size": len(content)})[0] == 200
    assert commit("lfsFile", {"path": "model.safetensors", "algo": "sha256", "oid": sha, "size": len(content)}) == 200
    assert hub.file("hvp-tester/strict", "model.safetensors") == content
    status, again = call(batch_url, body={"operation": "upload", "objects": [{"oid": sha, "size": len(content)}]})
    assert "actions" not in json.loads(again)["objects"][0], "stored already: nothing to upload"
    assert call(batch_url, body={"operation": "upload", "objects": []}, token=None)[0] in (401, 403), "writes need a token"


CARD_EXPORTS = {  # name: (arch, image_size, small_stem)
    "resnet": ("resnet18", 32, False), "resnet-small-stem": ("resnet18", 32, True),
    "vit": ("vit_tiny", 64, False), "vit-small-stem": ("vit_tiny", 32, True),
}

PUSH_EXPORTS = r"""
import json, sys
import hvp_utils as hvp
import hvp_run
for name, (arch, size, small_stem, export) in json.loads(sys.argv[2]).items():
    config = {"arch": arch, "image_size": size, "small_stem": small_stem, "dataset": "zalando-datasets/fashion_mnist"}
    pusher = hvp_run.HubPusher(f"hvp-tester/card-{name}", "DINO", config, sys.argv[1], tries=1)
    pusher.push(export, step=5)
    print(name, "pushed:", pusher.close())
"""

RUN_THE_CARDS = r"""
import json, re, sys
import PIL.Image, timm, torch
from huggingface_hub import ModelCard
from safetensors.torch import save_file
out, facts = sys.argv[1], {}
for name, size in json.loads(sys.argv[2]).items():
    card = ModelCard.load(f"hvp-tester/card-{name}")
    usage = card.text[card.text.index("## Usage"):card.text.index("## Results")]
    snippets = re.findall(r"```python\n(.*?)```", usage, re.S)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    runs = []
    for i, code in enumerate(snippets):
        namespace = {"image": PIL.Image.new("RGB", (2 * size, 2 * size), (90, 120, 200))}
        exec(compile(code, f"<card {name} #{i}>", "exec"), namespace)
        model = namespace["model"]
        with torch.no_grad():
            save_file({"features": model(x).contiguous()}, f"{out}/{name}-{i}.safetensors")
        data = timm.data.resolve_data_config({}, model=model)
        runs.append({"code": code, "input_size": list(data["input_size"]), "mean": list(data["mean"]),
                     "transform_ok": "features" not in namespace or namespace["features"].shape == (1, model.num_features)})
    facts[name] = {"library": card.data.library_name, "runs": runs}
print(json.dumps(facts))
"""


def test_each_model_card_loads_its_architecture_with_identical_features(hub, tmp_path):
    import timm
    from safetensors.torch import load_file
    torch.manual_seed(0)
    models, exports, features = {}, {}, {}
    for name, (arch, size, small_stem) in CARD_EXPORTS.items():
        models[name] = hvp_run.create_backbone(arch, size, small_stem).eval()
        data = dict(TRAINING_DATA_CONFIG, input_size=(3, size, size))
        exports[name] = hvp_run.export_backbone(models[name], tmp_path / name / "backbone", data, "hvp_dino")
        with torch.no_grad():
            features[name] = models[name](torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)))
    jobs = {name: [*CARD_EXPORTS[name], str(exports[name])] for name in CARD_EXPORTS}
    pushed = ok(run_with_hub(["-c", PUSH_EXPORTS, tmp_path, json.dumps(jobs)], hub.url, tmp_path / "hf-push"))
    assert pushed.stdout.count("pushed: True") == 4

    ran = ok(run_with_hub(["-c", RUN_THE_CARDS, tmp_path, json.dumps({n: c[1] for n, c in CARD_EXPORTS.items()})],
                          hub.url, tmp_path / "hf-load", token=None))
    facts = json.loads(ran.stdout.strip().splitlines()[-1])
    for name, (arch, size, small_stem) in CARD_EXPORTS.items():
        runs = facts[name]["runs"]
        assert len(runs) == 2, (name, [r["code"] for r in runs])
        for i, run in enumerate(runs):  # every snippet on the card: the exported model, its data config
            assert torch.equal(load_file(tmp_path / f"{name}-{i}.safetensors")["features"], features[name]), (name, i)
            assert run["input_size"] == [3, size, size] and run["mean"] == list(hvp.IMAGENET_MEAN), (name, i)
            assert run["transform_ok"], (name, i)
        first, second = (run["code"] for run in runs)
        if name == "resnet-small-stem":  # plain timm cannot build it: say so, and load it another way
            assert facts[name]["library"] == hvp_run.HUB_CUSTOM_LIBRARY
            assert 'hvp_run.load_backbone("hf-hub:hvp-tester/card-resnet-small-stem")' in first
            assert "timm.create_model(\"hf-hub:" not in first + second and "nn.Identity()" in second
        else:
            assert facts[name]["library"] == "timm"
            assert f'timm.create_model("hf-hub:hvp-tester/card-{name}", pretrained=True)' in first
            assert 'pretrained_cfg_overlay=dict(\n        file=hf_hub_download(' in second
        if arch.startswith("vit"):
            assert f"img_size=[{size}, {size}]" in second and "dynamic_img_size=True" in second
            assert ("patch_size=4" in second) == small_stem

    # the same calls on the local export (the card's "local-dir:" note), and why the card lists model_args
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for name in ("resnet", "vit-small-stem"):
        with torch.no_grad():
            local = timm.create_model(f"local-dir:{exports[name]}", pretrained=True).eval()
            assert torch.equal(local(x), features[name])
    with torch.no_grad():
        assert torch.equal(hvp_run.load_backbone(exports["resnet-small-stem"])[0].eval()(x), features["resnet-small-stem"])
    with pytest.raises(RuntimeError, match="conv1.weight"):
        timm.create_model(f"local-dir:{exports['resnet-small-stem']}", pretrained=True)
    by_name_only = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=0,
                                     pretrained_cfg_overlay=dict(file=str(exports["vit-small-stem"] / "model.safetensors")))
    assert by_name_only.patch_embed.patch_size == (16, 16), "no error: the weights were resampled into a patch-16 ViT"


def test_a_failing_hub_is_retried_and_reported_and_training_and_checkpoints_stay_intact(hub, tiny_dataset, tmp_path):
    # a repo to start from (--init_from hf-hub:...) that the server still serves while every write fails
    hvp_run.export_backbone(hvp_run.create_backbone("test_resnet", 32), tmp_path / "init", {"input_size": (3, 32, 32)}, "init")
    hub.add_files("hvp-tester/init", {p.name: p.read_bytes() for p in (tmp_path / "init").iterdir()})
    hub.fail(500, methods={"POST"})
    out = tmp_path / "run"
    result = run_with_hub(train(out, tiny_dataset, "--max_steps", 2, "--save_every", 1, "--push_to_hub",
                                "--hub_model_id", "hvp-tester/failing", "--hub_every", 1,
                                "--init_from", "hf-hub:hvp-tester/init"), hub.url, tmp_path / "hf")
    assert result.returncode == 2, "a scheduler or CI sees that the final push failed"
    assert result.stderr.strip().splitlines()[-1] == ("error: training finished and is saved, but its final Hub push "
                                                      "did not complete (see the hub: line above)")
    assert "backbone initialised from hf-hub:hvp-tester/init" in result.stdout
    assert "k-NN (k=20, T=0.07)" in result.stdout, "training ran to its end"
    assert re.search(r"push of step 2 to hvp-tester/failing failed \(try 1/3\): .*500", result.stderr)
    assert "failed after 3 tries" in result.stderr and "hf upload hvp-tester/failing" in result.stderr
    assert "Traceback" not in result.stderr and TOKEN not in result.stdout + result.stderr
    assert sum(1 for m, p, _ in hub.requests if p == "/api/repos/create") >= 3, "retried"
    assert "hvp-tester/failing" not in hub.repos
    assert hvp_run.load_checkpoint(hvp_run.latest_checkpoint(out))["step"] == 2
    hvp_run.load_backbone(out)
    kept = sorted(p.name for p in (out / "hub_upload" / "backbone").iterdir())
    assert kept == ["README.md", "config.json", "model.safetensors"], "what the last push would have uploaded"
    assert files_containing(out, TOKEN) == [], "the kept card and config do not hold the token"

    # once the Hub is back, the printed command uploads it
    hub.fail(None)
    command = re.search(r"upload it later with: hf upload (\S+) (\S+) \.", result.stderr).groups()
    cli = "from huggingface_hub.cli.hf import main; main()"
    ok(run_with_hub(["-c", cli, "upload", *command, "."], hub.url, tmp_path / "hf"))
    assert hub.file("hvp-tester/failing", "model.safetensors") == (out / "backbone" / "model.safetensors").read_bytes()


PUSH_TO_A_DOWN_HUB = r"""
import sys
import hvp_utils as hvp
import hvp_run
pusher = hvp_run.HubPusher("hvp-tester/down", "SimSiam", {"arch": "test_resnet"}, sys.argv[1], tries=2)
pusher.push(sys.argv[2], step=7)
print("pushed:", pusher.close())
"""


def test_a_hub_that_is_down_is_reported_and_the_export_is_kept(hub, tmp_path):
    export = hvp_run.export_backbone(hvp_run.create_backbone("test_resnet", 32), tmp_path / "backbone", {}, "t")
    before = {p.name: p.read_bytes() for p in export.iterdir()}
    hub.stop()
    result = ok(run_with_hub(["-c", PUSH_TO_A_DOWN_HUB, tmp_path, export], hub.url, tmp_path / "hf"))
    assert "pushed: False" in result.stdout
    assert "failed (try 1/2)" in result.stderr and "failed after 2 tries" in result.stderr
    assert {p.name: p.read_bytes() for p in export.iterdir()} == before
    assert (tmp_path / "hub_upload" / "backbone" / "model.safetensors").read_bytes() == before["model.safetensors"]


PUSH_TO_A_SILENT_HUB = r"""
import sys, time
import hvp_run
pusher = hvp_run.HubPusher("hvp-tester/silent", "SimSiam", {"arch": "test_resnet"}, sys.argv[1], tries=2)
pusher.push(sys.argv[2], step=3)
start = time.monotonic()
print("pushed:", pusher.close(), flush=True)
print(f"closed after {time.monotonic() - start:.1f} s", flush=True)
"""


@pytest.fixture
def silent_hub():
    from hub_server import SilentHub
    server = SilentHub().start()
    yield server
    server.stop()


def abandoned_lines(stderr):
    return [line for line in stderr.splitlines() if "abandoned" in line]


def seconds_to_close(stdout):
    return float(re.search(r"closed after ([\d.]+) s", stdout).group(1))


def test_a_hub_that_never_answers_is_abandoned_at_the_close_deadline_and_the_export_kept(silent_hub, tmp_path):
    export = hvp_run.export_backbone(hvp_run.create_backbone("test_resnet", 32), tmp_path / "backbone", {}, "t")
    result = ok(run_with_hub(["-c", PUSH_TO_A_SILENT_HUB, tmp_path, export], silent_hub.url, tmp_path / "hf",
                             timeout=120, HVP_HUB_CLOSE_TIMEOUT="2"))
    assert "pushed: False" in result.stdout and seconds_to_close(result.stdout) < 10
    assert silent_hub.connections >= 1, "the push did reach the silent server"
    kept = tmp_path / "hub_upload" / "backbone"
    assert abandoned_lines(result.stderr) == [
        f"hub: not done after 2 s: push of step 3 to hvp-tester/silent abandoned. The local checkpoints are intact; "
        f"upload it later with: hf upload hvp-tester/silent {kept} ."]
    assert (kept / "model.safetensors").read_bytes() == (export / "model.safetensors").read_bytes()
    assert (kept / "README.md").is_file()
    assert not list(tmp_path.glob(".hub-push-*")), "the abandoned push's staging folder was moved, not left"


def test_every_hub_request_has_a_timeout_so_a_silent_hub_fails_its_tries(silent_hub, tmp_path):
    export = hvp_run.export_backbone(hvp_run.create_backbone("test_resnet", 32), tmp_path / "backbone", {}, "t")
    result = ok(run_with_hub(["-c", PUSH_TO_A_SILENT_HUB, tmp_path, export], silent_hub.url, tmp_path / "hf",
                             timeout=120, HVP_HUB_TIMEOUT="0.5", HVP_HUB_CLOSE_TIMEOUT="100"))
    assert "pushed: False" in result.stdout and seconds_to_close(result.stdout) < 50
    assert "failed (try 1/2)" in result.stderr and "failed after 2 tries" in result.stderr
    assert abandoned_lines(result.stderr) == [], "the tries ended by themselves, before the deadline"
    assert (tmp_path / "hub_upload" / "backbone" / "model.safetensors").is_file()


def test_a_stop_signal_ends_the_wait_for_a_silent_hub(silent_hub, tmp_path):
    import signal
    import time
    export = hvp_run.export_backbone(hvp_run.create_backbone("test_resnet", 32), tmp_path / "backbone", {}, "t")
    process = subprocess.Popen([sys.executable, "-c", PUSH_TO_A_SILENT_HUB, str(tmp_path), str(export)], cwd=REPO,
                               env=hub_env(silent_hub.url, tmp_path / "hf", HVP_HUB_CLOSE_TIMEOUT="300"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        waiting = process.stdout.readline()  # printed once close() listens for the signal
        assert waiting.startswith("hub: waiting for the push of step 3 to hvp-tester/silent (at most 300 s")
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0 and "pushed: False" in stdout and seconds_to_close(stdout) < 20
    (line,) = abandoned_lines(stderr)
    assert line.startswith("hub: SIGTERM received: push of step 3 to hvp-tester/silent abandoned.")
    assert (tmp_path / "hub_upload" / "backbone" / "model.safetensors").is_file()



def test_sigterm_during_training_does_not_wait_for_a_silent_hub(silent_hub, tiny_dataset, tmp_path):
    import signal
    import time
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, *map(str, train(out, tiny_dataset, "--max_steps", 500, "--save_every", 2, "--log_every", 1,
                                          "--eval_split", "", "--push_to_hub", "--hub_model_id", "hvp-tester/silent",
                                          "--hub_every", 1))],
        cwd=REPO, env=hub_env(silent_hub.url, tmp_path / "hf", HVP_HUB_CLOSE_TIMEOUT="300", HVP_HUB_TIMEOUT="300"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while silent_hub.connections == 0 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)  # until a periodic push hangs on the silent server
        assert silent_hub.connections >= 1, "no push reached the silent server"
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
        took = time.monotonic() - signalled
    finally:
        process.kill()
    assert process.returncode == 0, stderr[-3000:]
    assert took < 30, f"the run waited {took:.0f} s after SIGTERM"
    assert "SIGTERM: saved" in stdout and "abandoned" in stderr
    assert (out / "hub_upload" / "backbone" / "model.safetensors").is_file()
    assert not list(out.glob(".hub-push-*"))

def test_an_unknown_hub_repo_is_a_one_line_error(hub, tiny_dataset, tmp_path):
    result = run_with_hub(["eval/knn.py", "--backbone", "hf-hub:hvp-tester/no-such-repo", "--dataset", tiny_dataset,
                           "--output", tmp_path / "knn.json"], hub.url, tmp_path / "hf")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: no model repo 'hvp-tester/no-such-repo' on {hub.url} (check the name; a private repo needs "
        "`hf auth login` or HF_TOKEN)")
    assert not (tmp_path / "knn.json").exists()


def test_push_to_hub_without_a_token_or_repo_id_is_a_one_line_error_before_anything_is_written(hub, tiny_dataset,
                                                                                             tmp_path):
    result = run_with_hub(train(tmp_path / "out", tiny_dataset, "--max_steps", 1, "--push_to_hub"), hub.url,
                          tmp_path / "hf", token=None)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --push_to_hub needs a Hugging Face token")
    assert "--hub_model_id" in result.stderr
    assert not (tmp_path / "out").exists() and hub.requests == []


class FakeAccelerator:
    is_main_process, num_processes, mixed_precision = True, 1, "no"


@pytest.mark.parametrize("flags,message", [
    (dict(hub_model_id="me/x"), "--hub_model_id only takes effect with --push_to_hub"),
    (dict(hub_every=5), "--hub_every only takes effect with --push_to_hub"),
    (dict(push_to_hub=True, hub_model_id="me/bad name"), "--hub_model_id 'me/bad name' is not a valid Hub repo id"),
    (dict(push_to_hub=True, hub_model_id="me/x", hub_every=-1), "--hub_every must be >= 0"),
])
def test_bad_hub_flags_are_one_line_errors(flags, message, monkeypatch, tmp_path):
    from huggingface_hub import constants
    from train_simsiam import Config
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(hvp_run.HVPError, match="^" + re.escape(message)):
        hvp_run.HubPusher.from_config(Config(output_dir=str(tmp_path / "out"), **flags), FakeAccelerator(), "SimSiam")


def test_the_repo_name_defaults_to_the_output_folder_and_pushes_are_due_every_n_steps(monkeypatch, tmp_path):
    from huggingface_hub import constants
    from train_simsiam import Config
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    pusher = hvp_run.HubPusher.from_config(Config(output_dir=str(tmp_path / "hvp simsiam"), push_to_hub=True, hub_every=10),
                                       FakeAccelerator(), "SimSiam")
    assert pusher.repo_id == "hvp-simsiam"  # create_repo puts a bare name in the token owner's namespace
    assert [pusher.due(s) for s in (5, 10)] == [False, True]
    not_main = type("Worker", (FakeAccelerator,), {"is_main_process": False})()
    assert not hvp_run.HubPusher.from_config(Config(push_to_hub=True), not_main, "SimSiam").due(10)


def test_init_from_copies_the_weights_and_rejects_another_architecture(tmp_path):
    source = hvp_run.create_backbone("test_resnet", 32)
    hvp_run.export_backbone(source, tmp_path / "export", {}, "t")
    target = hvp_run.init_backbone(hvp_run.create_backbone("test_resnet", 32), tmp_path / "export")
    for name, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[name]), name
    with pytest.raises(hvp_run.HVPError, match="does not fit --arch"):
        hvp_run.init_backbone(hvp_run.create_backbone("resnet18", 32), tmp_path / "export")


LOAD_HVP_IN_A_FRESH_PROCESS = r"""
import sys, torch
import hvp_utils as hvp
import hvp_run
repo, local = sys.argv[1], sys.argv[2]
x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    print(torch.equal(hvp_run.load_backbone(f"hf-hub:{repo}")[0].eval()(x), hvp_run.load_backbone(local)[0].eval()(x)))
"""

OTHER_SCRIPTS = {
    "train_ibot.py": ["--arch", "vit_tiny", "--small_stem", "--image_size", "16", "--local_size", "8",
                      "--batch_size", "8", "--out_dim", "64", "--patch_out_dim", "64", "--hidden_dim", "64",
                      "--bottleneck_dim", "32", "--global_views", "4", "--local_views", "2", "--local_crops_number", "1"],
    "train_dino.py": ["--arch", "vit_tiny", "--small_stem", "--image_size", "16", "--local_size", "8",
                      "--batch_size", "8", "--out_dim", "64", "--hidden_dim", "64", "--bottleneck_dim", "32",
                      "--global_views", "4", "--local_views", "2", "--local_crops_number", "1"],
}


@pytest.mark.parametrize("script", sorted(OTHER_SCRIPTS))  # SimSiam above; SimCLR pushes through the same hvp_run.Run
def test_the_vit_scripts_push_their_exported_teacher(script, hub, tiny_dataset, tmp_path):
    out, repo = tmp_path / "run", f"hvp-tester/{script[6:-3]}-tiny"
    ok(run_with_hub([script, "--dataset", tiny_dataset, "--output_dir", out, *OTHER_SCRIPTS[script], "--max_steps", 1,
                     "--num_workers", 0, "--report_to", "none", "--mixed_precision", "no", "--push_to_hub",
                     "--hub_model_id", repo], hub.url, tmp_path / "hf-train"))
    loaded = ok(run_with_hub(["-c", LOAD_HVP_IN_A_FRESH_PROCESS, repo, out / "backbone"], hub.url,
                             tmp_path / "hf-load", token=None))
    assert loaded.stdout.strip().splitlines()[-1] == "True"
    assert files_containing(out, TOKEN) == []
