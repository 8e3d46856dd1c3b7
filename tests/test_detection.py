"""eval/detection.py (Mask R-CNN transfer on COCO-format data) and tools/export_detection.py (backbones in
detectron2 / ViTDet / MMDetection / MMSegmentation layouts): key maps, file formats, one-line errors, and a
few training steps end to end on a tiny shapes dataset.

detectron2 and MMDetection/MMSegmentation cannot be installed here (no detectron2 wheel on PyPI; mmdet 3
needs mmcv's compiled ops), so the exports are checked against the names those libraries use, their
file formats, torchvision's ResNet, and a round trip back into timm."""
import json
import pickle
import sys

import numpy as np
import pytest
import torch

import hvp_run
from conftest import REPO, run_script

sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "eval"))
import detection  # noqa: E402
import export_detection  # noqa: E402



# ----------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return detection.write_shapes_dataset(tmp_path_factory.mktemp("shapes") / "set")


@pytest.fixture(scope="module")
def resnet18_export(tmp_path_factory):
    torch.manual_seed(0)
    return hvp_run.export_backbone(hvp_run.create_backbone("resnet18").eval(), tmp_path_factory.mktemp("r18") / "backbone",
                                   {"input_size": (3, 64, 64)}, "hvp_test")


@pytest.fixture(scope="module")
def resnet50_export(tmp_path_factory):
    torch.manual_seed(0)
    return hvp_run.export_backbone(hvp_run.create_backbone("resnet50").eval(), tmp_path_factory.mktemp("r50") / "backbone",
                                   {"input_size": (3, 64, 64)}, "hvp_test")


@pytest.fixture(scope="module")
def vit_export(tmp_path_factory):
    torch.manual_seed(0)
    vit = hvp_run.create_backbone("vit_tiny", 32, depth=2, embed_dim=32, num_heads=2, pos_embed_resample="dino")
    return hvp_run.export_backbone(vit.eval(), tmp_path_factory.mktemp("vit") / "backbone", {"input_size": (3, 32, 32)},
                                   "hvp_test")


def features(model, size):
    torch.manual_seed(1)
    with torch.no_grad():
        return model.eval().forward_features(torch.randn(2, 3, size, size))


def round_trip(export_folder, fmt, tmp_path):
    """Export, read the file back as the target library would, rename to timm and load strictly into a
    zeroed copy of the backbone: (original model, reloaded model)."""
    import copy
    weights, _ = export_detection.export(str(export_folder), fmt, str(tmp_path / f"w{export_detection.suffixes(fmt)[0]}"))
    if weights.suffix == ".pkl":
        with open(weights, "rb") as f:
            stored = pickle.load(f)["model"]
    else:
        stored = torch.load(weights, map_location="cpu", weights_only=True)["state_dict"]
    original, _ = hvp_run.load_backbone(str(export_folder))
    reloaded = copy.deepcopy(original)
    for p in reloaded.state_dict().values():
        p.zero_()
    names = export_detection.target_names(original, fmt)
    reloaded.load_state_dict(export_detection.from_target(stored, names), strict=True)
    return original, reloaded


# ----------------------------------------------------------------------------------- key maps

@pytest.mark.parametrize("arch,fmt", [("resnet50", "detectron2"), ("resnet50", "mmdet"), ("resnet18", "detectron2"),
                                      ("vit", "vitdet"), ("vit", "mmseg")])
def test_key_map_is_a_bijection_over_the_backbone_keys(arch, fmt):
    model = (hvp_run.create_backbone(arch) if arch != "vit" else
             hvp_run.create_backbone("vit_tiny", 32, depth=2, embed_dim=32, num_heads=2))
    names = export_detection.target_names(model, fmt)
    assert list(names) == list(model.state_dict())
    assert len(set(names.values())) == len(names)
    back = export_detection.from_target(export_detection.to_target(model.state_dict(), names), names)
    assert list(back) == list(model.state_dict())


def test_detectron2_names_follow_its_resnet_layout():
    names = export_detection.target_names(hvp_run.create_backbone("resnet50"), "detectron2")
    targets = set(names.values())
    for key in ("stem.conv1.weight", "stem.conv1.norm.running_var", "res2.0.conv1.weight", "res2.0.conv3.norm.bias",
                "res2.0.shortcut.weight", "res2.0.shortcut.norm.weight", "res5.2.conv3.norm.running_mean"):
        assert key in targets
    assert {k.split(".")[0] for k in targets} == {"stem", "res2", "res3", "res4", "res5"}
    assert names["layer3.5.bn2.weight"] == "res4.5.conv2.norm.weight"


def test_mmdet_names_are_torchvision_resnet_names():
    import torchvision
    names = export_detection.target_names(hvp_run.create_backbone("resnet50"), "mmdet")
    assert set(names.values()) == set(torchvision.models.resnet50().state_dict()) - {"fc.weight", "fc.bias"}


def test_mmseg_names_follow_its_vision_transformer_layout():
    vit = hvp_run.create_backbone("vit_tiny", 32, depth=2, embed_dim=32, num_heads=2)
    names = export_detection.target_names(vit, "mmseg")
    assert names["blocks.1.attn.qkv.weight"] == "layers.1.attn.attn.in_proj_weight"
    assert names["blocks.0.attn.proj.bias"] == "layers.0.attn.attn.out_proj.bias"
    assert names["blocks.0.mlp.fc1.weight"] == "layers.0.ffn.layers.0.0.weight"
    assert names["blocks.0.mlp.fc2.bias"] == "layers.0.ffn.layers.1.bias"
    assert names["blocks.0.norm2.weight"] == "layers.0.ln2.weight"
    assert names["norm.weight"] == "ln1.weight"
    assert names["patch_embed.proj.weight"] == "patch_embed.projection.weight"


def test_vitdet_names_are_timm_names_under_backbone_net():
    vit = hvp_run.create_backbone("vit_tiny", 32, depth=2, embed_dim=32, num_heads=2)
    names = export_detection.target_names(vit, "vitdet")
    assert all(v == f"backbone.net.{k}" for k, v in names.items())


# ----------------------------------------------------------------------------------- files

@pytest.mark.parametrize("fmt", ["detectron2", "mmdet"])
def test_resnet50_export_round_trip_gives_identical_features(resnet50_export, fmt, tmp_path):
    original, reloaded = round_trip(resnet50_export, fmt, tmp_path)
    assert torch.equal(features(original, 32), features(reloaded, 32))


@pytest.mark.parametrize("fmt", ["vitdet", "mmseg"])
def test_vit_export_round_trip_gives_identical_features(vit_export, fmt, tmp_path):
    original, reloaded = round_trip(vit_export, fmt, tmp_path)
    assert torch.equal(features(original, 48), features(reloaded, 48))


def test_detectron2_file_is_a_model_zoo_pickle_of_numpy_arrays(resnet18_export, tmp_path):
    weights, settings = export_detection.export(str(resnet18_export), "detectron2", str(tmp_path / "r18.pkl"))
    with open(weights, "rb") as f:
        blob = pickle.load(f, encoding="latin1")  # how DetectionCheckpointer opens .pkl files
    assert blob["__author__"] == "HVP" and blob["matching_heuristics"] is True
    assert all(isinstance(v, np.ndarray) for v in blob["model"].values())
    assert "stem.conv1.weight" in blob["model"]


def test_detectron2_settings_say_rgb_pixel_stats_stride_and_syncbn(resnet50_export, tmp_path):
    import yaml
    _, settings = export_detection.export(str(resnet50_export), "detectron2", str(tmp_path / "r50.pkl"))
    text = yaml.safe_load(settings.read_text())
    assert text["INPUT"]["FORMAT"] == "RGB"
    assert text["MODEL"]["PIXEL_MEAN"] == pytest.approx([123.675, 116.28, 103.53])
    assert text["MODEL"]["PIXEL_STD"] == pytest.approx([58.395, 57.12, 57.375])
    assert text["MODEL"]["RESNETS"] == {"DEPTH": 50, "RES2_OUT_CHANNELS": 256, "STRIDE_IN_1X1": False, "NORM": "SyncBN"}
    assert text["MODEL"]["WEIGHTS"] == str((tmp_path / "r50.pkl").resolve())


def test_mmdet_export_loads_into_torchvision_detection_backbone(resnet50_export, tmp_path):
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    weights, _ = export_detection.export(str(resnet50_export), "mmdet", str(tmp_path / "r50.pth"))
    state = torch.load(weights, map_location="cpu", weights_only=True)["state_dict"]  # what init_cfg Pretrained reads
    fpn = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=5)
    fpn.body.load_state_dict(state, strict=True)  # FrozenBatchNorm2d drops num_batches_tracked itself
    original, _ = hvp_run.load_backbone(str(resnet50_export))
    assert torch.equal(fpn.body.layer4[2].conv3.weight, original.layer4[2].conv3.weight)


def test_mmdet_settings_name_the_pytorch_style_and_syncbn(resnet50_export, tmp_path):
    _, settings = export_detection.export(str(resnet50_export), "mmdet", str(tmp_path / "r50.pth"))
    namespace = {}
    exec(settings.read_text(), namespace)  # an MMEngine config is Python
    backbone = namespace["model"]["backbone"]
    assert backbone["style"] == "pytorch" and backbone["depth"] == 50
    assert backbone["norm_cfg"]["type"] == "SyncBN" and backbone["norm_eval"] is False
    assert backbone["init_cfg"] == {"type": "Pretrained", "checkpoint": str((tmp_path / "r50.pth").resolve())}
    assert namespace["model"]["data_preprocessor"]["bgr_to_rgb"] is True


# ----------------------------------------------------------------------------------- what cannot be exported

def cli_error(main, argv, capsys, monkeypatch):
    """Run a script's main() as its command line does (hvp_run.run_main); returns the one line it printed
    to stderr, after checking the exit status 2."""
    monkeypatch.setattr(sys, "argv", ["script", *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        hvp_run.run_main(main)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error
    return error


def export_error(model, fmt, tmp_path, capsys, monkeypatch):
    folder = hvp_run.export_backbone(model, tmp_path / "backbone", {"input_size": (3, 32, 32)}, "hvp_test")
    error = cli_error(export_detection.main, ["--backbone", folder, "--format", fmt, "--output", tmp_path / "out.pkl"],
                      capsys, monkeypatch)
    assert not (tmp_path / "out.pkl").exists() and not (tmp_path / "out.yaml").exists()
    return error


def test_small_stem_resnet_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    error = export_error(hvp_run.create_backbone("resnet18", 32, small_stem=True), "detectron2", tmp_path, capsys,
                         monkeypatch)
    assert error.startswith("error: a small-stem ResNet")


def test_vit_with_layer_scale_is_refused_rather_than_dropping_it(tmp_path, capsys, monkeypatch):
    vit = hvp_run.create_backbone("vit_tiny", 32, depth=2, embed_dim=32, num_heads=2, init_values=1e-5)
    error = export_error(vit, "mmseg", tmp_path, capsys, monkeypatch)
    assert "ls1.gamma" in error and "drop" in error


def test_vit_asked_for_in_a_resnet_format_is_refused(vit_export, tmp_path):
    with pytest.raises(hvp_run.HVPError, match="--format detectron2 is for ResNets"):
        export_detection.export(str(vit_export), "detectron2", str(tmp_path / "v.pkl"))


def test_resnet_d_is_refused():
    with pytest.raises(hvp_run.HVPError, match="stem"):
        export_detection.target_names(hvp_run.create_backbone("resnet18d"), "mmdet")


# ----------------------------------------------------------------------------------- eval/detection.py

def test_detection_help_lists_protocol_defaults():
    result = run_script(["eval/detection.py", "--help"])
    assert "--train_annotations" in result.stdout and "90000" in result.stdout and "0.7" in result.stdout


def test_dataset_maps_categories_and_masks(shapes):
    dataset = detection.CocoInstances(shapes / "images", detection.load_coco(shapes / "instances.json"), train=False)
    image, target = dataset[0]
    assert image.shape == (3, 64, 64) and 0 <= float(image.min()) and float(image.max()) <= 1
    assert target["labels"].tolist() == [1, 2]  # category 5 -> 1, 9 -> 2
    assert target["masks"].shape == (2, 64, 64) and target["masks"].sum() > 0
    x0, y0, x1, y1 = target["boxes"][0].tolist()
    assert target["masks"][0, int(y0):int(y1), int(x0):int(x1)].float().mean() > 0.9  # the polygon fills its box


def test_resolve_config_fills_the_protocol_defaults_and_scales_lr_steps():
    resnet = detection.resolve_config(detection.Config(), "resnet")
    assert (resnet.lr, resnet.max_iter, resnet.lr_steps, resnet.max_size) == (0.02, 90000, "60000,80000", 1333)
    vit = detection.resolve_config(detection.Config(max_iter=1000, lr=2e-4), "vit")
    assert (vit.lr, vit.layer_decay, vit.drop_path, vit.lr_steps) == (2e-4, 0.7, 0.1, "889,963")


def detection_args(backbone, shapes, output):
    """A few CPU steps on the shapes: 64 px, 2 iterations of 2 images, a narrow pyramid, 5 detections."""
    return ["--backbone", backbone, "--train_images", shapes / "images", "--train_annotations", shapes / "instances.json",
            "--val_images", shapes / "images", "--val_annotations", shapes / "instances.json", "--max_iter", 2,
            "--batch_size", 2, "--min_size", 64, "--max_size", 96, "--test_min_size", 64, "--fpn_channels", 32,
            "--detections_per_image", 5, "--num_workers", 0, "--output", output]


def check_ap(result):
    for kind in ("box_ap", "mask_ap"):
        assert set(result[kind]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert all(v == -1 or 0 <= v <= 100 for v in result[kind].values())


def test_resnet_runs_end_to_end_and_writes_box_and_mask_ap(resnet18_export, shapes, tmp_path):
    run_script(["eval/detection.py", *detection_args(resnet18_export, shapes, tmp_path / "det.json")], timeout=240)
    result = json.loads((tmp_path / "det.json").read_text())
    check_ap(result)
    assert result["protocol"] == "resnet" and result["config"]["norm"] == "syncbn"
    assert result["losses"][-1]["iteration"] == 2


def test_vit_runs_end_to_end_through_the_simple_feature_pyramid(vit_export, shapes, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["detection.py", *map(str, detection_args(vit_export, shapes, tmp_path / "det.json"))])
    detection.main()  # in this process: the ResNet run above goes through the command line
    result = json.loads((tmp_path / "det.json").read_text())
    check_ap(result)
    assert result["protocol"] == "vit" and result["config"]["layer_decay"] == 0.7


def test_simple_feature_pyramid_gives_strides_4_to_64_for_patch_16(vit_export):
    vit, _ = hvp_run.load_backbone(str(vit_export))
    pyramid = detection.vit_pyramid(vit, detection.resolve_config(detection.Config(), "vit"))
    out = pyramid(torch.randn(1, 3, 64, 128))
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(16, 32), (8, 16), (4, 8), (2, 4), (1, 2)]
    assert list(out) == ["0", "1", "2", "3", "pool"]


def test_vit_layer_decay_scales_blocks_by_depth(vit_export):
    vit, _ = hvp_run.load_backbone(str(vit_export))
    cfg = detection.resolve_config(detection.Config(fpn_channels=16), "vit")
    model = detection.build_model(cfg, vit, 2, (0.5,) * 3, (0.5,) * 3, 1, torch.device("cpu"))
    scale_of = {id(p): g["lr_scale"] for g in detection.param_groups(model, cfg) for p in g["params"]}
    blocks = model.backbone.vit.blocks
    assert scale_of[id(model.backbone.vit.pos_embed)] == pytest.approx(0.7 ** 3)
    assert scale_of[id(blocks[0].attn.qkv.weight)] == pytest.approx(0.7 ** 2)
    assert scale_of[id(blocks[1].attn.qkv.weight)] == pytest.approx(0.7)
    assert scale_of[id(model.roi_heads.box_predictor.cls_score.weight)] == 1.0


def test_missing_annotations_is_a_one_line_error(resnet18_export, tmp_path, capsys, monkeypatch):
    error = cli_error(detection.main, ["--backbone", resnet18_export, "--train_images", tmp_path, "--train_annotations",
                                       tmp_path / "none.json", "--val_images", tmp_path, "--val_annotations",
                                       tmp_path / "none.json"], capsys, monkeypatch)
    assert error.startswith("error: --train_annotations")
