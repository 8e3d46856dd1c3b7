"""eval/knn.py, eval/linear.py, eval/finetune.py, eval/transfer.py: features, backbone sources, probes,
undecodable images, presets, bad inputs."""
import json
import sys

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import hvp_utils as hvp
import hvp_run
from conftest import REPO, run_script

from eval import common, finetune, knn, linear, transfer  # noqa: E402

COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 230, 230)]


def colour_images(count, seed):
    """Solid-colour 12 px images with pixel noise: the class is the colour (linearly separable)."""
    gen = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for i in range(count):
        label = i % len(COLOURS)
        pixels = torch.tensor(COLOURS[label]).view(1, 1, 3) + torch.randint(-25, 26, (12, 12, 3), generator=gen)
        images.append(Image.fromarray(pixels.clamp(0, 255).to(torch.uint8).numpy()))
        labels.append(label)
    return images, labels


def write_colour_dataset(folder, corrupt=None):
    """4 colour classes, 64 train / 32 test images, as Hub-layout parquet (row groups of 8);
    corrupt = {split: row}: that row's image cell is a truncated PNG."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=4)})
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for split, count, seed in (("train", 64, 0), ("test", 32, 1)):
        images, labels = colour_images(count, seed)
        path = folder / "data" / f"{split}-00000-of-00001.parquet"
        datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(path)
        table = pq.read_table(path)
        if split in (corrupt or {}):
            cells = table.column("image").to_pylist()
            cells[corrupt[split]] = {"bytes": b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "path": None}
            table = table.set_column(0, "image", pa.array(cells, type=table.schema.field("image").type))
        pq.write_table(table, path, row_group_size=8)  # the schema keeps the Hugging Face feature metadata
    return folder


@pytest.fixture(scope="module")
def colour_dataset(tmp_path_factory):
    return write_colour_dataset(tmp_path_factory.mktemp("colours"))


@pytest.fixture(scope="module")
def corrupt_dataset(tmp_path_factory):
    """The colour dataset with one image cell that cannot be decoded in each split."""
    return write_colour_dataset(tmp_path_factory.mktemp("corrupt_colours"), corrupt={"train": 5, "test": 3})


def tiny_resnet(seed=0):
    torch.manual_seed(seed)
    return hvp_run.create_backbone("resnet18", 12, small_stem=True).eval()


def tiny_vit(depth=3):
    torch.manual_seed(0)
    return hvp_run.create_backbone("vit_tiny", 12, small_stem=True, depth=depth, embed_dim=32, num_heads=2).eval()


def export(model, folder):
    return hvp_run.export_backbone(model, folder, {"input_size": (3, 12, 12)}, "hvp_test")


def features(model, x, **kw):
    with torch.no_grad():
        return linear.FeatureModel(model, **kw).eval()(x)


# ----------------------------------------------------------------------------------- features

def test_vit_features_concatenate_the_normed_cls_of_the_last_blocks_and_the_patch_mean():
    vit, x = tiny_vit(depth=3), torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        outputs = []
        for block in vit.blocks:
            tokens = block(tokens)
            outputs.append(vit.norm(tokens))
    expected = torch.cat([outputs[1][:, 0], outputs[2][:, 0], outputs[2][:, 1:].mean(1)], dim=1)
    got = features(vit, x, n_last_blocks=2, avgpool=True)
    assert got.shape == (2, 3 * 32) and linear.FeatureModel(vit, 2, True).dim == 96
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(features(vit, x, n_last_blocks=1), vit(x))  # last-block CLS = timm's pooled output


def test_non_vit_features_are_the_pooled_backbone_output():
    resnet, x = tiny_resnet(), torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(features(resnet, x), resnet(x))
    assert linear.FeatureModel(resnet).dim == resnet.num_features == 512


def test_more_last_blocks_than_the_vit_has_is_an_error():
    with pytest.raises(hvp_run.HVPError, match="--n_last_blocks 4 but the ViT has 3 blocks"):
        linear.FeatureModel(tiny_vit(depth=3), n_last_blocks=4)


# ----------------------------------------------------------------------------------- backbone sources

def test_every_backbone_source_gives_identical_features(tmp_path):
    model, x = tiny_resnet(), torch.randn(3, 3, 12, 12)
    reference = features(model, x)
    export(model, tmp_path / "export")
    run = tmp_path / "run"  # a training output folder: checkpoints + the latest export
    ckpt = hvp_run.save_checkpoint(run, 7, {"model": {"backbone." + k: v for k, v in model.state_dict().items()}, "step": 7},
                               model, {"input_size": (3, 12, 12)}, "hvp_test")
    export(model, run / "backbone")
    for source in (tmp_path / "export", run, ckpt):
        loaded, config = common.load_backbone(source)
        assert config["pretrained_cfg"]["input_size"] == [3, 12, 12]
        assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
        torch.testing.assert_close(features(loaded, x), reference, msg=str(source))


def test_checkpoint_key_loads_the_teacher_instead_of_the_exported_student(tmp_path):
    student, teacher, x = tiny_resnet(seed=1), tiny_resnet(seed=2), torch.randn(3, 3, 12, 12)
    state = {"student": {f"backbone.{k}": v for k, v in student.state_dict().items()},
             "teacher": {f"module.backbone.{k}": v for k, v in teacher.state_dict().items()}
             | {"module.head.weight": torch.zeros(2, 2)}, "step": 3}
    ckpt = hvp_run.save_checkpoint(tmp_path / "dino", 3, state, student, {"input_size": (3, 12, 12)}, "hvp_test")
    loaded, _ = common.load_backbone(tmp_path / "dino", checkpoint_key="teacher")
    torch.testing.assert_close(features(loaded, x), features(teacher, x))
    loaded, _ = common.load_backbone(ckpt)  # without the key: the export (student)
    torch.testing.assert_close(features(loaded, x), features(student, x))
    with pytest.raises(hvp_run.HVPError, match="has no state 'ema'"):
        common.load_backbone(ckpt, checkpoint_key="ema")


def test_random_init_keeps_the_architecture_and_none_of_the_weights(tmp_path):
    x = torch.randn(3, 3, 12, 12)
    first, _ = common.load_backbone(export(tiny_resnet(seed=1), tmp_path / "a"), random_init=True, seed=5)
    second, _ = common.load_backbone(export(tiny_resnet(seed=2), tmp_path / "b"), random_init=True, seed=5)
    trained, _ = common.load_backbone(tmp_path / "a")
    assert {k: v.shape for k, v in first.state_dict().items()} == {k: v.shape for k, v in trained.state_dict().items()}
    torch.testing.assert_close(features(first, x), features(second, x))  # depends on the seed only
    assert not torch.allclose(features(first, x), features(trained, x))


# ----------------------------------------------------------------------------------- linear probe

def probe_config(backbone, dataset, tmp_path, **kw):
    return linear.Config(**{**dict(backbone=str(backbone), dataset=str(dataset), epochs=15, batch_size=16,
                                   optimizer="sgd", lr="0.3,3", cache_views=2, num_workers=0,
                                   output=str(tmp_path / "linear.json")), **kw})


def test_linear_probe_separates_colour_classes(colour_dataset, tmp_path):
    result = linear.run(probe_config(export(tiny_resnet(), tmp_path / "b"), colour_dataset, tmp_path))
    assert result["best_top1"] == 100.0 and result["train_samples"] == 64 and result["test_samples"] == 32
    assert result["skipped_images"] == {"train": 0, "test": 0}
    assert len(result["epochs"]) == 15 and len(result["epochs"][0]["top1"]) == 2  # every epoch, one value per lr
    assert result["num_classes"] == 4 and result["features"] == "pooled" and result["feature_dim"] == 512


def test_linear_probe_without_cache_runs_the_backbone_on_fresh_augmentations(colour_dataset, tmp_path):
    result = linear.run(probe_config(export(tiny_vit(depth=2), tmp_path / "v"), colour_dataset, tmp_path,
                                     cache_views=0, lr="3", epochs=3, n_last_blocks=2))
    assert result["features"] == "vit_cls" and result["feature_dim"] == 64
    assert [e["epoch"] for e in result["epochs"]] == [1, 2, 3] and result["best_top1"] > 25
    assert [e["skipped_images"] for e in result["epochs"]] == [0, 0, 0]


def test_cached_views_are_the_train_split_in_order_augmented_differently_per_view(colour_dataset):
    accelerator = hvp_run.make_accelerator("no", 1, "none", ".")
    cfg = linear.Config(backbone="x", batch_size=10, num_workers=0, crop_scale=(0.3, 1.0))
    source = common.open_split(str(colour_dataset), "train", "image", "label", accelerator, "a linear probe")
    loaders = common.augmented_loaders(source, cfg, 12, hvp.IMAGENET_MEAN, hvp.IMAGENET_STD, accelerator)

    def view(epoch):
        batches = list(loaders(epoch))
        return torch.cat([b["image"] for b in batches]), torch.cat([b["label"] for b in batches])

    (first, labels), (again, _), (second, second_labels) = view(0), view(0), view(1)
    assert len(labels) == 64 and labels.tolist() == [i % 4 for i in range(64)]  # every image once, in order
    assert torch.equal(second_labels, labels) and torch.equal(first, again)  # a view is reproducible
    assert not torch.allclose(first, second)  # and another view epoch is another augmentation


def test_finetuning_epochs_are_full_shuffled_batches_of_a_new_stream_each(colour_dataset):
    accelerator = hvp_run.make_accelerator("no", 1, "none", ".")
    cfg = finetune.Config(backbone="x", batch_size=16, num_workers=0)
    source = common.open_split(str(colour_dataset), "train", "image", "label", accelerator, "fine-tuning")
    steps = common.steps_per_epoch(source, 16)
    loaders = common.augmented_loaders(source, cfg, 12, hvp.IMAGENET_MEAN, hvp.IMAGENET_STD, accelerator, steps)
    batches = hvp_run.training_batches(loaders, steps)
    epochs = [[next(batches) for _ in range(steps)] for _ in range(2)]
    batches.close()
    assert steps == 4 and [[e for e, _ in epoch] for epoch in epochs] == [[0] * 4, [1] * 4]
    assert all(len(b["label"]) == 16 for epoch in epochs for _, b in epoch)
    orders = [torch.cat([b["label"] for _, b in epoch]) for epoch in epochs]
    assert all(sorted(order.tolist()) == sorted(i % 4 for i in range(64)) for order in orders)  # every image once
    assert orders[0].tolist() != [i % 4 for i in range(64)] and not torch.equal(orders[0], orders[1])  # shuffled anew


def test_the_lars_probe_scales_weight_steps_by_the_trust_ratio_and_leaves_biases_plain():
    heads = linear.LinearHeads(4, 3, count=1)
    optimizer = linear.make_optimizer(linear.Config(optimizer="lars", weight_decay=0.1), heads, [0.5])
    weight, bias = heads.heads[0].weight, heads.heads[0].bias
    weight.grad, bias.grad = torch.randn(3, 4), torch.randn(3)
    w0, b0 = weight.detach().clone(), bias.detach().clone()
    optimizer.step()
    update = weight.grad + 0.1 * w0  # weight decay on the matrix only
    torch.testing.assert_close(weight.detach(), w0 - 0.5 * 0.001 * w0.norm() / update.norm() * update)
    torch.testing.assert_close(bias.detach(), b0 - 0.5 * bias.grad)


def test_linear_cli_writes_json_and_reads_an_image_folder(tmp_path):
    for split, count, seed in (("train", 24, 0), ("test", 8, 1)):
        for i, (image, label) in enumerate(zip(*colour_images(count, seed))):
            (tmp_path / "folder" / split / f"c{label}").mkdir(parents=True, exist_ok=True)
            image.save(tmp_path / "folder" / split / f"c{label}" / f"{i}.png")
    export(tiny_resnet(), tmp_path / "b")
    out = run_script(["eval/linear.py", "--backbone", tmp_path / "b", "--dataset", tmp_path / "folder",
                      "--epochs", 2, "--cache_views", 1, "--num_workers", 0, "--optimizer", "sgd", "--lr", 1])
    result = json.loads((tmp_path / "b" / "linear.json").read_text())
    assert "linear probe" in out.stdout and result["train_samples"] == 24 and len(result["epochs"]) == 2


# ----------------------------------------------------------------------------------- undecodable images

def test_knn_cli_counts_an_undecodable_image_of_each_split(corrupt_dataset, tmp_path, monkeypatch, capsys):
    backbone = export(tiny_resnet(), tmp_path / "b")
    monkeypatch.setattr(sys, "argv", ["knn.py", "--backbone", str(backbone), "--dataset", str(corrupt_dataset),
                                      "--k", "5,10", "--num_workers", "0", "--batch_size", "16"])
    knn.main()
    result = json.loads((backbone / "eval" / f"knn-{corrupt_dataset.name}.json").read_text())
    assert result["skipped_images"] == {"train": 1, "test": 1}
    assert result["train_samples"] == 63 and result["test_samples"] == 31
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("k-NN")]
    assert len(lines) == 2 and all(line.endswith("| undecodable images skipped: train 1, test 1") for line in lines)


def test_knn_eval_of_a_training_run_writes_its_own_file_and_leaves_the_runs_knn_json_unchanged(colour_dataset,
                                                                                                  tmp_path, monkeypatch):
    run = tmp_path / "run"  # a training output folder: the latest export and the run's own k-NN result
    export(tiny_resnet(), run / "backbone")
    (run / "knn.json").write_text('{"knn_top1": 12.5, "k": 20}')
    before = (run / "knn.json").read_bytes()
    monkeypatch.setattr(sys, "argv", ["knn.py", "--backbone", str(run), "--dataset", str(colour_dataset),
                                      "--k", "5", "--num_workers", "0", "--batch_size", "16"])
    knn.main()
    assert (run / "knn.json").read_bytes() == before
    result = json.loads((run / "eval" / f"knn-{colour_dataset.name}.json").read_text())
    # 4 flat colours: even an untrained backbone's features tell them apart (chance is 25 %)
    assert result["knn"]["5"]["top1"] >= 75 and result["test_samples"] == 32


def test_eval_results_of_a_hub_backbone_go_to_a_folder_under_outputs_never_the_current_folder(tmp_path):
    from pathlib import Path
    assert common.results_folder("hf-hub:org/name") == Path("outputs/org--name")
    assert common.results_folder("hf-hub:org/name@v1.0") == Path("outputs/org--name@v1.0")
    assert common.results_folder(tmp_path) == tmp_path  # a local backbone folder: its own
    cfg = knn.Config(backbone="hf-hub:org/name", dataset="uoft-cs/cifar10")
    assert knn.default_output(cfg) == Path("outputs/org--name/eval/knn-cifar10.json")
    assert knn.default_output(knn.Config(raw_pixels=True, dataset="x/y")) == Path("outputs/raw-pixels/eval/knn-y.json")
    assert common.default_output(linear.Config(backbone="hf-hub:org/name"), "linear") == Path("outputs/org--name/linear.json")


def test_eval_mixed_precision_takes_the_training_values_and_rejects_others_in_one_line():
    assert common.accelerate_precision("auto") in ("bf16", "no")  # bf16 where native, else fp32, as in training
    assert [common.accelerate_precision(v) for v in ("", "no", "fp16", "bf16")] == [None, "no", "fp16", "bf16"]
    linear.check_config(linear.Config(backbone="x", mixed_precision="auto"))
    with pytest.raises(hvp_run.HVPError, match="^--mixed_precision must be auto, no, fp16 or bf16, got 'fp8'$"):
        common.make_accelerator("fp8")


@pytest.mark.parametrize("cache_views", [1, 0])
def test_linear_probe_counts_undecodable_images_per_split(corrupt_dataset, tmp_path, capsys, cache_views):
    result = linear.run(probe_config(export(tiny_resnet(), tmp_path / "b"), corrupt_dataset, tmp_path, epochs=2,
                                     cache_views=cache_views))
    assert result["skipped_images"] == {"train": 1, "test": 1} and result["test_samples"] == 31
    if cache_views:  # the cached features leave the image out
        assert result["train_samples"] == 63 and "skipped_images" not in result["epochs"][0]
    else:  # every epoch reads all 64 rows (4 full batches of 16): the image is met, and replaced, once per epoch
        assert [e["skipped_images"] for e in result["epochs"]] == [1, 1]
    assert "undecodable images skipped: train 1, test 1" in capsys.readouterr().out


def test_finetuning_counts_undecodable_images_per_split_and_epoch(corrupt_dataset, tmp_path, capsys):
    cfg = finetune.Config(backbone=str(export(tiny_resnet(), tmp_path / "b")), dataset=str(corrupt_dataset),
                          epochs=2, batch_size=16, lr=1e-3, num_workers=0)
    result = finetune.run(cfg)
    assert result["skipped_images"] == {"train": 1, "test": 1} and result["test_samples"] == 31
    assert [e["skipped_images"] for e in result["epochs"]] == [1, 1]
    out = capsys.readouterr().out
    assert "epoch 1: " in out and "(1 undecodable train images replaced)" in out
    assert "undecodable images skipped: train 1, test 1" in out


# ----------------------------------------------------------------------------------- fine-tuning, transfer

def test_finetune_updates_the_backbone_and_reports_every_epoch(colour_dataset, tmp_path):
    cfg = finetune.Config(backbone=str(export(tiny_vit(depth=2), tmp_path / "v")), dataset=str(colour_dataset),
                          epochs=2, batch_size=16, lr=1e-2, num_workers=0)
    result = finetune.run(cfg)
    assert result["num_classes"] == 4 and [e["epoch"] for e in result["epochs"]] == [1, 2]
    best = max(result["epochs"], key=lambda e: e["top1"])  # the best epoch is the one reported
    assert (result["best_top1"], result["best_epoch"]) == (best["top1"], best["epoch"])
    assert result["best_top1"] >= 75  # 4 flat colours (chance: 25 %)


def test_vit_finetuning_uses_layerwise_lr_decay():
    model = tiny_vit(depth=2)
    model.reset_classifier(4)
    groups = finetune.make_optimizer(finetune.Config(layer_decay=0.5), model, 1e-3).param_groups
    scales = sorted({g["lr_scale"] for g in groups})
    assert scales[-1] == 1.0 and scales[0] == 0.5 ** 3  # embeddings, 2 blocks, head: 4 layers
    groups = finetune.make_optimizer(finetune.Config(layer_decay=0.5), tiny_resnet(), 1e-3).param_groups
    assert all(g.get("lr_scale", 1.0) == 1.0 for g in groups)  # ResNets: no layer decay


def test_transfer_writes_a_markdown_table_and_keeps_going_after_a_bad_dataset(colour_dataset, tmp_path, monkeypatch):
    backbone = export(tiny_resnet(), tmp_path / "b")
    monkeypatch.setattr(sys, "argv", ["transfer.py", "--backbone", str(backbone), "--datasets",
                                      f"{colour_dataset},{tmp_path / 'missing'}", "--evals", "linear",
                                      "--epochs", "2", "--cache_views", "1", "--num_workers", "0",
                                      "--batch_size", "16"])
    transfer.main()
    table = (backbone / "transfer.md").read_text()
    assert "| dataset | linear |" in table and f"| {colour_dataset} | " in table
    assert f"| {tmp_path / 'missing'} | error: cannot open dataset" in table
    probe = json.loads((backbone / "transfer.json").read_text())["results"][str(colour_dataset)]["linear"]
    assert probe["test_samples"] == 32 and probe["best_top1"] * 32 / 100 == pytest.approx(round(probe["best_top1"] * 32 / 100))
    assert f"| {colour_dataset} | {probe['best_top1']:.2f} (" in table  # the table shows the JSON's number


def test_transfer_ends_in_a_one_line_error_when_every_evaluation_failed(tmp_path, monkeypatch):
    backbone = export(tiny_resnet(), tmp_path / "b")
    monkeypatch.setattr(sys, "argv", ["transfer.py", "--backbone", str(backbone), "--datasets",
                                      f"{tmp_path / 'missing'},{tmp_path / 'gone'}", "--evals", "linear",
                                      "--num_workers", "0"])
    with pytest.raises(hvp_run.HVPError, match="^every evaluation failed"):
        transfer.main()
    assert f"| {tmp_path / 'gone'} | error: cannot open dataset" in (backbone / "transfer.md").read_text()


@pytest.fixture
def saved_models(monkeypatch):
    """The models finetune.run hands to finetune.save_model (copied as they were), in order."""
    import copy
    models, save = [], finetune.save_model

    def spy(model, *args, **kw):
        models.append(copy.deepcopy(model).eval())
        return save(model, *args, **kw)
    monkeypatch.setattr(finetune, "save_model", spy)
    return models


def test_the_finetuned_classifier_is_saved_and_reloads_with_identical_logits(colour_dataset, tmp_path, saved_models):
    import timm
    x = torch.randn(5, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    for name, backbone in (("vit", tiny_vit(depth=2)), ("resnet", tiny_resnet())):
        cfg = finetune.Config(backbone=str(export(backbone, tmp_path / name)), dataset=str(colour_dataset), epochs=1,
                              batch_size=16, lr=1e-3, num_workers=0)
        result = finetune.run(cfg)
        folder = tmp_path / name / f"finetune_{colour_dataset.name}"  # next to finetune_<dataset>.json
        assert result["model_dir"] == str(folder)
        assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
        config = json.loads((folder / "config.json").read_text())
        assert config["num_classes"] == 4 and config["label_names"] == ["0", "1", "2", "3"]
        assert config["pretrained_cfg"]["tag"] == finetune.MODEL_TAG and config["pretrained_cfg"]["input_size"] == [3, 12, 12]
        trained = saved_models[-1]
        loaded = finetune.load_model(folder)
        with torch.no_grad():
            assert trained(x).shape == (5, 4)
            assert torch.equal(loaded(x), trained(x)), name
            if name == "vit":  # plain timm rebuilds it: a small-stem ViT is a timm ViT
                by_timm = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
                assert torch.equal(by_timm(x), trained(x)) and by_timm.pretrained_cfg["label_names"] == config["label_names"]
                bigger = torch.randn(2, 3, 16, 16)  # and keeps taking other sizes (dynamic_img_size)
                assert torch.equal(by_timm(bigger), trained(bigger))
            else:  # the small-stem ResNet is marked as such: its stem is not timm's
                assert config["hvp_small_stem"] is True
        card = (folder / "README.md").read_text()
        last = result["epochs"][-1]
        assert f"| these (last epoch, 1) | {last['top1']:.2f} % | {last['top5']:.2f} % |" in card
        assert f"on the `train` split of `{colour_dataset.name}`" in card and "pipeline_tag: image-classification" in card
        assert str(tmp_path) not in card, "no local paths on a card"


def test_the_finetuned_models_card_and_config_agree_on_its_licence_and_give_its_accuracy_as_metadata(colour_dataset,
                                                                                                     tmp_path):
    from huggingface_hub import ModelCard
    cfg = finetune.Config(backbone=str(export(tiny_resnet(), tmp_path / "b")), dataset=str(colour_dataset), epochs=1,
                          batch_size=16, lr=1e-3, num_workers=0, output_dir=str(tmp_path / "model"),
                          hub_license="cc-by-4.0")
    result = finetune.run(cfg)
    card = ModelCard.load(tmp_path / "model" / "README.md")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert card.data.license == config["pretrained_cfg"]["license"] == "cc-by-4.0"
    (accuracy,) = card.data.eval_results
    assert accuracy.metric_value == round(result["epochs"][-1]["top1"], 2) and accuracy.dataset_split == "test"
    assert "for 1 epoch.\n" in card.text and "on\n1 process." in card.text and "(s)" not in card.text


def test_the_finetuned_model_keeps_the_class_names_of_the_dataset(tmp_path):
    for split, count, seed in (("train", 16, 0), ("test", 8, 1)):
        for i, (image, label) in enumerate(zip(*colour_images(count, seed))):
            (tmp_path / "folder" / split / ["red", "green", "blue", "white"][label]).mkdir(parents=True, exist_ok=True)
            image.save(tmp_path / "folder" / split / ["red", "green", "blue", "white"][label] / f"{i}.png")
    cfg = finetune.Config(backbone=str(export(tiny_resnet(), tmp_path / "b")), dataset=str(tmp_path / "folder"), epochs=1,
                          batch_size=8, lr=1e-3, num_workers=0, output_dir=str(tmp_path / "model"))
    finetune.run(cfg)
    names = json.loads((tmp_path / "model" / "config.json").read_text())["label_names"]
    assert names == sorted(["red", "green", "blue", "white"])
    assert finetune.load_model(tmp_path / "model").pretrained_cfg["label_names"] == names


def test_finetuning_replaces_only_a_folder_it_wrote_and_checks_the_hub_flags_first(colour_dataset, tmp_path):
    finetune.check_model_folder(tmp_path / "new")  # absent, or empty: fine
    (tmp_path / "empty").mkdir()
    finetune.check_model_folder(tmp_path / "empty")
    export(tiny_resnet(), tmp_path / "backbone")  # a backbone export: never replaced
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    for folder in (tmp_path / "backbone", tmp_path / "other"):
        cfg = finetune.Config(backbone=str(tmp_path / "backbone"), dataset=str(colour_dataset), epochs=1,
                              batch_size=16, num_workers=0, output_dir=str(folder))
        with pytest.raises(hvp_run.HVPError, match="exists and does not hold a fine-tuned model"):
            finetune.run(cfg)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    base = dict(backbone=str(tmp_path / "backbone"), dataset=str(colour_dataset), num_workers=0)
    with pytest.raises(hvp_run.HVPError, match="--hub_model_id only takes effect with --push_to_hub"):
        finetune.run(finetune.Config(**base, hub_model_id="me/x"))
    with pytest.raises(hvp_run.HVPError, match="cannot push with HF_HUB_OFFLINE=1"):  # the tests run offline
        finetune.run(finetune.Config(**base, push_to_hub=True, hub_model_id="me/x"))
    with pytest.raises(hvp_run.HVPError, match="cannot be combined with --no-save_model"):
        finetune.resolve_config(finetune.Config(**base, push_to_hub=True, save_model=False))
    assert not (tmp_path / "backbone" / f"finetune_{colour_dataset.name}").exists()


HUB_TOKEN = "hf_hvpFinetuneTokenThatMustNeverLeak0123"

LOAD_THE_PUSHED_CLASSIFIER = r"""
import json, sys
from pathlib import Path
import numpy as np, timm, torch
from PIL import Image
from huggingface_hub import ModelCard
repo, local, code = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, code)
from eval import finetune
x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    hub = timm.create_model(f"hf-hub:{repo}", pretrained=True).eval()
    here = timm.create_model(f"local-dir:{local}", pretrained=True).eval()
    via_hvp = finetune.load_model(f"hf-hub:{repo}")
    same = torch.equal(hub(x), here(x)) and torch.equal(via_hvp(x), here(x))
card = ModelCard.load(repo)
Image.fromarray(np.full((20, 20, 3), 200, np.uint8)).save("image.jpg")  # the card's snippet reads image.jpg
snippet = card.text.split("## Usage", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
exec(snippet, {})  # prints the predicted class name
print(json.dumps({"same_logits": same, "labels": hub.pretrained_cfg["label_names"], "pipeline": card.data.pipeline_tag,
                  "library": card.data.library_name, "text": card.text}))
"""


def hub_env(hub, tmp_path, token):
    from conftest import script_env
    env = script_env(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1",
                     HVP_HUB_RETRY_WAIT="0.05")
    env.pop("HF_TOKEN", None)
    return {**env, "HF_TOKEN": token} if token else env


def run_with(env, args, cwd=REPO):
    import subprocess
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def hub():
    from hub_server import HubServer
    server = HubServer().start()
    yield server
    server.stop()


def test_a_pushed_finetuned_model_loads_back_from_the_hub_with_identical_logits(hub, colour_dataset, tmp_path):
    backbone = export(tiny_vit(depth=2), tmp_path / "vit")
    args = ["eval/finetune.py", "--backbone", backbone, "--dataset", colour_dataset, "--epochs", 1, "--batch_size", 16,
            "--lr", 1e-3, "--num_workers", 0, "--push_to_hub", "--hub_model_id", "hvp-tester/vit-colours"]
    refused = run_with(hub_env(hub, tmp_path, None), args)  # no token: one line, before anything is trained
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].startswith(
        "error: --push_to_hub needs a Hugging Face token")
    folder = tmp_path / "vit" / f"finetune_{colour_dataset.name}"
    assert not folder.exists() and hub.requests == []

    pushed = run_with(hub_env(hub, tmp_path, HUB_TOKEN), args)
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    assert f"hub: pushed the fine-tuned model to {hub.url}/hvp-tester/vit-colours" in pushed.stdout
    result = json.loads(folder.with_suffix(".json").read_text())
    assert result["pushed_to_hub"] is True and result["hub_model_id"] == "hvp-tester/vit-colours"
    for name in ("config.json", "model.safetensors", "README.md"):
        assert hub.file("hvp-tester/vit-colours", name) == (folder / name).read_bytes(), name
    assert hub.stored_in_lfs("hvp-tester/vit-colours", "model.safetensors")

    loaded = run_with(hub_env(hub, tmp_path / "fresh", None), ["-c", LOAD_THE_PUSHED_CLASSIFIER, "hvp-tester/vit-colours",
                                                                folder, REPO], cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    facts = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert facts["same_logits"] and facts["labels"] == ["0", "1", "2", "3"]
    assert loaded.stdout.strip().splitlines()[-2] in facts["labels"], "the card's snippet ran and printed a class"
    assert facts["pipeline"] == "image-classification" and facts["library"] == "timm"
    last = result["epochs"][-1]
    assert f"| these (last epoch, 1) | {last['top1']:.2f} % | {last['top5']:.2f} % |" in facts["text"]
    assert 'timm.create_model("hf-hub:hvp-tester/vit-colours", pretrained=True)' in facts["text"]
    assert hub.tokens_seen == {HUB_TOKEN}
    for text in (pushed.stdout, pushed.stderr, loaded.stdout, loaded.stderr, *(p.read_text() for p in folder.glob("*.*")
                                                                              if p.suffix in (".json", ".md"))):
        assert HUB_TOKEN not in text


def test_a_failed_push_is_retried_reported_and_the_model_stays_local(hub, colour_dataset, tmp_path):
    hub.fail(500, methods={"POST"})
    backbone = export(tiny_resnet(), tmp_path / "r")
    result = run_with(hub_env(hub, tmp_path, HUB_TOKEN), [
        "eval/finetune.py", "--backbone", backbone, "--dataset", colour_dataset, "--epochs", 1, "--batch_size", 16,
        "--num_workers", 0, "--push_to_hub", "--hub_model_id", "hvp-tester/failing"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "failed (try 1/3)" in result.stderr and "failed after 3 tries" in result.stderr
    folder = tmp_path / "r" / f"finetune_{colour_dataset.name}"
    assert f"upload it later with: hf upload hvp-tester/failing {folder} ." in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: the fine-tuned model is saved in {folder} but")
    assert json.loads(folder.with_suffix(".json").read_text())["pushed_to_hub"] is False
    assert finetune.load_model(folder)(torch.randn(1, 3, 12, 12)).shape == (1, 4)


def test_finetune_presets_follow_protocol_and_never_override_a_given_flag():
    cfg, _ = finetune.parse_args(["--dataset", "flowers102"])
    assert (cfg.lr, cfg.epochs, cfg.image_column) == (5e-4, 300, "image")
    cfg, _ = finetune.parse_args(["--dataset", "flowers102", "--protocol", "dino"])
    assert (cfg.lr, cfg.epochs) == (5e-5, 300)
    cfg, _ = finetune.parse_args(["--dataset", "uoft-cs/cifar100", "--protocol", "dino", "--lr", "1e-4"])
    assert (cfg.lr, cfg.epochs, cfg.label_column) == (1e-4, 300, "fine_label")
    cfg, _ = finetune.parse_args(["--dataset", "cifar10", "--epochs", "100", "--protocol", "dino"])
    assert (cfg.lr, cfg.epochs, cfg.image_column) == (7.5e-6, 100, "img")
    assert finetune.resolve_config(cfg).dataset == "uoft-cs/cifar10"
    cfg, notes = finetune.parse_args(["--batch_size", "32"])  # the shipped dataset: its CPU preset
    assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.dataset) == (1e-3, 3, 32, hvp_run.DEFAULT_DATASET)
    assert len(notes) == 1 and "batch_size" not in notes[0] and "lr=0.001" in notes[0]
    cfg, notes = finetune.parse_args(["--dataset", "some/other"])
    assert (cfg.lr, cfg.epochs, notes) == (5e-5, 100, [])


def test_finetuning_a_split_smaller_than_one_global_batch_is_a_one_line_error(colour_dataset):
    with pytest.raises(hvp_run.HVPError, match="has 64 images, fewer than one global batch"):
        finetune.run(finetune.Config(backbone="x", dataset=str(colour_dataset), batch_size=128, num_workers=0))


def test_transfer_presets_follow_the_table_in_design_md():
    assert finetune.transfer_preset("cifar10")["lr"] == 7.5e-6 and finetune.transfer_preset("cifar10")["epochs"] == 300
    assert finetune.transfer_preset("uoft-cs/cifar100")["label_column"] == "fine_label"
    assert finetune.transfer_preset("flowers102", "dino")["lr"] == 5e-5
    assert finetune.transfer_preset("inat21", "dino") == dict(dataset="inat21", image_column="image",
                                                             label_column="label", test_split="validation",
                                                             lr=5e-5, epochs=100)
    assert finetune.transfer_preset("some/other") == {}


# ----------------------------------------------------------------------------------- bad inputs

def test_a_dataset_without_labels_is_a_one_line_error(tmp_path):
    images, _ = colour_images(8, 0)
    (tmp_path / "nolabels" / "data").mkdir(parents=True)
    for split in ("train", "test"):
        datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()})).to_parquet(
            tmp_path / "nolabels" / "data" / f"{split}-00000-of-00001.parquet")
    export(tiny_resnet(), tmp_path / "b")
    with pytest.raises(hvp_run.HVPError, match="has no label column 'label': a linear probe needs labels"):
        linear.run(probe_config(tmp_path / "b", tmp_path / "nolabels", tmp_path))
    with pytest.raises(hvp_run.HVPError, match="fine-tuning needs labels"):
        finetune.run(finetune.Config(backbone=str(tmp_path / "b"), dataset=str(tmp_path / "nolabels"), num_workers=0))


@pytest.mark.parametrize("script", ["eval/linear.py", "eval/finetune.py"])
def test_a_backbone_that_cannot_be_loaded_is_a_one_line_error(script, tmp_path, tiny_dataset):
    out = run_script([script, "--backbone", tmp_path, "--dataset", tiny_dataset, "--batch_size", 32], check=False)
    assert out.returncode == 2 and out.stderr.strip().startswith("error: no backbone found")
    assert len(out.stderr.strip().splitlines()) == 1


def test_bad_flags_are_errors():
    with pytest.raises(hvp_run.HVPError, match="--optimizer must be lars or sgd"):
        linear.check_config(linear.Config(backbone="x", optimizer="adam"))
    with pytest.raises(hvp_run.HVPError, match="--lr must be comma-separated numbers"):
        linear.check_config(linear.Config(backbone="x", lr="0.1,fast"))
    with pytest.raises(hvp_run.HVPError, match="no public Hub copy known"):
        finetune.resolve_config(finetune.Config(backbone="x", dataset="inat21"))
    with pytest.raises(hvp_run.HVPError, match="--checkpoint_key needs a checkpoint"):
        common.checkpoint_backbone_weights("hf-hub:org/name", "teacher")
