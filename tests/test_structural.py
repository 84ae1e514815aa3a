"""Attention found by structure: the generic and the transformers structural adapters,
run-time layouts, refusals with reasons, ``inspect``, and the coverage check.

The default run checks a fixed sample of architectures that no family adapter knows; the
whole sweep (every timm module, every transformers vision model type) is slow-marked:
``pytest -m slow tests/test_structural.py``.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import pickle
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import attnmask
from attnmask.adapters.generic import GenericAdapter, masked_class
from attnmask.adapters.layouts import grid_candidates, pooled_allowed, resolve_geometry
from attnmask.coverage import check_model
from attnmask.masks import local_window, evaluate

timm = pytest.importorskip("timm")

ROOT = Path(__file__).resolve().parents[1]


def _sweep_module():
    spec = importlib.util.spec_from_file_location("coverage_sweep", ROOT / "benchmarks" / "coverage_sweep.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("coverage_sweep", module)
    spec.loader.exec_module(module)
    return module


def timm_model(name: str, size: int = 224, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    return model, images


# Architectures no family adapter knows, each standing for a structural case: small configs.
TIMM_SAMPLE = {
    "pit (grid changes between stages, class token)": ("pit_ti_224", 224, {}),
    "twins (host windows, then sub-sampled keys)": ("twins_svt_small", 224, dict(depths=(1, 1, 1, 1))),
    "nest (windows as a query dimension)": ("nest_tiny", 224, {}),
    "maxvit (window and grid partitions)": ("maxvit_tiny_tf_224", 224, dict(depths=(1, 1, 1, 1))),
    "swinv2_cr (explicit softmax in windows)": ("swinv2_cr_tiny_224", 224, dict(depths=(1, 1, 1, 1))),
    "mvitv2 (pooled keys, explicit softmax)": ("mvitv2_tiny", 224, {}),
    "samvit (windowed + global blocks, heads in the batch)": (
        "samvit_base_patch16",
        256,
        dict(img_size=256, depth=2, embed_dim=64, num_heads=2, global_attn_indexes=(1,), window_size=7),
    ),
    "vit rope (rotary attention)": ("vit_small_patch16_rope_224", 224, dict(depth=2)),
}


@pytest.mark.parametrize("case", list(TIMM_SAMPLE))
def test_timm_architectures_by_structure(case):
    name, size, kwargs = TIMM_SAMPLE[case]
    model, images = timm_model(name, size, **kwargs)
    row = check_model(model, images)
    assert row["status"] == "patched", row
    assert row["family"] == "generic"
    assert row["remove_identical"]


def hf_model(model_type: str, image_size: int = 64):
    return _sweep_module().hf_model(model_type, image_size)


HF_SAMPLE = {
    "ijepa (no class token)": ("ijepa", "hf"),
    "yolos (detection tokens after the patches)": ("yolos", "hf"),
    "dpt": ("dpt", "hf"),
    "aimv2 vision": ("aimv2_vision_model", "hf"),
    "data2vec-vision (explicit attention)": ("data2vec-vision", "generic"),
    "vitdet (explicit attention, decomposed relative positions)": ("vitdet", "generic"),
}


@pytest.mark.parametrize("case", list(HF_SAMPLE))
def test_transformers_model_types_by_structure(case):
    pytest.importorskip("transformers")
    model_type, family = HF_SAMPLE[case]
    torch.manual_seed(0)
    model, images = hf_model(model_type)
    row = check_model(model, images)
    assert row["status"] == "patched", row
    assert row["family"] == family
    assert row["remove_identical"]


def test_yolos_detection_tokens_are_placed_after_the_patches():
    pytest.importorskip("transformers")
    model, images = hf_model("yolos")
    row = check_model(model, images)
    assert row["layout"] == "checked"  # the perturbed patch's token is where attnmask put it
    assert "8x8 grid" in row["geometry"]


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        ("xcit_nano_12_p16_224", dict(depth=2), ["(XCA) is cross-covariance (channel) attention", "(ClassAttn) is class attention"]),
        ("hiera_tiny_224", {}, ["unrolled into mask units"]),
    ],
)
def test_refusals_name_the_layer_kind_and_the_reason(name, kwargs, expected):
    model, images = timm_model(name, **kwargs)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError) as error:
        attnmask.apply(model)
    for text in expected:
        assert text in str(error.value)
    assert "supported family" not in str(error.value)
    assert not attnmask.is_patched(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not type(m).__name__.startswith("AttnmaskMasked") for m in model.modules())


def test_models_without_attention_are_called_so():
    model, _ = timm_model("resnet18")
    with pytest.raises(TypeError, match="no module computes attention between tokens"):
        attnmask.apply(model)


def test_inspect_reports_layers_and_leaves_the_model_alone():
    model, images = timm_model("volo_d1_224")
    model.train()
    classes = [type(m) for m in model.modules()]
    report = attnmask.inspect(model)
    text = str(report)
    assert "no key projection" in text  # the outlookers
    assert report.patchable and report.adapter == "generic"
    assert any("grid" in layer.geometry for layer in report.patchable)
    assert report.to_dict()["layers"][0]["name"]
    assert [type(m) for m in model.modules()] == classes
    assert all(m.training for m in model.modules())
    assert not attnmask.is_patched(model)


def test_inspect_on_a_family_model_lists_its_sites():
    model, _ = timm_model("vit_tiny_patch16_224", depth=2)
    report = attnmask.inspect(model)
    assert report.adapter == "timm.vit"
    assert [layer.name for layer in report.layers] == ["blocks.0.attn", "blocks.1.attn"]


def test_generic_patch_survives_deepcopy_pickle_and_restores_fused_attn():
    model, images = timm_model("pit_ti_224")
    attn = [m for m in model.modules() if hasattr(m, "fused_attn")][0]
    attn.fused_attn = False  # the explicit path: patched layers use SDPA, remove restores False
    attnmask.apply(model, heads=[0], window=3)
    with torch.no_grad():
        out = model(images)
        assert torch.equal(copy.deepcopy(model)(images), out)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert torch.equal(loaded(images), out)
    assert type(pickle.loads(pickle.dumps(type(attn)))) is type
    attnmask.remove(model)
    assert attn.fused_attn is False
    assert "_attnmask_fused_attn" not in attn.__dict__


def test_masked_class_name_round_trips_to_its_host():
    from timm.layers import Attention

    import attnmask.adapters.generic as generic

    cls = masked_class(Attention)
    assert getattr(generic, cls.__name__) is cls
    del generic._MASKED[Attention]
    delattr(generic, cls.__name__)
    again = getattr(generic, cls.__name__)  # rebuilt from the name, as unpickling does
    assert again._attnmask_host is Attention


def test_soft_mode_is_refused_on_explicit_softmax_layers_and_the_model_is_untouched():
    model, images = timm_model("swinv2_cr_tiny_224", depths=(1, 1, 1, 1))
    attnmask.apply(model, heads=[0], window=3, mode="soft")
    with pytest.raises(ValueError, match="mode='soft' is not accepted there"):
        with torch.no_grad():
            model(images)
    attnmask.remove(model)
    with torch.no_grad():
        model(images)


def test_an_observing_forward_needs_an_input_it_can_run():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_heads = 2
            self.qkv = nn.Linear(8, 24)

        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, 2, 4).permute(2, 0, 3, 1, 4)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, 8)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 8, 4, 4)
            self.attn = Odd()

        def forward(self, x):
            return self.attn(self.embed(x).flatten(2).transpose(1, 2))

    model = Net().eval()
    images = torch.randn(2, 3, 32, 24)
    report = attnmask.inspect(model, example=images)
    assert report.patchable[0].geometry.startswith("8x6 grid")
    attnmask.apply(model, heads=[0], window=3, example=images)
    row_model = Net().eval()
    row_model.load_state_dict(model.state_dict())
    assert check_model(row_model, images)["status"] == "patched"


@given(
    q_grid=st.tuples(st.integers(1, 8), st.integers(1, 8)),
    window=st.tuples(st.integers(0, 3), st.integers(0, 3)).map(lambda w: (2 * w[0] + 1, 2 * w[1] + 1)),
    prefix_tokens=st.integers(0, 2),
    prefix=st.sampled_from(["global", "isolated"]),
)
def test_pooled_rule_on_equal_grids_is_the_window(q_grid, window, prefix_tokens, prefix):
    pooled = pooled_allowed(q_grid, q_grid, window, prefix_tokens, prefix_tokens, prefix)
    n = prefix_tokens + q_grid[0] * q_grid[1]
    expected = evaluate(local_window(q_grid, window, prefix_tokens, prefix), 1, n)[0]
    assert torch.equal(pooled, expected)


@given(
    q_grid=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    stride=st.tuples(st.integers(1, 8), st.integers(1, 8)),
    window=st.integers(0, 3).map(lambda w: 2 * w + 1),
)
def test_pooled_rule_gives_every_query_a_key_and_keeps_distance(q_grid, stride, window):
    k_grid = (-(-q_grid[0] // stride[0]), -(-q_grid[1] // stride[1]))
    allowed = pooled_allowed(q_grid, k_grid, (window, window), 0, 0, "global")
    assert allowed.any(dim=1).all()
    # a key whose cell lies wholly outside the query's window region is never allowed
    r = window // 2
    for qi in range(q_grid[0] * q_grid[1]):
        qr, qc = divmod(qi, q_grid[1])
        for ki in allowed[qi].nonzero().flatten().tolist():
            kr, kc = divmod(ki, k_grid[1])
            assert kr * q_grid[0] < (qr + r + 1) * k_grid[0] and (kr + 1) * q_grid[0] > (qr - r) * k_grid[0]
            assert kc * q_grid[1] < (qc + r + 1) * k_grid[1] and (kc + 1) * q_grid[1] > (qc - r) * k_grid[1]


def test_geometry_prefers_the_declared_prefix_and_refuses_what_fits_nothing():
    candidates = [((14, 14), "a"), ((7, 28), "b")]
    assert resolve_geometry(197, candidates).grid == (14, 14)
    assert resolve_geometry(197, candidates).prefix == 1
    assert resolve_geometry(200, [((14, 14), "a"), ((2, 99), "b")], prefix_hint=2).grid == (2, 99)
    assert resolve_geometry(300, candidates) is None
    windows = resolve_geometry(49, [], windows=4)
    assert windows.grid == (7, 7) and windows.windows == 4
    assert resolve_geometry(265, candidates, suffix=68).suffix == 68
    assert grid_candidates((2, 3, 224, 224)) == []  # an image holds no token grid
    assert grid_candidates((2, 96, 7, 3)) == [(7, 3)]  # channels first
    assert grid_candidates((2, 2, 3, 96)) == [(2, 3)]  # channels last (a 2 x 3 map, not an image)
    assert (7, 5) in grid_candidates((2, 7, 5, 96)) and (7, 5) in grid_candidates((2, 96, 7, 5))


def test_generic_adapter_is_the_last_resort_and_family_adapters_keep_their_models():
    model, _ = timm_model("deit_tiny_patch16_224", depth=1)
    assert attnmask.inspect(model).adapter == "timm.vit"
    model, _ = timm_model("pit_ti_224")
    assert attnmask.inspect(model).adapter == "generic"
    assert isinstance(GenericAdapter().matches(model), bool)


@pytest.mark.slow
def test_whole_sweep_meets_the_coverage_targets(tmp_path):
    """Every timm module and transformers vision model type (about 15 minutes on 2 cores)."""
    sweep = _sweep_module()
    out = tmp_path / "coverage.json"
    sweep.main(["--out", str(out)])
    import json

    rows = json.loads(out.read_text())["rows"]
    timm_patched = {r["arch"] for r in rows if r["library"] == "timm" and r["status"] == "patched"}
    hf_patched = {r["arch"] for r in rows if r["library"] == "transformers" and r["status"] == "patched"}
    assert len(timm_patched) >= 30, sorted(timm_patched)
    assert len(hf_patched) >= 18, sorted(hf_patched)
    assert not [r for r in rows if r["status"] == "failed"]
    assert not [r for r in rows if "supported family" in r.get("reason", "")]


class _GatedAttention(nn.Module):
    """SDPA attention, then a softmax over channels (a gate, not attention)."""

    def __init__(self):
        super().__init__()
        self.num_heads = 4
        self.qkv = nn.Linear(32, 96)
        self.gate = nn.Linear(32, 32)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        self.last_gate = self.gate(x).softmax(-1)
        return out * self.last_gate


class _GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 32, 4, 4)
        self.attn = _GatedAttention()

    def forward(self, x):
        return self.attn(self.embed(x).flatten(2).transpose(1, 2))


def test_a_softmax_that_is_not_attention_is_left_alone_at_any_batch():
    """A (B, N, C) channel softmax looks like heads folded into the batch when B divides by the
    head count; only the softmax kinds the observing forward saw compute attention are masked."""
    torch.manual_seed(0)
    model = _GatedNet().eval()
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        model(images)
    gate = model.attn.last_gate.clone()
    attnmask.apply(model, heads="all", window=3)
    with torch.no_grad():
        model(images)
    assert torch.equal(model.attn.last_gate, gate)
    assert check_model(_GatedNet().eval(), images)["status"] == "patched"


def test_inspect_and_reapply_on_a_patched_model_run_no_forward():
    model, images = timm_model("pit_ti_224")
    attnmask.apply(model, heads=[0], window=3)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    report = attnmask.inspect(model)
    attnmask.apply(model, heads=[1], window=5)
    attnmask.describe(model)
    assert not calls and len(report.patchable) == 12
    assert attnmask.get_spec(model).window == (5, 5)


def test_remove_and_failed_apply_leave_hooks_and_switches_exactly_as_before():
    model, images = timm_model("pit_ti_224")
    fused = [m.__dict__.get("fused_attn") for m in model.modules()]
    hooks = [dict(m._forward_pre_hooks_with_kwargs) for m in model.modules()]
    attnmask.apply(model, heads=[0], window=3)
    attnmask.remove(model)
    assert [dict(m._forward_pre_hooks_with_kwargs) for m in model.modules()] == hooks
    assert [m.__dict__.get("fused_attn") for m in model.modules()] == fused
    with pytest.raises(ValueError):
        attnmask.apply(model, heads=[7], window=3)  # stage 0 has 2 heads
    assert [dict(m._forward_pre_hooks_with_kwargs) for m in model.modules()] == hooks
    assert [m.__dict__.get("fused_attn") for m in model.modules()] == fused


def test_pooled_keys_are_masked_whatever_attention_the_model_ran_before():
    transformers = pytest.importorskip("transformers")
    config = transformers.SegformerConfig(hidden_sizes=[16, 32, 32, 32], num_attention_heads=[2, 2, 2, 2], depths=[1, 1, 1, 1])
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    outputs = []
    for implementation in ("eager", "sdpa"):
        torch.manual_seed(0)
        model = transformers.SegformerModel(config).eval()
        model.set_attn_implementation(implementation)
        attnmask.apply(model, heads=[0], window=3)
        with torch.no_grad():
            outputs.append(model(images).last_hidden_state)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


def test_reapplying_keeps_the_softmax_layouts_the_first_observing_forward_saw():
    model, images = timm_model("swinv2_cr_tiny_224", depths=(1, 1, 1, 1))
    attnmask.apply(model, heads=[0], window=3)
    first = model.stages[0].blocks[0].attn._attnmask_site.expected
    assert first and all(route == "softmax" for route, _ in first)
    attnmask.apply(model, heads=[0], window=5)  # remove, then install again: no new observing forward
    assert model.stages[0].blocks[0].attn._attnmask_site.expected == first
    with torch.no_grad():
        model(images)
    assert model.stages[0].blocks[0].attn._attnmask_site.last.grid == (7, 7)  # the softmax was masked again
