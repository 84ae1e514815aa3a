"""Recording kernel: attention with explicit probabilities, handed to a recorder.

Tools that measure what attention does (:func:`attnmask.locality_scores`) need the real
attention probabilities of every layer, which fused kernels never materialise. While a
recorder is active in the current thread (``with recording(recorder): ...``),
:func:`~attnmask.kernels.get_kernel` returns :func:`recording_attention` instead of the
layer's backend: it computes ``softmax`` explicitly (at least float32), calls
``recorder(probs, mask)`` and returns ``probs @ v``, so the forward goes on with the real
output (up to the rounding of the explicit softmax).

The logits are built as every backend builds them (:func:`attnmask.masks.restrict`): scaled
``q k^T``, then the masked heads restricted to their window (``-inf`` in hard mode, 0 in soft
mode), then the host's own ``attn_mask`` (boolean or additive) added, then the softmax.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch

from ..masks import LocalMask
from .common import explicit_probs

Recorder = Callable[[torch.Tensor, LocalMask], None]
"""``(probs (batch, heads, tokens, tokens), mask) -> None``: receives each layer's attention."""

_active = 0
"""Recordings in progress, in any thread: the cheap check ``get_kernel`` makes on every call
(a plain module global, so compiled graphs only guard on it)."""
_lock = threading.Lock()
_state = threading.local()


def current_recorder() -> Optional[Recorder]:
    """The recorder active in this thread, or ``None`` (the usual case: nothing is recorded)."""
    if not _active:
        return None
    return getattr(_state, "recorder", None)


def is_recording() -> bool:
    """Whether attention calls in this thread are being recorded."""
    return current_recorder() is not None


@contextmanager
def recording(recorder: Recorder) -> Iterator[None]:
    """Route every attnmask kernel call of this thread through :func:`recording_attention`.

    Args:
        recorder: Called as ``recorder(probs, mask)`` once per attention call, with the
            float (at least float32) probabilities ``(batch, heads, tokens, tokens)`` and the
            layer's :class:`~attnmask.masks.LocalMask` (``mask.layer`` says which layer).
    """
    global _active
    previous = getattr(_state, "recorder", None)
    _state.recorder = recorder
    with _lock:
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
        _state.recorder = previous


def attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    mask: LocalMask,
    *,
    attn_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """The attention probabilities ``(batch, heads, tokens, tokens)`` a masked layer uses.

    Computed in ``q``'s dtype promoted to at least float32. The order is the one every
    backend follows: scaled ``q k^T``, :func:`~attnmask.masks.restrict` on the masked heads
    (``mask.mode``), the host's ``attn_mask`` (boolean: ``-inf`` where False; float: added),
    softmax over the keys.
    """
    # mask.dense(): every head's mask (global heads all True), per sample with positions.
    return explicit_probs(q, k, mask.dense(q.device), mask.mode, attn_mask, scale)


def recording_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: LocalMask,
    *,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """The kernel signature of :mod:`attnmask.kernels`, recording the probabilities.

    Hands :func:`attention_probs` and ``mask`` to the active recorder (if any) and returns
    ``probs @ v`` in ``q``'s dtype.

    Raises:
        ValueError: For ``dropout_p > 0`` (recording measures attention; run in eval mode).
    """
    if dropout_p:
        raise ValueError(
            f"dropout_p={dropout_p!r} is not accepted while attention is recorded: the recorded "
            "probabilities would not be the ones used (run the model in eval mode)"
        )
    probs = attention_probs(q, k, mask, attn_mask=attn_mask, scale=scale)
    recorder = current_recorder()
    if recorder is not None:
        recorder(probs, mask)
    return (probs @ v.to(probs.dtype)).to(q.dtype)
