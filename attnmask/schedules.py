"""Head schedules: the paper's placements of masked heads, as functions of depth.

Each preset is an ordinary callable ``(layer_index, num_layers, num_heads) -> heads`` that
``apply(heads=...)`` accepts, so it works for any depth and width; ``apply(heads="mait")``
looks it up by name in :data:`PRESETS`. Read one, copy it, change it: that is the intended
way to write a new schedule.

"Thirds" split the layers as evenly as the depth allows: layer ``i`` of ``L`` is in the first
third when ``3 * i < L`` and in the middle third when ``3 * i < 2 * L`` (24 layers: 0-7, 8-15,
16-23; 36 layers: 0-11, 12-23, 24-35; 10 layers: 0-3, 4-6, 7-9).
"""

from __future__ import annotations

from typing import Callable, Union

LayerHeads = Union[int, str]


def third(layer: int, num_layers: int) -> int:
    """Which third of the depth ``layer`` is in: 0 (first), 1 (middle) or 2 (last)."""
    if 3 * layer < num_layers:
        return 0
    if 3 * layer < 2 * num_layers:
        return 1
    return 2


def mait(layer: int, num_layers: int, num_heads: int) -> LayerHeads:
    """The MaiT models' schedule (the paper's 24-layer models, ``docs/models.md``): every head masked in the first third
    of the layers, one head (head 0) in the middle third, none in the last third."""
    return ("all", 1, 0)[third(layer, num_layers)]


def mait_mixed(layer: int, num_layers: int, num_heads: int) -> LayerHeads:
    """The paper's 36-layer mixed schedule: every head masked in the first third of the
    layers, one head (head 0) in all the others."""
    return "all" if third(layer, num_layers) == 0 else 1


def one_head(layer: int, num_layers: int, num_heads: int) -> LayerHeads:
    """One masked head (head 0) in every layer (the paper's 36-layer "1 head everywhere")."""
    return 1


PRESETS: dict[str, Callable[[int, int, int], LayerHeads]] = {
    "mait": mait,
    "mait-mixed": mait_mixed,
    "one-head": one_head,
}
"""Named schedules ``apply(heads=name)`` accepts."""

__all__ = ["PRESETS", "mait", "mait_mixed", "one_head", "third"]
