"""The structural adapter: attention over a patch grid, found by what it does, not its name.

This adapter handles models that no family adapter claims (any timm, torchvision or other
PyTorch model). It needs no host library.

**Finding the layers** (:mod:`.structure`). An attention layer is a module with an integer
``num_heads`` whose own ``forward`` calls ``scaled_dot_product_attention`` or a ``softmax``:
the two ways host code computes attention weights. Layers of a few structural kinds are
refused with the reason (:data:`~.structure.REFUSALS`): channel (cross-covariance) attention, attention whose weights are
not query-key products, attention-pooling heads, unrolled token orders. Then one forward
pass on an example input (the model's configured input size, or ``example=``) observes what
every candidate actually computes, and a layer is patched only if each of its attention
calls resolves to a token-to-token map over a patch grid.

**Patching.** A patched layer's class is swapped to a subclass whose ``forward`` runs the
host's own ``forward`` inside a :class:`~torch.overrides.TorchFunctionMode` that sees the
layer's ``scaled_dot_product_attention`` call (run by the layer's attnmask kernel instead)
or its explicit ``softmax`` over the keys (the locality mask is added to the logits first).
Modules with a ``fused_attn`` switch (timm) are set to the SDPA path while patched.

**Geometry, per call** (:meth:`.runtime.Runtime.geometry`): the token count of the call is matched
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
import sys
import threading
import weakref
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..kernels import get_kernel, record
from ..kernels.common import explicit_probs
from ..masks import cached, combine_masks, masked_logit
from ..report import FoundLayer
from ..spec import LayerPlan
from . import Adapter, Site
from .layouts import Grid, PooledMask, TokenGeometry, pair
from .runtime import CallInput, Runtime, naflex_geometry, takes_spatial_shapes
from .structure import REFUSALS, UNREADABLE, candidate_layers, head_count, host_class, refusal_message, unreadable_layers
from .swap import drop_attnmask_attributes, keep_hook, remove_attnmask_hooks

__all__ = ["ADAPTER", "GenericAdapter", "SiteLayout", "SiteState", "masked_class", "runtime_layouts", "takes_spatial_shapes"]

SDPA = F.scaled_dot_product_attention
SOFTMAXES = frozenset({torch.softmax, torch.Tensor.softmax, F.softmax, torch.special.softmax})


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
    everything = torch.ones((), dtype=torch.bool, device=q.device)  # the window is in ``bias``
    probs = explicit_probs(q, k, everything, "hard", bias, scale)
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
        if not torch.compiler.is_compiling() and len(self.resolved) < 64:  # (not read while tracing: guarded on)
            self.resolved[key] = (q, k)
        return q, k

    def note(self, route: str, q: TokenGeometry, k: Optional[TokenGeometry]) -> None:
        if torch.compiler.is_compiling():
            return  # reports only: mutating them while tracing would recompile on each change
        self.last = q
        if len(self.seen) < 8:
            self.seen.append((route, self._describe(q, k), None))

    def problem(self, route: str, reason: str) -> None:
        if len(self.seen) < 8 and not torch.compiler.is_compiling():
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
        if not torch.compiler.is_compiling():
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
        return cached(key, build, plan.cache)

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
        if not torch.compiler.is_compiling():
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
        for handle in runtime._hooks:
            keep_hook(model, handle)  # removed by handle, also from a copy (the runtime's list is not copied)
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


ADAPTER = GenericAdapter()


class SiteLayout:
    """A layer's layout learned per call, for attention code that sees only ``q, k, v``
    (transformers' attention functions): the layer's input is recorded by a pre-hook."""

    def __init__(self, site: SiteState) -> None:
        self.site = site
        self.prefix_tokens = 0
        self.last_grid: Optional[Grid] = None

    def __call__(self, module: nn.Module, args, kwargs) -> None:
        # A key of its own per layer, set without reading what the previous forward left
        # (under torch.compile, reading it first would be guarded on and recompile).
        self.site.runtime.state()[("call", self.site.name)] = CallInput.of(args, kwargs)

    @property
    def grid(self) -> Optional[Grid]:
        return self.last_grid

    def geometry(self, batch: int, nq: int, nk: int):
        call = self.site.runtime.state().get(("call", self.site.name)) or CallInput()
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
            if len(self.site.seen) < 8 and not torch.compiler.is_compiling():
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
    for handle in runtime._hooks:
        keep_hook(model, handle)
    layouts = {}
    for site in sites:
        layout = SiteLayout(SiteState(site.name, site.module, runtime, None))
        keep_hook(model, site.module.register_forward_pre_hook(layout, with_kwargs=True))
        layouts[site.name] = layout
    return layouts
