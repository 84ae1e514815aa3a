"""The public functions: ``apply``, ``remove``, ``describe``, ``get_spec``.

This module knows no host library: it validates arguments, asks the adapter registry for the
model's attention layers, builds a :class:`~attnmask.spec.MaskSpec` and lets the adapter
install it.
"""

from __future__ import annotations

from typing import Any, Optional, TypeVar

from torch import nn

from .adapters import adapter_named, find_adapter
from .kernels import choose_backend, resolve_backend
from .masks import MaskCache
from .report import InspectReport, LayerRow, MaskReport
from .spec import Heads, LayerPlan, MaskSpec, check_mode, check_prefix, normalize_window, resolve_heads

ModelT = TypeVar("ModelT", bound=nn.Module)

SPEC_ATTR = "_attnmask_spec"
CACHE_ATTR = "_attnmask_cache"


_WRAPPERS = {
    "OptimizedModule": "_orig_mod",  # torch.compile
    "DistributedDataParallel": "module",
    "DataParallel": "module",
    "FullyShardedDataParallel": "module",  # FSDP1; FSDP2 (fully_shard) wraps nothing
}
"""Wrapper class name -> the attribute holding the model it wraps."""


def check_model(model: Any, argument: str = "model") -> nn.Module:
    """Raise a ``TypeError`` naming ``argument`` unless ``model`` is an ``nn.Module``."""
    if not isinstance(model, nn.Module):
        shown = repr(model)
        shown = shown if len(shown) <= 80 else f"<{type(model).__name__} object>"
        raise TypeError(
            f"{argument}={shown} is not accepted: expected a torch.nn.Module (a model, or a torch.compile / "
            "DistributedDataParallel / FSDP wrapper of one)"
        )
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile`` (``OptimizedModule._orig_mod``), ``DataParallel``,
    ``DistributedDataParallel`` and FSDP wrappers (``.module``), nested in any order, else
    ``model``: the spec and the patched modules live on the original model."""
    for _ in range(8):  # wrappers nest a few levels at most
        attribute = next((_WRAPPERS[c.__name__] for c in type(model).__mro__ if c.__name__ in _WRAPPERS), None)
        inner = getattr(model, attribute, None) if attribute else None
        if not isinstance(inner, nn.Module) or inner is model:
            return model
        model = inner
    return model


def get_spec(model: nn.Module) -> Optional[MaskSpec]:
    """The :class:`MaskSpec` of a patched model (or of the model inside a ``torch.compile`` or
    data-parallel wrapper), or ``None`` if it is not patched."""
    return unwrap(check_model(model)).__dict__.get(SPEC_ATTR)


def mask_cache(model: nn.Module) -> Optional[MaskCache]:
    """The :class:`~attnmask.masks.MaskCache` of a patched model's installation (shared by
    its patched layers; ``info()`` gives the bytes it holds now and at its peak, and
    ``max_bytes`` its bound), or ``None`` if the model is not patched."""
    return unwrap(check_model(model)).__dict__.get(CACHE_ATTR)


def is_patched(model: nn.Module) -> bool:
    """Whether ``attnmask.apply`` has patched ``model`` (and ``remove`` has not undone it)."""
    return get_spec(model) is not None


def apply(
    model: ModelT,
    heads: Heads = 0.5,
    window: Any = 7,
    *,
    prefix: str = "global",
    backend: str = "auto",
    mode: str = "hard",
    example: Any = None,
) -> ModelT:
    """Make chosen attention heads of ``model`` local, in place.

    Each patch token of a masked head attends only to the patches in a ``window``
    neighbourhood around itself (clipped at the grid border); prefix tokens (class,
    distillation, register tokens) stay global. Weights, parameter names and the state_dict
    do not change. Calling ``apply`` on a patched model replaces its masks.

    Args:
        model: A supported vision transformer (see the error for unsupported ones).
        heads: Which heads to mask in each attention layer (default ``0.5``: half the heads
            of every layer, at least one):

            - a schedule preset: ``"mait"`` (all heads in the first third of the layers,
              one in the middle third, none in the last), ``"mait-mixed"`` (all heads in
              the first third, one elsewhere), ``"one-head"`` (see :mod:`attnmask.schedules`);
            - ``int`` ``n``: the first ``n`` heads of every layer (``0`` masks none);
            - ``float`` ``f`` in ``(0, 1]``: ``floor(f * num_heads)`` heads, at least 1;
            - ``"all"`` or ``"none"``;
            - a sequence of head indices, the same in every layer;
            - a mapping ``{layer_index: heads}`` (layers not named stay unmasked);
            - a callable ``(layer_index, num_layers, num_heads) -> heads`` (any form above).
        window: Odd int ``k`` for a ``k x k`` neighbourhood, or a pair of odd ints
            ``(kh, kw)`` (rows, columns); default ``7``. A window that reaches every patch
            from every patch (``kh >= 2 * rows - 1`` and ``kw >= 2 * cols - 1`` of the grid,
            prefix tokens global) masks nothing: a ``UserWarning`` says so at the first forward on that grid.
        prefix: ``"global"`` (prefix tokens attend to everything and are visible to every
            query) or ``"isolated"`` (patch queries of masked heads do not see prefix tokens).
        backend: ``"auto"`` (chosen per call from device, dtype, token count, masked-head
            fraction and training, see :data:`attnmask.kernels.AUTO_TABLE`), ``"sdpa"``,
            ``"flex"`` (FlexAttention block masks; inference only on CPU) or ``"reference"``
            (float64, for tests).
        mode: ``"hard"`` (default: out-of-window logits are ``-inf``; the head is strictly
            local and sparse kernels can skip the masked work) or ``"soft"`` (the paper's
            Eq. 2: out-of-window logits are set to 0 before the softmax, so some global
            information leaks in; computed densely).
        example: An input for the one observing forward that models of no family adapter
            get (see :func:`inspect`); default: one random image of the model's configured size.

    Wrappers: ``model`` may be a ``torch.compile`` wrapper (``OptimizedModule``) or a
    ``DataParallel``/``DistributedDataParallel``/FSDP wrapper; the model inside is patched and
    :func:`remove`, :func:`describe`, :func:`get_spec` and :func:`inspect` see through the
    same wrappers. A wrapper compiled before ``apply`` (or ``remove``) needs nothing more:
    patching swaps module classes and plan objects, which TorchDynamo's guards check, so the
    next call recompiles (no ``torch._dynamo.reset()``; see ``tests/test_wrappers.py``).
    Wrap ``DistributedDataParallel`` after ``apply`` where you can: DDP captures nothing that
    patching changes, but its hooks on parameters are set when it is built.

    Returns:
        The same ``model`` (the wrapper, if a wrapper was given), patched.

    Raises:
        TypeError, ValueError: For bad arguments or an unsupported model. Everything is
            validated before anything is patched: a failing call leaves ``model`` untouched.
    """
    wrapper, model = model, unwrap(check_model(model))
    window = normalize_window(window)
    prefix = check_prefix(prefix)
    mode = check_mode(mode)
    resolved_backend = resolve_backend(backend)
    adapter = find_adapter(model)
    accepted = getattr(adapter, "backends", None)
    if accepted is not None and backend not in accepted:
        raise ValueError(
            f"backend={backend!r} is not accepted for {adapter.name} models: their masked heads run in "
            f"the host's own attention code ({adapter.backend_label}); accepted: {list(accepted)}"
        )
    sites = adapter.sites(model, example) if adapter.observes else adapter.sites(model)
    if not sites:
        raise TypeError(f"attnmask found no attention layers to patch in {type(model).__name__}")
    chosen = resolve_heads(heads, [site.num_heads for site in sites])
    spec = MaskSpec(
        family=adapter.name,
        layers=tuple(site.name for site in sites),
        num_heads=tuple(site.num_heads for site in sites),
        heads=chosen,
        window=window,
        prefix=prefix,
        backend=backend,
        mode=mode,
    )
    checkpoint = _checkpoint(model)
    previous = get_spec(model)
    undo = [adapter.snapshot(model)]
    if previous is not None and previous.family != adapter.name:
        undo.append(adapter_named(previous.family).snapshot(model))
    try:
        remove(model)
        _install(model, adapter, sites, spec, resolved_backend)
    except BaseException:
        _restore(model, checkpoint)
        for restore in undo:  # e.g. transformers configs' attention implementation
            restore()
        raise
    return wrapper


def _install(model: nn.Module, adapter, sites, spec: MaskSpec, backend: str) -> None:
    masked = [site for site in sites if spec.heads[site.layer]]
    cache = MaskCache()  # one per installation: remove() (or a re-apply) drops its masks
    plans = [
        LayerPlan(s.layer, s.num_heads, spec.heads[s.layer], spec.window, spec.prefix, backend, spec.mode, cache)
        for s in masked
    ]
    adapter.install(model, masked, plans)
    model.__dict__[SPEC_ATTR] = spec
    model.__dict__[CACHE_ATTR] = cache


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def _patched_attribute(key: str) -> bool:
    return key.startswith("_attnmask") or key == "fused_attn"


def _checkpoint(model: nn.Module) -> list[tuple[nn.Module, type, dict, dict]]:
    """What patching may change on each module: its class, attnmask attributes (and timm's
    ``fused_attn`` switch), hooks."""
    return [
        (
            module,
            type(module),
            {k: v for k, v in module.__dict__.items() if _patched_attribute(k)},
            {name: dict(getattr(module, name)) for name in _HOOK_DICTS if hasattr(module, name)},
        )
        for module in model.modules()
    ]


def _restore(model: nn.Module, checkpoint) -> None:
    """Put every module back as :func:`_checkpoint` saw it (a failed ``apply`` changes nothing)."""
    for module, cls, attrs, hooks in checkpoint:
        module.__class__ = cls
        for key in [k for k in module.__dict__ if _patched_attribute(k)]:
            del module.__dict__[key]
        module.__dict__.update(attrs)
        for name, saved in hooks.items():
            live = getattr(module, name)
            live.clear()
            live.update(saved)


def remove(model: ModelT) -> ModelT:
    """Undo :func:`apply`: restore the original attention modules exactly, in place.

    A model that is not patched is returned unchanged. ``model`` may be a ``torch.compile``
    or data-parallel wrapper (see :func:`apply`); the wrapper is returned.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    inner = unwrap(check_model(model))
    spec = inner.__dict__.get(SPEC_ATTR)
    if spec is None:
        return model
    adapter_named(spec.family).uninstall(inner, spec.layers)
    del inner.__dict__[SPEC_ATTR]
    inner.__dict__.pop(CACHE_ATTR, None)
    return model


def describe(model: nn.Module) -> MaskReport:
    """Which layers and heads of ``model`` are masked, with window, grid and backend.

    ``print(describe(model))`` shows a table; ``describe(model).to_dict()`` gives the same
    as plain data. Works on unpatched models too (nothing masked), and on ``torch.compile``
    wrappers (it describes the model inside). An unpatched model that no family adapter
    claims is found by structure, which runs one observing forward (see :func:`inspect`).
    """
    model = unwrap(check_model(model))
    spec = get_spec(model)
    adapter = adapter_named(spec.family) if spec is not None else find_adapter(model)
    notes = tuple(adapter.notes(model))
    if spec is None:
        sites = adapter.sites(model)
        rows = [LayerRow(s.layer, s.name, s.num_heads, ()) for s in sites]
        return MaskReport(adapter.name, rows, None, adapter.grid(model), "global", None, None, notes=notes)
    rows = [LayerRow(i, name, n, chosen) for i, (name, n, chosen) in enumerate(zip(spec.layers, spec.num_heads, spec.heads))]
    grid = adapter.grid(model)
    resolved = getattr(adapter, "backend_label", None) or _resolved_label(model, adapter, spec, grid)
    return MaskReport(adapter.name, rows, spec.window, grid, spec.prefix, spec.backend, resolved, spec, notes)


def inspect(model: nn.Module, example: Any = None) -> InspectReport:
    """What attnmask finds in ``model``, layer by layer, before anything is patched.

    Every attention-like module is listed with the adapter that would patch it and what it
    attends over, or the reason it is refused (channel attention, class attention, a
    sequence that fits no patch grid, ...). Models no family adapter claims are checked by
    one forward pass on ``example`` (default: one random image of the model's configured
    size), with the model in eval mode and gradients off; the model is left as it was.
    ``print(attnmask.inspect(model))`` shows a table; ``.to_dict()`` gives plain data.
    """
    model = unwrap(check_model(model))
    adapter = find_adapter(model)
    title = f"{type(model).__module__}.{type(model).__qualname__}"
    return InspectReport(title, adapter.name, adapter.findings(model, example), tuple(adapter.notes(model)))


def _resolved_label(model: nn.Module, adapter, spec: MaskSpec, grid: Optional[tuple[int, int]]) -> str:
    """The kernel name; for ``"auto"``, what it picks for this model's device, dtype and
    sequence length (prefix tokens plus the grid) at inference (the choice itself is made
    per call)."""
    if spec.backend != "auto":
        return resolve_backend(spec.backend)
    parameter = next(model.parameters(), None)
    if parameter is None or grid is None or not spec.masked_layers:
        return "sdpa"
    prefix_tokens = adapter.prefix_tokens(model)
    fraction = max(len(spec.heads[i]) / spec.num_heads[i] for i in spec.masked_layers)
    tokens = prefix_tokens + grid[0] * grid[1]
    return choose_backend(parameter.device.type, parameter.dtype, tokens, fraction, False, spec.mode)
