"""The issue's acceptance model: timm vit_small_patch16_224 (random weights) at 224 px,
``heads=3, window=7``; plus a model-level hypothesis search over input sizes and masks."""

import copy

import pytest
import torch
from helpers import make_timm
from hypothesis import given
from hypothesis import strategies as st

import attnmask

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def vit_small():
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False).eval()


def block0_heads(model, images):
    seen = {}
    handle = model.blocks[0].attn.proj.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    with torch.no_grad():
        out = model(images)
    handle.remove()
    return out, seen["x"].reshape(images.shape[0], 197, 6, 64)


def test_vit_small_heads_3_window_7(vit_small):
    model = attnmask.apply(copy.deepcopy(vit_small), heads=3, window=7)
    spec = attnmask.get_spec(model)
    assert spec.num_layers == 12 and spec.heads == ((0, 1, 2),) * 12 and spec.window == (7, 7)

    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    expected, expected_heads = block0_heads(vit_small, images)
    out, heads = block0_heads(model, images)
    assert torch.equal(heads[..., 3:, :], expected_heads[..., 3:, :])  # global heads, bit for bit
    assert not torch.allclose(heads[..., :3, :], expected_heads[..., :3, :], atol=1e-4)

    # Locality at query patch (7, 7): patch (7, 11) is outside the 7 x 7 window, (7, 10) inside.
    query = 1 + 7 * 14 + 7
    for col, inside in ((11, False), (10, True), (3, False), (4, True)):
        changed = images.clone()
        changed[:, :, 7 * 16 : 8 * 16, col * 16 : (col + 1) * 16] += 1.0
        moved = block0_heads(model, changed)[1][0, query, :3]
        assert torch.equal(moved, heads[0, query, :3]) != inside, col

    attnmask.remove(model)
    with torch.no_grad():
        assert torch.equal(model(images), expected)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), vit_small.state_dict().values()))


def test_vit_small_matches_float64_reference_and_trains(vit_small):
    model = copy.deepcopy(vit_small).double()
    images = torch.randn(1, 3, 224, 224, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sdpa = attnmask.apply(copy.deepcopy(model), heads=3, window=7)
    reference = attnmask.apply(model, heads=3, window=7, backend="reference")
    with torch.no_grad():
        torch.testing.assert_close(sdpa(images), reference(images), rtol=1e-10, atol=1e-10)
    sdpa.float().train()
    sdpa(images.float()).logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in sdpa.parameters())


@given(
    size=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    window=st.tuples(st.integers(0, 4), st.integers(0, 4)).map(lambda w: (2 * w[0] + 1, 2 * w[1] + 1)),
    heads=st.sets(st.integers(0, 3), min_size=1).map(sorted),
    prefix=st.sampled_from(["global", "isolated"]),
    family=st.sampled_from(["vit_dynamic", "vit_reg4_dynamic", "siglip_dynamic"]),
)
def test_any_input_size_matches_reference(size, window, heads, prefix, family):
    base = {"vit_dynamic": "vit_dynamic", "vit_reg4_dynamic": "vit_reg4", "siglip_dynamic": "siglip"}[family]
    model = make_timm(base, dynamic_img_size=True).double()
    images = torch.randn(1, 3, size[0] * 8, size[1] * 8, dtype=torch.float64)
    sdpa = attnmask.apply(copy.deepcopy(model), heads=heads, window=window, prefix=prefix)
    reference = attnmask.apply(model, heads=heads, window=window, prefix=prefix, backend="reference")
    with torch.no_grad():
        torch.testing.assert_close(sdpa(images), reference(images), rtol=1e-10, atol=1e-10)
    assert attnmask.describe(sdpa).grid == size
