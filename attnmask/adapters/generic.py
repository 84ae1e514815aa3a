"""The structural adapter: attention over a patch grid, found by what it does, not its name.

This adapter handles models that no family adapter claims (any timm, torchvision or other
PyTorch model). It needs no host library.

**Finding the layers.** An attention layer is a module with an integer ``num_heads`` whose
own ``forward`` calls ``scaled_dot_product_attention`` or a ``softmax``: the two ways host
code computes attention weights. Layers of a few structural kinds are refused with the
reason (:data:`REFUSALS`): channel (cross-covariance) attention, attention whose weights are
not query-key products, attention-pooling heads, unrolled token orders. Then one forward
pass on an example input (the model's configured input size, or ``example=``) observes what
every candidate actually computes, and a layer is patched only if each of its attention
calls resolves to a token-to-token map over a patch grid.

**Patching.** A patched layer's class is swapped to a subclass whose ``forward`` runs the
host's own ``forward`` inside a :class:`~torch.overrides.TorchFunctionMode` that sees the
layer's ``scaled_dot_product_attention`` call (run by the layer's attnmask kernel instead)
or its explicit ``softmax`` over the keys (the locality mask is added to the logits first).
Modules with a ``fused_attn`` switch (timm) are set to the SDPA path while patched.

**Geometry, per call** (:meth:`Runtime.geometry`): the token count of the call is matched
against the grids the forward produced, nearest first: the layer's own 4-D input, a size
argument passed to it, its ``window_size``, the 4-D inputs of the modules enclosing it, the
patch embedding's grid, then grids derived from the image size. Host windows show up as a
batch that is a multiple of the image batch (or a window dimension of the queries); their
grid is the window's own. Tokens beyond the grid are prefix tokens. Keys on a coarser grid
than the queries (pooled attention) use :func:`~attnmask.adapters.layouts.pooled_allowed`.
"""

from __future__ import annotations

import binascii
import importlib
import inspect
import re
import sys
import threading
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..kernels import get_kernel, record
from ..masks import cached, combine_masks, masked_logit
from ..spec import LayerPlan
from ..report import FoundLayer
from . import Adapter, Site
from .layouts import Grid, PooledMask, TokenGeometry, grid_candidates, pair, resolve_geometry, scaled_grids
from .swap import drop_attnmask_attributes, remove_attnmask_hooks

SDPA = F.scaled_dot_product_attention
SOFTMAXES = frozenset({torch.softmax, torch.Tensor.softmax, F.softmax, torch.special.softmax})


# -- finding attention by structure ------------------------------------------------------

def forward_names(module: nn.Module) -> tuple[str, ...]:
    """Names the module's own ``forward`` refers to (globals and attributes), and those of the
    methods of its class that ``forward`` calls (ConViT's ``get_attention``)."""
    cls = host_class(module)
    code = getattr(cls.forward, "__code__", None)
    if code is None:
        return ()
    names = list(code.co_names)
    for name in code.co_names:
        method = cls.__dict__.get(name) if name != "forward" else None
        inner = getattr(method, "__code__", None)
        if inner is not None:
            names += inner.co_names
    return tuple(names)


def head_count(module: nn.Module) -> Optional[int]:
    """The module's number of heads: its ``num_heads`` (or a synonym), or 1 for single-head
    attention (key and query projections, no head count)."""
    for attr in ("num_heads", "num_attention_heads", "n_heads", "heads"):
        value = module.__dict__.get(attr, getattr(type(module), attr, None))
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    if has_key_projection(module) and has_query_projection(module):
        return 1
    return None


def has_query_projection(module: nn.Module) -> bool:
    return any(
        n in ("qkv", "q", "qk", "to_q", "to_qkv", "in_proj_weight") or n.startswith(("q_", "qkv_")) or "quer" in n
        for n in _projection_names(module)
    )


def computes_attention(module: nn.Module) -> bool:
    names = forward_names(module)
    return "scaled_dot_product_attention" in names or "softmax" in names


def _projection_names(module: nn.Module) -> set[str]:
    return {n.lower() for n, _ in module.named_children()} | {n.lower() for n, _ in module.named_parameters(recurse=False)}


def has_key_projection(module: nn.Module) -> bool:
    """Whether keys are projected from the tokens: a layer or weight named for keys
    (``qkv``, ``kv``, ``k``, ``k_proj``, ``key``, ``queries_keys_values``, ``in_proj_weight``...)."""
    return any(
        n in ("qkv", "qk", "kv", "k", "to_k", "to_qkv", "to_kv", "in_proj_weight", "in_proj")
        or n.startswith(("k_", "qkv_", "kv_"))
        or "key" in n
        for n in _projection_names(module)
    )


def _refuse_channel(module: nn.Module) -> bool:
    return isinstance(getattr(module, "temperature", None), nn.Parameter)


def _refuse_outlook(module: nn.Module) -> bool:
    return not has_key_projection(module) and "scaled_dot_product_attention" not in forward_names(module)


def _pooling_head(name: str, module: nn.Module) -> bool:
    return any("pool" in part for part in name.split(".")) or hasattr(module, "latent")


REFUSALS: tuple[tuple[str, Callable[[str, nn.Module], bool], str], ...] = (
    (
        "channel",
        lambda name, m: _refuse_channel(m),
        "is cross-covariance (channel) attention: it attends between channels, so there is no token-to-token map to mask",
    ),
    (
        "no keys",
        lambda name, m: _refuse_outlook(m),
        "has no key projection: its attention weights are predicted from each token (e.g. outlook attention), "
        "not query-key products over the patch grid",
    ),
    (
        "pooling",
        _pooling_head,
        "is an attention-pooling head: its queries are learned or pooled tokens, not patches",
    ),
)
"""Structural kinds of attention attnmask leaves alone: ``(kind, predicate(name, module), reason)``."""


def host_class(module: nn.Module) -> type:
    """The host's class of a module (the class a masked subclass was made from)."""
    return getattr(type(module), "_attnmask_host", type(module))


def group_name(name: str) -> str:
    """``blocks.3.attn`` -> ``blocks.*.attn`` (for messages that name layer kinds)."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "*", name)


def unreadable_layers(model: nn.Module, candidates: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Modules with a head count and key projections that compute no softmax or SDPA of
    their own (linear or additive attention, ...), outside and inside no candidate."""
    names = [n for n, _ in candidates]
    return [
        (n, m)
        for n, m in model.named_modules()
        if n
        and head_count(m)
        and has_key_projection(m)
        and not computes_attention(m)
        and not any(n == o or n.startswith(o + ".") or o.startswith(n + ".") for o in names)
        and not type(m).__module__.startswith("attnmask.")
    ]


def candidate_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Innermost modules with a head count whose forward computes attention weights."""
    found = [
        (n, m)
        for n, m in model.named_modules()
        if n and head_count(m) and computes_attention(m) and not type(m).__module__.startswith("attnmask.")
        or n and type(m).__name__.startswith("AttnmaskMasked")
    ]
    names = [n for n, _ in found]
    return [(n, m) for n, m in found if not any(o.startswith(n + ".") for o in names)]


# -- run-time state of a patched (or probed) model ---------------------------------------

class Runtime:
    """Shapes seen during the current forward of one model, per thread.

    Forward pre-hooks record the image batch and size (the model's first 4-D input), the
    4-D inputs of every module that encloses an attention layer, and the grid of each patch
    embedding (a module with a ``grid_size``, or a convolution whose stride equals its kernel).
    """

    def __init__(self, model: nn.Module, sites: Sequence[str], prefix_hint: Optional[int], suffix: int = 0) -> None:
        self.prefix_hint = prefix_hint
        self.suffix = suffix
        self.local = threading.local()
        self.enclosing: dict[str, tuple[str, ...]] = {}
        self._hooks: list = []
        self._register(model, sites)

    # hooks
    def _register(self, model: nn.Module, sites: Sequence[str]) -> None:
        self._hooks.append(model.register_forward_pre_hook(self.on_model, with_kwargs=True))
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
        return {k: v for k, v in self.__dict__.items() if k not in ("local", "_hooks")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.local = threading.local()
        self._hooks = []

    def remove(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def empty(self) -> bool:
        """Whether this thread has seen nothing of the current forward (no hook ran in it)."""
        state = getattr(self.local, "state", None)
        return state is None or (state["image"] is None and not state["inputs"] and not state["patches"])

    def state(self) -> dict:
        state = getattr(self.local, "state", None)
        if state is None:
            state = self.local.state = {"image": None, "inputs": {}, "patches": []}
        return state

    def on_model(self, module: nn.Module, args, kwargs) -> None:
        state = self.state()
        state["inputs"] = {}
        state["patches"] = []
        image = _first_tensor(args, kwargs, dims=(4,))
        state["image"] = (int(image.shape[0]), (int(image.shape[-2]), int(image.shape[-1]))) if image is not None else None
        state["spatial_shapes"] = _spatial_shapes(module, args, kwargs)

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
        if grid is not None:
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
        for name in self.enclosing.get(site.name, ()):
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


class _Recorder:
    """Forward pre-hook recording a module's 4-D input into its model's :class:`Runtime`."""

    def __init__(self, runtime: Runtime, name: str) -> None:
        self.runtime = runtime
        self.name = name

    def __call__(self, module, args, kwargs) -> None:
        self.runtime.on_input(self.name, args, kwargs)


def takes_spatial_shapes(module: nn.Module) -> bool:
    """Whether the module's forward takes per-sample patch grids (``spatial_shapes``, NaFlex)."""
    try:
        return "spatial_shapes" in inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return False


def _spatial_shapes(module: nn.Module, args, kwargs) -> Optional[torch.Tensor]:
    shapes = kwargs.get("spatial_shapes")
    if shapes is None and takes_spatial_shapes(module):
        names = list(inspect.signature(type(module).forward).parameters)[1:]
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


UNREADABLE = (
    "computes attention in a form attnmask cannot read: no scaled_dot_product_attention call and no softmax over "
    "(heads, queries, keys) logits in its forward on the example input (e.g. factorised, halo, linear or additive attention)"
)


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


# -- the interception ----------------------------------------------------------------------

_HEAD_LAYOUTS = ("bhnd", "bhtnd", "bthnd", "(bh)nd")


def head_layout(t: torch.Tensor, heads: int) -> Optional[str]:
    """How a query tensor holds its heads: ``(B, H, N, D)``, ``(B, H, T, N, D)`` with host
    windows ``T``, ``(B, T, H, N, D)``, or heads folded into the batch ``(B * H, N, D)``."""
    if t.dim() == 4 and t.shape[1] == heads:
        return "bhnd"
    if t.dim() == 5 and t.shape[1] == heads:
        return "bhtnd"
    if t.dim() == 5 and t.shape[2] == heads:
        return "bthnd"
    if t.dim() == 3 and t.shape[0] % heads == 0:
        return "(bh)nd"
    return None


def to_bhnd(t: torch.Tensor, layout: str, heads: int) -> torch.Tensor:
    if layout == "bhnd":
        return t
    if layout == "bhtnd":
        return t.transpose(1, 2).flatten(0, 1)
    if layout == "bthnd":
        return t.flatten(0, 1)
    return t.reshape(-1, heads, *t.shape[1:])


def from_bhnd(t: torch.Tensor, layout: str, like: torch.Size) -> torch.Tensor:
    if layout == "bhnd":
        return t
    if layout == "bhtnd":
        return t.reshape(like[0], like[2], *t.shape[1:]).transpose(1, 2)
    if layout == "bthnd":
        return t.reshape(like[0], like[1], *t.shape[1:])
    return t.reshape(-1, *t.shape[2:])


def windows_in(layout: str, shape: torch.Size) -> int:
    return int(shape[2]) if layout == "bhtnd" else int(shape[1]) if layout == "bthnd" else 1


def recorded_pooled(q, k, v, bias, scale, mask) -> Optional[torch.Tensor]:
    """Pooled attention computed explicitly for a recorder that accepts pooled masks
    (``mask()`` builds its :class:`PooledMask`); ``None`` when nothing records it."""
    recorder = record.current_recorder()
    if recorder is None or not getattr(recorder, "accepts_pooled", False):
        return None
    additive = bias.float() if bias.dtype != torch.bool else torch.zeros(bias.shape, device=bias.device).masked_fill(~bias, float("-inf"))
    logits = (q.float() @ k.float().transpose(-2, -1)) * (scale or q.shape[-1] ** -0.5)
    probs = torch.softmax(logits + additive, -1)
    recorder(probs, mask())
    return (probs @ v.float()).to(q.dtype)


class SiteState:
    """One patched (or probed) layer: its plan, its model's :class:`Runtime`, what was seen."""

    def __init__(self, name: str, module: nn.Module, runtime: Runtime, plan: Optional[LayerPlan]) -> None:
        self.name = name
        self.num_heads = int(head_count(module))
        self.runtime = runtime
        self.plan = plan
        window = getattr(module, "window_size", None)
        if window is None and isinstance(getattr(module, "ws", None), int):
            window = module.ws
        try:
            self.window: Optional[Grid] = pair(window) if window is not None else None
        except (TypeError, ValueError):
            self.window = None
        self.seen: list[tuple[str, str, Optional[str]]] = []  # (route, geometry, problem): the first calls
        self.last: Optional[TokenGeometry] = None  # the latest call's geometry
        self.routes: set[tuple[str, str]] = set()  # (route, head layout) of the attention calls resolved
        self.expected: Optional[frozenset] = None  # set at install: the routes the observing forward saw
        self.resolved: dict[tuple, tuple] = {}  # (layout, nq, nk, batch) -> geometries, for threads without state

    def _describe(self, q: TokenGeometry, k: Optional[TokenGeometry]) -> str:
        text = f"{q.grid[0]}x{q.grid[1]} grid from {q.source}"
        if q.prefix or q.suffix:
            text += f", {q.prefix} prefix" + (f" + {q.suffix} suffix" if q.suffix else "") + " tokens"
        if q.windows > 1:
            text += f", {q.windows} host windows per image"
        if k is not None and k.grid != q.grid:
            text += f"; keys pooled to {k.grid[0]}x{k.grid[1]}"
        return text

    def resolve(self, call: CallInput, layout: str, shape: torch.Size, nq: int, nk: int, batch: int):
        """``(query geometry, key geometry or None)`` or raise ``ValueError`` with the reason."""
        if call.cross:
            raise ValueError(
                "is cross-attention: its queries and keys come from two different token sequences, not one patch grid"
            )
        if call.tokens is not None and nq != call.tokens and nk != call.tokens and layout != "(bh)nd":
            raise ValueError(
                f"attends over {nq} queries and {nk} keys while its input holds {call.tokens} tokens: "
                "not token-to-token attention over its input"
            )
        key = (layout, nq, nk, batch)
        if self.runtime.empty() and key in self.resolved:
            return self.resolved[key]  # e.g. a checkpoint recomputed on another thread, whose state is empty
        extra = windows_in(layout, shape)
        q = self.runtime.geometry(self, call, nq, batch, extra)
        if q is None and nq < nk and nk == call.tokens and self.runtime.geometry(self, call, nk, batch, extra) is not None:
            raise ValueError(
                f"is class attention: its {nq} queries are class tokens, not patches, so no query has a window"
            )
        if q is None:
            raise ValueError(f"attends over a sequence of {nq} tokens that fits no patch grid this forward produced")
        k = None
        if nk != nq:
            k = self.runtime.key_geometry(self, call, nk, batch, extra, q)
            if k is None:
                raise ValueError(f"{nk} keys fit no grid related to the {q.grid[0]}x{q.grid[1]} query grid")
        if len(self.resolved) < 64:
            self.resolved[key] = (q, k)
        return q, k

    def note(self, route: str, q: TokenGeometry, k: Optional[TokenGeometry]) -> None:
        self.last = q
        if len(self.seen) < 8:
            self.seen.append((route, self._describe(q, k), None))

    def problem(self, route: str, reason: str) -> None:
        if len(self.seen) < 8:
            self.seen.append((route, "", reason))

    # SDPA route
    def sdpa(self, call: CallInput, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        layout = head_layout(q, self.num_heads)
        if layout is None or k.shape[:-2] != q.shape[:-2] or enable_gqa:
            reason = f"its attention call does not hold {self.num_heads} heads per query ({tuple(q.shape)})"
            return self._unresolved("sdpa", reason, lambda: SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale))
        q4, k4, v4 = (to_bhnd(t, layout, self.num_heads) for t in (q, k, v))
        nq, nk = q4.shape[-2], k4.shape[-2]
        try:
            qg, kg = self.resolve(call, layout, q.shape, nq, nk, q4.shape[0])
        except ValueError as error:
            return self._unresolved("sdpa", str(error), lambda: SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale))
        self.note("sdpa", qg, kg)
        self.routes.add(("sdpa", layout))
        host = None
        if attn_mask is not None:
            host = to_bhnd(attn_mask.expand(*q.shape[:-1], nk), layout, self.num_heads)
        if is_causal:
            causal = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril()
            host = combine_masks(host, causal, q.dtype)
        plan = self.plan
        if plan is None:
            out = SDPA(q4, k4, v4, attn_mask=host, dropout_p=dropout_p, scale=scale)
        elif kg is None:
            mask = qg.local_mask(plan, q4.shape[0], q.device)
            out = get_kernel(plan.backend)(q4, k4, v4, mask, attn_mask=host, dropout_p=dropout_p, scale=scale)
        else:
            if plan.mode != "hard":
                raise ValueError(f"attnmask: {self.name} pools its keys; mode={plan.mode!r} is not accepted there, only 'hard'")
            bias = self._pooled_bias(qg, kg, host, q4)
            out = recorded_pooled(q4, k4, v4, bias, scale, lambda: self.pooled_mask(qg, kg))
            if out is None:
                out = SDPA(q4, k4, v4, attn_mask=bias, dropout_p=dropout_p, scale=scale)
        return from_bhnd(out, layout, q.shape)

    def pooled_mask(self, qg: TokenGeometry, kg: TokenGeometry) -> PooledMask:
        plan = self.plan
        return PooledMask(qg.grid, kg.grid, plan.window, qg.prefix, kg.prefix, self.num_heads, plan.heads, plan.prefix, plan.layer)

    def _pooled_heads(self, qg: TokenGeometry, kg: TokenGeometry, device) -> torch.Tensor:
        """``(num_heads, Nq, Nk)`` boolean, True where a head may attend (global heads: all),
        cached per geometry like every other mask form."""
        plan = self.plan

        def build() -> torch.Tensor:
            return self.pooled_mask(qg, kg).dense(device)

        if torch.compiler.is_compiling():
            return build()
        key = ("pooled", qg.grid, kg.grid, qg.prefix, kg.prefix, plan.window, plan.prefix, self.num_heads, plan.heads, torch.device(device))
        return cached(key, build)

    def _pooled_bias(self, qg: TokenGeometry, kg: TokenGeometry, host, q4) -> torch.Tensor:
        return combine_masks(host, self._pooled_heads(qg, kg, q4.device)[None], q4.dtype)

    def _unresolved(self, route: str, reason: str, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self.plan is None:  # probing: remember why, compute as the host would
            self.problem(route, reason)
            return run()
        raise ValueError(f"attnmask: layer {self.name} cannot be masked in this forward: {reason}")

    # explicit route
    def softmax(self, call: CallInput, func, args, kwargs):
        x = args[0] if args else kwargs.get("input")
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        if not isinstance(x, torch.Tensor) or dim is None or dim not in (-1, x.dim() - 1) or x.dim() < 3:
            return NOT_ATTENTION
        layout = head_layout(x, self.num_heads)
        if layout is None or self.expected is not None and ("softmax", layout) not in self.expected:
            return NOT_ATTENTION  # not a softmax of the kind the observing forward saw compute attention
        logits = to_bhnd(x, layout, self.num_heads)
        nq, nk = logits.shape[-2], logits.shape[-1]
        try:
            qg, kg = self.resolve(call, layout, x.shape, nq, nk, logits.shape[0])
        except ValueError as error:
            return self._unresolved("softmax", str(error), lambda: func(*args, **kwargs))
        self.note("softmax", qg, kg)
        self.routes.add(("softmax", layout))
        plan = self.plan
        if plan is None or not plan.heads:
            return func(*args, **kwargs)
        if plan.mode != "hard":
            raise ValueError(
                f"attnmask: {self.name} computes its attention weights itself (an explicit softmax); "
                f"mode={plan.mode!r} is not accepted there, only 'hard'"
            )
        mask = None
        if kg is None:
            mask = qg.local_mask(plan, logits.shape[0], x.device)
            forbidden = mask.forbidden(x.device) if mask.positions is None else ~mask.dense(x.device)  # cached per geometry
        else:
            forbidden = ~self._pooled_heads(qg, kg, x.device)
        masked = from_bhnd(logits.masked_fill(forbidden, masked_logit("hard")), layout, x.shape)
        probs = func(masked, *args[1:], **kwargs)
        recorder = record.current_recorder()
        if recorder is not None and (mask is not None or getattr(recorder, "accepts_pooled", False)):
            recorder(to_bhnd(probs, layout, self.num_heads).float(), mask if mask is not None else self.pooled_mask(qg, kg))
        return probs


NOT_ATTENTION = object()
"""What :meth:`SiteState.softmax` returns for a softmax that is not over attention logits."""


class _Intercept(TorchFunctionMode):
    """Runs a layer's SDPA call or attention softmax through its :class:`SiteState`."""

    def __init__(self, site: SiteState, call: CallInput) -> None:
        super().__init__()
        self.site = site
        self.call = call
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is SDPA:
            self.calls += 1
            return self.site.sdpa(self.call, *args, **kwargs)
        if func in SOFTMAXES:
            out = self.site.softmax(self.call, func, args, kwargs)
            if out is not NOT_ATTENTION:
                self.calls += 1
                return out
        return func(*args, **kwargs)


class InterceptedAttention(nn.Module):
    """Mixin of the masked subclasses: the host's forward, with its attention intercepted."""

    def forward(self, *args, **kwargs):
        site: SiteState = self.__dict__["_attnmask_site"]
        mode = _Intercept(site, CallInput.of(args, kwargs))
        with mode:
            out = super().forward(*args, **kwargs)
        if not mode.calls and site.plan is not None and site.plan.heads:
            raise RuntimeError(
                f"attnmask: layer {site.name} computed attention without a scaled_dot_product_attention call or a "
                "softmax over its keys, so its masks were not applied"
            )
        return out


_MASKED: dict[type, type] = {}
_MASKED_LOCK = threading.Lock()


def _class_name(host: type) -> str:
    code = binascii.hexlify(f"{host.__module__}:{host.__qualname__}".encode()).decode()
    return f"AttnmaskMasked{host.__name__}_{code}"


def masked_class(host: type) -> type:
    """The masked subclass of ``host``: created once, a module attribute (so pickling works)."""
    with _MASKED_LOCK:
        cls = _MASKED.get(host)
        if cls is None:
            name = _class_name(host)
            cls = type(name, (InterceptedAttention, host), {"__module__": __name__, "__qualname__": name, "_attnmask_host": host})
            _MASKED[host] = cls
            setattr(sys.modules[__name__], name, cls)
        return cls


def __getattr__(name: str) -> type:
    """Recreate a masked class on unpickling, from the host class its name encodes."""
    if name.startswith("AttnmaskMasked") and "_" in name:
        module, _, qualname = binascii.unhexlify(name.rsplit("_", 1)[1]).decode().partition(":")
        host: Any = importlib.import_module(module)
        for part in qualname.split("."):
            host = getattr(host, part)
        return masked_class(host)
    raise AttributeError(name)


# -- the adapter ---------------------------------------------------------------------------

def example_input(model: nn.Module, example: Optional[torch.Tensor] = None) -> torch.Tensor:
    """An input for the observing forward: ``example``, or one image at the model's size."""
    if example is not None:
        return example
    parameter = next(iter(model.parameters()), None)
    device = parameter.device if parameter is not None else None
    dtype = parameter.dtype if parameter is not None and parameter.dtype.is_floating_point else torch.float32
    size = None
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        size = tuple(cfg["input_size"])
    if size is None:
        config = getattr(model, "config", None)
        image = getattr(config, "image_size", None) or getattr(model, "image_size", None)
        if image is None:
            embed = getattr(model, "patch_embed", None)
            image = getattr(embed, "img_size", None)
        channels = getattr(config, "num_channels", 3) or 3
        image = pair(image if image is not None else 224)
        size = (channels, *image)
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, *size, generator=generator).to(device=device, dtype=dtype)


_OBSERVED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
"""Routes each layer's attention took in the observing forward of :meth:`GenericAdapter.sites`
(per model, for as long as the model lives; nothing is stored on the model)."""


class GenericAdapter(Adapter):
    """Adapter for attention found by structure (registered as ``"generic"``)."""

    name = "generic"
    observes = True

    def matches(self, model: nn.Module) -> bool:
        return True

    def findings(self, model: nn.Module, example: Optional[torch.Tensor] = None) -> list[FoundLayer]:
        """Every attention-like module, classified (runs one observing forward, except on a
        model this adapter has patched: its layers are known)."""
        installed = self._installed(model)
        if installed is not None:
            found = []
            for site in installed:
                state = site.module.__dict__.get("_attnmask_site")
                seen = state.seen[0] if state is not None and state.seen else ("", "", None)
                found.append(FoundLayer(site.name, host_class(site.module).__name__, site.num_heads, "patchable", route=seen[0], geometry=seen[1]))
            return found
        findings: list[FoundLayer] = []
        probe: list[tuple[str, nn.Module]] = []
        candidates = candidate_layers(model)
        unreadable = unreadable_layers(model, candidates)
        inner = [(n, m) for n, m in unreadable if not any(o.startswith(n + ".") for o, _ in unreadable)]
        for name, module in inner:
            findings.append(FoundLayer(name, host_class(module).__name__, int(head_count(module)), "refused", UNREADABLE))
        for name, module in candidates:
            heads = int(head_count(module))
            for kind, predicate, reason in REFUSALS:
                if predicate(name, module):
                    findings.append(FoundLayer(name, host_class(module).__name__, heads, "refused", reason))
                    break
            else:
                findings.append(FoundLayer(name, host_class(module).__name__, heads, "patchable"))
                probe.append((name, module))
        if any(hasattr(m, "unroll") or hasattr(m, "unroll_schedule") for m in model.modules()):
            for f in findings:
                if f.status == "patchable":
                    f.status, f.reason = "refused", (
                        "runs on tokens the model unrolled into mask units (a permuted order), not a row-major grid"
                    )
            probe = []
        if probe:
            self._observe(model, probe, findings, example)
        return findings

    def _observe(self, model: nn.Module, probe, findings: list[FoundLayer], example) -> None:
        prefix_hint = _prefix_hint(model)
        runtime = Runtime(model, [n for n, _ in probe], prefix_hint)
        states: dict[str, SiteState] = {}
        saved = []
        training = [(m, m.training) for m in model.modules()]
        try:
            for name, module in probe:
                state = SiteState(name, module, runtime, None)
                states[name] = state
                kept = {k: module.__dict__[k] for k in ("_attnmask_site", "fused_attn") if k in module.__dict__}
                saved.append((module, type(module), kept))
                if "fused_attn" in module.__dict__ or hasattr(type(module), "fused_attn"):
                    module.__dict__["fused_attn"] = True
                module.__class__ = masked_class(host_class(module))
                module.__dict__["_attnmask_site"] = state
            model.eval()
            with torch.no_grad():
                x = example_input(model, example)
                model(x)
        except Exception as error:  # noqa: BLE001 - the model's own failure, reported per layer
            for f in findings:
                if f.status == "patchable" and (f.name not in states or not states[f.name].seen):
                    f.status, f.reason = "refused", f"the observing forward failed ({type(error).__name__}: {str(error)[:160]}); pass example="
        finally:
            for module, cls, kept in saved:  # exactly as before, patched or not
                module.__class__ = cls
                module.__dict__.pop("_attnmask_site", None)
                module.__dict__.pop("fused_attn", None)
                module.__dict__.update(kept)
            for module, mode in training:
                module.training = mode
            runtime.remove()
        for f in findings:
            if f.status != "patchable" or f.name not in states:
                continue
            seen = states[f.name].seen
            problems = [p for _, _, p in seen if p]
            if not seen:
                f.status, f.reason = "refused", UNREADABLE
            elif problems:
                f.status, f.reason = "refused", problems[0]
            else:
                f.route = seen[0][0]
                f.geometry = seen[0][1]
                f.routes = frozenset(states[f.name].routes)

    def sites(self, model: nn.Module, example: Optional[torch.Tensor] = None) -> list[Site]:
        installed = self._installed(model)
        if installed is not None:  # patched by this adapter: its layers are known, no forward needed
            return installed
        findings = self.findings(model, example)
        good = [f for f in findings if f.status == "patchable"]
        if not good:
            raise TypeError(refusal_message(model, findings))
        sites = [Site(name=f.name, layer=i, num_heads=f.num_heads, module=model.get_submodule(f.name)) for i, f in enumerate(good)]
        _OBSERVED[model] = {f.name: f.routes for f in good}  # for install; nothing is kept on the model
        return sites

    @staticmethod
    def _installed(model: nn.Module) -> Optional[list[Site]]:
        spec = model.__dict__.get("_attnmask_spec")
        if spec is None or spec.family != "generic":
            return None
        sites = [
            Site(name=name, layer=i, num_heads=n, module=model.get_submodule(name))
            for i, (name, n) in enumerate(zip(spec.layers, spec.num_heads))
        ]
        observed = dict(_OBSERVED.get(model, {}))  # keep what the first observing forward saw
        for site in sites:
            state = site.module.__dict__.get("_attnmask_site")
            if state is not None and state.expected is not None:
                observed.setdefault(site.name, state.expected)
        _OBSERVED[model] = observed
        return sites

    def install(self, model: nn.Module, sites: Sequence[Site], plans: Sequence[LayerPlan]) -> None:
        if not sites:
            return
        runtime = Runtime(model, [s.name for s in sites], _prefix_hint(model))
        model.__dict__["_attnmask_runtime"] = runtime
        observed = _OBSERVED.get(model, {})
        for site, plan in zip(sites, plans):
            module = site.module
            previous = module.__dict__.get("_attnmask_site")
            if "fused_attn" in module.__dict__ or hasattr(type(module), "fused_attn"):
                module.__dict__["_attnmask_fused_attn"] = module.__dict__.get("fused_attn", _MISSING)
                module.fused_attn = True
            module.__class__ = masked_class(host_class(module))
            state = SiteState(site.name, module, runtime, plan)
            state.expected = observed.get(site.name) or (previous.expected if previous is not None else None)
            if state.expected is None:  # never observed (e.g. a copy re-patched): no softmax is taken for attention
                state.expected = frozenset(("sdpa", layout) for layout in _HEAD_LAYOUTS)
            module.__dict__["_attnmask_site"] = state
            module.__dict__["_attnmask_plan"] = plan

    def uninstall(self, model: nn.Module, names: Sequence[str]) -> None:
        runtime = model.__dict__.pop("_attnmask_runtime", None)
        if runtime is not None:
            runtime.remove()
        for module in model.modules():
            if module is model:
                continue
            host = getattr(type(module), "_attnmask_host", None)
            if host is not None:
                module.__class__ = host
            fused = module.__dict__.get("_attnmask_fused_attn", None)
            if fused is _MISSING:
                module.__dict__.pop("fused_attn", None)
            elif "_attnmask_fused_attn" in module.__dict__:
                module.__dict__["fused_attn"] = fused
            drop_attnmask_attributes(module)
        remove_attnmask_hooks(model)

    def _last(self, model: nn.Module) -> Optional[TokenGeometry]:
        """The latest call's geometry of the first patched layer that has run."""
        for module in model.modules():
            site = module.__dict__.get("_attnmask_site")
            if site is not None and site.last is not None:
                return site.last
        return None

    def grid(self, model: nn.Module) -> Optional[Grid]:
        last = self._last(model)
        return last.grid if last is not None else None

    def prefix_tokens(self, model: nn.Module) -> int:
        last = self._last(model)
        return last.prefix if last is not None else _prefix_hint(model) or 0

    def notes(self, model: nn.Module) -> list[str]:
        return []


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (_missing, ())


def _missing() -> "_Missing":
    return _MISSING


_MISSING = _Missing()


def _prefix_hint(model: nn.Module) -> Optional[int]:
    value = getattr(model, "num_prefix_tokens", None)
    return int(value) if isinstance(value, int) else None


def refusal_message(model: nn.Module, findings: list[FoundLayer]) -> str:
    """Why no layer of ``model`` can be masked, one line per kind of layer."""
    title = f"attnmask cannot mask {type(model).__module__}.{type(model).__qualname__}"
    if not findings:
        return (
            f"{title}: no module computes attention between tokens (none has a head count and calls "
            "scaled_dot_product_attention or a softmax in its forward); it is not a model with attention over a patch grid"
        )
    kinds: dict[tuple[str, str], list[str]] = {}
    for f in findings:
        kinds.setdefault((f.kind, f.reason), []).append(group_name(f.name))
    lines = []
    for (cls, reason), names in kinds.items():
        shown = ", ".join(sorted(Counter(names)))
        lines.append(f"{shown} ({cls}) {reason}")
    return f"{title}: " + "; ".join(lines)


ADAPTER = GenericAdapter()


class SiteLayout:
    """A layer's layout learned per call, for attention code that sees only ``q, k, v``
    (transformers' attention functions): the layer's input is recorded by a pre-hook."""

    def __init__(self, site: SiteState) -> None:
        self.site = site
        self.prefix_tokens = 0
        self.last_grid: Optional[Grid] = None

    def __call__(self, module: nn.Module, args, kwargs) -> None:
        self.site.runtime.state().setdefault("calls", {})[self.site.name] = CallInput.of(args, kwargs)

    @property
    def grid(self) -> Optional[Grid]:
        return self.last_grid

    def geometry(self, batch: int, nq: int, nk: int):
        call = self.site.runtime.state().get("calls", {}).get(self.site.name) or CallInput()
        try:
            q, k = self.site.resolve(call, "bhnd", torch.Size((batch, self.site.num_heads, nq, 1)), nq, nk, batch)
        except ValueError as error:
            raise ValueError(f"attnmask: layer {self.site.name} cannot be masked in this forward: {error}") from None
        self.last_grid, self.prefix_tokens = q.grid, q.prefix
        self.site.note("attention function", q, k)
        return q, k

    def mask(self, plan: LayerPlan, batch: int, num_tokens: int, kept=None):
        shapes = self.site.runtime.state().get("spatial_shapes")
        if shapes is not None and shapes.shape[0] == batch and int((shapes[:, 0] * shapes[:, 1]).max()) <= num_tokens:
            grid, positions = naflex_geometry(shapes, num_tokens)
            self.last_grid, self.prefix_tokens = grid, 0
            if len(self.site.seen) < 8:
                self.site.seen.append(("attention function", f"per-sample grids up to {grid[0]}x{grid[1]} (spatial_shapes), padding global", None))
            return plan.local_mask(grid, 1, positions)
        q, _ = self.geometry(batch, num_tokens, num_tokens)
        return q.local_mask(plan, batch, None)

    def pooled_bias(self, plan: LayerPlan, query: torch.Tensor, key: torch.Tensor, host) -> torch.Tensor:
        """Additive per-head mask for keys on a coarser grid than the queries."""
        q, k = self.geometry(query.shape[0], query.shape[2], key.shape[2])
        self.site.plan = plan
        self.last_pooled = (q, k)
        return self.site._pooled_bias(q, k, host, query)

    def recorded(self, query, key, value, bias, scale) -> Optional[torch.Tensor]:
        """:func:`recorded_pooled` for the call :meth:`pooled_bias` just described."""
        q, k = self.last_pooled
        return recorded_pooled(query, key, value, bias, scale, lambda: self.site.pooled_mask(q, k))


def runtime_layouts(model: nn.Module, sites: Sequence[Site], prefix_hint: Optional[int], suffix: int) -> dict[str, SiteLayout]:
    """One :class:`SiteLayout` per site, sharing one :class:`Runtime` (hooks on ``model``)."""
    runtime = Runtime(model, [s.name for s in sites], prefix_hint, suffix)
    layouts = {}
    for site in sites:
        layout = SiteLayout(SiteState(site.name, site.module, runtime, None))
        site.module.register_forward_pre_hook(layout, with_kwargs=True)
        layouts[site.name] = layout
    return layouts
