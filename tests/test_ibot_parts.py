"""train_ibot.py's parts in-process: masking with the mask token, block masks, the iBOT loss,
hard-view selection against exhaustive enumeration, masks travelling with their views, teacher
reuse, reduced-resolution masks."""
import contextlib
import itertools
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import hvp_utils as hvp
import train_ibot as ti


class NoAccelerator:
    """What select_hard_views needs from an Accelerator (fp32: autocast is a no-op)."""
    num_processes = 1

    @staticmethod
    def autocast():
        return contextlib.nullcontext()


def tiny_cfg(**kw):
    base = dict(arch="vit_tiny", small_stem=True, image_size=16, local_size=8, out_dim=64, patch_out_dim=48,
                hidden_dim=64, bottleneck_dim=32, global_views=4, local_views=4, local_crops_number=2,
                channels_last=False)
    return replace(ti.Config(), **{**base, **kw})


def random_masks(B, G, h, w, gen, ratio=0.4):
    return torch.rand(B, G, h, w, generator=gen) < ratio


def vit_pair(cfg):
    torch.manual_seed(0)
    student = ti.build_model(cfg, drop_path_rate=0.0).train()
    teacher = ti.build_model(cfg, drop_path_rate=0.0).train()
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    return student, teacher


def test_masked_positions_receive_the_mask_token_and_the_rest_is_timms_forward():
    model, _ = vit_pair(tiny_cfg())
    model.eval()
    x = torch.randn(3, 3, 16, 16)
    mask = torch.zeros(3, 4, 4, dtype=torch.bool)
    mask[0, 1, 2] = mask[2, :2, :] = True
    seen = {}
    hook = model.backbone.patch_embed.register_forward_hook(lambda m, i, out: seen.update(embed=out))
    with torch.no_grad():
        model.mask_token.normal_()
        original = model.backbone.pos_drop.register_forward_pre_hook(lambda m, i: seen.update(tokens=i[0].clone()))
        model.tokens(x, mask)
        original.remove()
    hook.remove()
    # the tokens entering the blocks: [CLS] + (patch embedding or mask token) + position embedding
    pos = model.backbone.pos_embed[:, 1:]
    tokens = seen["tokens"][:, 1:] - pos
    embed = seen["embed"].flatten(1, 2)
    flat = mask.flatten(1)
    torch.testing.assert_close(tokens[flat], model.mask_token[0].expand(int(flat.sum()), -1))
    torch.testing.assert_close(tokens[~flat], embed[~flat])
    # without a mask, the output is timm's own forward_features / forward
    with torch.no_grad():
        cls, patches = model.tokens(x)
        features = model.backbone.forward_features(x)
        torch.testing.assert_close(cls, features[:, 0])
        torch.testing.assert_close(patches, features[:, 1:])
        torch.testing.assert_close(cls, model.backbone(x))
    # the mask token is a trained parameter of the wrapper (saved with the model)
    assert "mask_token" in dict(model.named_parameters())


def test_the_model_gives_cls_logits_for_all_views_and_patch_logits_for_globals():
    model, _ = vit_pair(tiny_cfg())
    gen = torch.Generator().manual_seed(0)
    cls, patches = model(torch.randn(2, 4, 3, 16, 16), random_masks(2, 4, 4, 4, gen), torch.randn(2, 3, 3, 8, 8))
    assert cls.shape == (2, 7, 64) and patches.shape == (2, 4, 16, 48)
    shared, _ = vit_pair(tiny_cfg(shared_head=True, patch_out_dim=64))
    assert shared.head.last_layer2 is None and shared(torch.randn(2, 2, 3, 16, 16))[1].shape == (2, 2, 16, 64)


def test_only_masked_patches_enter_the_patch_loss():
    gen = torch.Generator().manual_seed(1)
    B, G, K = 4, 2, 12
    student, teacher = torch.randn(B, G, 16, K, generator=gen), torch.randn(B, G, 16, K, generator=gen)
    masks = random_masks(B, G, 4, 4, gen)
    masks[0, 0] = False  # no masked patch: the term is 0, not NaN
    loss = ti.masked_patch_loss(student, teacher, masks, torch.zeros(K), 0.07, 0.1)
    # changing any unmasked patch changes nothing
    changed = torch.where(masks.flatten(2)[..., None], student, torch.randn(B, G, 16, K, generator=gen))
    torch.testing.assert_close(ti.masked_patch_loss(changed, teacher, masks, torch.zeros(K), 0.07, 0.1), loss)
    # a loop over the masked patches
    for b, g in itertools.product(range(B), range(G)):
        idx = masks[b, g].flatten().nonzero()[:, 0]
        terms = [-(F.softmax(teacher[b, g, n] / 0.07, -1) * F.log_softmax(student[b, g, n] / 0.1, -1)).sum() for n in idx]
        expected = torch.stack(terms).mean() if terms else torch.tensor(0.0)
        torch.testing.assert_close(loss[b, g], expected)


def test_block_masks_are_seeded_rectangles_of_about_the_ratio():
    masks = [ti.block_mask(14, 14, 0.3, (0.3, 1 / 0.3), torch.Generator().manual_seed(s)) for s in range(20)]
    ratios = torch.stack([m.float().mean() for m in masks])
    assert (ratios <= 0.3 + 1e-6).all() and ratios.mean() > 0.2
    again = ti.block_mask(14, 14, 0.3, (0.3, 1 / 0.3), torch.Generator().manual_seed(3))
    assert torch.equal(again, masks[3])
    assert not ti.block_mask(4, 4, 0.0, (0.3, 3.3), torch.Generator()).any()


def test_masks_are_drawn_per_global_view_in_the_transform():
    from PIL import Image
    cfg = tiny_cfg(global_views=4, local_views=3, pred_ratio=0.4)
    transform = ti.MaskedMultiCrop(hvp.multicrop_transform(cfg), (4, 4), cfg.pred_ratio, cfg.pred_aspect)
    image = Image.new("RGB", (28, 28), (120, 30, 200))
    out = transform(image, torch.Generator().manual_seed(0))
    assert out["masks"].shape == (4, 4, 4) and out["masks"].dtype == torch.bool and out["masks"].any()
    assert out["globals"].shape == (4, 3, 16, 16) and out["locals"].shape == (3, 3, 8, 8)
    again = transform(image, torch.Generator().manual_seed(0))
    assert all(torch.equal(out[k], again[k]) for k in out)
    # the globals alternate DINO's two transforms (DESIGN.md, D5), not the reference iBOT's "view 0 only"
    assert [r.blur_p for r in transform.multicrop.groups["globals"]] == [1.0, 0.1, 1.0, 0.1]


def exhaustive_selection(student_out, teacher_out, masks, centers, temps, cfg):
    """Every (even global, odd global, L-subset of locals) tuple in the reference's order, scored with
    the per-sample iBOT loss of that tuple (each global with its own mask); first strict maximum wins."""
    G, L = cfg.global_views, cfg.local_crops_number
    B, V = student_out[0].shape[:2]
    best = torch.full((B,), -float("inf"))
    best_globals, best_locals = torch.zeros(B, 2, dtype=torch.long), torch.zeros(B, L, dtype=torch.long)
    for g0, g1 in itertools.product(range(0, G, 2), range(1, G, 2)):
        for subset in itertools.combinations(range(V - G), L):
            student = (student_out[0][:, [g0, g1, *(G + l for l in subset)]], student_out[1][:, [g0, g1]])
            teacher = (teacher_out[0][:, [g0, g1]], teacher_out[1][:, [g0, g1]])
            loss = ti.ibot_loss(student, teacher, masks[:, [g0, g1]], centers, temps, cfg)[0]
            better = loss > best
            best = torch.where(better, loss, best)
            best_globals[better] = torch.tensor([g0, g1])
            best_locals[better] = torch.tensor(subset, dtype=torch.long)
    return best_globals, best_locals, best


@pytest.mark.parametrize("G,L_loader,L,lambdas", [(4, 4, 2, (1.0, 1.0)), (4, 5, 3, (0.5, 2.0)), (6, 3, 1, (1.0, 1.0)),
                                                  (2, 4, 2, (1.0, 1.0)), (4, 2, 0, (1.0, 3.0))])
def test_selection_equals_exhaustive_enumeration_of_tuples(G, L_loader, L, lambdas):
    gen = torch.Generator().manual_seed(G * 100 + L_loader * 10 + L)
    B, K, Kp, N = 10, 24, 20, 16
    student_out = (torch.randn(B, G + L_loader, K, generator=gen) * 3, torch.randn(B, G, N, Kp, generator=gen) * 3)
    teacher_out = (torch.randn(B, G, K, generator=gen), torch.randn(B, G, N, Kp, generator=gen))
    masks = random_masks(B, G, 4, 4, gen)
    centers, temps = (torch.randn(K, generator=gen) * 0.1, torch.randn(Kp, generator=gen) * 0.1), (0.05, 0.07)
    cfg = tiny_cfg(global_views=G, local_views=L_loader, local_crops_number=L, lambda1=lambdas[0], lambda2=lambdas[1])
    seen = {}

    def student(g, m, l):
        seen["masks"] = m
        return student_out

    chosen = ti.select_hard_views(student, lambda g: teacher_out, torch.zeros(B, G, 3, 16, 16), masks,
                                  torch.zeros(B, L_loader, 3, 8, 8), centers, temps, cfg, NoAccelerator(), patch=4)
    assert seen["masks"] is masks  # the student scores the masked globals
    ref_globals, ref_locals, ref_loss = exhaustive_selection(student_out, teacher_out, masks, centers, temps, cfg)
    assert torch.equal(chosen["globals"], ref_globals)
    assert torch.equal(chosen["locals"], ref_locals)
    torch.testing.assert_close(chosen["score"], ref_loss)
    assert (chosen["globals"][:, 0] % 2 == 0).all() and (chosen["globals"][:, 1] % 2 == 1).all()
    plain_student = (student_out[0][:, [0, 1, *range(G, G + L)]], student_out[1][:, :2])
    plain = ti.ibot_loss(plain_student, (teacher_out[0][:, :2], teacher_out[1][:, :2]), masks[:, :2], centers, temps, cfg)[0]
    torch.testing.assert_close(chosen["plain_score"], plain)
    # teacher outputs for the step are those of the chosen globals (DESIGN.md, D3)
    assert torch.equal(chosen["teacher_out"][0], hvp.gather_views(teacher_out[0], ref_globals))
    assert torch.equal(chosen["teacher_out"][1], hvp.gather_views(teacher_out[1], ref_globals))


def test_the_patch_term_can_decide_the_global_pair():
    B, G, K, Kp, N = 1, 4, 8, 8, 16
    student_out = (torch.zeros(B, G, K), torch.zeros(B, G, N, Kp))
    student_out[1][0, 2, :, 0] = -20.0  # global 2's masked patches disagree with the teacher
    teacher_out = (torch.zeros(B, G, K), torch.zeros(B, G, N, Kp))
    teacher_out[1][..., 0] = 5.0
    masks = torch.ones(B, G, 4, 4, dtype=torch.bool)
    cfg = tiny_cfg(global_views=G, local_views=0, local_crops_number=0)
    chosen = ti.select_hard_views(lambda g, m, l: student_out, lambda g: teacher_out, torch.zeros(B, G, 3, 16, 16),
                                  masks, torch.zeros(B, 0, 3, 8, 8), (torch.zeros(K), torch.zeros(Kp)), (0.04, 0.07),
                                  cfg, NoAccelerator())
    assert chosen["globals"][0, 0] == 2
    assert ti.select_hard_views(lambda g, m, l: student_out, lambda g: teacher_out, torch.zeros(B, G, 3, 16, 16),
                                masks, torch.zeros(B, 0, 3, 8, 8), (torch.zeros(K), torch.zeros(Kp)), (0.04, 0.07),
                                replace(cfg, lambda2=0.0), NoAccelerator())["globals"][0, 0] == 0


def test_masks_are_gathered_with_their_views_and_teacher_outputs_reused():
    cfg = tiny_cfg()
    student, teacher = vit_pair(cfg)
    gen = torch.Generator().manual_seed(1)
    B = 6
    global_views, local_views = torch.randn(B, 4, 3, 16, 16, generator=gen), torch.randn(B, 4, 3, 8, 8, generator=gen)
    masks = random_masks(B, 4, 4, 4, gen)
    centers = (torch.randn(cfg.out_dim, generator=gen) * 0.1, torch.randn(cfg.patch_out_dim, generator=gen) * 0.1)
    chosen = ti.select_hard_views(student, teacher, global_views, masks, local_views, centers, (0.04, 0.07), cfg,
                                  NoAccelerator(), patch=4)
    x_globals, x_masks = hvp.gather_views(global_views, chosen["globals"]), hvp.gather_views(masks, chosen["globals"])
    x_locals = hvp.gather_views(local_views, chosen["locals"])
    for b in range(B):
        for slot in range(2):
            v = chosen["globals"][b, slot]
            assert torch.equal(x_globals[b, slot], global_views[b, v]) and torch.equal(x_masks[b, slot], masks[b, v])
    with torch.no_grad():
        rerun = teacher(x_globals)
        # the training step's loss on the chosen tuple with its masks is the score it was chosen by
        step_loss = ti.ibot_loss(student(x_globals, x_masks, x_locals), rerun, x_masks, centers, (0.04, 0.07), cfg)[0]
    for reused, fresh in zip(chosen["teacher_out"], rerun):
        torch.testing.assert_close(reused, fresh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step_loss, chosen["score"], rtol=1e-4, atol=1e-4)


def test_reduced_resolution_selection_resizes_masks_to_the_coarser_grid():
    masks = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    masks[0, 0, :2, :2] = True      # a whole 2x2 block -> masked
    masks[0, 0, 2, 2:] = True       # half of a block -> masked
    masks[0, 0, 0, 2] = True        # a quarter -> not masked
    assert ti.resize_masks(masks, (2, 2))[0, 0].tolist() == [[True, False], [False, True]]
    assert ti.resize_masks(masks, (4, 4)) is masks
    cfg = tiny_cfg(hvp_select_res=0.5)
    student, teacher = vit_pair(cfg)
    seen = {}

    def spy(g, m, l):
        seen.update(globals=g.shape, masks=m.shape, locals=l.shape)
        return student(g, m, l)

    gen = torch.Generator().manual_seed(2)
    chosen = ti.select_hard_views(spy, teacher, torch.randn(3, 4, 3, 16, 16, generator=gen), random_masks(3, 4, 4, 4, gen),
                                  torch.randn(3, 4, 3, 8, 8, generator=gen), (torch.zeros(64), torch.zeros(48)),
                                  (0.04, 0.07), cfg, NoAccelerator(), patch=4)
    assert seen == {"globals": (3, 4, 3, 8, 8), "masks": (3, 4, 2, 2), "locals": (3, 4, 3, 4, 4)}
    assert chosen["teacher_out"] is None and chosen["globals"].shape == (3, 2)


def test_teacher_temperatures_warm_up_separately():
    cfg = tiny_cfg(warmup_teacher_temp=0.04, teacher_temp=0.06, warmup_teacher_patch_temp=0.04,
                   teacher_patch_temp=0.07, warmup_teacher_temp_epochs=3)
    temps = [tuple(round(t, 4) for t in ti.teacher_temperatures(e, cfg)) for e in range(4)]
    assert temps == [(0.04, 0.04), (0.0467, 0.05), (0.0533, 0.06), (0.06, 0.07)]
