"""Weighted k-NN: the chunked matmul implementation equals a per-query loop."""
import math

import pytest
import torch

import hvp_run
from conftest import run_script


def reference_knn(train, train_labels, test, k, temperature, num_classes):
    scores = []
    for q in test:
        sims = [float(torch.dot(q / q.norm(), t / t.norm())) for t in train]
        order = sorted(range(len(train)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in order:
            votes[int(train_labels[i])] += math.exp(sims[i] / temperature)
        scores.append(votes)
    return torch.tensor(scores, dtype=torch.float64)


def test_knn_votes_equal_a_per_query_loop():
    gen = torch.Generator().manual_seed(0)
    train, test = torch.randn(60, 8, generator=gen, dtype=torch.float64), torch.randn(17, 8, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 5, (60,), generator=gen)
    fast = hvp_run.knn_classify(train, labels, test, k=7, temperature=0.5, num_classes=5, chunk=4)
    torch.testing.assert_close(fast.double(), reference_knn(train, labels, test, 7, 0.5, 5), rtol=1e-4, atol=1e-6)


def test_knn_accuracy_on_separable_clusters_is_perfect():
    gen = torch.Generator().manual_seed(1)
    centres = torch.randn(4, 16, generator=gen) * 10
    labels = torch.arange(4).repeat_interleave(25)
    feats = centres[labels] + torch.randn(100, 16, generator=gen) * 0.1
    top1, top5 = hvp_run.knn_accuracy(feats[::2], labels[::2], feats[1::2], labels[1::2], k=5)
    assert top1 == 100.0 and top5 == 100.0
    shuffled = labels[torch.randperm(100, generator=gen)]
    top1, _ = hvp_run.knn_accuracy(feats[::2], shuffled[::2], feats[1::2], shuffled[1::2], k=5)
    assert top1 < 60


def test_knn_cli_on_raw_pixels_and_on_an_exported_backbone(tiny_dataset, tmp_path):
    out = run_script(["eval/knn.py", "--raw_pixels", "--dataset", tiny_dataset, "--k", "5",
                      "--output", tmp_path / "raw.json", "--num_workers", "0", "--mixed_precision", "auto"])
    assert "k-NN raw pixels" in out.stdout and (tmp_path / "raw.json").exists()
    backbone = hvp_run.create_backbone("resnet18", 28, small_stem=True)
    hvp_run.export_backbone(backbone, tmp_path / "backbone", {"input_size": (3, 28, 28)}, "hvp_test")
    out = run_script(["eval/knn.py", "--backbone", tmp_path / "backbone", "--dataset", tiny_dataset, "--k", "5,10",
                      "--num_workers", "0"])
    assert "k=5: top-1" in out.stdout and "k=10: top-1" in out.stdout
    assert (tmp_path / "backbone" / "eval" / f"knn-{tiny_dataset.name}.json").exists()


@pytest.mark.parametrize("args,message", [
    (["--backbone", "{tmp}"], "error: no backbone found"),
    (["--raw_pixels", "--k", "abc"], "error: --k must be comma-separated whole numbers, got 'abc'"),
    (["--raw_pixels", "--mixed_precision", "fp8"], "error: --mixed_precision must be auto, no, fp16 or bf16"),
])
def test_knn_cli_errors_are_one_line(args, message, tmp_path):
    out = run_script(["eval/knn.py", *[a.format(tmp=tmp_path) for a in args]], check=False)
    assert out.returncode == 2 and out.stderr.strip().startswith(message)
    assert len(out.stderr.strip().splitlines()) == 1


def test_feature_extraction_shows_its_progress_out_of_the_images_of_the_process(tiny_dataset, monkeypatch):
    bars = []

    class Bar:
        def __init__(self, total, desc="", enabled=True):
            self.total, self.done = total, 0
            bars.append(self)

        def update(self, n):
            self.done += n

        def close(self):
            pass
    monkeypatch.setattr(hvp_run.knn, "progress_bar", Bar)
    accelerator = hvp_run.make_accelerator("no", 1, "none", ".")
    source = hvp_run.open_source(str(tiny_dataset), "test", "image", "label")
    loader = hvp_run.eval_loader(source, 28, accelerator, batch_size=20, num_workers=0)
    hvp_run.extract_features(lambda x: x.flatten(1), loader, accelerator)
    assert [(bar.total, bar.done) for bar in bars] == [(48, 48)]
