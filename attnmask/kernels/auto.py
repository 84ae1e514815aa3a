"""``backend="auto"``: the kernel the measurements found fastest, chosen per call.

Each call is described as a :class:`~attnmask.kernels.capabilities.Call` (device, dtype,
token count, masked-head fraction, training, mode, host mask, per-sample positions,
dropout). The kernels whose :class:`~attnmask.kernels.capabilities.Capabilities` accept it
qualify; among their :class:`~attnmask.kernels.capabilities.Measured` rows that match the
call, the one with the highest measured speed (relative to dense SDPA) wins. With no
matching row, :data:`DEFAULT` runs: SDPA, which runs every call. The rows live with their
kernels (each kernel module's ``BACKEND``); :data:`AUTO_TABLE` collects them, and each keeps
the measurement it rests on (``benchmarks/run.py`` re-measures them; ``docs/performance.md``
shows the results).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..masks import LocalMask
from .capabilities import Call, Measured
from .registry import REGISTRY

DEFAULT = Measured(
    "sdpa",
    speed=0.0,
    modes=None,
    evidence="Everything no measured row covers: SDPA with the additive mask (global heads on the dense "
    "path), which runs every call (any device, dtype, mode, host mask, positions, dropout, training).",
)
"""What ``auto`` runs when no measured row of a qualifying kernel matches the call."""

AUTO_TABLE: tuple[Measured, ...] = tuple(row for backend in REGISTRY.values() if backend.auto for row in backend.rows) + (DEFAULT,)
"""Every measured row of every kernel ``auto`` may pick, then :data:`DEFAULT`. Not an
ordered first-match table: the fastest qualifying match wins (:func:`choose_rule`)."""


def candidates(call: Call) -> list[tuple[Measured, Optional[str]]]:
    """Every row that matches ``call``, fastest first, each with the reason its kernel does
    not qualify (``None`` when it does). For debugging choices and for the docs."""
    rows = [(row, REGISTRY[row.backend].capabilities.refusal(call)) for row in AUTO_TABLE[:-1] if row.matches(call)]
    return sorted(rows, key=lambda item: -item[0].speed)


def choose_rule(call: Call) -> Measured:
    """The row ``auto`` follows for ``call``: the fastest matching row of a qualifying
    kernel, else :data:`DEFAULT`. Calls whose mask restricts nothing never get here (plain
    SDPA is exact)."""
    for row, refusal in candidates(call):
        if refusal is None:
            return row
    return DEFAULT


def choose_backend(
    device: str, dtype: torch.dtype, tokens: int, fraction: float, training: bool, mode: str = "hard", **facts
) -> str:
    """The backend ``auto`` picks for a call described by its facts (see
    :class:`~attnmask.kernels.capabilities.Call`; ``facts`` are its other fields)."""
    return choose_rule(Call(device, dtype, tokens, fraction, training, mode, **facts)).backend


def auto_rule(
    q: torch.Tensor,
    mask: LocalMask,
    dropout_p: float = 0.0,
    k: Optional[torch.Tensor] = None,
    v: Optional[torch.Tensor] = None,
    attn_mask: Optional[torch.Tensor] = None,
) -> Measured:
    """The row ``"auto"`` follows for these tensors and this mask. Masks that restrict
    nothing run :data:`DEFAULT` (plain SDPA). It is training when gradients are enabled
    and any of ``q``, ``k``, ``v`` requires them."""
    if mask.is_identity:
        return DEFAULT
    return choose_rule(Call.of(q, mask, attn_mask, dropout_p, k, v))


def auto_choice(
    q: torch.Tensor,
    mask: LocalMask,
    dropout_p: float = 0.0,
    k: Optional[torch.Tensor] = None,
    v: Optional[torch.Tensor] = None,
    attn_mask: Optional[torch.Tensor] = None,
) -> str:
    """The backend ``"auto"`` runs for these tensors and this mask (see :func:`auto_rule`)."""
    return auto_rule(q, mask, dropout_p, k, v, attn_mask).backend


def auto_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: LocalMask,
    *,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Run the kernel (and its options) that :func:`auto_rule` picks for this call."""
    rule = auto_rule(q, mask, dropout_p, k, v, attn_mask)
    run = REGISTRY[rule.backend].run
    return run(q, k, v, mask, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale, **dict(rule.options))
