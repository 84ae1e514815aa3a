"""Hugging Face: attention weights of masked layers, subclasses of the host's attention class,
and a failed re-apply that puts every config's attention implementation back exactly."""

from __future__ import annotations

import pytest
import torch
from helpers import allowed

import attnmask

T = pytest.importorskip("transformers")
from attnmask.adapters import hf  # noqa: E402

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=40, patch_size=8)


def vit(seed=0, **config):
    torch.manual_seed(seed)
    model = T.ViTModel(T.ViTConfig(initializer_range=0.2, **{**SMALL, **config})).eval()
    with torch.no_grad():
        model.embeddings.cls_token.normal_(std=0.5)
    return model


def images(batch=2, seed=1):
    return torch.randn(batch, 3, 40, 40, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("previous", ["sdpa", "eager"])
def test_output_attentions_returns_the_masked_probabilities(previous, mode):
    model = vit(attn_implementation=previous)
    x = images()
    with torch.no_grad():
        plain = model(x, output_attentions=True)
    attnmask.apply(model, heads={0: [0, 2], 1: [1]}, window=3, mode=mode)
    with torch.no_grad():
        expected = model(x).last_hidden_state
        out = model(x, output_attentions=True)
    assert len(out.attentions) == 2
    torch.testing.assert_close(out.last_hidden_state, expected, rtol=1e-5, atol=1e-5)
    grid, prefix = (5, 5), 1
    forbidden = torch.tensor(
        [[not allowed(q, kv, grid, (3, 3), prefix) for kv in range(26)] for q in range(26)], dtype=torch.bool
    )
    for layer, heads in ((0, [0, 2]), (1, [1])):
        weights = out.attentions[layer]
        assert weights.shape == (2, 4, 26, 26)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 26), rtol=1e-5, atol=1e-5)
        for head in range(4):
            outside = weights[:, head][:, forbidden]
            if head in heads and mode == "hard":
                assert torch.equal(outside, torch.zeros_like(outside))
            else:
                assert outside.abs().max() > 0
    if previous == "eager":  # layer 0's input is the same; its global heads equal the eager ones
        torch.testing.assert_close(out.attentions[0][:, [1, 3]], plain.attentions[0][:, [1, 3]], rtol=1e-5, atol=1e-6)


def test_output_attentions_with_an_unmasked_layer_returns_every_layer():
    model = attnmask.apply(vit(), heads={1: "all"}, window=3)
    with torch.no_grad():
        out = model(images(), output_attentions=True)
    assert len(out.attentions) == 2 and all(a.shape == (2, 4, 26, 26) for a in out.attentions)


class KeepsForward(T.models.vit.modeling_vit.ViTAttention):
    pass


class OverridesForward(T.models.vit.modeling_vit.ViTAttention):
    def forward(self, hidden_states, attention_mask=None, **kwargs):
        q = self.q_proj(hidden_states)
        return self.o_proj(q), None


def test_subclass_of_the_attention_class_is_patched_or_refused_by_name():
    model = vit()
    names = [n for n, m in model.named_modules() if type(m) is T.models.vit.modeling_vit.ViTAttention]
    model.get_submodule(names[1]).__class__ = KeepsForward
    attnmask.apply(model, heads="all", window=3)
    assert attnmask.get_spec(model).layers == tuple(names)
    attnmask.remove(model)
    model.get_submodule(names[1]).__class__ = OverridesForward
    with pytest.raises(TypeError) as info:
        attnmask.apply(model, heads="all", window=3)
    assert names[1] in str(info.value) and "OverridesForward" in str(info.value)
    assert model.config._attn_implementation == "sdpa" and not attnmask.is_patched(model)


def _implementations(model):
    return [(id(c), c.__dict__.get("_attn_implementation_internal", "<unset>")) for c in hf._configs(model)]


@pytest.mark.parametrize("late", [True, False])
def test_failed_reapply_restores_attn_implementation_exactly(monkeypatch, late):
    model = attnmask.apply(vit(), heads=2, window=3)
    x = images()
    with torch.no_grad():
        expected = model(x).last_hidden_state
    before, spec = _implementations(model), attnmask.get_spec(model)
    assert model.config._attn_implementation == "attnmask"
    if late:  # fails after the implementation was switched
        select = hf.HFAdapter._select

        def failing_select(model, configs):
            select(model, configs)
            raise RuntimeError("late failure")

        monkeypatch.setattr(hf.HFAdapter, "_select", staticmethod(failing_select))
    else:  # fails after remove put the previous implementation back
        monkeypatch.setattr(hf.HFAdapter, "_layout", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("late failure")))
    with pytest.raises(RuntimeError, match="late failure"):
        attnmask.apply(model, heads=1, window=5)
    monkeypatch.undo()
    assert _implementations(model) == before and attnmask.get_spec(model) == spec
    with torch.no_grad():
        assert torch.equal(model(x).last_hidden_state, expected)
    attnmask.remove(model)
    assert model.config._attn_implementation == "sdpa"


def test_failed_reapply_restores_sub_configs_exactly(monkeypatch):
    torch.manual_seed(0)
    config = T.CLIPConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=40, patch_size=8),
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64),
        projection_dim=16,
    )
    model = attnmask.apply(T.CLIPModel(config).eval(), heads=1, window=3)
    before = _implementations(model)
    assert len(before) >= 3
    monkeypatch.setattr(hf.HFAdapter, "_layout", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("late failure")))
    with pytest.raises(RuntimeError):
        attnmask.apply(model, heads=2, window=3)
    assert _implementations(model) == before
