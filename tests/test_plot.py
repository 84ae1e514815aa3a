"""attnmask.plot: the mask panels and the locality heatmap draw exactly the data they are given.

The drawing tests skip without matplotlib; the missing-matplotlib error is tested everywhere.
"""

import importlib.util
import sys

import pytest
import torch

from attnmask import plot
from attnmask.masks import LocalMask


def test_without_matplotlib_the_error_says_how_to_install(monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    mask = LocalMask(grid=(4, 4), window=(3, 3), prefix_tokens=1, num_heads=2, heads=(0,))
    for call in (lambda: plot.locality(torch.zeros(2, 2)), lambda: plot.masks(mask)):
        with pytest.raises(ImportError, match=r"attnmask.plot needs matplotlib: pip install 'attnmask\[plot\]'"):
            call()


def test_import_does_not_import_matplotlib():
    import subprocess

    code = "import sys, attnmask.plot; from attnmask import plot; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
needs_matplotlib = pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed (the plot extra)")
if HAS_MATPLOTLIB:
    from matplotlib.figure import Figure


def panels(fig):
    return [ax for ax in fig.axes if ax.get_visible() and ax.images]


@needs_matplotlib
@pytest.mark.parametrize(
    "mask",
    [
        LocalMask(grid=(6, 5), window=(3, 3), prefix_tokens=1, num_heads=3, heads=(0, 2)),
        LocalMask(grid=(5, 7), window=(3, 5), prefix_tokens=2, num_heads=2, heads=(1,), prefix="isolated"),
        LocalMask(grid=(4, 4), window=(3, 3), prefix_tokens=0, num_heads=1, heads=()),
    ],
    ids=["global-prefix", "isolated", "all-global"],
)
@pytest.mark.parametrize("query", [None, (0, 0), (3, 2)])
def test_mask_panels_show_the_mask_row_of_the_query(mask, query):
    fig = plot.masks(mask, query=query)
    assert isinstance(fig, Figure)
    rows, cols = mask.grid
    row, col = (rows // 2, cols // 2) if query is None else query
    dense = mask.dense()[:, mask.prefix_tokens + row * cols + col]  # (heads, tokens)
    axes = panels(fig)
    assert len(axes) == mask.num_heads
    for head, ax in enumerate(axes):
        data = ax.images[0].get_array()
        assert data.shape == (rows, cols)
        expected = dense[head, mask.prefix_tokens :].reshape(rows, cols)
        assert torch.equal(torch.as_tensor(data.tolist(), dtype=torch.bool), expected)
        kind = "local" if head in mask.heads else "global"
        assert ax.get_title() == f"head {head}: {kind}"
        query_cell = ax.patches[0]
        assert query_cell.get_xy() == (col - 0.5, row - 0.5)
        note = ax.get_xlabel()
        if mask.prefix_tokens == 0:
            assert note == "no prefix tokens"
        else:
            assert note.endswith("hidden" if kind == "local" and mask.prefix == "isolated" else "visible")


@needs_matplotlib
def test_local_panel_is_the_clipped_window():
    mask = LocalMask(grid=(14, 14), window=(3, 3), prefix_tokens=1, num_heads=2, heads=(0,))
    local, global_ = (ax.images[0].get_array() for ax in panels(plot.masks(mask, query=(0, 13))))
    assert local.sum() == 4 and local[:2, 12:].all()  # a corner patch sees 4 of 9
    assert global_.all()


@needs_matplotlib
def test_masks_of_a_patched_and_an_unpatched_model(tmp_path):
    timm = pytest.importorskip("timm")
    import attnmask

    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=3, num_heads=3)
    fig = plot.masks(model, layer=1)
    assert [ax.get_title() for ax in panels(fig)] == ["head 0: global", "head 1: global", "head 2: global"]
    assert all(ax.images[0].get_array().all() for ax in panels(fig))

    attnmask.apply(model, heads={1: [0, 2]}, window=3, prefix="isolated")
    fig = plot.masks(model, layer=1, query=(1, 2))
    assert [ax.get_title() for ax in panels(fig)] == ["head 0: local", "head 1: global", "head 2: local"]
    expected = LocalMask(grid=(4, 4), window=(3, 3), prefix_tokens=1, num_heads=3, heads=(0, 2), prefix="isolated")
    dense = expected.dense()[:, 1 + 1 * 4 + 2, 1:].reshape(3, 4, 4)
    for head, ax in enumerate(panels(fig)):
        assert torch.equal(torch.as_tensor(ax.images[0].get_array().tolist(), dtype=torch.bool), dense[head])
    notes = [ax.get_xlabel() for ax in panels(fig)]
    assert notes == ["1 prefix token: hidden", "1 prefix token: visible", "1 prefix token: hidden"]
    assert "layer 1" in fig._suptitle.get_text()
    fig.savefig(tmp_path / "masks.png")
    assert (tmp_path / "masks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # heads and ax: draw into the caller's axes
    owner = Figure()
    ax = owner.subplots()
    assert plot.masks(model, layer=1, heads=[2], ax=ax) is owner
    assert ax.get_title() == "head 2: local"
    owner = Figure()
    axes = owner.subplots(1, 3)  # an array of Axes
    assert plot.masks(model, layer=1, ax=axes) is owner and all(ax.images for ax in axes)
    # grid: draw at another input size
    assert panels(plot.masks(model, layer=1, grid=(6, 8)))[0].images[0].get_array().shape == (6, 8)


@needs_matplotlib
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"query": (6, 0)}, ValueError, r"query=\(6, 0\) is not accepted: expected a patch \(row, col\) with 0 <= row"),
        ({"query": (1, -1)}, ValueError, "query="),
        ({"query": 3}, ValueError, "query=3"),
        ({"query": (True, 0)}, ValueError, "query="),
        ({"grid": (0, 4)}, ValueError, r"grid=\(0, 4\) is not accepted: expected a pair of positive ints"),
        ({"heads": [3]}, ValueError, r"heads=\[3\] is not accepted: expected a non-empty sequence of .* in \[0, 2\]"),
        ({"heads": []}, ValueError, "heads="),
        ({"heads": 1}, TypeError, "heads=1"),
        ({"layer": 0}, TypeError, "layer=0 is not accepted with a LocalMask"),
        ({"ax": "axes"}, TypeError, "ax='axes' is not accepted: expected a list of 3 matplotlib Axes"),
    ],
)
def test_masks_bad_arguments(kwargs, error, match):
    mask = LocalMask(grid=(6, 5), window=(3, 3), prefix_tokens=1, num_heads=3, heads=(0,))
    with pytest.raises(error, match=match):
        plot.masks(mask, **kwargs)


@needs_matplotlib
def test_masks_bad_model_arguments():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2)
    with pytest.raises(ValueError, match=r"layer=2 is not accepted: the model has 2 attention layers, .* \[0, 1\]"):
        plot.masks(model, layer=2)
    with pytest.raises(TypeError, match="model_or_mask=str is not accepted"):
        plot.masks("vit")
    with pytest.raises(TypeError, match="attnmask"):
        plot.masks(torch.nn.Linear(2, 2))


@needs_matplotlib
def test_locality_heatmap_is_the_table(tmp_path):
    scores = torch.rand(5, 4, dtype=torch.float64)
    scores[1, 3] = float("nan")
    scores[4, 2:] = float("nan")
    fig = plot.locality(scores, title="ViT-T")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    data = ax.images[0].get_array()
    table = torch.as_tensor(data.filled(float("nan")), dtype=torch.float64)
    torch.testing.assert_close(table, scores, equal_nan=True, rtol=0, atol=0)
    assert data.mask.sum() == 3  # NaN cells are masked: drawn blank
    assert ax.images[0].get_clim() == (0.0, 1.0)
    assert ax.get_title() == "ViT-T" and ax.get_xlabel() == "head" and ax.get_ylabel() == "layer"
    assert len(fig.axes) == 2  # the heatmap and its colorbar
    assert len(ax.texts) == 20 - 3  # small table: values annotated, NaN cells left blank
    assert ax.texts[0].get_text() == f"{scores[0, 0].item():.2f}"
    fig.savefig(tmp_path / "locality.png")
    assert (tmp_path / "locality.png").stat().st_size > 0


@needs_matplotlib
def test_locality_inputs_and_options():
    import numpy as np

    nested = [[0.1, 0.9], [float("nan"), 0.5]]
    for scores in (nested, np.array(nested), torch.tensor(nested, dtype=torch.float32)):
        data = plot.locality(scores).axes[0].images[0].get_array()
        np.testing.assert_allclose(data.filled(np.nan), np.array(nested), rtol=1e-6)
    assert not plot.locality(nested, annotate=False).axes[0].texts
    assert not plot.locality(torch.rand(24, 16)).axes[0].texts  # large table: no values written
    owner = Figure()
    ax = owner.subplots()
    assert plot.locality(nested, ax=ax) is owner and ax.images


@needs_matplotlib
@pytest.mark.parametrize(
    "scores, kwargs, error, match",
    [
        (torch.rand(3), {}, ValueError, r"scores of shape \(3,\) are not accepted: expected a non-empty 2-D"),
        (torch.rand(0, 3), {}, ValueError, "scores of shape"),
        ("abc", {}, TypeError, "scores=str is not accepted"),
        ([[0.5]], {"annotate": "yes"}, TypeError, "annotate='yes' is not accepted"),
        ([[0.5]], {"ax": 1}, TypeError, "ax=1 is not accepted: expected one matplotlib Axes"),
    ],
)
def test_locality_bad_arguments(scores, kwargs, error, match):
    with pytest.raises(error, match=match):
        plot.locality(scores, **kwargs)
