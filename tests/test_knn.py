"""Weighted k-NN: the chunked matmul implementation equals a per-query loop."""
import math

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
                      "--output", tmp_path / "raw.json", "--num_workers", "0"])
    assert "k-NN raw pixels" in out.stdout and (tmp_path / "raw.json").exists()
    backbone = hvp_run.create_backbone("resnet18", 28, small_stem=True)
    hvp_run.export_backbone(backbone, tmp_path / "backbone", {"input_size": (3, 28, 28)}, "hvp_test")
    out = run_script(["eval/knn.py", "--backbone", tmp_path / "backbone", "--dataset", tiny_dataset, "--k", "5,10",
                      "--num_workers", "0"])
    assert "k=5: top-1" in out.stdout and "k=10: top-1" in out.stdout
    assert (tmp_path / "backbone" / "knn.json").exists()


def test_knn_cli_errors_are_one_line(tmp_path, tiny_dataset):
    out = run_script(["eval/knn.py", "--backbone", tmp_path], check=False)
    assert out.returncode == 2 and out.stderr.strip().startswith("error: no backbone found")
    assert len(out.stderr.strip().splitlines()) == 1
