"""Finding attention layers by what they compute, not by their class names.

A candidate is a module with a head count (:func:`head_count`) whose own ``forward``, or a
method of its class that ``forward`` calls, refers to ``scaled_dot_product_attention`` or a
``softmax`` (:func:`candidate_layers`). Candidates of the structural kinds in
:data:`REFUSALS` are refused with the reason; modules with heads and key projections that
compute neither are listed as unreadable (:func:`unreadable_layers`). Used by the structural
adapter, :mod:`attnmask.adapters.generic`, before its observing forward.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Callable, Optional

from torch import nn

from ..report import FoundLayer
from . import WHERE_FAMILIES


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


UNREADABLE = (
    "computes attention in a form attnmask cannot read: no scaled_dot_product_attention call and no softmax over "
    "(heads, queries, keys) logits in its forward on the example input (e.g. factorised, halo, linear or additive attention)"
)


def refusal_message(model: nn.Module, findings: list[FoundLayer]) -> str:
    """Why no layer of ``model`` can be masked, one line per kind of layer."""
    title = f"attnmask cannot mask {type(model).__module__}.{type(model).__qualname__}"
    if not findings:
        return (
            f"{title}: no attention layers found (no module computes attention between tokens: none has a head "
            f"count and calls scaled_dot_product_attention or a softmax); {WHERE_FAMILIES}"
        )
    kinds: dict[tuple[str, str], list[str]] = {}
    for f in findings:
        kinds.setdefault((f.kind, f.reason), []).append(group_name(f.name))
    lines = []
    for (cls, reason), names in kinds.items():
        shown = ", ".join(sorted(Counter(names)))
        lines.append(f"{shown} ({cls}) {reason}")
    return f"{title}: " + "; ".join(lines)
