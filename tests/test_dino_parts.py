"""train_dino.py's parts in-process: the DINO loss, multi-crop hard-view selection against exhaustive
enumeration, teacher-output reuse, centre and EMA updates, the head."""
import contextlib
import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hvp_utils as hvp
import train_dino as td


class NoAccelerator:
    """What select_hard_views needs from an Accelerator (fp32: autocast is a no-op)."""
    num_processes = 1

    @staticmethod
    def autocast():
        return contextlib.nullcontext()


def float_slack(x, ulps=8):
    """A few float32 steps at the magnitude of x: the same sum in another order (another CPU kind,
    another kernel) may differ by that much, so comparisons of equal-in-exact-arithmetic scores
    allow it."""
    return ulps * torch.finfo(torch.float32).eps * x.abs()


def tiny_cfg(**kw):
    base = dict(arch="vit_tiny", small_stem=True, image_size=16, local_size=8, out_dim=64, hidden_dim=64,
                bottleneck_dim=32, global_views=4, local_views=4, local_crops_number=2, channels_last=False)
    return replace(td.Config(), **{**base, **kw})


def textbook_dino_loss(student_logits, teacher_logits, center, teacher_temp, student_temp):
    """DINO's loss in its crop-major form: a list of per-crop (B, K) outputs, the batch-mean
    cross-entropy of every (teacher crop q, student crop v != q), averaged over the terms."""
    student = [s / student_temp for s in student_logits.unbind(1)]
    teacher = [F.softmax((t - center) / teacher_temp, dim=-1) for t in teacher_logits.unbind(1)]
    total, terms = 0.0, 0
    for q, t in enumerate(teacher):
        for v, s in enumerate(student):
            if v != q:
                total = total + torch.sum(-t * F.log_softmax(s, dim=-1), dim=-1).mean()
                terms += 1
    return total / terms


def test_dino_loss_is_the_textbook_dino_loss_per_sample():
    gen = torch.Generator().manual_seed(0)
    B, L, K = 6, 3, 32
    student, teacher = torch.randn(B, 2 + L, K, generator=gen), torch.randn(B, 2, K, generator=gen)
    center = torch.randn(K, generator=gen) * 0.1
    per_sample = td.dino_loss(student, teacher, center, 0.04, 0.1)
    assert per_sample.shape == (B,)
    torch.testing.assert_close(per_sample.mean(), textbook_dino_loss(student, teacher, center, 0.04, 0.1))
    # sample b's loss depends on sample b only
    torch.testing.assert_close(td.dino_loss(student[2:3], teacher[2:3], center, 0.04, 0.1), per_sample[2:3])


def exhaustive_selection(student_logits, teacher_logits, center, G, L, teacher_temp, student_temp):
    """Every (even global, odd global, L-subset of locals) tuple in the reference's order, scored
    with the per-sample DINO loss of that tuple; per sample, the first strict maximum wins."""
    B, V = student_logits.shape[:2]
    best = torch.full((B,), -float("inf"))
    best_globals, best_locals = torch.zeros(B, 2, dtype=torch.long), torch.zeros(B, L, dtype=torch.long)
    for g0, g1 in itertools.product(range(0, G, 2), range(1, G, 2)):
        for subset in itertools.combinations(range(V - G), L):
            student = student_logits[:, [g0, g1, *(G + l for l in subset)]]
            loss = td.dino_loss(student, teacher_logits[:, [g0, g1]], center, teacher_temp, student_temp)
            better = loss > best
            best = torch.where(better, loss, best)
            best_globals[better] = torch.tensor([g0, g1])
            best_locals[better] = torch.tensor(subset, dtype=torch.long)
    return best_globals, best_locals, best


@pytest.mark.parametrize("G,L_loader,L", [(2, 4, 2), (4, 4, 4), (4, 6, 3), (6, 5, 2), (4, 3, 0)])
def test_top_l_local_selection_equals_exhaustive_enumeration_of_tuples(G, L_loader, L):
    gen = torch.Generator().manual_seed(G * 100 + L_loader * 10 + L)
    B, K = 12, 48
    student_logits = torch.randn(B, G + L_loader, K, generator=gen) * 3
    teacher_logits = torch.randn(B, G, K, generator=gen)
    center = torch.randn(K, generator=gen) * 0.1
    cfg = tiny_cfg(global_views=G, local_views=L_loader, local_crops_number=L, student_temp=0.1)
    # select_hard_views with stand-in networks that return these logits
    chosen = td.select_hard_views(lambda g, l: student_logits, lambda g: teacher_logits,
                                  torch.zeros(B, G, 3, 16, 16), torch.zeros(B, L_loader, 3, 8, 8),
                                  center, 0.05, cfg, NoAccelerator())
    ref_globals, ref_locals, ref_loss = exhaustive_selection(student_logits, teacher_logits, center, G, L, 0.05, 0.1)
    assert torch.equal(chosen["globals"], ref_globals)
    assert torch.equal(chosen["locals"], ref_locals)
    torch.testing.assert_close(chosen["score"], ref_loss)
    # even views in slot 0 (global transform 1), odd views in slot 1 (transform 2), locals ascending
    assert (chosen["globals"][:, 0] % 2 == 0).all() and (chosen["globals"][:, 1] % 2 == 1).all()
    assert (chosen["locals"].diff(dim=1) > 0).all()
    # the plain tuple (0, 1, first L locals) is a candidate: its loss is the score of random views
    plain = td.dino_loss(student_logits[:, [0, 1, *range(G, G + L)]], teacher_logits[:, :2], center, 0.05, 0.1)
    torch.testing.assert_close(chosen["plain_score"], plain)
    assert (chosen["score"] >= chosen["plain_score"] - float_slack(chosen["plain_score"])).all()
    # the teacher outputs handed to the training step are those of the chosen globals
    assert torch.equal(chosen["teacher_logits"], hvp.gather_views(teacher_logits, ref_globals))


def test_limited_selection_picks_the_best_of_the_drawn_tuples():
    gen = torch.Generator().manual_seed(3)
    B, G, L_loader, L, K = 10, 4, 6, 2, 16
    student_logits, teacher_logits = torch.randn(B, G + L_loader, K, generator=gen), torch.randn(B, G, K, generator=gen)
    cfg = tiny_cfg(global_views=G, local_views=L_loader, local_crops_number=L, hvp_limit=5)
    args = (lambda g, l: student_logits, lambda g: teacher_logits, torch.zeros(B, G, 3, 16, 16),
            torch.zeros(B, L_loader, 3, 8, 8), torch.zeros(K), 0.04, cfg, NoAccelerator())
    limited = td.select_hard_views(*args, generator=torch.Generator().manual_seed(1))
    full = td.select_hard_views(*args[:6], replace(cfg, hvp_limit=0), NoAccelerator())
    assert (limited["score"] <= full["score"] + float_slack(full["score"])).all()
    again = td.select_hard_views(*args, generator=torch.Generator().manual_seed(1))
    assert torch.equal(limited["globals"], again["globals"]) and torch.equal(limited["locals"], again["locals"])


def vit_pair(cfg):
    torch.manual_seed(0)
    student = td.build_model(cfg, drop_path_rate=0.1).train()
    teacher = td.build_model(cfg, drop_path_rate=0.0).train()
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    return student, teacher


def test_teacher_outputs_reused_from_selection_equal_rerunning_the_teacher():
    cfg = tiny_cfg()
    student, teacher = vit_pair(cfg)
    gen = torch.Generator().manual_seed(1)
    global_views, local_views = torch.randn(6, 4, 3, 16, 16, generator=gen), torch.randn(6, 4, 3, 8, 8, generator=gen)
    center = torch.randn(cfg.out_dim, generator=gen) * 0.1
    chosen = td.select_hard_views(student, teacher, global_views, local_views, center, 0.04, cfg, NoAccelerator(), patch=4)
    assert chosen["teacher_logits"] is not None
    x_globals = hvp.gather_views(global_views, chosen["globals"])
    x_locals = hvp.gather_views(local_views, chosen["locals"])
    with torch.no_grad():
        rerun = teacher(x_globals)
    torch.testing.assert_close(chosen["teacher_logits"], rerun, rtol=1e-5, atol=1e-5)
    student_logits = student(x_globals, x_locals)
    loss_reused = td.dino_loss(student_logits, chosen["teacher_logits"], center, 0.04, 0.1).mean()
    loss_rerun = td.dino_loss(student_logits, rerun, center, 0.04, 0.1).mean()
    torch.testing.assert_close(loss_reused, loss_rerun, rtol=1e-5, atol=1e-5)
    # at reduced resolution the training step needs full-resolution teacher outputs: none are handed over
    half = td.select_hard_views(student, teacher, global_views, local_views, center, 0.04,
                                replace(cfg, hvp_select_res=0.5), NoAccelerator(), patch=4)
    assert half["teacher_logits"] is None and half["globals"].shape == (6, 2) and half["locals"].shape == (6, 2)


def test_selection_size_is_rounded_to_whole_patches():
    assert hvp.selection_size(224, 0.5, 16) == 112 and hvp.selection_size(96, 0.5, 16) == 48
    assert hvp.selection_size(32, 0.5, 8) == 16 and hvp.selection_size(16, 0.5, 8) == 8
    assert hvp.selection_size(16, 0.25, 8) == 8  # never below one patch
    assert hvp.selection_size(30, 0.5, 1) == 15  # CNNs: any size


def test_center_is_an_ema_of_the_mean_teacher_output():
    center = torch.full((4,), 2.0)
    teacher_logits = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [3.0, 2.0, 1.0, 0.0]]])  # (B=1, 2 globals, K=4)
    hvp.update_center(center, teacher_logits.sum((0, 1)), torch.tensor([2.0]), 0.9, NoAccelerator())
    torch.testing.assert_close(center, 0.9 * 2.0 + 0.1 * torch.tensor([2.0, 2.0, 2.0, 2.0]))


def test_teacher_ema_moves_parameters_towards_the_student():
    student, teacher = hvp.DINOHead(8, 16, 12, 4), hvp.DINOHead(8, 16, 12, 4)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = [t.clone() for t in teacher.parameters()]
    hvp.ema_update(teacher, student, 0.75)
    for t, b, s in zip(teacher.parameters(), before, student.parameters()):
        torch.testing.assert_close(t, 0.75 * b + 0.25 * s)
    hvp.ema_update(teacher, student, 1.0)  # the schedule's end: the teacher stops moving
    for t, b, s in zip(teacher.parameters(), before, student.parameters()):
        torch.testing.assert_close(t, 0.75 * b + 0.25 * s)
    # the momentum schedule is a cosine from momentum_teacher to 1
    assert hvp.cosine(0, 100, 0.996, 1.0) == 0.996 and hvp.cosine(100, 100, 0.996, 1.0) == 1.0


def test_head_last_layer_is_weight_normalised_and_norm_last_layer_fixes_its_norm():
    head = hvp.DINOHead(24, 40, hidden_dim=32, bottleneck_dim=8, norm_last_layer=True)
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.equal(g, torch.ones_like(g))
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(40))
    assert head(torch.randn(5, 3, 24)).shape == (5, 3, 40)
    free = hvp.DINOHead(24, 40, hidden_dim=32, bottleneck_dim=8, norm_last_layer=False)
    assert free.last_layer.parametrizations.weight.original0.requires_grad


def test_one_vit_takes_global_and_local_crops_and_the_teacher_temperature_warms_up():
    cfg = tiny_cfg()
    student, _ = vit_pair(cfg)
    out = student(torch.randn(3, 2, 3, 16, 16), torch.randn(3, 5, 3, 8, 8))
    assert out.shape == (3, 7, cfg.out_dim)
    warm = tiny_cfg(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3)
    # np.linspace over the warm-up epochs, as DINO: 0.07 is reached at the last warm-up epoch (2)
    assert [round(td.teacher_temperature(e, warm), 4) for e in range(5)] == [0.04, 0.055, 0.07, 0.07, 0.07]


def test_the_lr_warm_up_reaches_the_peak_at_its_last_step_as_dino():
    # DINO's cosine_scheduler: np.linspace(0, base, warmup_iters), then the cosine over the rest
    warmup, total, peak = 5, 20, 1.0
    values = [hvp.cosine(s, total, peak, 0.0, warmup) for s in range(total)]
    assert values[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert values[5] == 1.0 and values[-1] > 0


def test_multicrop_transform_alternates_the_two_global_transforms():
    from PIL import Image
    cfg = tiny_cfg(global_views=4, local_views=3)
    transform = hvp.multicrop_transform(cfg)
    recipes = transform.groups["globals"]
    assert [r.blur_p for r in recipes] == [1.0, 0.1, 1.0, 0.1] and [r.solarize_p for r in recipes] == [0, 0.2, 0, 0.2]
    out = transform(Image.new("RGB", (28, 28), (120, 30, 200)), torch.Generator().manual_seed(0))
    assert out["globals"].shape == (4, 3, 16, 16) and out["locals"].shape == (3, 3, 8, 8)
    assert out["globals_params"].shape[0] == 4 and out["locals_params"].shape[0] == 3


def test_a_one_epoch_teacher_temperature_warm_up_starts_at_the_warm_up_value():
    # DINO: np.concatenate((np.linspace(warmup, final, warmup_epochs), np.ones(rest) * final))
    for epochs in (0, 1, 2, 5):
        expected = list(np.linspace(0.04, 0.07, epochs)) + [0.07] * 3
        assert [hvp.linear_warmup(e, 0.04, 0.07, epochs) for e in range(epochs + 3)] == pytest.approx(expected)
