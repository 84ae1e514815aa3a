"""Mixed precision (issue 16, part 2): bf16 and fp16, by autocast and by casting the model.

1. No fully masked row can arise: for every geometry, prefix policy, head subset and
   per-sample layout, every query row of every head keeps at least one key (its own token),
   in every cached form of the mask and combined with a Swin-style shift mask. A fully
   masked row is what turns a ``-inf`` mask into NaN (softmax of all ``-inf``), and NaN rows
   are what half precision is blamed for.
2. The kernels in bfloat16 / float16 (cast inputs, and float32 inputs under CPU autocast):
   finite outputs and gradients, and equal to the float64 reference within a tolerance of
   the dtype.
3. Patched models (timm ViT with 0-4 prefix tokens and a dynamic grid, one Hugging Face ViT,
   one torchvision ViT): forward and backward finite under autocast and after ``.half()`` /
   ``.to(torch.bfloat16)``, still masked after the cast.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnmask
from attnmask.kernels import blocked_attention, flex_attention, reference_attention, sdpa_attention
from attnmask.kernels.blocked import build_blocking
from attnmask.masks import LocalMask, combine_masks

HALF_DTYPES = (torch.bfloat16, torch.float16)


def examples(n: int) -> int:
    """``n`` examples under the CI profile (25 by default), proportionally more under ``dev``."""
    return max(1, n * settings.default.max_examples // 25)


odd_1_to_9 = st.sampled_from([1, 3, 5, 7, 9])


@st.composite
def positions_for(draw, prefix_tokens: int, grid: tuple[int, int], batch: int):
    """Per-sample layouts (``LocalMask.positions``), or ``None`` for the full layout in order.

    ``"mae"``: prefix tokens first, then a per-sample shuffled subset of the patches (ViTMAE's
    random masking, timm's patch dropout); ``"any"``: any per-sample subset of the full
    layout in any order (prefix tokens may be dropped or moved)."""
    kind = draw(st.sampled_from([None, "mae", "any"]))
    if kind is None:
        return None
    patches = grid[0] * grid[1]
    if kind == "mae":
        keep = draw(st.integers(1, patches))
        rows = [
            list(range(prefix_tokens)) + [prefix_tokens + p for p in draw(st.permutations(range(patches)))[:keep]]
            for _ in range(batch)
        ]
    else:
        full = prefix_tokens + patches
        keep = draw(st.integers(1, full))
        rows = [draw(st.permutations(range(full)))[:keep] for _ in range(batch)]
    return torch.tensor(rows, dtype=torch.long)


@st.composite
def local_masks(draw, max_side: int = 8, max_heads: int = 4, batch: int = 2, mode=None, positions: bool = True):
    """A :class:`LocalMask`: grid 1..max_side per side, odd windows 1..9 (often larger than
    the grid), 0-4 prefix tokens, either prefix policy, any head subset (all included),
    sometimes per-sample positions."""
    grid = (draw(st.integers(1, max_side)), draw(st.integers(1, max_side)))
    window = (draw(odd_1_to_9), draw(odd_1_to_9))
    prefix_tokens = draw(st.integers(0, 4))
    num_heads = draw(st.integers(1, max_heads))
    heads = tuple(sorted(draw(st.one_of(st.just(set(range(num_heads))), st.sets(st.integers(0, num_heads - 1))))))
    prefix = draw(st.sampled_from(["global", "isolated"]))
    mode = draw(st.sampled_from(["hard", "soft"])) if mode is None else mode
    layout = draw(positions_for(prefix_tokens, grid, batch)) if positions else None
    return LocalMask(grid, window, prefix_tokens, num_heads, heads, prefix, positions=layout, mode=mode)


# 1. No fully masked row ---------------------------------------------------------------------
#
# Mutation check (done by hand on a scratch copy, not kept): in masks.local_window, changing
# ``(q_row - kv_row).abs() <= radius_h`` to ``< radius_h`` (a window that excludes its own
# row) leaves 1-row windows seeing nothing, and test_every_row_keeps_a_key fails at once
# (falsifying example: window (1, k), no prefix tokens or prefix="isolated"). Dropping
# ``q_prefix |`` from the isolated branch fails it too (prefix queries with no key).


@settings(max_examples=examples(60))
@given(mask=local_masks())
def test_every_row_keeps_a_key(mask: LocalMask):
    dense = mask.dense()  # (heads, N, N), or (batch, heads, N, N) with positions
    assert dense.any(-1).all(), "a query row with no allowed key (softmax of all -inf is NaN)"
    # Why: every query may attend to itself (its own patch is inside its window; prefix
    # queries are global), whatever the layout.
    assert dense.diagonal(dim1=-2, dim2=-1).all()
    window = mask.window_mask()
    assert window.any(-1).all() and window.diagonal(dim1=-2, dim2=-1).all()
    if mask.positions is None:
        assert (~mask.forbidden()).any(-1).all()
        for dtype in (torch.float32, *HALF_DTYPES):
            for additive in (mask.additive_mask(dtype=dtype), mask.head_additive_mask(dtype=dtype)):
                assert additive.dtype == dtype
                assert additive.isfinite().any(-1).all()
                assert set(additive.unique().tolist()) <= {0.0, float("-inf")}


@settings(max_examples=examples(40))
@given(mask=local_masks(positions=False), block=st.tuples(st.integers(1, 8), st.integers(1, 8)))
def test_blocked_rows_keep_a_key(mask: LocalMask, block: tuple[int, int]):
    """The blocked backend's block-space window (each query against its block's halo) keeps
    every query's own token too, for any query block (the halo is clipped and shifted at the
    border), and so does its additive form in half precision."""
    layout = build_blocking(mask, block, torch.device("cpu"))
    assert layout.allowed.any(-1).all()
    queries = layout.queries.view(layout.blocks, -1, 1)
    keys = layout.keys.view(layout.blocks, 1, -1)
    own = (queries == keys) & layout.allowed[0]
    assert own.any(-1).all()


def swin_shift_mask(windows: tuple[int, int], size: int, shift: int) -> torch.Tensor:
    """Swin's shifted-window attention mask (as timm, torchvision and transformers build it):
    ``(num_windows, size * size, size * size)``, 0 between tokens of one region, -100 elsewhere."""
    height, width = windows[0] * size, windows[1] * size
    labels = torch.zeros(height, width)
    cuts = (slice(0, -size), slice(-size, -shift), slice(-shift, None)) if shift else (slice(None),)
    region = 0
    for rows in cuts:
        for cols in cuts:
            labels[rows, cols] = region
            region += 1
    tiles = labels.view(windows[0], size, windows[1], size).permute(0, 2, 1, 3).reshape(-1, size * size)
    differ = tiles[:, :, None] != tiles[:, None, :]
    return torch.zeros(differ.shape).masked_fill(differ, -100.0)


@settings(max_examples=examples(30))
@given(
    windows=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    size=st.integers(1, 6),
    shift_fraction=st.floats(0, 0.99),
    window=st.tuples(odd_1_to_9, odd_1_to_9),
)
def test_swin_shift_mask_combined_keeps_a_key(windows, size, shift_fraction, window):
    """The locality mask added to a Swin shift mask (additive -100 or boolean) in every
    dtype: each row keeps its own token at a finite logit, and the softmax has no NaN."""
    shift = int(shift_fraction * size)
    host = swin_shift_mask(windows, size, shift)
    local = LocalMask((size, size), window, 0, 1, (0,)).window_mask()
    for dtype in (torch.float32, *HALF_DTYPES):
        combined = combine_masks(host.to(dtype), local, dtype)
        assert combined.dtype == dtype
        assert (combined.diagonal(dim1=-2, dim2=-1) == 0).all()
        assert not combined.float().softmax(-1).isnan().any()
        boolean = combine_masks(host == 0, local, dtype)
        assert boolean.diagonal(dim1=-2, dim2=-1).all()


# 2. Kernels in half precision ------------------------------------------------------------


def flex_eager(q, k, v, mask, **kwargs):
    """FlexAttention's eager implementation: the compiled CPU kernel would compile once per
    drawn shape (tens of seconds each); both run the same block mask and score_mod."""
    return flex_attention(q, k, v, mask, compiled=False, **kwargs)


KERNEL_BACKENDS = {"sdpa": sdpa_attention, "blocked": blocked_attention, "flex": flex_eager}
TRAINS = {"sdpa": True, "blocked": True, "flex": False}  # FlexAttention has no CPU backward

# |actual - reference| <= ATOL + RTOL * |reference|, with the reference computed in float64
# from the very inputs the kernel got (values representable in the half dtype), so the bound
# is the kernel's own rounding: unit-scale inputs, logits of unit scale, bf16 has 8 mantissa
# bits, fp16 11. Under the dev profile (480 examples) the worst error reached 0.2-0.6 of
# these bounds.
OUT_TOLERANCE = {torch.bfloat16: (1.5e-2, 1e-2), torch.float16: (2.5e-3, 2e-3)}
GRAD_TOLERANCE = {torch.bfloat16: (3e-2, 2e-2), torch.float16: (4e-3, 4e-3)}


def _close(actual: torch.Tensor, expected: torch.Tensor, tolerance: tuple[float, float], what: str) -> None:
    atol, rtol = tolerance
    error = (actual.double() - expected).abs()
    bound = atol + rtol * expected.abs()
    assert error.le(bound).all(), f"{what}: max error {error.max().item():.3g}, worst excess {(error - bound).max().item():.3g}"


@settings(max_examples=examples(40))
@given(
    mask=local_masks(max_side=5, max_heads=3),
    dtype=st.sampled_from(HALF_DTYPES),
    backend=st.sampled_from(sorted(KERNEL_BACKENDS)),
    autocast=st.booleans(),
    amplitude=st.sampled_from([1.0, 1.0, 1.0, 64.0]),
    seed=st.integers(0, 2**16),
)
def test_kernels_half_precision(mask: LocalMask, dtype, backend: str, autocast: bool, amplitude: float, seed: int):
    """Each CPU backend in bf16/fp16, by cast inputs or float32 inputs under autocast, both
    modes, any geometry: finite outputs and gradients (flex: outputs only, no CPU backward),
    within the dtype's rounding of the float64 reference. ``amplitude=64`` (logits of
    magnitude ~10^3, soft mode's zeroed logits far from the real ones, values near fp16's
    range after the product): finite only, the comparison would measure the inputs'
    rounding, not the kernel."""
    generator = torch.Generator().manual_seed(seed)
    shape = (2, mask.num_heads, mask.num_tokens, 8)
    # Inputs are values representable in ``dtype``; with autocast they are handed over as
    # float32 and autocast rounds them back to exactly these.
    inputs = [(amplitude * torch.randn(shape, generator=generator)).to(dtype) for _ in range(3)]
    if autocast:
        inputs = [t.float() for t in inputs]
    trains = TRAINS[backend]
    leaves = [t.clone().requires_grad_(trains) for t in inputs]
    with torch.set_grad_enabled(trains), torch.autocast("cpu", dtype=dtype, enabled=autocast):
        out = KERNEL_BACKENDS[backend](*leaves, mask)
    assert out.shape == shape
    assert out.dtype == dtype if not autocast else out.dtype in (dtype, torch.float32)
    assert out.isfinite().all()

    if amplitude != 1.0:
        if trains:
            out.float().square().mean().backward()
            assert all(leaf.grad.isfinite().all() for leaf in leaves), f"{backend}: non-finite gradients"
        return

    exact = [t.double().requires_grad_(trains) for t in inputs]
    with torch.set_grad_enabled(trains):
        reference = reference_attention(*exact, mask)
    _close(out, reference.detach(), OUT_TOLERANCE[dtype], f"{backend} output")

    if trains:
        upstream = torch.randn(shape, generator=generator)
        (out.float() * upstream).sum().backward()
        (reference * upstream.double()).sum().backward()
        for name, leaf, ref in zip("qkv", leaves, exact):
            assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype
            assert leaf.grad.isfinite().all(), f"{backend}: d{name} not finite"
            _close(leaf.grad, ref.grad, GRAD_TOLERANCE[dtype], f"{backend} d{name}")


@pytest.mark.parametrize("backend", ["sdpa", "blocked", "flex"])
def test_autocast_float32_queries_with_scattered_global_heads(backend: str):
    """Regression: float32 q/k/v under autocast with global heads that are not consecutive
    (heads=(1,) of 3: global heads [0, 2]). SDPA returns bf16 for them, and writing that into
    the float32 output by index (not a slice's copy_) raised "Index put requires the source
    and destination dtypes match"; kernels.common.split_heads_into now casts it."""
    mask = LocalMask((2, 3), (1, 3), 1, 3, (1,))
    q, k, v = (torch.randn(2, 3, mask.num_tokens, 8).bfloat16().float() for _ in range(3))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = KERNEL_BACKENDS[backend](q, k, v, mask)
    assert out.isfinite().all()
    _close(out, reference_attention(q.double(), k.double(), v.double(), mask), OUT_TOLERANCE[torch.bfloat16], backend)


# 3. Patched models ---------------------------------------------------------------------------

PATCH = 8
TIMM_MODELS: dict[int, torch.nn.Module] = {}
"""Tiny timm ViTs by prefix token count, built once (each example patches a deep copy)."""


def timm_vit(prefix_tokens: int) -> torch.nn.Module:
    """A 2-block, 4-head timm ViT (8 px patches, any grid) with ``prefix_tokens`` prefix
    tokens: a class token and/or register tokens, random (not timm's near-zero init)."""
    if prefix_tokens not in TIMM_MODELS:
        import timm

        class_token = prefix_tokens in (1, 2, 4)
        torch.manual_seed(prefix_tokens)
        model = timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            img_size=32,
            patch_size=PATCH,
            embed_dim=32,
            depth=2,
            num_heads=4,
            dynamic_img_size=True,
            class_token=class_token,
            reg_tokens=prefix_tokens - class_token,
            global_pool="token" if class_token else "avg",
            num_classes=0,
        )
        assert model.num_prefix_tokens == prefix_tokens
        with torch.no_grad():
            for name in ("cls_token", "reg_token", "pos_embed"):
                if getattr(model, name, None) is not None:
                    getattr(model, name).normal_(std=0.5)
        TIMM_MODELS[prefix_tokens] = model.train()
    return TIMM_MODELS[prefix_tokens]


def assert_finite_backward(model: torch.nn.Module, features: torch.Tensor) -> None:
    """``features`` finite; after a backward of a loss of them, every parameter gradient
    (attention projections included) exists where it should and is finite."""
    assert features.isfinite().all(), "non-finite features"
    features.float().square().mean().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert all(grads[name] is not None for name in grads if ".attn.qkv." in name or ".attn.in_proj" in name)
    bad = [name for name, grad in grads.items() if grad is not None and not grad.isfinite().all()]
    assert not bad, f"non-finite gradients: {bad}"


COVERS_GRID = "ignore:attnmask. window .* covers the whole:UserWarning"  # windows larger than the grid are drawn on purpose


@pytest.mark.filterwarnings(COVERS_GRID)
@settings(max_examples=examples(30))
@given(
    prefix_tokens=st.integers(0, 4),
    grid=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    window=st.tuples(odd_1_to_9, odd_1_to_9),
    heads=st.one_of(st.just({0, 1, 2, 3}), st.sets(st.integers(0, 3), min_size=1)),
    prefix=st.sampled_from(["global", "isolated"]),
    mode=st.sampled_from(["hard", "soft"]),
    backend=st.sampled_from(["auto", "sdpa", "blocked"]),
    dtype=st.sampled_from(HALF_DTYPES),
    cast=st.booleans(),
)
def test_timm_vit_half_precision(prefix_tokens, grid, window, heads, prefix, mode, backend, dtype, cast):
    """A patched timm ViT in bf16/fp16, by autocast or by casting the patched model
    (``.half()`` / ``.to(torch.bfloat16)``): finite features and gradients for every grid
    (``dynamic_img_size``), window, prefix token count and policy, mode and backend. A cast
    model is still patched and still masked: its features differ from the unpatched model's
    at the same dtype whenever the mask restricts something."""
    base = timm_vit(prefix_tokens)
    model = attnmask.apply(copy.deepcopy(base), heads=sorted(heads), window=window, prefix=prefix, mode=mode, backend=backend)
    images = torch.randn(2, 3, grid[0] * PATCH, grid[1] * PATCH, generator=torch.Generator().manual_seed(0))
    if not cast:
        with torch.autocast("cpu", dtype=dtype):
            features = model.forward_features(images)
        assert features.dtype in (dtype, torch.float32)
        assert_finite_backward(model, features)
        return
    model = model.half() if dtype == torch.float16 else model.to(torch.bfloat16)
    spec = attnmask.get_spec(model)
    assert spec is not None and spec.mode == mode
    features = model.forward_features(images.to(dtype))
    assert features.dtype == dtype
    assert_finite_backward(model, features)
    geometry = LocalMask(grid, window, prefix_tokens, 4, tuple(sorted(heads)), prefix, mode=mode)
    if not geometry.is_identity:
        with torch.no_grad():
            plain = copy.deepcopy(base).to(dtype).forward_features(images.to(dtype))
        assert not torch.equal(features.detach(), plain), "the cast model is no longer masked"


def hf_vit() -> torch.nn.Module:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=40, patch_size=8)
    return ViTModel(config, add_pooling_layer=False)


def hf_swin() -> torch.nn.Module:
    from transformers import SwinConfig, SwinModel

    torch.manual_seed(0)
    config = SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4)
    return SwinModel(config, add_pooling_layer=False)


def torchvision_vit() -> torch.nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=40, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=8)
    with torch.no_grad():
        model.heads.head.weight.normal_(std=0.5)  # torchvision zero-initialises the head
    return model


def hidden(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.last_hidden_state


# (build, images, forward kwargs): heads=[1] leaves global heads 0, 2, 3 (not consecutive).
HOSTS = {
    "hf-vit": (hf_vit, (48, 32), {"interpolate_pos_encoding": True}),
    "hf-swin": (hf_swin, (32, 32), {}),  # the shifted blocks pass Swin's -100 shift mask
    "torchvision-vit": (torchvision_vit, (40, 40), {}),
}


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("host", sorted(HOSTS))
def test_other_hosts_half_precision(host: str, mode: str, dtype):
    """Hugging Face ViT and Swin (whose shift mask attnmask adds to) and torchvision's ViT,
    patched, under autocast and cast to ``dtype``: finite outputs and gradients, and still
    masked after the cast."""
    pytest.importorskip("torchvision" if host.startswith("torchvision") else "transformers")
    build, size, kwargs = HOSTS[host]
    base = build().train()
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    model = attnmask.apply(copy.deepcopy(base), heads=[1], window=3, mode=mode, backend="auto")
    with torch.autocast("cpu", dtype=dtype):
        out = hidden(model(images, **kwargs))
    assert_finite_backward(model, out)

    model.zero_grad()
    model = model.to(dtype)
    assert attnmask.get_spec(model) is not None
    out = hidden(model(images.to(dtype), **kwargs))
    assert out.dtype == dtype
    assert_finite_backward(model, out)
    with torch.no_grad():
        plain = hidden(copy.deepcopy(base).to(dtype)(images.to(dtype), **kwargs))
    assert not torch.equal(out.detach(), plain), "the cast model is no longer masked"
