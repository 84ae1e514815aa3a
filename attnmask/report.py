"""The report that :func:`attnmask.describe` returns: a printable table and a dict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .spec import MaskSpec


COVERS_GRID_NOTE = "window covers grid"
"""How :class:`MaskReport` flags a window that masks nothing (header and first note)."""


@dataclass(frozen=True)
class LayerRow:
    """One attention layer: index, module name, number of heads, masked head indices."""

    layer: int
    name: str
    num_heads: int
    heads: tuple[int, ...]


@dataclass(frozen=True)
class MaskReport:
    """What is masked in a model.

    Attributes:
        family: Adapter family handling the model.
        layers: One :class:`LayerRow` per attention layer.
        window: ``(kh, kw)``, or ``None`` if the model is not patched.
        grid: Patch grid of the latest forward (or of the configured image size).
        prefix: Prefix policy.
        backend: Backend asked for (``None`` if not patched).
        resolved_backend: Kernel that runs the masked heads; for ``"auto"``, the one it
            picks for this model's device, dtype and grid at inference.
        spec: The model's :class:`MaskSpec`, if patched.
        notes: What the adapter says about this model (layers left alone, caveats).
    """

    family: str
    layers: list[LayerRow]
    window: Optional[tuple[int, int]]
    grid: Optional[tuple[int, int]]
    prefix: str
    backend: Optional[str]
    resolved_backend: Optional[str]
    spec: Optional[MaskSpec] = None
    notes: tuple[str, ...] = ()

    @property
    def patched(self) -> bool:
        return self.spec is not None

    @property
    def window_covers_grid(self) -> bool:
        """Whether the window reaches every patch of the grid from every patch, so that the
        "masked" heads attend everywhere, as global heads do (nothing is masked). ``False``
        when not patched, when the grid is unknown, and with ``prefix="isolated"`` (patch
        queries still do not see prefix tokens)."""
        if not self.window or not self.grid or self.prefix != "global":
            return False
        return self.window[0] >= 2 * self.grid[0] - 1 and self.window[1] >= 2 * self.grid[1] - 1

    @property
    def all_notes(self) -> tuple[str, ...]:
        """:attr:`notes`, with one first when the window covers the grid."""
        if not self.window_covers_grid or any(n.startswith(COVERS_GRID_NOTE) for n in self.notes):
            return self.notes
        kh, kw = self.window
        rows, cols = self.grid
        note = (
            f"{COVERS_GRID_NOTE}: the {kh}x{kw} window reaches every patch of the {rows}x{cols} grid, so the masked "
            f"heads attend as global heads do; a window masks something when it is under {2 * rows - 1} rows "
            f"or {2 * cols - 1} columns"
        )
        return (note,) + self.notes

    @property
    def mode(self) -> Optional[str]:
        """``"hard"`` or ``"soft"`` (``None`` if not patched)."""
        return self.spec.mode if self.spec is not None else None

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-serialisable)."""
        return {
            "family": self.family,
            "patched": self.patched,
            "window": list(self.window) if self.window else None,
            "grid": list(self.grid) if self.grid else None,
            "prefix": self.prefix,
            "mode": self.mode,
            "backend": self.backend,
            "resolved_backend": self.resolved_backend,
            "window_covers_grid": self.window_covers_grid,
            "layers": [
                {"layer": r.layer, "name": r.name, "num_heads": r.num_heads, "masked_heads": list(r.heads)}
                for r in self.layers
            ],
            "notes": list(self.all_notes),
        }

    def __str__(self) -> str:
        masked = sum(len(r.heads) for r in self.layers)
        total = sum(r.num_heads for r in self.layers)
        grid = f"{self.grid[0]}x{self.grid[1]}" if self.grid else "unknown"
        if self.window:
            header = (
                f"attnmask: {self.family}, window {self.window[0]}x{self.window[1]}, grid {grid}, "
                f"prefix {self.prefix}, mode {self.mode}, backend {self.backend} -> {self.resolved_backend}"
                f"{' (chosen per call; here at inference)' if self.backend == 'auto' else ''}; "
                f"{masked}/{total} heads masked"
                f"{f' ({COVERS_GRID_NOTE}: no masking)' if self.window_covers_grid else ''}"
            )
        else:
            header = f"attnmask: {self.family}, not patched, grid {grid}; 0/{total} heads masked"
        name_width = max([len("module")] + [len(r.name) for r in self.layers])
        lines = [header, f"{'layer':>5}  {'module':<{name_width}}  {'heads':>5}  masked"]
        for r in self.layers:
            chosen = _ranges(r.heads) if r.heads else "-"
            if r.heads and len(r.heads) == r.num_heads:
                chosen += " (all)"
            lines.append(f"{r.layer:>5}  {r.name:<{name_width}}  {r.num_heads:>5}  {chosen}")
        lines.extend(f"note: {note}" for note in self.all_notes)
        return "\n".join(lines)


def _ranges(indices: tuple[int, ...]) -> str:
    """``(0, 1, 2, 5)`` -> ``"0-2,5"``."""
    parts: list[str] = []
    start = prev = indices[0]
    for i in indices[1:] + (None,):
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts)


@dataclass
class FoundLayer:
    """One attention-like module of a model, as an adapter found it (:func:`attnmask.inspect`).

    Attributes:
        name: Module name.
        kind: The host's class name of the module.
        num_heads: Number of heads.
        status: ``"patchable"`` or ``"refused"``.
        reason: Why it is refused (empty if patchable).
        route: How a patched layer's attention is reached (``"sdpa"``, ``"softmax"``, ...).
        geometry: What the layer attends over (grid, prefix tokens, host windows), where known.
    """

    name: str
    kind: str
    num_heads: int
    status: str
    reason: str = ""
    route: str = ""
    geometry: str = ""
    routes: frozenset = frozenset()  # (route, head layout) pairs the observing forward resolved


@dataclass(frozen=True)
class InspectReport:
    """What attnmask finds in a model before anything is patched (:func:`attnmask.inspect`)."""

    model: str
    adapter: str
    layers: list[FoundLayer]
    notes: tuple[str, ...] = ()

    @property
    def patchable(self) -> list[FoundLayer]:
        return [layer for layer in self.layers if layer.status == "patchable"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "adapter": self.adapter,
            "layers": [{k: v for k, v in vars(layer).items() if k != "routes"} for layer in self.layers],
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        lines = [f"{self.model}: {len(self.patchable)} of {len(self.layers)} attention layers patchable ({self.adapter})"]
        width = max([len(layer.name) for layer in self.layers] + [5])
        for layer in self.layers:
            detail = layer.geometry if layer.status == "patchable" else layer.reason
            lines.append(f"  {layer.name:<{width}}  {layer.kind:<24} {layer.num_heads:>3} heads  {layer.status:<9}  {detail}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)
