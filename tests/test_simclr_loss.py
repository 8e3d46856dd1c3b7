"""SimCLR's parts: NT-Xent, its multi-process gather, hard-pair scoring and LARS, each against a
slow, obviously-correct reference."""
import contextlib
import itertools
import math
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import hvp_utils as hvp
import train_simclr as simclr


# ----------------------------------------------------------------------------- references

def reference_nt_xent(z1, z2, temperature):
    """NT-Xent per anchor, written out: 2B embeddings [z1; z2], anchor a's positive is the other
    view of its image, its candidates are the 2B - 1 embeddings other than itself (Chen et al.,
    eq. 1). Returns (2B,) losses: anchors of view 1, then of view 2."""
    z = torch.cat([z1, z2])
    n = len(z1)
    sim = F.cosine_similarity(z[:, None], z[None], dim=-1) / temperature  # fine for a few samples
    losses = []
    for a in range(2 * n):
        positive = (a + n) % (2 * n)
        candidates = torch.stack([sim[a, c] for c in range(2 * n) if c != a])
        losses.append(torch.logsumexp(candidates, 0) - sim[a, positive])
    return torch.stack(losses)


def reference_selection(z, temperature):
    """The reference's loop: for each candidate pair in combinations order, the per-sample NT-Xent
    of that pair (both directions, negatives from that pair only); running best replaced only on
    strict improvement. z (B, N, D) global embeddings."""
    B, N, _ = z.shape
    per_pair = {(n, m): reference_nt_xent(z[:, n], z[:, m], temperature) for n, m in itertools.combinations(range(N), 2)}
    chosen, best = [], []
    for b in range(B):
        best_pair, best_score = None, -math.inf
        for (n, m), losses in per_pair.items():
            score = float(losses[b] + losses[b + B])
            if best_pair is None or score > best_score:
                best_pair, best_score = (n, m), score
        chosen.append(best_pair)
        best.append(best_score)
    return torch.tensor(chosen), torch.tensor(best), per_pair


# ----------------------------------------------------------------------------- NT-Xent

@pytest.mark.parametrize("batch,dim,temperature", [(2, 3, 0.1), (5, 8, 0.1), (7, 4, 0.5)])
def test_nt_xent_and_its_gradient_equal_the_written_out_reference(batch, dim, temperature):
    gen = torch.Generator().manual_seed(batch)
    z1, z2 = torch.randn(batch, dim, generator=gen), torch.randn(batch, dim, generator=gen)
    a1, a2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss = simclr.nt_xent_loss(a1, a2, temperature)
    loss.backward()
    r1, r2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    expected = reference_nt_xent(r1, r2, temperature).mean()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(a1.grad, r1.grad)
    torch.testing.assert_close(a2.grad, r2.grad)


def test_nt_xent_table_holds_every_directional_term_of_every_pair():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(6, 4, 5, generator=gen)
    table = simclr.nt_xent_table(z, 0.1)
    for n, m in itertools.permutations(range(4), 2):
        expected = reference_nt_xent(z[:, n], z[:, m], 0.1)[:6]  # anchors in view n, positives in view m
        torch.testing.assert_close(table[:, n, m], expected)


def test_the_loss_is_computed_in_float32_from_low_precision_embeddings():
    z = torch.randn(4, 2, 8).to(torch.bfloat16)
    assert simclr.nt_xent_table(z, 0.1).dtype == torch.float32


# ----------------------------------------------------------------------------- hard-pair selection

class FixedEmbedding(nn.Module):
    """A deterministic stand-in for the model: images -> 6-d embeddings."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3 * 4 * 4, 6)

    def forward(self, x):
        return self.proj(x.flatten(1))


def test_selection_equals_the_brute_force_loop_over_pairs():
    torch.manual_seed(0)
    model = FixedEmbedding()
    views = torch.randn(9, 4, 3, 4, 4)
    cfg = types.SimpleNamespace(hvp_select_res=1.0, channels_last=False, temperature=0.1)
    accelerator = types.SimpleNamespace(autocast=contextlib.nullcontext)
    pair, hard_score, scores = simclr.select_hard_pair(model, views, cfg, accelerator)

    with torch.no_grad():
        z = model(views.flatten(0, 1)).unflatten(0, (9, 4))
    expected_pair, expected_score, per_pair = reference_selection(z, 0.1)
    assert pair.tolist() == expected_pair.tolist()
    torch.testing.assert_close(hard_score, expected_score)
    plain = per_pair[(0, 1)]
    torch.testing.assert_close(scores[:, 0], plain[:9] + plain[9:])  # column 0: the plain pair (0, 1)
    assert len(set(map(tuple, pair.tolist()))) > 1, "the test must exercise several winning pairs"


# ----------------------------------------------------------------------------- two processes

def _two_process_worker(rank, rendezvous, data_path, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    data = torch.load(data_path)
    half = slice(rank * 3, rank * 3 + 3)
    z1 = data["z1"][half].clone().requires_grad_()
    z2 = data["z2"][half].clone().requires_grad_()
    loss = simclr.nt_xent_loss(z1, z2, 0.1)
    loss.backward()
    scores = simclr.pair_scores(simclr.nt_xent_table(data["views"][half], 0.1), hvp.candidate_pairs(4))
    torch.save({"loss": loss.detach(), "grad1": z1.grad, "grad2": z2.grad, "scores": scores}, f"{out_path}.{rank}")
    dist.destroy_process_group()


def test_two_processes_give_the_one_process_loss_gradient_and_scores_of_the_global_batch(tmp_path):
    gen = torch.Generator().manual_seed(1)
    data = {"z1": torch.randn(6, 5, generator=gen), "z2": torch.randn(6, 5, generator=gen),
            "views": torch.randn(6, 4, 5, generator=gen)}
    torch.save(data, tmp_path / "data.pt")
    mp.spawn(_two_process_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path / "data.pt"), str(tmp_path / "out")),
             nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"out.{r}") for r in range(2)]

    z1, z2 = data["z1"].clone().requires_grad_(), data["z2"].clone().requires_grad_()
    loss = simclr.nt_xent_loss(z1, z2, 0.1)
    loss.backward()
    # DDP averages over processes: the mean of the per-process losses and gradients is the global one
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss.detach())
    torch.testing.assert_close(torch.cat([r["grad1"] for r in ranks]) / 2, z1.grad)
    torch.testing.assert_close(torch.cat([r["grad2"] for r in ranks]) / 2, z2.grad)
    # each process scores its own samples with negatives from both processes
    global_scores = simclr.pair_scores(simclr.nt_xent_table(data["views"], 0.1), hvp.candidate_pairs(4))
    torch.testing.assert_close(torch.cat([r["scores"] for r in ranks]), global_scores)


def test_one_process_gather_is_a_no_op():
    x = torch.randn(3, 2)
    gathered, offset = simclr.gather_with_grad(x)
    assert gathered is x and offset == 0


# ----------------------------------------------------------------------------- LARS

def test_lars_adapts_and_decays_weight_matrices_but_not_biases_or_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    groups = simclr.lars_param_groups(model, weight_decay=0.1)
    assert [len(g["params"]) for g in groups] == [2, 4]  # 2 weight matrices; 2 biases + BN weight and bias
    opt = simclr.LARS(groups, lr=0.5, momentum=0.9, eta=0.01)
    model(torch.randn(5, 4)).square().sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for p, w, g in zip(model.parameters(), before, grads):
        if p.ndim > 1:
            update = g + 0.1 * w
            expected = w - 0.5 * (0.01 * w.norm() / update.norm()) * update
        else:
            expected = w - 0.5 * g  # plain SGD: no decay, no trust ratio
        torch.testing.assert_close(p.detach(), expected)


def test_lars_momentum_accumulates_the_scaled_updates():
    p = nn.Parameter(torch.tensor([[3.0, 4.0]]))
    opt = simclr.LARS([{"params": [p], "weight_decay": 0.0, "lars": True}], lr=1.0, momentum=0.5, eta=0.1)
    for _ in range(2):
        p.grad = torch.tensor([[0.0, 10.0]])
        opt.step()
    # step 1: trust 0.1 * 5 / 10 = 0.05 -> update (0, 0.5); step 2: |w| = |(3, 3.5)|
    trust2 = 0.1 * torch.tensor([3.0, 3.5]).norm() / 10
    expected = torch.tensor([[3.0, 3.5 - (0.5 * 0.5 + 10 * trust2)]])
    torch.testing.assert_close(p.detach(), expected)
