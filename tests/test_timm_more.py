"""Family-specific checks for the timm CaiT, Swin/SwinV2, BEiT and EVA adapters.

The generic properties run on these families through ``cases_timm_more.py``; what is here
is particular to one family: CaiT's class attention and head mixing, Swin's shifted and
resized windows, SwinV2's and BEiT's position biases, EVA's rotary embeddings, dynamic sizes
and patch dropout.
"""

from __future__ import annotations

import pytest
import torch
from cases_timm_more import CASES, VIT_LIKE, build_timm, check_swin, swin_v1_attention64, swin_v2_attention64
from families import random_images
from helpers import brute_force_mask

import attnmask
from attnmask.kernels import BACKENDS

timm = pytest.importorskip("timm")
from timm.models.cait import ClassAttn  # noqa: E402


CASE = {case.id: case for case in CASES}


def features(model, images, **kwargs):
    with torch.no_grad():
        return model.forward_features(images, **kwargs)


def head_outputs(model, module, images) -> torch.Tensor:
    """Per-head attention outputs of ``module`` (the input of its ``proj``): ``(B, N, heads, head_dim)``."""
    seen = {}
    handle = module.proj.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    try:
        features(model, images)
    finally:
        handle.remove()
    return seen["x"].reshape(*seen["x"].shape[:2], module.num_heads, -1)


# ----------------------------------------------------------------------------------------
# CaiT


def test_cait_leaves_class_attention_alone_and_says_so():
    case = CASE["timm-cait"]
    model = case.build(0)
    images = case.images(2, 1)
    class_attn = [(name, m) for name, m in model.named_modules() if isinstance(m, ClassAttn)]
    assert len(class_attn) == 2
    assert "2 class-attention layers (ClassAttn) are left global" in attnmask.describe(model).notes
    attnmask.apply(model, heads="all", window=3)
    report = attnmask.describe(model)
    assert [row.name for row in report.layers] == ["blocks.0.attn", "blocks.1.attn"]
    assert "2 class-attention layers (ClassAttn) are left global" in report.notes
    assert any("proj_w" in note for note in report.notes)
    for _, module in class_attn:
        assert type(module) is ClassAttn and not any(k.startswith("_attnmask") for k in vars(module))
    # The class token, appended after the self-attention blocks, is still in the output.
    assert features(model, images).shape[1] == 1 + case.grid[0] * case.grid[1]


def test_cait_all_heads_masked_is_local_and_head_mixing_leaks_otherwise():
    case = CASE["timm-cait"]
    images = case.images(1, 1)
    width = case.grid[1]
    query, near, far = (2, 3), (1, 2), (0, 0)

    def query_heads(model, pixels):
        return head_outputs(model, model.blocks[0].attn, pixels)[0, query[0] * width + query[1]]

    def moved(model, patch):
        pixels = images.clone()
        row, col = patch[0] * case.patch, patch[1] * case.patch
        pixels[:, :, row : row + case.patch, col : col + case.patch] += 1.0
        return query_heads(model, pixels)

    model = attnmask.apply(case.build(0), heads={0: "all"}, window=3)
    base = query_heads(model, images)
    assert torch.equal(moved(model, far), base)
    assert not torch.allclose(moved(model, near), base)
    # One masked head: proj_w mixes the global heads' far-reaching weights into it.
    attnmask.apply(model, heads={0: [0]}, window=3)
    base = query_heads(model, images)
    assert not torch.allclose(moved(model, far)[0], base[0])


def test_cait_reference_backend_agrees_and_kernels_are_refused():
    case = CASE["timm-cait"]
    model = case.build(0)
    images = case.images(2, 1)
    fast = features(attnmask.apply(model, heads=[0, 2], window=3), images)
    reference = features(attnmask.apply(model, heads=[0, 2], window=3, backend="reference"), images)
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-5)
    report = attnmask.describe(model)
    assert report.backend == "reference" and "float64" in report.resolved_backend
    # Talking heads mix all heads' logits and weights: no per-head kernel runs them, so asking
    # for one is an error that names what is accepted.
    for backend in ("sdpa", "flex"):
        with pytest.raises(ValueError, match="'auto', 'reference'"):
            attnmask.apply(model, heads=[0, 2], window=3, backend=backend)
    assert attnmask.get_spec(model).backend == "reference"  # the failed calls changed nothing


def visible_bias(model) -> None:
    """A position bias and logit scale large enough to matter (at init they are ~0 and 10)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "relative_position_bias_table" in name or "cpb_mlp" in name:
                param.normal_(std=1.0)
            if "logit_scale" in name:
                param.uniform_(0.5, 3.0)


def sharp_logits(model):
    """Swin v1 logits of order 1 (at init ``q k^T * scale`` is ~0, where soft changes little)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("attn.qkv.weight"):
                param.normal_(std=0.3)
    return model


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("case_id", ["timm-swin", "timm-swinv2"])
def test_swin_every_backend_and_mode_agrees_with_reference(case_id, mode):
    """Swin runs through attnmask's kernels: every backend, both modes, against the float64
    reference backend and against the float64 attention written from the weights."""
    case = CASE[case_id]
    model = sharp_logits(case.build(0))
    images = case.images(2, 1)
    reference = features(attnmask.apply(model, heads=[0, 2], window=3, backend="reference", mode=mode), images)
    report = attnmask.describe(model)
    assert report.backend == "reference" and report.resolved_backend == "reference" and report.mode == mode
    check_swin(model, images, swin_v1_attention64 if case_id == "timm-swin" else swin_v2_attention64)
    for backend in [b for b in BACKENDS if b != "reference"]:
        fast = features(attnmask.apply(model, heads=[0, 2], window=3, backend=backend, mode=mode), images)
        torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-5, msg=lambda m: f"{backend}: {m}")
        assert attnmask.get_spec(model).backend == backend and attnmask.describe(model).resolved_backend != "reference"
    check_swin(model, images, swin_v1_attention64 if case_id == "timm-swin" else swin_v2_attention64)
    other = features(attnmask.apply(model, heads=[0, 2], window=3, mode="soft" if mode == "hard" else "hard"), images)
    assert not torch.allclose(other, reference, atol=1e-4), "soft and hard gave the same outputs"


# ----------------------------------------------------------------------------------------
# Swin and SwinV2


@pytest.mark.parametrize("case_id", ["timm-swin", "timm-swinv2"])
def test_swin_shifted_block_is_local_in_the_shifted_frame(case_id):
    case = CASE[case_id]
    model = attnmask.apply(case.build(0), heads={1: "all"}, window=3)
    block = model.layers[0].blocks[1]
    assert block.shift_size == (2, 2) and tuple(block.window_size) == (4, 4)
    x = torch.randn(1, 8, 12, 16, generator=torch.Generator().manual_seed(0))

    def out_at(tokens, row, col):
        with torch.no_grad():
            return block(tokens)[0, row, col]

    def bumped(row, col):
        tokens = x.clone()
        tokens[0, row, col] += torch.linspace(-1.0, 1.0, 16)  # not a constant: LayerNorm would remove it
        return tokens

    # Shifted by 2, (3, 3) shares the attention window rows 2-5 x cols 2-5 with (3, 4) and (3, 5)
    # (unshifted, the column boundary at 4 would separate them).
    base = out_at(x, 3, 3)
    assert not torch.allclose(out_at(bumped(3, 4), 3, 3), base)  # inside the 3 x 3 window
    assert torch.equal(out_at(bumped(3, 5), 3, 3), base)  # same attention window, outside 3 x 3
    assert torch.equal(out_at(bumped(3, 6), 3, 3), base)  # another attention window
    attnmask.remove(model)
    assert not torch.allclose(out_at(bumped(3, 5), 3, 3), base)


@pytest.mark.filterwarnings("ignore::UserWarning")  # timm's bias-table interpolation on resize
@pytest.mark.parametrize("case_id", ["timm-swin", "timm-swinv2"])
def test_swin_mask_follows_a_changed_window_size(case_id):
    case = CASE[case_id]
    model = case.build(0)
    if not hasattr(model, "set_input_size"):
        pytest.skip("this timm has no set_input_size")
    images = case.images(2, 1)
    attnmask.apply(model, heads="all", window=7)
    assert any("covers the whole attention window" in note for note in attnmask.describe(model).notes)
    unpatched = features(attnmask.remove(model), images)
    torch.testing.assert_close(features(attnmask.apply(model, heads="all", window=7), images), unpatched)

    model.set_input_size(img_size=(32, 48), window_size=(8, 8))  # 8 x 8 windows on stage 0 (8 x 12)
    assert tuple(model.layers[0].blocks[0].attn.window_size) == (8, 8)
    assert attnmask.describe(model).grid == (8, 8)
    assert not any("covers" in note for note in attnmask.describe(model).notes)
    check_swin(model, images, swin_v1_attention64 if case_id == "timm-swin" else swin_v2_attention64)
    resized = features(model, images)
    assert not torch.allclose(resized, features(attnmask.remove(model), images), atol=1e-4)




def fused(model, on: bool = True):
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = on  # timm's experimental SDPA path for Swin v1 (off by default)
    return model


@pytest.mark.parametrize(
    "case_id, host_fused",
    [("timm-swin", True), ("timm-swin", False), ("timm-swinv2", False)],
    ids=["swin-fused-host", "swin-explicit-host", "swinv2"],
)
def test_swin_global_heads_unchanged_and_bias_kept(case_id, host_fused):
    """Global heads run through SDPA with the host's bias + shift mask: bit for bit timm's fused
    Swin path; against timm's explicit softmax (Swin's default, SwinV2's only path) equal up
    to float32 rounding."""
    case = CASE[case_id]
    model = case.build(0)
    visible_bias(model)
    if host_fused:
        fused(model)
    images = case.images(2, 1)
    attn = model.layers[0].blocks[1].attn  # a shifted block
    original = head_outputs(model, attn, images)
    attnmask.apply(model, heads={1: [0]}, window=3)  # only this block: its input stays the same
    masked = head_outputs(model, attn, images)
    if host_fused:
        assert torch.equal(masked[:, :, 1:], original[:, :, 1:])
    else:
        torch.testing.assert_close(masked[:, :, 1:], original[:, :, 1:], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(masked[:, :, 0], original[:, :, 0], atol=1e-4)
    # A window covering the attention window changes nothing: the host's bias is used as it is.
    attnmask.apply(model, heads="all", window=7)
    covered = head_outputs(model, attn, images)
    if host_fused:
        assert torch.equal(covered, original)
    else:
        torch.testing.assert_close(covered, original, rtol=1e-5, atol=1e-6)
    attnmask.remove(model)
    assert torch.equal(head_outputs(model, attn, images), original)


def test_swin_v1_fused_path():
    case = CASE["timm-swin"]
    model = fused(case.build(0))
    images = case.images(2, 1)
    attn = model.layers[0].blocks[1].attn
    original = head_outputs(model, attn, images)
    attnmask.apply(model, heads={1: [0]}, window=3)
    masked = head_outputs(model, attn, images)
    assert torch.equal(masked[:, :, 1:], original[:, :, 1:])
    attnmask.apply(model, heads=[0, 2], window=3)
    check_swin(model, images, swin_v1_attention64)


@pytest.mark.parametrize("case_id", ["timm-swin", "timm-swinv2"])
def test_swin_soft_mode_zeroes_logits_before_the_bias(case_id):
    """Soft mode on Swin: out-of-window ``q k^T * scale`` (SwinV2: ``cos * logit_scale``) logits
    are 0 and the bias and shift mask are still added, as the float64 definition says; a far
    key inside the attention window then still moves a soft head (hard: it does not)."""
    case = CASE[case_id]
    model = sharp_logits(case.build(0))
    visible_bias(model)
    images = case.images(2, 1)
    attention64 = swin_v1_attention64 if case_id == "timm-swin" else swin_v2_attention64
    attnmask.apply(model, heads={0: "all", 1: [1, 3]}, window=3, mode="soft")
    check_swin(model, images, attention64)
    soft = features(model, images)
    reference = features(attnmask.apply(model, heads={0: "all", 1: [1, 3]}, window=3, mode="soft", backend="reference"), images)
    torch.testing.assert_close(soft, reference, rtol=1e-4, atol=1e-5)

    block = model.layers[0].blocks[0]  # unshifted: one 4 x 4 attention window is rows 0-3, cols 0-3
    x = torch.randn(1, 8, 12, 16, generator=torch.Generator().manual_seed(0))
    moved = x.clone()
    moved[0, 0, 3] += torch.linspace(-1.0, 1.0, 16)  # same attention window as (3, 0), outside 3 x 3

    def at_query(tokens):
        with torch.no_grad():
            return block(tokens)[0, 3, 0]

    assert not torch.allclose(at_query(moved), at_query(x))  # soft: the far value leaks in
    attnmask.apply(model, heads={0: "all", 1: [1, 3]}, window=3)
    assert torch.equal(at_query(moved), at_query(x))  # hard: exactly local


def test_swinv2_notes_name_the_attention_windows():
    model = CASE["timm-swinv2"].build(0)
    notes = attnmask.describe(model).notes
    assert notes and "4x4 in layers 0-3" in notes[0]


# ----------------------------------------------------------------------------------------
# BEiT


def _beit(**extra):
    model = build_timm("beit_base_patch16_224", ("cls_token",), **VIT_LIKE, **extra)(0)
    with torch.no_grad():  # a position bias large enough to matter
        for name, param in model.named_parameters():
            if "relative_position_bias_table" in name:
                param.normal_(std=1.0)
    return model


@pytest.mark.parametrize("shared", [False, True], ids=["per-layer-bias", "shared-bias"])
def test_beit_relative_position_bias_kept(shared):
    extra = dict(use_rel_pos_bias=False, use_shared_rel_pos_bias=True) if shared else {}
    model = _beit(**extra)
    assert (model.rel_pos_bias is not None) == shared
    images = random_images((40, 56))(2, 1)
    unpatched = features(model, images)
    attnmask.apply(model, heads="all", window=(9, 13))  # covers the 5 x 7 grid
    torch.testing.assert_close(features(model, images), unpatched, rtol=1e-6, atol=1e-6)
    attnmask.apply(model, heads=[1, 3], window=3)
    fast = features(model, images)
    attnmask.apply(model, heads=[1, 3], window=3, backend="reference")
    torch.testing.assert_close(features(model, images), fast, rtol=1e-4, atol=1e-5)
    # The bias matters: without it the patched model gives other outputs.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "relative_position_bias_table" in name:
                param.zero_()
    assert not torch.allclose(features(model, images), fast, atol=1e-3)


# ----------------------------------------------------------------------------------------
# EVA


@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224", "vit_small_patch16_dinov3"])
def test_eva_rope_dynamic_size(name):
    model = build_timm(name, ("cls_token", "reg_token", "pos_embed"), **VIT_LIKE, dynamic_img_size=True)(0)
    assert model.rope is not None
    prefix = model.num_prefix_tokens
    images = random_images((24, 72))(1, 1)  # a 3 x 9 grid
    attnmask.apply(model, heads="all", window=3, backend="sdpa")
    fast = features(model, images)
    assert attnmask.describe(model).grid == (3, 9)
    attnmask.apply(model, heads="all", window=3, backend="reference")
    torch.testing.assert_close(features(model, images), fast, rtol=1e-4, atol=1e-5)
    # Locality at this size, in the first block's attention output.
    query = prefix + 1 * 9 + 4
    base = head_outputs(model, model.blocks[0].attn, images)[0, query]
    moved = images.clone()
    moved[:, :, 16:24, 56:64] += 1.0  # patch (2, 7): outside the 3 x 3 window of (1, 4)
    assert torch.equal(head_outputs(model, model.blocks[0].attn, moved)[0, query], base)
    moved = images.clone()
    moved[:, :, 16:24, 40:48] += 1.0  # patch (2, 5): inside
    assert not torch.allclose(head_outputs(model, model.blocks[0].attn, moved)[0, query], base)


def test_eva_host_attn_mask_kept():
    model = CASE["timm-eva02-rope"].build(0)
    images = CASE["timm-eva02-rope"].images(2, 1)
    n = 1 + 35
    host_mask = torch.rand(n, n, generator=torch.Generator().manual_seed(0)) > 0.3
    host_mask |= torch.eye(n, dtype=torch.bool)
    unpatched = features(model, images, attn_mask=host_mask)
    attnmask.apply(model, heads="all", window=(9, 13))
    torch.testing.assert_close(features(model, images, attn_mask=host_mask), unpatched, rtol=1e-6, atol=1e-6)
    attnmask.apply(model, heads=[0, 2], window=3)
    fast = features(model, images, attn_mask=host_mask)
    attnmask.apply(model, heads=[0, 2], window=3, backend="reference")
    torch.testing.assert_close(features(model, images, attn_mask=host_mask), fast, rtol=1e-4, atol=1e-5)


def test_eva_patch_dropout_in_training():
    model = build_timm("eva02_tiny_patch14_224", ("cls_token",), **VIT_LIKE, patch_drop_rate=0.5)(0)
    images = random_images((40, 56))(2, 1)
    model.train()

    def run(backend):
        attnmask.apply(model, heads=[0, 2], window=3, backend=backend)
        torch.manual_seed(3)  # the same kept patches in every run
        with torch.no_grad():
            return model.forward_features(images)

    fast = run("sdpa")
    assert fast.shape[1] == 1 + 17  # the class token and 17 of the 35 patches
    # The mask of the latest forward is the full-layout mask read at each kept patch's position.
    attn = model.blocks[0].attn
    keep = attn._attnmask_kept.keep
    mask = attn._attnmask_tokens.mask(attn._attnmask_plan, 2, 1 + 17, attn._attnmask_kept)
    full = brute_force_mask((5, 7), (3, 3), 1, 4, (0, 2))
    for sample in range(2):
        positions = torch.cat([torch.zeros(1, dtype=torch.long), 1 + keep[sample]])
        expected = full[:, positions[:, None], positions[None, :]]
        assert torch.equal(mask.dense()[sample], expected)
    torch.testing.assert_close(run("reference"), fast, rtol=1e-4, atol=1e-5)
    attnmask.remove(model)
    torch.manual_seed(3)
    with torch.no_grad():
        assert not torch.allclose(model.forward_features(images), fast, atol=1e-4)
    assert not any(model.patch_drop._forward_hooks.values())

