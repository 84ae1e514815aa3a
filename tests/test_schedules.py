"""Head schedules (``heads="mait"`` and the other presets): the layers they mask, and whole
timm ViTs under each preset and mask mode against the float64 reference backend."""

from __future__ import annotations

import argparse

import pytest
import torch
from helpers import make_timm, same_snapshot, snapshot

import attnmask
from attnmask.cli import parse_heads
from attnmask.schedules import PRESETS
from attnmask.spec import resolve_heads

timm = pytest.importorskip("timm")


def thirds(num_layers: int, first, middle, last, num_heads: int) -> list[tuple[int, ...]]:
    """The schedule written out by hand: layers [0, L/3) first, [L/3, 2L/3) middle, rest last
    (boundaries rounded up, as the docs state: 24 -> 0-7, 8-15, 16-23)."""
    out = []
    for layer in range(num_layers):
        part = first if layer < -(-num_layers // 3) else middle if layer < -(-2 * num_layers // 3) else last
        out.append(tuple(range(num_heads)) if part == "all" else tuple(range(part)))
    return out


EXPECTED = {
    "mait": ("all", 1, 0),
    "mait-mixed": ("all", 1, 1),
    "one-head": (1, 1, 1),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("num_layers, num_heads", [(24, 6), (36, 3), (12, 4), (10, 2), (1, 3), (2, 3)])
def test_preset_masks_the_documented_layers(preset, num_layers, num_heads):
    assert list(resolve_heads(preset, [num_heads] * num_layers)) == thirds(num_layers, *EXPECTED[preset], num_heads)


def test_mait_schedule_of_the_paper_24_layers():
    resolved = resolve_heads("mait", [6] * 24)
    assert resolved[:8] == (tuple(range(6)),) * 8  # "all heads masked in the first 8 layers"
    assert resolved[8:16] == ((0,),) * 8  # "1 masked head in layers 9-16"
    assert resolved[16:] == ((),) * 8  # "none in the last 8"


def test_presets_are_plain_callables_apply_accepts():
    for name, schedule in PRESETS.items():
        assert resolve_heads(schedule, [3] * 9) == resolve_heads(name, [3] * 9)


def test_unknown_preset_is_refused_and_the_model_untouched():
    model = make_timm("vit", depth=3)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"heads='mait2' is not accepted.*'mait', 'mait-mixed', 'one-head'"):
        attnmask.apply(model, heads="mait2", window=3)
    assert same_snapshot(snapshot(model), before) and not attnmask.is_patched(model)


def test_cli_heads_accepts_presets():
    assert parse_heads("mait") == "mait"
    with pytest.raises(argparse.ArgumentTypeError, match="mait-mixed"):
        parse_heads("mait3")


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_timm_vit_under_each_preset_matches_the_reference(preset, mode):
    model = make_timm("vit", depth=6)
    images = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        unpatched = model(images)
        attnmask.apply(model, heads=preset, window=3, mode=mode, backend="reference")
        expected = model(images)
        for backend in ("sdpa", "auto"):
            attnmask.apply(model, heads=preset, window=3, mode=mode, backend=backend)
            torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-5)
    spec = attnmask.get_spec(model)
    assert spec.mode == mode and list(spec.heads) == thirds(6, *EXPECTED[preset], spec.num_heads[0])
    assert not torch.allclose(expected, unpatched)  # the masks change the model
