"""A window that covers the whole grid masks nothing: a warning says so (once), and describe() too."""

import warnings

import pytest
import torch

import attnmask
from attnmask import spec as spec_module

timm = pytest.importorskip("timm")


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test starts with no (window, grid) warned about yet."""
    monkeypatch.setattr(spec_module, "_COVERING_WARNED", set())


def tiny_vit(**kwargs):
    return timm.create_model("vit_tiny_patch16_224", depth=2, embed_dim=48, num_heads=3, **kwargs).eval()


def covering_warnings(run) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning) and "covers the whole" in str(w.message)]


def test_covering_window_warns_once_naming_window_and_grid():
    model = attnmask.apply(tiny_vit(img_size=64), heads=1, window=7)  # 4 x 4 grid: 7 reaches everything
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        found = covering_warnings(lambda: [model(images) for _ in range(3)])
    assert len(found) == 1, found  # one warning for every layer and every call
    assert "window 7x7" in found[0] and "4x4 grid" in found[0]


def test_a_window_that_masks_does_not_warn():
    model = attnmask.apply(tiny_vit(img_size=64), heads=1, window=5)  # 5 < 2 * 4 - 1: the corners are apart
    with torch.no_grad():
        assert covering_warnings(lambda: model(torch.randn(1, 3, 64, 64))) == []
    assert not attnmask.describe(model).window_covers_grid
    assert "window covers grid" not in str(attnmask.describe(model))


def test_grid_known_at_forward_time_warns_at_the_first_forward_on_it():
    model = attnmask.apply(tiny_vit(img_size=224, dynamic_img_size=True), heads=1, window=7)
    with torch.no_grad():
        assert covering_warnings(lambda: model(torch.randn(1, 3, 224, 224))) == []  # 14 x 14: masks
        found = covering_warnings(lambda: [model(torch.randn(1, 3, 48, 48)) for _ in range(2)])
    assert len(found) == 1 and "3x3 grid" in found[0]


def test_describe_says_the_window_covers_the_grid():
    model = attnmask.apply(tiny_vit(img_size=64), heads=1, window=7)
    report = attnmask.describe(model)
    text = str(report)
    assert report.window_covers_grid and report.to_dict()["window_covers_grid"] is True
    assert "2/6 heads masked (window covers grid: no masking)" in text.splitlines()[0]
    assert any(note.startswith("window covers grid") and "7x7" in note and "4x4" in note for note in report.to_dict()["notes"])
