"""The six properties on every timm family the adapter supports (tiny configs, CPU)."""

import copy
import io

import pytest
import torch
from helpers import TIMM_FAMILIES, grid_of, images_for, make_timm, same_snapshot, snapshot

import attnmask

timm = pytest.importorskip("timm")
from timm.layers import Attention  # noqa: E402

FAMILIES = sorted(TIMM_FAMILIES)


def run(model, images):
    with torch.no_grad():
        return model(images)


def first_attention_io(model, images):
    """(input, output) of the first block's attention module."""
    seen = {}
    attn = model.blocks[0].attn
    handle = attn.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    try:
        run(model, images)
    finally:
        handle.remove()
    return seen["x"], seen["y"]


def head_outputs(model, images, block=0):
    """Per-head attention outputs of a block, (B, N, heads, head_dim)."""
    seen = {}
    attn = model.blocks[block].attn
    handle = attn.proj.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    try:
        run(model, images)
    finally:
        handle.remove()
    return seen["x"].reshape(*seen["x"].shape[:2], attn.num_heads, -1)


@pytest.mark.parametrize("family", FAMILIES)
def test_identity(family):
    model = make_timm(family)
    images = images_for(family)
    expected = run(model, images)
    attnmask.apply(model, heads=0, window=3)
    assert torch.equal(run(model, images), expected)
    attnmask.apply(model, heads="all", window=(2 * grid_of(family)[0] - 1, 2 * grid_of(family)[1] - 1))
    assert torch.equal(run(model, images), expected)
    unpatched_attention = first_attention_io(model, images)[1]
    attnmask.apply(model, heads="all", window=3)
    assert not torch.allclose(first_attention_io(model, images)[1], unpatched_attention, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prefix", ["global", "isolated"])
def test_sdpa_matches_float64_reference(family, prefix):
    model = make_timm(family).double()
    images = images_for(family).double()
    sdpa = attnmask.apply(copy.deepcopy(model), heads=[0, 2], window=(3, 5), prefix=prefix, backend="sdpa")
    reference = attnmask.apply(copy.deepcopy(model), heads=[0, 2], window=(3, 5), prefix=prefix, backend="reference")
    torch.testing.assert_close(run(sdpa, images), run(reference, images), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(first_attention_io(sdpa, images)[1], first_attention_io(model, images)[1], atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_locality_in_first_block(family):
    model = attnmask.apply(make_timm(family), heads={0: "all"}, window=3)
    images = images_for(family, batch=1)
    rows, cols = grid_of(family)
    prefix = TIMM_FAMILIES[family][2]
    query_row, query_col = 1, 1
    query = prefix + query_row * cols + query_col
    base = first_attention_io(model, images)[1][0, query]
    for row in range(rows):
        for col in range(cols):
            changed = images.clone()
            changed[:, :, row * 8 : (row + 1) * 8, col * 8 : (col + 1) * 8] += 1.0
            out = first_attention_io(model, changed)[1][0, query]
            inside = abs(row - query_row) <= 1 and abs(col - query_col) <= 1
            assert torch.equal(out, base) != inside, (row, col)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("heads", [[1, 3], [0, 1], [2]])
def test_global_heads_untouched(family, heads):
    model = make_timm(family)
    images = images_for(family)
    expected = head_outputs(model, images)
    patched = attnmask.apply(copy.deepcopy(model), heads={0: heads}, window=3)
    got = head_outputs(patched, images)
    for h in range(4):
        assert torch.equal(got[:, :, h], expected[:, :, h]) == (h not in heads)


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_and_state_dict(family):
    model = make_timm(family)
    images = images_for(family)
    expected = run(model, images)
    before = snapshot(model)
    keys = list(model.state_dict())
    attnmask.apply(model, heads=[0, 3], window=3)
    assert list(model.state_dict()) == keys
    assert all(torch.equal(v, before["state"][k]) for k, v in model.state_dict().items())
    assert all(type(m) is not Attention for _, m in model.named_modules() if hasattr(m, "qkv"))
    attnmask.remove(model)
    assert same_snapshot(before, snapshot(model))
    assert torch.equal(run(model, images), expected)
    assert not attnmask.is_patched(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_flow(family):
    torch.manual_seed(0)
    model = attnmask.apply(make_timm(family, drop_rate=0.0), heads=2, window=3).train()
    images = images_for(family).requires_grad_(True)
    model(images).square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(grads[f"blocks.{i}.attn.qkv.weight"].abs().sum() > 0 for i in range(2))
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_gradient_is_local():
    """d(masked head output at a query) / d(token outside the window) is exactly zero."""
    model = attnmask.apply(make_timm("vit"), heads="all", window=3)
    attn = model.blocks[0].attn
    tokens = torch.randn(1, 1 + 5 * 7, 32, requires_grad=True)
    query = 1 + 2 * 7 + 3
    attn(tokens)[0, query].sum().backward()
    moved = tokens.grad[0].abs().sum(-1) > 0
    expected = torch.zeros(1 + 5 * 7, dtype=torch.bool)
    expected[0] = True  # class token, global
    for r in (1, 2, 3):
        for c in (2, 3, 4):
            expected[1 + r * 7 + c] = True
    assert torch.equal(moved, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_dropout_in_training(family):
    model = attnmask.apply(make_timm(family, attn_drop_rate=0.5), heads=2, window=3).train()
    out = model(images_for(family))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_deepcopy_and_pickle(family):
    model = attnmask.apply(make_timm(family), heads=[1], window=5)
    images = images_for(family)
    expected = run(model, images)
    copied = copy.deepcopy(model)
    assert torch.equal(run(copied, images), expected)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(run(loaded, images), expected)
    assert attnmask.get_spec(loaded) == attnmask.get_spec(model)
    attnmask.remove(loaded)
    attnmask.remove(model)
    assert torch.equal(run(loaded, images), run(model, images))


def test_dynamic_image_sizes_use_the_real_grid():
    model = attnmask.apply(make_timm("vit_dynamic"), heads={0: "all"}, window=3)
    for height, width in [(48, 32), (32, 48), (24, 64), (40, 56)]:
        images = torch.randn(1, 3, height, width)
        run(model, images)
        assert attnmask.describe(model).grid == (height // 8, width // 8)
        cols = width // 8
        # Patch (0, 2) is outside the 3x3 window of patch (2, 0) whatever the aspect ratio,
        # but a square-grid guess would put them next to each other in some layouts.
        query = 1 + 2 * cols + 0
        base = first_attention_io(model, images)[1][0, query]
        changed = images.clone()
        changed[:, :, 0:8, 16:24] += 1.0
        assert torch.equal(first_attention_io(model, changed)[1][0, query], base)
        changed = images.clone()
        changed[:, :, 8:16, 8:16] += 1.0  # patch (1, 1): a neighbour
        assert not torch.equal(first_attention_io(model, changed)[1][0, query], base)


def _compiled_matches_eager(family, images_list):
    torch._dynamo.reset()
    model = attnmask.apply(make_timm(family), heads=[0, 2], window=3)
    compiled = torch.compile(model, fullgraph=True)
    for images in images_list:
        torch.testing.assert_close(run(compiled, images), run(model, images), rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_dynamic_grid():
    _compiled_matches_eager("vit_dynamic", [torch.randn(2, 3, 48, 32), torch.randn(2, 3, 24, 64)])


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_compile_fullgraph_every_family(family):
    _compiled_matches_eager(family, [images_for(family)])
