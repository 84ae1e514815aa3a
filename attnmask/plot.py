"""Pictures: which keys a query may attend to in each head, and the locality score table.

Two functions, each returning a ``matplotlib.figure.Figure`` (drawn with matplotlib's object
API, no ``pyplot`` state: they work headless and in scripts, and ``fig.savefig(path)``
writes them):

- :func:`masks`: one panel per head of a layer, the patch grid with a query patch and the
  keys it may attend to shaded (a global head: every patch; a local head: its window,
  clipped at the border).
- :func:`locality`: the attention locality scores of :func:`attnmask.locality_scores` as a
  layers x heads heatmap.

matplotlib is an optional dependency (``pip install 'attnmask[plot]'``), imported only when
a function is called.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch
from torch import nn

from .adapters import adapter_named
from .api import describe
from .masks import LocalMask

if TYPE_CHECKING:  # matplotlib is optional: imported lazily by the functions
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MISSING = "attnmask.plot needs matplotlib: pip install 'attnmask[plot]'"

ALLOWED_COLOR = "#4c72b0"
"""Keys the query may attend to."""
MASKED_COLOR = "#e6e6e6"
"""Keys masked out for the query."""
QUERY_COLOR = "#dd8452"
"""The query patch."""
PANELS_PER_ROW = 8
GRID_LINES_UP_TO = 32
"""Patch grids up to this many rows and columns get lines between the patches."""
ANNOTATE_UP_TO = 300
"""``locality(annotate=None)`` writes the values when the table has at most this many cells."""


def _matplotlib():
    """Import matplotlib's object API, or raise the ImportError that says how to install it."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(MISSING) from None
    return Figure


def masks(
    model_or_mask: Union[nn.Module, LocalMask],
    *,
    layer: Optional[int] = None,
    query: Optional[Sequence[int]] = None,
    grid: Optional[Sequence[int]] = None,
    heads: Optional[Sequence[int]] = None,
    ax: Union["Axes", Sequence["Axes"], None] = None,
) -> "Figure":
    """Draw, for each head of one layer, which keys a query patch may attend to.

    Each panel is the patch grid: the query patch in orange, the patches it may attend to
    shaded blue (a global head: all of them; a local head: its window, clipped at the grid
    border), the others light grey. Panel titles say ``"head h: local"`` or
    ``"head h: global"``; below each panel, whether the query sees the prefix tokens
    (class, distillation, register tokens), which the grid does not show. The panels'
    images are the mask itself: ``ax.images[0].get_array()`` of head ``h``'s panel is
    ``mask.dense()[h, q, prefix_tokens:]`` reshaped to the grid (1 = may attend).

    Args:
        model_or_mask: A model of a supported family, patched by :func:`attnmask.apply` or
            not (an unpatched model's heads are all global), or one layer's
            :class:`~attnmask.masks.LocalMask` (per-sample ``positions`` not accepted).
        layer: Attention layer of a model to draw (default 0); not accepted with a
            ``LocalMask``, which is one layer's mask already.
        query: ``(row, col)`` of the query patch; default the centre patch
            ``(H // 2, W // 2)``.
        grid: ``(H, W)`` patch grid to draw the masks on; default the model's (its latest
            input size, else its configured one; for Swin, its first attention window) or
            the mask's.
        heads: Head indices to draw; default every head of the layer.
        ax: Axes to draw into, one per head drawn (a list, or the array
            ``Figure.subplots`` returns; a single ``Axes`` when drawing one head); default a
            new figure with up to 8 panels a row.

    Returns:
        The ``Figure`` drawn on.

    Raises:
        ImportError: Without matplotlib.
        TypeError, ValueError: For bad arguments (unsupported model, layer, query, grid or
            heads out of range).
    """
    Figure = _matplotlib()
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch, Rectangle

    mask = _layer_mask(model_or_mask, layer, grid)
    rows, cols = mask.grid
    query = _check_query(query, mask.grid)
    drawn = _check_heads(heads, mask.num_heads)
    q_index = mask.prefix_tokens + query[0] * cols + query[1]
    allowed = _query_row(mask, q_index)  # (num_heads, tokens)

    owns_figure = ax is None
    if owns_figure:
        per_row = min(len(drawn), PANELS_PER_ROW)
        lines = math.ceil(len(drawn) / per_row)
        fig = Figure(figsize=(2.4 * per_row, 2.6 * lines + 0.9), layout="constrained")
        axes = list(fig.subplots(lines, per_row, squeeze=False).ravel())
        for unused in axes[len(drawn) :]:
            unused.set_visible(False)
    else:
        axes = _check_axes(ax, len(drawn))
        fig = axes[0].get_figure()

    cmap = ListedColormap([MASKED_COLOR, ALLOWED_COLOR])
    for axis, head in zip(axes, drawn):
        image = allowed[head, mask.prefix_tokens :].reshape(rows, cols).to(torch.float32).numpy()
        axis.imshow(image, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        axis.add_patch(Rectangle((query[1] - 0.5, query[0] - 0.5), 1, 1, facecolor=QUERY_COLOR, edgecolor="none"))
        axis.set_title(f"head {head}: {'local' if head in mask.heads else 'global'}")
        axis.set_xticks([])
        axis.set_yticks([])
        if max(rows, cols) <= GRID_LINES_UP_TO:
            axis.set_xticks(np.arange(-0.5, cols, 1), minor=True)
            axis.set_yticks(np.arange(-0.5, rows, 1), minor=True)
            axis.grid(which="minor", color="white", linewidth=0.5)
            axis.tick_params(which="both", length=0)
        axis.set_xlabel(_prefix_note(allowed[head, : mask.prefix_tokens]), fontsize="small")

    if owns_figure:
        fig.suptitle(_masks_title(mask, query))
        fig.legend(
            handles=[
                Patch(color=QUERY_COLOR, label="query"),
                Patch(color=ALLOWED_COLOR, label="may attend"),
                Patch(color=MASKED_COLOR, label="masked out" if mask.mode == "hard" else "logit set to 0 (soft)"),
            ],
            loc="outside lower center",
            ncols=3,
            frameon=False,
        )
    return fig


def locality(
    scores: Any,
    *,
    ax: Optional["Axes"] = None,
    title: Optional[str] = None,
    annotate: Optional[bool] = None,
) -> "Figure":
    """Draw attention locality scores as a heatmap: layers (rows) x heads (columns).

    Colours span 0 (global: no attention inside the window) to 1 (local); ``NaN`` cells
    (a layer with fewer heads, a layer never reached) stay blank. The image's data is the
    table: ``ax.images[0].get_array()`` (a masked array, ``NaN`` masked).

    Args:
        scores: A ``(layers, heads)`` table: what :func:`attnmask.locality_scores` returns,
            or any 2-D tensor, array or nested list of numbers.
        ax: Axes to draw into (its figure gets the colorbar); default a new figure sized
            to the table.
        title: Axes title; default ``"Attention locality score"``.
        annotate: Write each value in its cell; default when the table has at most 300
            cells.

    Returns:
        The ``Figure`` drawn on.

    Raises:
        ImportError: Without matplotlib.
        TypeError, ValueError: For a table that is not 2-D numbers, or a bad ``annotate``.
    """
    Figure = _matplotlib()
    import matplotlib
    import numpy as np

    table = _check_scores(scores)
    if annotate is not None and not isinstance(annotate, bool):
        raise TypeError(f"annotate={annotate!r} is not accepted: expected True, False or None (automatic)")
    if title is not None and not isinstance(title, str):
        raise TypeError(f"title={title!r} is not accepted: expected a string or None")
    layers, heads = table.shape
    annotate = table.size <= ANNOTATE_UP_TO if annotate is None else annotate

    if ax is None:
        width = max(4.8, 1.8 + 0.55 * heads)  # room for the colorbar and a title over few heads
        fig = Figure(figsize=(width, 1.2 + 0.28 * max(layers, 4)), layout="constrained")
        ax = fig.subplots()
    else:
        ax = _check_axes(ax, 1)[0]
        fig = ax.get_figure()

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=(0, 0, 0, 0))
    image = ax.imshow(
        np.ma.masked_invalid(table), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest"
    )
    fig.colorbar(image, ax=ax, label="ALS (attention inside the window)")
    ax.set_xticks(range(heads))
    if layers <= 40:
        ax.set_yticks(range(layers))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title("Attention locality score" if title is None else title)
    if annotate:
        for (row, col), value in np.ndenumerate(table):
            if not np.isnan(value):
                color = "white" if value < 0.5 else "black"  # readable on viridis' dark and light ends
                ax.text(col, row, f"{value:.2f}", ha="center", va="center", color=color, fontsize="x-small")
    return fig


def _layer_mask(model_or_mask: Any, layer: Optional[int], grid: Optional[Sequence[int]]) -> LocalMask:
    """The :class:`LocalMask` to draw: the given one, or the model's mask of ``layer``."""
    if grid is not None:
        grid = _check_pair("grid", grid, "a pair of positive ints (rows, cols)", minimum=1)
    if isinstance(model_or_mask, LocalMask):
        if layer is not None:
            raise TypeError(
                f"layer={layer!r} is not accepted with a LocalMask: it is one layer's mask already "
                "(layer= picks a layer of a model)"
            )
        if model_or_mask.positions is not None:
            raise ValueError("a LocalMask with per-sample positions is not accepted: draw the full layout's mask")
        return model_or_mask if grid is None else _replace_grid(model_or_mask, grid)
    if not isinstance(model_or_mask, nn.Module):
        raise TypeError(
            f"model_or_mask={type(model_or_mask).__name__} is not accepted: expected a model of a supported "
            "family (patched by attnmask.apply or not) or an attnmask.masks.LocalMask"
        )
    report = describe(model_or_mask)  # raises the usual TypeError for unsupported models
    layer = 0 if layer is None else layer
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not 0 <= layer < len(report.layers):
        raise ValueError(
            f"layer={layer!r} is not accepted: the model has {len(report.layers)} attention layers, "
            f"expected an int in [0, {len(report.layers) - 1}]"
        )
    grid = grid or report.grid
    if grid is None:
        raise ValueError("attnmask could not tell this model's patch grid: pass grid=(rows, cols)")
    adapter = adapter_named(report.family)
    prefix_tokens = int(adapter.prefix_tokens(model_or_mask)) if hasattr(adapter, "prefix_tokens") else 0
    row = report.layers[int(layer)]
    return LocalMask(
        grid=(int(grid[0]), int(grid[1])),
        window=report.window or (1, 1),  # unpatched: no masked heads, the window is not used
        prefix_tokens=prefix_tokens,
        num_heads=row.num_heads,
        heads=row.heads,
        prefix=report.prefix,
        mode=report.mode or "hard",
        layer=int(layer),
    )


def _replace_grid(mask: LocalMask, grid: tuple[int, int]) -> LocalMask:
    import dataclasses

    return dataclasses.replace(mask, grid=grid)


def _query_row(mask: LocalMask, q_index: int) -> torch.Tensor:
    """``(num_heads, tokens)``: row ``q_index`` of ``mask.dense()``, from the mask's one
    definition (its ``mask_mod``), without building the full ``(heads, N, N)`` mask."""
    heads = torch.arange(mask.num_heads)[:, None, None]
    q_idx = torch.tensor([q_index])[None, :, None]
    kv_idx = torch.arange(mask.num_tokens)[None, None, :]
    zero = torch.zeros((), dtype=torch.long)
    return mask.mask_mod()(zero, heads, q_idx, kv_idx).expand(mask.num_heads, 1, mask.num_tokens)[:, 0]


def _check_pair(name: str, value: Any, accepted: str, minimum: int = 0) -> tuple[int, int]:
    try:
        pair = tuple(value)
    except TypeError:
        pair = ()
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum for v in pair):
        raise ValueError(f"{name}={value!r} is not accepted: expected {accepted}")
    return int(pair[0]), int(pair[1])


def _check_query(query: Optional[Sequence[int]], grid: tuple[int, int]) -> tuple[int, int]:
    rows, cols = grid
    if query is None:
        return rows // 2, cols // 2
    accepted = f"a patch (row, col) with 0 <= row < {rows} and 0 <= col < {cols} (the grid is {rows}x{cols})"
    row, col = _check_pair("query", query, accepted)
    if row >= rows or col >= cols:
        raise ValueError(f"query={query!r} is not accepted: expected {accepted}")
    return row, col


def _check_heads(heads: Optional[Sequence[int]], num_heads: int) -> list[int]:
    if heads is None:
        return list(range(num_heads))
    accepted = f"a non-empty sequence of head indices in [0, {num_heads - 1}]"
    try:
        chosen = list(heads)
    except TypeError:
        raise TypeError(f"heads={heads!r} is not accepted: expected {accepted}") from None
    if not chosen or any(
        isinstance(h, bool) or not isinstance(h, numbers.Integral) or not 0 <= h < num_heads for h in chosen
    ):
        raise ValueError(f"heads={heads!r} is not accepted: expected {accepted}")
    return [int(h) for h in chosen]


def _check_axes(ax: Any, needed: int) -> list["Axes"]:
    import numpy as np
    from matplotlib.axes import Axes

    if isinstance(ax, np.ndarray):  # what Figure.subplots returns
        ax = list(ax.ravel())
    axes = [ax] if isinstance(ax, Axes) else list(ax) if isinstance(ax, (list, tuple)) else None
    if axes is None or len(axes) != needed or not all(isinstance(a, Axes) for a in axes):
        what = "one matplotlib Axes" if needed == 1 else f"a list of {needed} matplotlib Axes (one per head drawn)"
        raise TypeError(f"ax={ax!r} is not accepted: expected {what}, or None for a new figure")
    return axes


def _check_scores(scores: Any):
    import numpy as np

    if isinstance(scores, torch.Tensor):
        table = scores.detach().to("cpu", torch.float64).numpy()
    else:
        try:
            table = np.asarray(scores, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(
                f"scores={type(scores).__name__} is not accepted: expected a (layers, heads) table of numbers "
                "(a tensor from attnmask.locality_scores, an array or a nested list)"
            ) from None
    if table.ndim != 2 or 0 in table.shape:
        raise ValueError(
            f"scores of shape {tuple(table.shape)} are not accepted: expected a non-empty 2-D (layers, heads) table"
        )
    return table


def _prefix_note(prefix_row: torch.Tensor) -> str:
    """What the query sees of the prefix tokens (not drawn on the grid)."""
    total = int(prefix_row.numel())
    if total == 0:
        return "no prefix tokens"
    seen = int(prefix_row.sum())
    tokens = "1 prefix token" if total == 1 else f"{total} prefix tokens"
    if seen == total:
        return f"{tokens}: visible"
    if seen == 0:
        return f"{tokens}: hidden"
    return f"{tokens}: {seen} visible"


def _masks_title(mask: LocalMask, query: tuple[int, int]) -> str:
    where = f"query patch {query} of a {mask.grid[0]}x{mask.grid[1]} grid"
    layer = f"layer {mask.layer}: " if mask.layer is not None else ""
    if not mask.heads:
        return f"{layer}{where}, every head global"
    prefix = f", prefix tokens {mask.prefix}" if mask.prefix_tokens else ""
    soft = ", soft mask" if mask.mode == "soft" else ""
    return f"{layer}{where}, window {mask.window[0]}x{mask.window[1]}{prefix}{soft}"


__all__ = ["locality", "masks"]
