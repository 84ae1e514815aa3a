"""The public API: errors, untouched models on failure, re-apply, describe, lazy imports."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import images_for, make_timm, same_snapshot, snapshot

import attnmask

pytest.importorskip("timm")


BAD_CALLS = [
    (dict(window=4), ValueError, "window=4"),
    (dict(window=0), ValueError, "window=0"),
    (dict(window=(3, 4)), ValueError, "window=(3, 4)"),
    (dict(window="7"), TypeError, "window='7'"),
    (dict(window=7.0), TypeError, "window=7.0"),
    (dict(heads=5), ValueError, "heads=5"),
    (dict(heads=-1), ValueError, "heads=-1"),
    (dict(heads=[4]), ValueError, "head index 4"),
    (dict(heads="most"), ValueError, "heads='most'"),
    (dict(heads={2: 1}), ValueError, "layer indices"),
    (dict(heads=lambda layer, layers, n: n + 1), ValueError, "heads(0, 2, 4)=5"),
    (dict(prefix="local"), ValueError, "prefix='local'"),
    (dict(backend="flash"), ValueError, "backend='flash'"),
]


@pytest.mark.parametrize("kwargs, error, fragment", BAD_CALLS)
def test_failing_apply_leaves_model_untouched(kwargs, error, fragment):
    model = make_timm("vit")
    before = snapshot(model)
    with pytest.raises(error) as info:
        attnmask.apply(model, **{"heads": 2, "window": 3, **kwargs})
    assert fragment in str(info.value)
    assert same_snapshot(before, snapshot(model))
    assert not attnmask.is_patched(model)


@pytest.mark.parametrize("kwargs, error, fragment", BAD_CALLS[:4])
def test_failing_apply_keeps_previous_masks(kwargs, error, fragment):
    model = attnmask.apply(make_timm("vit_dynamic"), heads=[1], window=5)
    images = images_for("vit_dynamic")
    with torch.no_grad():
        expected = model(images)
    before, spec = snapshot(model), attnmask.get_spec(model)
    with pytest.raises(error):
        attnmask.apply(model, **{"heads": 2, "window": 3, **kwargs})
    assert same_snapshot(before, snapshot(model)) and attnmask.get_spec(model) == spec
    with torch.no_grad():
        assert torch.equal(model(images), expected)


def test_apply_on_patched_model_replaces_masks():
    model = make_timm("vit")
    images = images_for("vit")
    once = attnmask.apply(make_timm("vit"), heads=[3], window=3)
    attnmask.apply(model, heads="all", window=5)
    attnmask.apply(model, heads=[3], window=3)
    assert attnmask.get_spec(model).heads == ((3,), (3,))
    with torch.no_grad():
        assert torch.equal(model(images), once(images))
    attnmask.remove(model)
    with torch.no_grad():
        assert torch.equal(model(images), make_timm("vit")(images))


def test_masks_are_not_built_inside_a_forward_after_the_first(monkeypatch):
    from attnmask import masks

    model = attnmask.apply(make_timm("vit_dynamic"), heads=2, window=3)
    images = images_for("vit_dynamic")
    attnmask.mask_cache(model).clear()  # the installation's cache: built from nothing below
    calls = []
    real = masks.evaluate
    monkeypatch.setattr(masks, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        model(images)
        first = len(calls)
        model(images)
        model(images)
    assert first == 1  # one geometry, shared by both layers
    assert len(calls) == first


def test_models_without_attention_are_refused_with_the_structural_reason():
    import timm

    for model in (torch.nn.Sequential(torch.nn.Linear(2, 2)), timm.create_model("resnet10t", pretrained=False)):
        with pytest.raises(TypeError) as info:
            attnmask.apply(model, heads=1)
        assert "no module computes attention between tokens" in str(info.value)
        assert type(model).__name__ in str(info.value)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        attnmask.apply("vit_small_patch16_224")


def test_tokens_that_do_not_fit_the_grid():
    model = attnmask.apply(make_timm("vit"), heads=2, window=3)
    with pytest.raises(ValueError, match="20 tokens does not fit"):
        model.blocks[0].attn(torch.randn(1, 20, 32))


def test_remove_unpatched_is_a_no_op():
    model = make_timm("vit")
    before = snapshot(model)
    assert attnmask.remove(model) is model
    assert same_snapshot(before, snapshot(model))


def test_describe():
    model = make_timm("deit_distilled")
    plain = attnmask.describe(model)
    assert not plain.patched and plain.grid == (5, 7)
    attnmask.apply(model, heads={1: [0, 2, 3]}, window=(3, 5), prefix="isolated")
    report = attnmask.describe(model)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["window"] == [3, 5] and data["grid"] == [5, 7] and data["prefix"] == "isolated"
    assert data["backend"] == "auto" and data["resolved_backend"] == "sdpa"
    assert [layer["masked_heads"] for layer in data["layers"]] == [[], [0, 2, 3]]
    text = str(report)
    assert "window 3x5" in text and "blocks.1.attn" in text and "0,2-3" in text
    assert attnmask.get_spec(model).to_dict()["heads"] == [[], [0, 2, 3]]


def test_host_attn_mask_and_causal_are_combined():
    model = make_timm("vit").double()
    images = images_for("vit").double()
    n = 1 + 5 * 7
    keep = torch.rand(n, n, generator=torch.Generator().manual_seed(0)) > 0.5
    keep |= torch.eye(n, dtype=torch.bool)
    outs = {}
    for backend in ("sdpa", "reference"):
        patched = attnmask.apply(make_timm("vit").double(), heads=[0, 1], window=3, backend=backend)
        with torch.no_grad():
            outs[backend] = (patched.forward_features(images, attn_mask=keep), patched.blocks[0].attn(
                torch.randn(2, n, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1)), is_causal=True))
    torch.testing.assert_close(outs["sdpa"], outs["reference"], rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        assert not torch.allclose(outs["sdpa"][0], model.forward_features(images, attn_mask=keep))


def test_import_does_not_import_host_libraries():
    code = "import sys, attnmask; print([m for m in ('timm', 'transformers', 'torchvision') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_api_is_listed():
    for name in attnmask.__all__:
        assert hasattr(attnmask, name)
    assert {"apply", "remove", "describe", "MaskSpec"} <= set(attnmask.__all__)


def test_apply_rolls_back_when_install_fails(monkeypatch):
    from attnmask.adapters import timm_vit

    model = attnmask.apply(make_timm("vit_dynamic"), heads=[1], window=5)
    before, spec = snapshot(model), attnmask.get_spec(model)
    real_install = timm_vit.TimmViTAdapter.install

    def failing_install(self, model, sites, plans):
        real_install(self, model, sites[:1], plans[:1])
        raise RuntimeError("boom")

    monkeypatch.setattr(timm_vit.TimmViTAdapter, "install", failing_install)
    with pytest.raises(RuntimeError, match="boom"):
        attnmask.apply(model, heads=2, window=3)
    monkeypatch.setattr(timm_vit.TimmViTAdapter, "install", real_install)
    assert attnmask.get_spec(model) == spec
    assert same_snapshot(before, snapshot(model))
