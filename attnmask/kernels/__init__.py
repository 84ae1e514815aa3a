"""Masked attention kernels: one signature, several implementations.

Every kernel is called as ``kernel(q, k, v, mask, *, attn_mask=None, dropout_p=0.0,
scale=None)`` with ``q, k, v`` shaped ``(batch, heads, tokens, head_dim)`` and returns the
attention output ``(batch, heads, tokens, head_dim_v)``. ``mask`` is a
:class:`~attnmask.masks.LocalMask`: which heads are local, the window, the grid and the
prefix tokens. ``attn_mask`` is whatever mask the host model itself passes (boolean, True =
attend, or additive float, broadcastable to ``(batch, heads, tokens, tokens)``); kernels add
the locality mask to it, never replace it. Kernels know tensors and nothing of models.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol

import torch

from ..masks import LocalMask
from . import record
from .auto import AUTO_TABLE, auto_attention, auto_choice, auto_rule, choose_backend
from .blocked import blocked_attention
from .capabilities import Backend, Call, Capabilities, Measured
from .flex import flex_attention
from .fused import triton_attention
from .reference import reference_attention
from .registry import REGISTRY
from .sdpa import sdpa_attention


class Kernel(Protocol):
    """The one signature every backend implements."""

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: LocalMask,
        *,
        attn_mask: Optional[torch.Tensor] = None,
        dropout_p: float = 0.0,
        scale: Optional[float] = None,
    ) -> torch.Tensor: ...


KERNELS: dict[str, Callable[..., torch.Tensor]] = {"auto": auto_attention, **{name: b.run for name, b in REGISTRY.items()}}
"""Registered backends by name (``"auto"`` first, then :data:`~attnmask.kernels.registry.REGISTRY`)."""

BACKENDS = tuple(KERNELS)
"""Names ``apply(backend=...)`` accepts."""


def resolve_backend(backend: str) -> str:
    """Check a requested backend name and return it.

    ``"auto"`` stays ``"auto"``: it is decided per call, from the device, dtype, token count,
    masked-head fraction and training state (:data:`~attnmask.kernels.auto.AUTO_TABLE`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not accepted: expected one of {', '.join(map(repr, BACKENDS))}")
    return backend


def get_kernel(name: str) -> Callable[..., torch.Tensor]:
    """The kernel registered under ``name`` (a resolved backend, not ``"auto"``).

    While attention is recorded in this thread (:func:`attnmask.kernels.record.recording`,
    used by :func:`attnmask.locality_scores`), the recording kernel instead, whatever ``name``.
    """
    if record.is_recording():
        return record.recording_attention
    return KERNELS[name]


__all__ = [
    "triton_attention",
    "AUTO_TABLE",
    "Backend",
    "Call",
    "Capabilities",
    "Measured",
    "REGISTRY",
    "BACKENDS",
    "KERNELS",
    "Kernel",
    "auto_attention",
    "auto_choice",
    "auto_rule",
    "blocked_attention",
    "choose_backend",
    "flex_attention",
    "get_kernel",
    "reference_attention",
    "resolve_backend",
    "sdpa_attention",
]
