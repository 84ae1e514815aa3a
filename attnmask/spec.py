"""MaskSpec: the full, JSON-serialisable description of what ``apply`` did, and the
validation of ``apply``'s arguments (window, heads, prefix policy, backend)."""

from __future__ import annotations

import math
import numbers
import operator
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from .kernels import BACKENDS
from .masks import PREFIX_POLICIES, LocalMask, MaskCache
from .schedules import PRESETS

SPEC_VERSION = 1

HeadsPerLayer = Union[int, float, str, Sequence[int]]
"""What one layer's ``heads`` may be: a count, a fraction, ``"all"``/``"none"``, or indices."""

Heads = Union[HeadsPerLayer, Mapping[int, HeadsPerLayer], Callable[[int, int, int], HeadsPerLayer]]
"""What ``apply(heads=...)`` accepts: a per-layer form, a ``{layer: heads}`` mapping, or a
callable ``(layer_index, num_layers, num_heads) -> per-layer form``."""

HEAD_STRINGS = ("all", "none")

MODES = ("hard", "soft")
"""How a masked head's out-of-window logits are treated.

- ``"hard"`` (default): they are ``-inf``, so the head attends only inside its window (true
  locality; block-sparse kernels can skip the masked work).
- ``"soft"``: the paper's Eq. 2, ``softmax(M * (q k^T) / sqrt(d))``: they are set to 0, so each
  out-of-window key still gets weight ``e^0`` and a little global information leaks in.
"""


def normalize_window(window: Any) -> tuple[int, int]:
    """Validate ``window`` and return it as ``(kh, kw)``.

    Args:
        window: An odd positive int ``k`` (``k x k``) or a pair of odd positive ints
            ``(kh, kw)`` (rows, columns).

    Raises:
        TypeError: If ``window`` is not an int or a pair of ints.
        ValueError: If a size is even or not positive.
    """
    if isinstance(window, (bool, str, bytes, bytearray)) or not isinstance(window, (numbers.Integral, Sequence)):
        raise TypeError(
            f"window={window!r} is not accepted: expected an odd positive int k (a k x k window) "
            "or a pair of odd positive ints (kh, kw)"
        )
    sizes = (window, window) if isinstance(window, numbers.Integral) else tuple(window)
    if len(sizes) != 2 or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in sizes):
        raise TypeError(
            f"window={window!r} is not accepted: expected an odd positive int k or a pair of two "
            "odd positive ints (kh, kw)"
        )
    for size in sizes:
        if size <= 0 or size % 2 == 0:
            raise ValueError(
                f"window={window!r} is not accepted: window sizes must be odd and positive "
                "(1, 3, 5, 7, ...) so that the window is centred on its query patch"
            )
    return int(sizes[0]), int(sizes[1])


def check_choice(name: str, value: Any, accepted: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``accepted``, else raise a ValueError naming it."""
    if not isinstance(value, str) or value not in accepted:
        raise ValueError(f"{name}={value!r} is not accepted: expected one of {', '.join(map(repr, accepted))}")
    return value


def check_mode(mode: Any) -> str:
    """Validate the mask mode (see :data:`MODES`)."""
    return check_choice("mode", mode, MODES)


def check_prefix(prefix: Any) -> str:
    """Validate the prefix policy (see :data:`attnmask.masks.PREFIX_POLICIES`)."""
    return check_choice("prefix", prefix, PREFIX_POLICIES)


def _layer_heads(value: Any, layer: int, num_heads: int, where: str) -> tuple[int, ...]:
    """Resolve one layer's ``heads`` form to sorted head indices."""
    if isinstance(value, (bool, bytes, bytearray)):
        # bytes are a sequence of ints: b"\x00" would silently read as head 0.
        raise TypeError(f"{where}={value!r} is not accepted: use an int count, a fraction, 'all', 'none' or indices")
    if isinstance(value, str):
        check_choice(where, value, HEAD_STRINGS)
        return tuple(range(num_heads)) if value == "all" else ()
    if isinstance(value, numbers.Integral):
        if not 0 <= value <= num_heads:
            raise ValueError(
                f"{where}={value!r} is not accepted for layer {layer}, which has {num_heads} heads: "
                f"a head count must be between 0 and {num_heads}"
            )
        return tuple(range(int(value)))
    if isinstance(value, numbers.Real):
        if not (0.0 < value <= 1.0) or math.isnan(value):
            raise ValueError(f"{where}={value!r} is not accepted: a fraction of heads must be in (0, 1]")
        return tuple(range(max(1, math.floor(value * num_heads))))
    if isinstance(value, Sequence):
        indices = list(value)
        for index in indices:
            if isinstance(index, bool) or not isinstance(index, numbers.Integral):
                raise TypeError(f"{where}={value!r} is not accepted: head indices must be ints")
            if not 0 <= index < num_heads:
                raise ValueError(
                    f"{where}={value!r} is not accepted for layer {layer}, which has {num_heads} heads: "
                    f"head index {index} is outside 0..{num_heads - 1}"
                )
        if len(set(indices)) != len(indices):
            raise ValueError(f"{where}={value!r} is not accepted: head indices must not repeat")
        return tuple(sorted(int(i) for i in indices))
    raise TypeError(
        f"{where}={value!r} is not accepted: expected an int count, a float fraction in (0, 1], "
        "'all', 'none', a sequence of head indices, a {layer: heads} mapping or a callable "
        "(layer_index, num_layers, num_heads) -> heads"
    )


def resolve_heads(heads: Heads, num_heads: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Resolve ``apply``'s ``heads`` argument to the masked head indices of every layer.

    Args:
        heads: See :data:`Heads`. A preset name from
            :data:`attnmask.schedules.PRESETS` (``"mait"``, ...) is that schedule. An int ``n`` masks the first ``n`` heads of every layer; a
            float ``f`` masks ``floor(f * num_heads)`` heads (at least 1); ``"all"``/``"none"``;
            a sequence of indices masks the same heads in every layer; a mapping
            ``{layer_index: heads}`` masks only the named layers; a callable is asked per layer.
        num_heads: Number of heads of each layer, in layer order.

    Returns:
        One sorted tuple of masked head indices per layer.
    """
    num_layers = len(num_heads)
    if isinstance(heads, str) and heads not in HEAD_STRINGS:
        if heads not in PRESETS:
            raise ValueError(
                f"heads={heads!r} is not accepted: expected 'all', 'none', a schedule preset "
                f"({', '.join(map(repr, PRESETS))}), an int count, a float fraction in (0, 1], "
                "head indices, a {layer: heads} mapping or a callable"
            )
        heads = PRESETS[heads]
    if isinstance(heads, Mapping):
        resolved: list[tuple[int, ...]] = [() for _ in range(num_layers)]
        for layer, value in heads.items():
            if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not 0 <= layer < num_layers:
                raise ValueError(
                    f"heads={{{layer!r}: ...}} is not accepted: layer indices must be ints in "
                    f"0..{num_layers - 1} (the model has {num_layers} attention layers)"
                )
            resolved[layer] = _layer_heads(value, int(layer), num_heads[layer], f"heads[{layer}]")
        return tuple(resolved)
    if callable(heads):
        return tuple(
            _layer_heads(heads(layer, num_layers, n), layer, n, f"heads({layer}, {num_layers}, {n})")
            for layer, n in enumerate(num_heads)
        )
    return tuple(_layer_heads(heads, layer, n, "heads") for layer, n in enumerate(num_heads))


@dataclass(frozen=True)
class LayerPlan:
    """What one patched attention layer needs at run time (stored on the module).

    Attributes:
        layer: Layer index in the model's order of attention layers.
        num_heads: Number of heads of the layer.
        heads: Sorted indices of its masked heads.
        window: ``(kh, kw)``.
        prefix: Prefix policy.
        backend: Name of the kernel that runs it (``"auto"`` chooses per call).
        mode: ``"hard"`` or ``"soft"`` (see :data:`MODES`).
        cache: The installation's :class:`~attnmask.masks.MaskCache`, shared by every layer
            of one :func:`attnmask.apply` (``None``: the default cache).
    """

    layer: int
    num_heads: int
    heads: tuple[int, ...]
    window: tuple[int, int]
    prefix: str
    backend: str
    mode: str = "hard"
    cache: Optional[MaskCache] = field(default=None, compare=False, repr=False)

    def local_mask(self, grid: tuple[int, int], prefix_tokens: int, positions=None) -> LocalMask:
        """The layer's :class:`~attnmask.masks.LocalMask` for an input on ``grid``.

        Every adapter builds its masks here, when the grid of a call is known; a window that
        covers that grid (the masked heads stay global) is warned about once per geometry
        (:func:`warn_if_window_covers_grid`)."""
        # operator.index, not int(): under torch.compile with dynamic shapes a grid read off a
        # tensor's shape is symbolic, and int() keeps it so, while index() specialises it to
        # the number (masks are per grid: looked up while tracing, constants of the graph).
        mask = LocalMask(
            grid=(operator.index(grid[0]), operator.index(grid[1])),
            window=self.window,
            prefix_tokens=operator.index(prefix_tokens),
            num_heads=self.num_heads,
            heads=self.heads,
            prefix=self.prefix,
            positions=positions,
            mode=self.mode,
            # The layer index is for recording tools, which do not run compiled; read while
            # torch.compile traces, it would make each layer's code a recompilation.
            layer=None if torch.compiler.is_compiling() else self.layer,
            cache=self.cache,
        )
        if mask.heads and mask.covers_grid:
            warn_if_window_covers_grid(mask.window, mask.grid)
        return mask


_COVERING_WARNED: set[tuple[tuple[int, int], tuple[int, int]]] = set()
"""``(window, grid)`` pairs already warned about in this process."""


def warn_if_window_covers_grid(window: tuple[int, int], grid: tuple[int, int]) -> None:
    """Warn (a ``UserWarning``, once per ``(window, grid)`` in a process) that ``window`` reaches
    every patch of ``grid`` from every patch, so masked heads attend as global ones do.

    Skipped while ``torch.compile`` traces (a Python side effect it should not record); the
    first eager call, or :func:`attnmask.describe`, says it instead.
    """
    key = (tuple(window), tuple(grid))
    if torch.compiler.is_compiling() or key in _COVERING_WARNED:
        return
    _COVERING_WARNED.add(key)
    warnings.warn(
        f"attnmask: window {window[0]}x{window[1]} covers the whole {grid[0]}x{grid[1]} grid its layers attend "
        f"over, so the masked heads are not masked (a window masks something only when it is smaller than "
        f"{2 * grid[0] - 1}x{2 * grid[1] - 1} in one direction); use a smaller window or a larger input",
        UserWarning,
        stacklevel=3,
    )


@dataclass(frozen=True)
class MaskSpec:
    """Full description of a patched model's masks; JSON-serialisable via :meth:`to_dict`.

    Attributes:
        family: Adapter that patched the model (e.g. ``"timm.vit"``).
        layers: Module name of each attention layer, in layer order.
        num_heads: Number of heads of each layer.
        heads: Masked head indices of each layer.
        window: ``(kh, kw)`` neighbourhood of masked heads.
        prefix: Prefix policy (``"global"`` or ``"isolated"``).
        backend: Backend asked for (``"auto"``, ``"sdpa"``, ``"flex"`` or ``"reference"``).
        mode: ``"hard"`` or ``"soft"`` (see :data:`MODES`).
        version: Format version of this description.
    """

    family: str
    layers: tuple[str, ...]
    num_heads: tuple[int, ...]
    heads: tuple[tuple[int, ...], ...]
    window: tuple[int, int]
    prefix: str = "global"
    backend: str = "auto"
    mode: str = "hard"
    version: int = field(default=SPEC_VERSION)

    def __post_init__(self) -> None:
        if not (len(self.layers) == len(self.num_heads) == len(self.heads)):
            raise ValueError(
                f"MaskSpec: layers ({len(self.layers)}), num_heads ({len(self.num_heads)}) and heads "
                f"({len(self.heads)}) must have one entry per attention layer"
            )
        normalize_window(self.window)
        check_prefix(self.prefix)
        check_choice("backend", self.backend, BACKENDS)
        check_mode(self.mode)
        for layer, (n, chosen) in enumerate(zip(self.num_heads, self.heads)):
            _layer_heads(list(chosen), layer, n, f"heads[{layer}]")

    @property
    def num_layers(self) -> int:
        """Number of attention layers in the model."""
        return len(self.layers)

    @property
    def masked_layers(self) -> tuple[int, ...]:
        """Indices of the layers with at least one masked head."""
        return tuple(i for i, chosen in enumerate(self.heads) if chosen)

    def heads_mapping(self) -> dict[int, tuple[int, ...]]:
        """The masked heads as a ``{layer: heads}`` mapping that ``apply(heads=...)`` accepts."""
        return {i: chosen for i, chosen in enumerate(self.heads) if chosen}

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (lists and ints only)."""
        return {
            "version": self.version,
            "family": self.family,
            "window": list(self.window),
            "prefix": self.prefix,
            "backend": self.backend,
            "mode": self.mode,
            "layers": list(self.layers),
            "num_heads": list(self.num_heads),
            "heads": [list(chosen) for chosen in self.heads],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MaskSpec":
        """Inverse of :meth:`to_dict`; validates every field."""
        if not isinstance(data, Mapping):
            raise TypeError(f"MaskSpec.from_dict expects a mapping, got {type(data).__name__}")
        version = data.get("version", SPEC_VERSION)
        if version != SPEC_VERSION:
            raise ValueError(f"MaskSpec version={version!r} is not supported: this attnmask reads version {SPEC_VERSION}")
        missing = [key for key in ("family", "window", "layers", "num_heads", "heads") if key not in data]
        if missing:
            raise ValueError(f"MaskSpec.from_dict: missing keys {missing}")
        return cls(
            family=str(data["family"]),
            layers=tuple(str(name) for name in data["layers"]),
            num_heads=_ints(data["num_heads"], "num_heads"),
            heads=tuple(_ints(chosen, f"heads[{i}]") for i, chosen in enumerate(_sequence(data["heads"], "heads"))),
            window=normalize_window(data["window"]),
            prefix=data.get("prefix", "global"),
            backend=data.get("backend", "auto"),
            mode=data.get("mode", "hard"),
            version=version,
        )


def _sequence(value: Any, where: str) -> Sequence:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"MaskSpec {where}={value!r} is not accepted: expected a list")
    return value


def _ints(values: Any, where: str) -> tuple[int, ...]:
    """``values`` as a tuple of ints; floats, strings and bools are refused, not converted
    (a hand-edited ``1.9`` or ``"03"`` must not quietly become another head)."""
    items = _sequence(values, where)
    for item in items:
        if isinstance(item, bool) or not isinstance(item, numbers.Integral):
            raise ValueError(f"MaskSpec {where} entry {item!r} is not accepted: expected an int")
    return tuple(int(item) for item in items)
