"""Checkpoints and backbone exports: complete or absent, never pickled, loadable by timm."""
import json

import pytest
import timm
import torch

import hvp_utils as hvp
import hvp_run


def nested_state():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 7, "scaler": None,
            "config": {"arch": "x", "scale": (0.2, 1.0), "flag": True, "lr": float("inf")}}


def assert_same(a, b):
    if torch.is_tensor(a):
        assert torch.equal(a, b) and a.dtype == b.dtype
    elif isinstance(a, dict):
        assert list(a) == list(b)  # same keys, same key types, same order
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_checkpoint_round_trip_keeps_every_value_and_type(tmp_path):
    state = nested_state()
    path = hvp_run.save_checkpoint(tmp_path, 7, state)
    assert path.name == "checkpoint-00000007"
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "state.json", "state.safetensors"]  # no pickle
    assert_same(state, hvp_run.load_checkpoint(path))
    opt = torch.optim.AdamW(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).parameters())
    opt.load_state_dict(hvp_run.load_checkpoint(path)["optimizer"])  # int keys survive JSON


def test_latest_checkpoint_and_pruning(tmp_path):
    for step in (5, 10, 15):
        hvp_run.save_checkpoint(tmp_path, step, {"step": step}, keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint-00000010", "checkpoint-00000015"]
    assert hvp_run.latest_checkpoint(tmp_path).name == "checkpoint-00000015"
    assert hvp_run.latest_checkpoint(tmp_path / "checkpoint-00000010").name == "checkpoint-00000010"
    assert hvp_run.latest_checkpoint(tmp_path / "nothing-here") is None


@pytest.mark.parametrize("fail_in", ["save_file", "_replace_dir"])
def test_a_crash_while_saving_leaves_the_previous_checkpoint_as_latest(tmp_path, monkeypatch, fail_in):
    hvp_run.save_checkpoint(tmp_path, 1, {"step": 1, "w": torch.ones(3)})

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("killed while saving")

    if fail_in == "save_file":
        import safetensors.torch
        monkeypatch.setattr(safetensors.torch, "save_file", boom)
    else:
        monkeypatch.setattr(hvp_run.checkpoints, "_replace_dir", boom)
    with pytest.raises(KeyboardInterrupt):
        hvp_run.save_checkpoint(tmp_path, 2, {"step": 2, "w": torch.zeros(3)})
    latest = hvp_run.latest_checkpoint(tmp_path)
    assert latest.name == "checkpoint-00000001"
    assert torch.equal(hvp_run.load_checkpoint(latest)["w"], torch.ones(3))
    hvp_run.cleanup_partial_checkpoints(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000001"]


def test_a_checkpoint_changed_after_saving_is_found_by_its_checksums(tmp_path):
    path = hvp_run.save_checkpoint(tmp_path, 3, {"w": torch.arange(64.0)})
    assert hvp_run.checkpoint_problem(path) is None
    data = bytearray((path / "state.safetensors").read_bytes())
    data[-8:] = bytes(8)  # the same size, other values: damaged in place
    (path / "state.safetensors").write_bytes(bytes(data))
    assert "does not match its checksum" in hvp_run.checkpoint_problem(path)
    (path / "state.json").write_text((path / "state.json").read_text() + " ")
    assert "state.json has" in hvp_run.checkpoint_problem(path) or "checksum" in hvp_run.checkpoint_problem(path)
    (path / "state.safetensors").unlink()
    assert "missing" in hvp_run.checkpoint_problem(path)


def test_a_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = hvp_run.save_checkpoint(tmp_path, 3, {"w": torch.ones(2)})
    (path / "state.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(hvp_run.HVPError, match="cannot read checkpoint"):
        hvp_run.load_checkpoint(path)


DATA = {"input_size": (3, 32, 32), "interpolation": "bicubic", "crop_pct": 0.875,
        "mean": hvp.IMAGENET_MEAN, "std": hvp.IMAGENET_STD}


@pytest.mark.parametrize("arch,small_stem", [("resnet18", False), ("vit_tiny", True)])
def test_exported_backbone_loads_with_plain_timm(tmp_path, arch, small_stem):
    backbone = hvp_run.create_backbone(arch, 32, small_stem).eval()
    out = hvp_run.export_backbone(backbone, tmp_path / "backbone", DATA, "hvp_test")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["pretrained_cfg"]["tag"] == "hvp_test" and config["num_classes"] == 0
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(backbone(x), loaded(x))


def test_small_stem_resnet_round_trips_through_load_backbone(tmp_path):
    backbone = hvp_run.create_backbone("resnet18", 28, small_stem=True).eval()
    assert backbone.conv1.stride == (1, 1) and isinstance(backbone.maxpool, torch.nn.Identity)
    hvp_run.export_backbone(backbone, tmp_path / "backbone", DATA, "hvp_test")
    for source in (tmp_path / "backbone", tmp_path):  # export folder, or the output folder holding it
        loaded, config = hvp_run.load_backbone(source)
        x = torch.randn(2, 3, 28, 28)
        with torch.no_grad():
            assert torch.equal(backbone(x), loaded.eval()(x))


def test_checkpoint_folder_holds_the_backbone_export(tmp_path):
    backbone = hvp_run.create_backbone("resnet18", 32).eval()
    path = hvp_run.save_checkpoint(tmp_path, 4, {"step": 4}, backbone, DATA, "hvp_test")
    loaded, _ = hvp_run.load_backbone(path)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(backbone(x), loaded.eval()(x))


def test_unknown_arch_and_unsupported_small_stem_are_clear_errors():
    with pytest.raises(hvp_run.HVPError, match="unknown --arch 'resnet_does_not_exist'"):
        hvp_run.create_backbone("resnet_does_not_exist")
    with pytest.raises(hvp_run.HVPError, match="--small_stem supports"):
        hvp_run.create_backbone("convnext_atto", 32, small_stem=True)


def test_no_backbone_at_path_is_a_clear_error(tmp_path):
    with pytest.raises(hvp_run.HVPError, match="no backbone found"):
        hvp_run.load_backbone(tmp_path)


def test_the_export_names_the_weights_licence_instead_of_the_one_timm_copies(tmp_path):
    model = hvp_run.create_backbone("test_resnet", 32)
    default = hvp_run.export_backbone(model, tmp_path / "default", {}, "t")
    chosen = hvp_run.export_backbone(model, tmp_path / "chosen", {}, "t", license="cc-by-4.0")
    assert timm.create_model("test_resnet").pretrained_cfg.get("license") != "mit"  # what timm would copy
    assert json.loads((default / "config.json").read_text())["pretrained_cfg"]["license"] == hvp_run.HUB_LICENSE
    assert json.loads((chosen / "config.json").read_text())["pretrained_cfg"]["license"] == "cc-by-4.0"
