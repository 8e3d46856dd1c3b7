"""Hard-view selection: the vectorised fast paths equal slow, obviously-correct loops."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import hvp_utils as hvp


# ----------------------------------------------------------------------------- reference loops

def reference_pair_selection(score_of, batch, num_views):
    """The reference's loop: pairs in combinations order, running best replaced only on strict
    improvement (so the first candidate reaching the maximum wins), per sample."""
    chosen, best = [], []
    for b in range(batch):
        best_pair, best_score = None, -math.inf
        for n, m in itertools.combinations(range(num_views), 2):
            s = score_of(b, n, m)
            if best_pair is None or s > best_score:
                best_pair, best_score = (n, m), s
        chosen.append(best_pair)
        best.append(best_score)
    return torch.tensor(chosen), torch.tensor(best)


def reference_multicrop(cost, num_locals, extra=None):
    """Exhaustive enumeration of every (even, odd, L-subset) tuple in the reference's order, the
    score being the sum of all its loss terms (+ per-global extra terms)."""
    B, G, V = cost.shape
    out_g, out_l, out_s = [], [], []
    for b in range(B):
        best = None
        for g0, g1 in itertools.product(range(0, G, 2), range(1, G, 2)):
            for subset in itertools.combinations(range(G, V), num_locals):
                s = cost[b, g0, g1] + cost[b, g1, g0]
                for l in subset:
                    s = s + cost[b, g0, l] + cost[b, g1, l]
                if extra is not None:
                    s = s + extra[b, g0] + extra[b, g1]
                if best is None or s > best[0]:
                    best = (s, (g0, g1), subset)
        out_s.append(best[0])
        out_g.append(best[1])
        out_l.append(best[2])
    return torch.tensor(out_g), torch.tensor(out_l).view(B, num_locals), torch.stack(out_s)


# ----------------------------------------------------------------------------- pairs

def test_candidate_pairs_follow_the_reference_loop_order():
    assert hvp.candidate_pairs(4).tolist() == [list(p) for p in itertools.combinations(range(4), 2)]
    assert hvp.candidate_pairs(2).tolist() == [[0, 1]]


@pytest.mark.parametrize("num_views", [2, 3, 4, 5, 6])
def test_pair_selection_equals_brute_force_loop_with_ties(num_views):
    gen = torch.Generator().manual_seed(num_views)
    batch = 257
    # Integer-valued scores in a tiny range: most samples have several tied best pairs.
    values = torch.randint(0, 4, (batch, num_views), generator=gen).float()

    def pair_loss(first, second):
        return (first * second) % 5

    pair, best, scores = hvp.select_hard_pairs(values, pair_loss)
    ref_pair, ref_best = reference_pair_selection(
        lambda b, n, m: float((values[b, n] * values[b, m]) % 5), batch, num_views)
    assert scores.shape == (batch, math.comb(num_views, 2))
    if num_views > 2:
        assert (scores == scores.max(1, keepdim=True).values).sum(1).gt(1).any(), "the test must contain ties"
    assert torch.equal(pair, ref_pair)
    assert torch.equal(best, ref_best)


def test_pair_selection_with_simsiam_loss_equals_loop():
    gen = torch.Generator().manual_seed(0)
    B, N, D = 33, 5, 16
    p, z = torch.randn(B, N, D, generator=gen, dtype=torch.float64), torch.randn(B, N, D, generator=gen, dtype=torch.float64)

    def pair_loss(first, second):
        (p1, z1), (p2, z2) = first, second
        return -0.5 * (F.cosine_similarity(p1, z2, dim=-1) + F.cosine_similarity(p2, z1, dim=-1))

    def one(b, n, m):
        return float(-0.5 * (F.cosine_similarity(p[b, n], z[b, m], dim=0) + F.cosine_similarity(p[b, m], z[b, n], dim=0)))

    pair, best, scores = hvp.select_hard_pairs((p, z), pair_loss)
    ref_pair, ref_best = reference_pair_selection(one, B, N)
    assert torch.equal(pair, ref_pair)
    torch.testing.assert_close(best, ref_best.double())
    torch.testing.assert_close(scores[:, 0], torch.tensor([one(b, 0, 1) for b in range(B)], dtype=torch.float64))


def test_nan_score_wins_like_the_reference_running_max():
    scores = torch.tensor([[1.0, float("nan"), 5.0, float("nan")], [2.0, 2.0, 1.0, 0.0]])
    index, _ = hvp.hardest(scores)
    assert index.tolist() == [1, 0]


def test_selected_views_are_exactly_the_views_they_claim_to_be():
    gen = torch.Generator().manual_seed(1)
    B, N = 9, 4
    views = torch.randn(B, N, 3, 5, 7, generator=gen)
    pair = torch.stack([torch.randint(0, N, (B,), generator=gen), torch.randint(0, N, (B,), generator=gen)], 1)
    x1, x2 = hvp.gather_views(views, pair[:, 0]), hvp.gather_views(views, pair[:, 1])
    both = hvp.gather_views(views, pair)
    for b in range(B):
        assert torch.equal(x1[b], views[b, pair[b, 0]])
        assert torch.equal(x2[b], views[b, pair[b, 1]])
        assert torch.equal(both[b, 1], views[b, pair[b, 1]])


def test_two_views_is_the_plain_pair():
    views = torch.randn(6, 2, 8)
    pair, best, scores = hvp.select_hard_pairs(views, lambda a, b: (a - b).pow(2).sum(-1))
    assert pair.tolist() == [[0, 1]] * 6 and scores.shape == (6, 1)


def test_selection_runs_under_autocast_and_returns_index_tensors():
    model = torch.nn.Linear(8, 8)
    views = torch.randn(4, 3, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(views)
        assert out.dtype == torch.bfloat16
        pair, best, scores = hvp.select_hard_pairs(out, lambda a, b: -F.cosine_similarity(a, b, dim=-1))
    assert pair.dtype == torch.long and pair.shape == (4, 2)
    assert (pair[:, 0] < pair[:, 1]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_selection_on_gpu_matches_cpu():
    gen = torch.Generator().manual_seed(2)
    values = torch.randint(0, 4, (64, 5), generator=gen).float()
    cpu = hvp.select_hard_pairs(values, lambda a, b: (a * b) % 5)[0]
    gpu = hvp.select_hard_pairs(values.cuda(), lambda a, b: (a * b) % 5)[0]
    assert gpu.device.type == "cuda" and torch.equal(cpu, gpu.cpu())


# ----------------------------------------------------------------------------- multi-crop tuples

def test_global_pairs_keep_even_views_in_slot_zero():
    assert hvp.global_pairs(4).tolist() == [[0, 1], [0, 3], [2, 1], [2, 3]]
    assert hvp.global_pairs(2).tolist() == [[0, 1]]


@pytest.mark.parametrize("G,L_loader,L", [(2, 8, 8), (4, 8, 8), (4, 10, 8), (4, 6, 4), (6, 5, 2), (4, 4, 0)])
@pytest.mark.parametrize("with_extra", [False, True])
def test_top_l_multicrop_selection_equals_exhaustive_enumeration(G, L_loader, L, with_extra):
    gen = torch.Generator().manual_seed(G * 100 + L_loader * 10 + L)
    B = 12
    cost = torch.rand(B, G, G + L_loader, generator=gen, dtype=torch.float64)
    extra = torch.rand(B, G, generator=gen, dtype=torch.float64) if with_extra else None
    globals_, locals_, score = hvp.select_multicrop(cost, L, extra)
    ref_g, ref_l, ref_s = reference_multicrop(cost, L, extra)
    assert torch.equal(globals_, ref_g)
    assert torch.equal(locals_, ref_l)
    torch.testing.assert_close(score, ref_s)
    torch.testing.assert_close(score, hvp.tuple_score(cost, globals_[:, 0], globals_[:, 1], locals_, extra))



@pytest.mark.parametrize("G,L_loader,L", [(2, 8, 2), (4, 6, 2), (4, 8, 4), (2, 6, 5)])
def test_multicrop_ties_among_locals_go_to_the_first_subset_as_in_the_exhaustive_search(G, L_loader, L):
    gen = torch.Generator().manual_seed(G * 100 + L_loader * 10 + L)
    B = 64
    # a handful of integer values: many locals tie, so the subset chosen among equal ones is tested
    cost = torch.randint(0, 3, (B, G, G + L_loader), generator=gen).double()
    weights = cost[:, 0, G:] + cost[:, 1, G:]
    kth = weights.sort(1, descending=True).values[:, L - 1:L]
    assert ((weights == kth).sum(1) > 1).any(), "the test must contain ties at the L-th local"
    globals_, locals_, score = hvp.select_multicrop(cost, L)
    ref_g, ref_l, ref_s = reference_multicrop(cost, L)
    assert torch.equal(globals_, ref_g)
    assert torch.equal(locals_, ref_l)
    torch.testing.assert_close(score, ref_s)

def test_multicrop_selection_with_real_dino_cross_entropies():
    """The cost table built from teacher/student logits gives the same choice as scoring every tuple
    with the full DINO per-sample loss (sum of its cross-entropy terms)."""
    gen = torch.Generator().manual_seed(3)
    B, G, L_loader, L, K = 5, 4, 6, 3, 32
    student = torch.randn(G + L_loader, B, K, generator=gen, dtype=torch.float64) / 0.1
    teacher = torch.softmax(torch.randn(G, B, K, generator=gen, dtype=torch.float64) / 0.04, -1)
    logp = torch.log_softmax(student, -1)
    cost = -(teacher[:, None] * logp[None]).sum(-1).permute(2, 0, 1)   # (B, G, V)

    def dino_loss(b, g0, g1, subset):
        slots = [g0, g1, *subset]
        return sum(-(teacher[q][b] * logp[v][b]).sum() for q in (g0, g1) for v in slots if v != q)

    globals_, locals_, score = hvp.select_multicrop(cost, L)
    for b in range(B):
        best = max(((dino_loss(b, g0, g1, s), (g0, g1), s)
                    for g0, g1 in itertools.product(range(0, G, 2), range(1, G, 2))
                    for s in itertools.combinations(range(G, G + L_loader), L)), key=lambda t: t[0])
        assert globals_[b].tolist() == list(best[1]) and locals_[b].tolist() == list(best[2])
        torch.testing.assert_close(score[b], best[0])


def test_limited_multicrop_selection_is_the_best_of_its_drawn_candidates():
    gen = torch.Generator().manual_seed(4)
    B, G, L_loader, L = 7, 4, 8, 4
    cost = torch.rand(B, G, G + L_loader, generator=gen, dtype=torch.float64)
    g, l, s = hvp.select_multicrop(cost, L, limit=10, generator=torch.Generator().manual_seed(5))
    _, _, exhaustive = hvp.select_multicrop(cost, L)
    assert (s <= exhaustive + 1e-12).all()
    torch.testing.assert_close(s, hvp.tuple_score(cost, g[:, 0], g[:, 1], l))
    assert (g[:, 0] % 2 == 0).all() and (g[:, 1] % 2 == 1).all() and (l >= G).all()
    assert (l[:, 1:] > l[:, :-1]).all(), "local subsets are sets in ascending order"
    # the same generator seed draws the same candidate set
    again = hvp.select_multicrop(cost, L, limit=10, generator=torch.Generator().manual_seed(5))
    assert torch.equal(again[0], g) and torch.equal(again[1], l)
    # a limit covering every candidate is the exhaustive search
    full = hvp.select_multicrop(cost, L, limit=4 * math.comb(8, 4))
    torch.testing.assert_close(full[2], exhaustive)


def test_selection_statistics_compare_hard_pair_with_pair_zero_one():
    params = torch.zeros(2, 3, len(hvp.PARAM_NAMES))
    params[..., hvp.P["src_height"]] = params[..., hvp.P["src_width"]] = 10
    # sample 0: views 0 and 1 identical boxes, view 2 disjoint from view 0
    params[0, :, :4] = torch.tensor([[0, 0, 5, 5], [0, 0, 5, 5], [5, 5, 5, 5]], dtype=torch.float)
    params[1, :, :4] = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 5], [0, 0, 10, 10]], dtype=torch.float)
    stats = hvp.selection_stats(params, torch.tensor([[0, 2], [0, 1]]), torch.tensor([2.0, 4.0]), torch.tensor([1.0, 1.0]))
    assert stats["hard_score"] == 3.0 and stats["random_score"] == 1.0
    assert stats["random_iou"] == pytest.approx((1.0 + 0.5) / 2)
    assert stats["hard_iou"] == pytest.approx((0.0 + 0.5) / 2)
    assert stats["hard_area"] == pytest.approx(((0.25 + 0.25) / 2 + (1 + 0.5) / 2) / 2)
    # histograms over [0, 1] in 10 bins (1.0 falls in the last bin); area counts both crops of a pair
    assert stats["hard_iou_hist"] == [1, 0, 0, 0, 0, 1, 0, 0, 0, 0]
    assert stats["random_iou_hist"] == [0, 0, 0, 0, 0, 1, 0, 0, 0, 1]
    assert stats["hard_area_hist"] == [0, 0, 2, 0, 0, 1, 0, 0, 0, 1]
    assert stats["random_area_hist"] == [0, 0, 2, 0, 0, 1, 0, 0, 0, 1]
