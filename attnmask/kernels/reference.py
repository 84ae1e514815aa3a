"""Reference masked attention: explicit softmax in float64 (slow; for tests)."""

from __future__ import annotations

from typing import Optional

import torch

from ..masks import LocalMask
from .capabilities import Backend, Capabilities
from .common import explicit_probs


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: LocalMask,
    *,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """``softmax(restrict(q k^T * scale) + host mask) v`` in float64.

    ``restrict`` (:func:`attnmask.masks.restrict`) applies the locality mask in the layer's
    ``mask.mode``: forbidden logits become ``-inf`` (hard) or 0 (soft), before the host's own
    mask or bias is added. The locality mask is the dense evaluation of the layer's per-head
    ``mask_mod`` (see :mod:`attnmask.masks`), so this checks every other backend against the
    one definition. The result is cast back to ``q``'s dtype. Dropout is not supported (it is
    random).

    Args:
        q: Queries ``(batch, heads, tokens, head_dim)``.
        k: Keys, same shape as ``q``.
        v: Values ``(batch, heads, tokens, head_dim_v)``.
        mask: The layer's :class:`~attnmask.masks.LocalMask`.
        attn_mask: The host model's own mask (boolean, True = attend, or additive).
        dropout_p: Must be 0.
        scale: Softmax scale; ``None`` means ``head_dim ** -0.5``.
    """
    if dropout_p:
        raise ValueError(f"dropout_p={dropout_p!r} is not accepted by the reference backend: it is deterministic (use 0.0)")
    probs = explicit_probs(q, k, mask.dense(q.device), mask.mode, attn_mask, scale, torch.float64)
    return (probs @ v.double()).to(q.dtype)


BACKEND = Backend(name="reference", run=reference_attention, capabilities=Capabilities(dropout=False, soft_dropout=False), auto=False)
"""Float64, for tests: ``auto`` never picks it."""
