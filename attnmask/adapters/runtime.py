"""Shapes a forward produces, recorded per thread: where a structural adapter learns its grids.

A :class:`Runtime` is attached to one model by forward hooks: the image batch and size, the
4-D inputs of the modules enclosing each attention layer, the patch embedding's grid and
per-sample grids (``spatial_shapes``). :meth:`Runtime.geometry` matches an attention call's
token count against them (:func:`~attnmask.adapters.layouts.resolve_geometry`).
:class:`CallInput` is what one attention layer's forward was given.
"""

from __future__ import annotations

import functools
import inspect
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch import nn

from .layouts import Grid, TokenGeometry, grid_candidates, pair, resolve_geometry, scaled_grids

if TYPE_CHECKING:
    from .generic import SiteState


class Runtime:
    """Shapes seen during the current forward of one model, per thread.

    Forward pre-hooks record the image batch and size (the model's first 4-D input), the
    4-D inputs of every module that encloses an attention layer, and the grid of each patch
    embedding (a module with a ``grid_size``, or a convolution whose stride equals its kernel).
    """

    def __init__(self, model: nn.Module, sites: Sequence[str], prefix_hint: Optional[int], suffix: int = 0) -> None:
        self.prefix_hint = prefix_hint
        self.suffix = suffix
        self.local = _ThreadState()
        self._traced = _fresh_state()  # the state while torch.compile traces (see state())
        self._traced_live = False  # whether a traced on_model renewed _traced (see state())
        self.enclosing: dict[str, tuple[str, ...]] = {}
        self._hooks: list = []
        self._register(model, sites)

    # hooks
    def _register(self, model: nn.Module, sites: Sequence[str]) -> None:
        self._hooks.append(model.register_forward_pre_hook(self.on_model, with_kwargs=True))
        self._hooks.append(model.register_forward_hook(self.on_model_end, always_call=True))
        ancestors: set[str] = set()
        for site in sites:
            parts = site.split(".")
            chain = tuple(".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1))
            self.enclosing[site] = chain
            ancestors.update(chain)
        for name in sorted(ancestors):
            module = model.get_submodule(name)
            self._hooks.append(module.register_forward_pre_hook(_Recorder(self, name), with_kwargs=True))
        for name, module in model.named_modules():
            if module is not model and takes_spatial_shapes(module):
                self._hooks.append(module.register_forward_pre_hook(self.on_shapes, with_kwargs=True))
            if _is_patch_embedding(module):
                self._hooks.append(module.register_forward_pre_hook(self.on_image, with_kwargs=True))
                self._hooks.append(module.register_forward_hook(self.on_patch_embedding))

    def __getstate__(self) -> dict:
        # Per-thread shapes and hook handles belong to this process's forward, not to copies.
        return {k: v for k, v in self.__dict__.items() if k not in ("local", "_hooks", "_traced", "_traced_live")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.local = _ThreadState()
        self._traced = _fresh_state()
        self._traced_live = False
        self._hooks = []

    def remove(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def empty(self) -> bool:
        """Whether this thread has seen nothing of the current forward (no hook ran in it).
        Never while torch.compile traces the whole forward: it records its own shapes."""
        if self._tracing_forward():
            return False
        state = self.local.state
        return state["image"] is None and not state["inputs"] and not state["patches"]

    def _tracing_forward(self) -> bool:
        """Whether torch.compile traces a forward that entered the model in the traced region
        (its :meth:`on_model` ran while tracing). A compiled *region* (each block compiled on
        its own, ``torch.compile(model.blocks[i])``) reads the shapes the eager part of the
        forward recorded in this thread."""
        return torch.compiler.is_compiling() and self._traced_live

    def state(self) -> dict:
        """This thread's shapes of the current forward. While torch.compile traces the whole
        forward, one plain dict whose entries always exist and are overwritten, never read
        first: a compiled forward then reads only what it recorded itself, not what the
        previous call left (dynamo would guard on that, and recompile when it changed)."""
        if self._tracing_forward():
            return self._traced
        return self.local.state

    def on_model(self, module: nn.Module, args, kwargs) -> None:
        if torch.compiler.is_compiling():
            self._traced = _fresh_state()  # a new forward starts from nothing the last one left
            self._traced_live = True
        else:
            self._traced_live = False
        state = self.state()
        state["inputs"] = {}
        state["patches"] = []
        image = _first_tensor(args, kwargs, dims=(4,))
        state["image"] = (int(image.shape[0]), (int(image.shape[-2]), int(image.shape[-1]))) if image is not None else None
        state["spatial_shapes"] = _spatial_shapes(module, args, kwargs)

    def on_model_end(self, module: nn.Module, args, output) -> None:
        """The model's forward ended (also by an exception): the traced state it renewed is
        not for a later compiled region of another forward."""
        self._traced_live = False

    def on_shapes(self, module: nn.Module, args, kwargs) -> None:
        shapes = _spatial_shapes(module, args, kwargs)
        if shapes is not None:
            self.state()["spatial_shapes"] = shapes

    def on_image(self, module: nn.Module, args, kwargs) -> None:
        """Pre-hook on a patch embedding: its 4-D input is the image (also when the model is
        entered below its root, e.g. through ``forward_features``)."""
        image = _first_tensor(args, kwargs, dims=(4,))
        if image is not None and image.shape[1] <= 4:
            self.state()["image"] = (int(image.shape[0]), (int(image.shape[-2]), int(image.shape[-1])))

    def on_input(self, name: str, args, kwargs) -> None:
        tensor = _first_tensor(args, kwargs, dims=(4,))
        if tensor is not None:
            self.state()["inputs"][name] = tuple(tensor.shape)

    def on_patch_embedding(self, module: nn.Module, args, output) -> None:
        out = output[0] if isinstance(output, (tuple, list)) and output else output
        grid = None
        if isinstance(out, torch.Tensor) and out.dim() == 4:
            grid = (int(out.shape[-2]), int(out.shape[-1])) if isinstance(module, nn.Conv2d) else None
            if grid is None:
                grid = (int(out.shape[1]), int(out.shape[2])) if out.shape[-1] == getattr(module, "embed_dim", -1) else (int(out.shape[-2]), int(out.shape[-1]))
        elif getattr(module, "grid_size", None) is not None:
            image = args[0] if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4 else None
            feat = getattr(module, "dynamic_feat_size", None)
            grid = pair(feat(image.shape[-2:]) if image is not None and callable(feat) else module.grid_size)
        if grid is not None and torch.compiler.is_compiling():
            # The latest grid only, also when the traced region starts below the model (a
            # compiled forward_features): reading the list would guard on earlier forwards'.
            self.state()["patches"] = [grid]
        elif grid is not None:
            patches = self.state()["patches"]
            patches.insert(0, grid)
            del patches[4:]

    # geometry
    def candidates(self, site: "SiteState", call: "CallInput", windows: int) -> list[tuple[Grid, str]]:
        state = self.state()
        out: list[tuple[Grid, str]] = []
        for grid in grid_candidates(call.shape4 or ()):
            out.append((grid, "the layer's 4-D input"))
        for grid in call.sizes:
            out.append((grid, "the layer's size argument"))
        if windows > 1 and site.window is not None:
            out.append((site.window, "the layer's window size"))
        # Only when this forward recorded 4-D inputs: reading the layer's own ancestors (its
        # name) while torch.compile traces one block would make each block a graph of its own.
        for name in self.enclosing.get(site.name, ()) if state["inputs"] else ():
            shape = state["inputs"].get(name)
            for grid in grid_candidates(shape or ()):
                out.append((grid, f"the 4-D input of {name}"))
        for grid in state["patches"]:
            out.append((grid, "the patch embedding"))
        return out

    def image_grids(self) -> list[tuple[Grid, str]]:
        image = self.state()["image"]
        if image is None:
            return []
        return [(g, "the image size") for g in scaled_grids(image[1])]

    def windows(self, batch: int) -> int:
        image = self.state()["image"]
        if image is None or not image[0] or batch % image[0]:
            return 1
        return batch // image[0]

    def geometry(self, site: "SiteState", call: "CallInput", tokens: int, batch: int, least_windows: int = 1) -> Optional[TokenGeometry]:
        """The layout of a call over ``tokens`` tokens with ``batch`` sequences (``None`` if no
        grid of this forward fits). ``least_windows``: host windows the queries' shape shows."""
        windows = max(self.windows(batch), least_windows)
        found = resolve_geometry(
            tokens, self.candidates(site, call, windows), windows=windows, prefix_hint=self.prefix_hint, suffix=self.suffix
        )
        if found is None:
            limit = self.prefix_hint if self.prefix_hint is not None else 1
            found = resolve_geometry(
                tokens, self.image_grids(), windows=windows, prefix_hint=self.prefix_hint, suffix=self.suffix, max_extra=limit
            )
        return found

    def key_geometry(self, site, call, tokens: int, batch: int, least_windows: int, query: TokenGeometry) -> Optional[TokenGeometry]:
        """The grid of keys on another grid than the queries: a stride of the query grid (or
        the other way round), with the same tokens beyond the grid."""
        derived = [(g, "a pooled query grid") for g in scaled_grids(query.grid)]
        found = resolve_geometry(tokens, derived, windows=query.windows, prefix_hint=query.prefix, suffix=query.suffix)
        if found is None:
            found = self.geometry(site, call, tokens, batch, least_windows)
        if found is not None and (found.prefix, found.suffix) != (query.prefix, query.suffix):
            return None  # pooled keys keep the queries' extra tokens
        return found


def _fresh_state() -> dict:
    return {"image": None, "inputs": {}, "patches": [], "spatial_shapes": None}


class _ThreadState(threading.local):
    """Per-thread shapes; ``state`` exists in every thread from its first access (a compiled
    region that found it missing would be guarded on its absence, and recompile once)."""

    def __init__(self) -> None:
        self.state = _fresh_state()


class _Recorder:
    """Forward pre-hook recording a module's 4-D input into its model's :class:`Runtime`."""

    def __init__(self, runtime: Runtime, name: str) -> None:
        self.runtime = runtime
        self.name = name

    def __call__(self, module, args, kwargs) -> None:
        self.runtime.on_input(self.name, args, kwargs)


def takes_spatial_shapes(module: nn.Module) -> bool:
    """Whether the module's forward takes per-sample patch grids (``spatial_shapes``, NaFlex)."""
    return _forward_parameters(type(module)).count("spatial_shapes") > 0


@functools.lru_cache(maxsize=None)
def _forward_parameters(cls: type) -> tuple[str, ...]:
    """Parameter names of ``cls.forward`` after ``self`` (read once per class, not per forward)."""
    try:
        return tuple(inspect.signature(cls.forward).parameters)[1:]
    except (TypeError, ValueError):
        return ()


def _spatial_shapes(module: nn.Module, args, kwargs) -> Optional[torch.Tensor]:
    shapes = kwargs.get("spatial_shapes")
    if shapes is None and takes_spatial_shapes(module):
        names = _forward_parameters(type(module))
        position = names.index("spatial_shapes")
        shapes = args[position] if position < len(args) else None
    return shapes if isinstance(shapes, torch.Tensor) and shapes.dim() == 2 and shapes.shape[-1] == 2 else None


def naflex_geometry(shapes: torch.Tensor, num_tokens: int) -> tuple[Grid, torch.Tensor]:
    """Per-sample grids (``spatial_shapes``, ``(B, 2)`` rows of ``(h, w)``), each sample's
    patches row-major first, then padding: the common grid ``(max h, max w)`` and
    :attr:`LocalMask.positions` into one virtual prefix token (index 0, where padding goes:
    global, and masked out by the host's padding mask) followed by that grid."""
    heights, widths = shapes[:, 0].long(), shapes[:, 1].long()
    grid = (int(heights.max()), int(widths.max()))
    i = torch.arange(num_tokens, device=shapes.device)[None, :]
    w = widths[:, None]
    positions = 1 + (i // w) * grid[1] + i % w
    positions = torch.where(i < heights[:, None] * w, positions, torch.zeros_like(positions))
    return grid, positions


def _is_patch_embedding(module: nn.Module) -> bool:
    if getattr(module, "grid_size", None) is not None and hasattr(module, "proj"):
        return True
    if isinstance(module, nn.Conv2d):  # on pixels, strided (patches, possibly overlapping)
        k, s = pair(module.kernel_size), pair(module.stride)
        return s[0] > 1 and k[0] >= s[0] and module.in_channels <= 4
    return False


def _first_tensor(args, kwargs, dims=(4,)) -> Optional[torch.Tensor]:
    """The first tensor of ``dims`` dimensions among the arguments (or inside a tuple or list
    argument: PiT's stages take ``(feature map, class tokens)``)."""
    for value in list(args) + list(kwargs.values()):
        items = value if isinstance(value, (tuple, list)) else (value,)
        for item in items:
            if isinstance(item, torch.Tensor) and item.dim() in dims:
                return item
    return None


@dataclass
class CallInput:
    """What the patched layer's forward was given: its 4-D input's shape, size arguments."""

    shape4: Optional[tuple[int, ...]] = None
    tokens: Optional[int] = None
    sizes: list[Grid] = field(default_factory=list)
    cross: bool = False  # a second token sequence was passed (queries and keys from different tokens)

    @classmethod
    def of(cls, args, kwargs) -> "CallInput":
        values = list(args) + list(kwargs.values())
        call = cls()
        first = next((v for v in values if isinstance(v, torch.Tensor)), None)
        if first is not None and first.dim() == 4:
            call.shape4 = tuple(first.shape)
        elif first is not None and first.dim() == 3:
            call.tokens = int(first.shape[1])
        sequences = [v for v in values if isinstance(v, torch.Tensor) and v.dim() == 3 and v.is_floating_point()]
        if first is not None and first.dim() == 3:
            call.cross = any(
                v is not first and v.shape[-1] == first.shape[-1] and v.shape[0] == first.shape[0] and v.shape[1] != first.shape[1]
                for v in sequences
            )  # a second sequence of the same length is a position embedding, not other tokens
        ints = [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
        for v in values:
            if isinstance(v, (tuple, list, torch.Size)) and len(v) == 2 and all(isinstance(i, int) for i in v):
                call.sizes.append((int(v[0]), int(v[1])))
        if len(ints) == 2:
            call.sizes.append((ints[0], ints[1]))
        return call
