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
from .reference import reference_attention
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


KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    "sdpa": sdpa_attention,
    "reference": reference_attention,
}
"""Registered backends by name."""

BACKENDS = ("auto", *KERNELS)
"""Names ``apply(backend=...)`` accepts."""


def resolve_backend(backend: str) -> str:
    """Turn a requested backend into the name of a registered kernel.

    ``"auto"`` picks ``"sdpa"`` for now: this is the seam where faster kernels (FlexAttention,
    a fused local-attention kernel) will be chosen per device and shape.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not accepted: expected one of {', '.join(map(repr, BACKENDS))}")
    return "sdpa" if backend == "auto" else backend


def get_kernel(name: str) -> Callable[..., torch.Tensor]:
    """The kernel registered under ``name`` (a resolved backend, not ``"auto"``)."""
    return KERNELS[name]


__all__ = ["BACKENDS", "KERNELS", "Kernel", "get_kernel", "reference_attention", "resolve_backend", "sdpa_attention"]
