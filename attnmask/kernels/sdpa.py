"""Masked attention on torch's ``scaled_dot_product_attention``.

Hard mode (the default) runs the masked heads through SDPA with an additive ``-inf`` window
mask. Soft mode cannot: SDPA's mask is *added* to the logits, and setting a logit to 0 is no
addition. Its masked heads run :func:`soft_attention`, the explicit product; global heads take
the same dense SDPA path in both modes.
"""

from __future__ import annotations

import threading
import time
from typing import Optional

import torch
import torch.nn.functional as F

from ..masks import LocalMask, combine_masks
from .capabilities import Backend, Capabilities, Measured
from .common import explicit_probs, split_heads


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: LocalMask,
    *,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    one_call: bool = False,
) -> torch.Tensor:
    """Attention with the locality mask on the masked heads, through SDPA.

    Global heads go through SDPA exactly as the host would call it (no locality mask, so the
    flash kernel where the device has one), and their outputs are bit-for-bit the unpatched
    ones. In hard mode masked heads go through SDPA with the cached additive window mask (in
    ``q``'s dtype, rows padded to an aligned stride, so SDPA neither converts nor copies it
    per call), combined with the host's ``attn_mask`` when there is one. In soft mode they
    run :func:`soft_attention` (explicit, dense; differentiable). When the mask restricts
    nothing (no masked heads, or a window covering the grid) this is plain SDPA.

    Args:
        q: Queries ``(batch, heads, tokens, head_dim)``.
        k: Keys, same shape as ``q``.
        v: Values ``(batch, heads, tokens, head_dim_v)``.
        mask: The layer's :class:`~attnmask.masks.LocalMask` for this input size.
        attn_mask: The host model's own mask, if any (boolean or additive).
        dropout_p: Attention dropout probability (training only).
        scale: Softmax scale; ``None`` is SDPA's default ``head_dim ** -0.5``.
        one_call: CUDA, hard mode, no host mask, no dropout, no per-sample positions: run
            every head in one SDPA call on cuDNN's attention with a per-head additive mask
            (:meth:`~attnmask.masks.LocalMask.head_additive_mask`, zeros on global heads)
            instead of splitting the heads. Faster at small token counts on an H100 (see
            :data:`~attnmask.kernels.auto.AUTO_TABLE`), but global heads then come from cuDNN,
            not from the flash kernel the host would use: equal up to rounding, not bit for
            bit. Anywhere else, or where cuDNN refuses the call, the split path runs.

    Returns:
        ``(batch, heads, tokens, head_dim_v)``, laid out in memory as ``(batch, tokens,
        heads, head_dim_v)`` when heads are split, so the caller's usual
        ``transpose(1, 2).reshape(batch, tokens, -1)`` is a view, not a copy.
    """
    if mask.is_identity:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    if one_call and attn_mask is None and not dropout_p and _one_call_possible(q, mask):
        out = _cudnn_one_call(q, k, v, mask, scale)
        if out is not None:
            return out

    def masked_heads(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor, host: Optional[torch.Tensor]) -> torch.Tensor:
        if mask.mode == "soft":
            return soft_attention(q_, k_, v_, mask.window_mask(q_.device), host, dropout_p=dropout_p, scale=scale)
        return F.scaled_dot_product_attention(
            q_, k_, v_, attn_mask=locality_mask(mask, host, q_), dropout_p=dropout_p, scale=scale
        )

    return split_heads(q, k, v, mask, attn_mask, masked_heads, dropout_p=dropout_p, scale=scale)


RETRY_AFTER_S = 60.0
"""Seconds a cuDNN refusal of one combination stands before the one-call path is tried again
(doubling with each repeated refusal, up to :data:`RETRY_AFTER_MAX_S`)."""
RETRY_AFTER_MAX_S = 3600.0

_CUDNN_REFUSED: dict[tuple, tuple[float, float]] = {}
"""(dtype, head dims, tokens, heads, device) -> (time the refusal expires, its length): a
refused combination runs the split path until then, so a transient failure (another
process holding the GPU's memory, a workspace that did not fit) does not disable the path
for the whole process, and a lasting one costs one failed try per period."""
_cudnn_lock = threading.Lock()


def cudnn_refused(key: tuple, now: Optional[float] = None) -> bool:
    """Whether the one-call path stands refused for ``key`` at time ``now`` (``time.monotonic``)."""
    now = time.monotonic() if now is None else now
    with _cudnn_lock:
        entry = _CUDNN_REFUSED.get(key)
        return entry is not None and now < entry[0]


def refuse_cudnn(key: tuple, now: Optional[float] = None) -> None:
    """Record a refusal of ``key``: for :data:`RETRY_AFTER_S`, doubled for each refusal in a row."""
    now = time.monotonic() if now is None else now
    with _cudnn_lock:
        previous = _CUDNN_REFUSED.get(key)
        length = RETRY_AFTER_S if previous is None else min(previous[1] * 2, RETRY_AFTER_MAX_S)
        _CUDNN_REFUSED[key] = (now + length, length)


def accept_cudnn(key: tuple) -> None:
    """Forget the refusals of ``key`` (it ran)."""
    if key in _CUDNN_REFUSED:
        with _cudnn_lock:
            _CUDNN_REFUSED.pop(key, None)


def _one_call_possible(q: torch.Tensor, mask: LocalMask) -> bool:
    return (
        q.is_cuda
        and mask.mode == "hard"
        and mask.positions is None
        and q.dtype in (torch.float16, torch.bfloat16)
        and not torch.compiler.is_compiling()
    )


def _cudnn_one_call(q, k, v, mask: LocalMask, scale: Optional[float]) -> Optional[torch.Tensor]:
    """Every head in one cuDNN attention call with the per-head additive mask; ``None`` if
    cuDNN refuses this combination (remembered for a while, see :data:`_CUDNN_REFUSED`, so a
    lasting refusal costs one try per period and a transient one does not last).

    The cuDNN operator is called directly, not through ``sdpa_kernel([CUDNN_ATTENTION])``:
    that context manager switches SDPA's backends for every thread of the process, so
    another thread's SDPA calls would fail while it is open, and two overlapping uses can
    leave every other backend disabled. Out-of-memory errors are raised, not remembered."""
    key = (q.dtype, q.shape[-1], v.shape[-1], q.shape[-2], q.shape[1], q.device)
    if cudnn_refused(key):
        return None
    bias = mask.head_additive_mask(q.device, q.dtype).expand(q.shape[0], -1, -1, -1)
    try:
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, bias, False, 0.0, False, False, scale=scale)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, TypeError, NotImplementedError):
        refuse_cudnn(key)
        return None
    accept_cudnn(key)
    return out[0]


def locality_mask(mask: LocalMask, host: Optional[torch.Tensor], q: torch.Tensor) -> torch.Tensor:
    """The SDPA ``attn_mask`` of the masked heads: the cached additive window mask, or the
    host's mask with the window added to it (``positions``: the per-sample boolean mask)."""
    if mask.positions is not None:
        return combine_masks(host, mask.window_mask(q.device), q.dtype)
    if host is None and q.dtype.is_floating_point:
        return mask.additive_mask(q.device, q.dtype)
    return combine_masks(host, mask.window_mask(q.device), q.dtype)


def soft_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    host: Optional[torch.Tensor] = None,
    *,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Soft-mode attention of masked heads: ``softmax(M * (q k^T * scale) + host) v``.

    Forbidden logits are set to 0 (:func:`~attnmask.masks.restrict` in ``"soft"`` mode)
    before the host's mask or bias is added. Every key contributes, so this is dense work:
    the logits, softmax and weighted sum are computed in ``q``'s dtype promoted to at least
    float32 (half-precision inputs are upcast; the output is cast back). Plain autograd
    operations, so it trains.

    Args:
        q: Queries ``(batch, heads, tokens, head_dim)`` of the masked heads.
        k: Keys, same shape as ``q``.
        v: Values ``(batch, heads, tokens, head_dim_v)``.
        allowed: Boolean window mask broadcastable to ``(batch, heads, tokens, tokens)``
            (True where a masked head may attend).
        host: The host's mask for these heads (boolean, True = attend, or additive), or ``None``.
        dropout_p: Dropout probability on the attention weights (as SDPA applies it).
        scale: Softmax scale; ``None`` means ``head_dim ** -0.5``.
    """
    weights = explicit_probs(q, k, allowed, "soft", host, scale)
    if dropout_p:
        weights = F.dropout(weights, p=dropout_p)
    return (weights @ v.to(weights.dtype)).to(q.dtype)


CUDA_EVIDENCE_ONE_CALL = (
    "H100, bf16, torch 2.11, below 1025 tokens (benchmarks/results/gpu_probe_h100.json): 197 tokens, half "
    "the heads masked: every head in one cuDNN SDPA call with a per-head additive mask 0.90x / 0.63x dense "
    "(per call / back to back), the split path 0.67x / 0.49x; all heads masked: 0.78x / 0.62x vs 0.98x / "
    "0.63x. Whole timm ViT-B/16 at 224 px, half masked: 0.936x the unpatched throughput, split 0.902x, "
    "FlexAttention 0.71x-0.76x; with this row, auto 0.95x vs sdpa 0.92x "
    "(benchmarks/results/nvidia-h100-80gb-hbm3-auto.json). At 1025 tokens the split path wins "
    "(0.76x vs 0.69x per call), so the row stops at 1024."
)
CUDA_EVIDENCE_SPLIT = (
    "H100, bf16, torch 2.11, 12 heads x 64, 7x7 window, forward, per call (benchmarks/results/gpu_probe_h100.json): "
    "SDPA split into global and masked heads 0.67x dense at 197 tokens, 0.76x at 1025 and 0.77x at 4097 with half "
    "the heads masked; forward+backward 0.49x / 0.65x at 1025 tokens, 0.60x / 0.56x at 4097 (half / all; "
    "benchmarks/results/nvidia-h100-80gb-hbm3.json)."
)
CPU_EVIDENCE_SDPA = (
    "CPU (2-core AMD EPYC, torch 2.14.1, fp32, 12 heads x 64, 7x7 window): SDPA with the cached additive mask, "
    "0.75x-1.05x dense SDPA at 197-1025 tokens (benchmarks/results/cpu-amd-epyc.json; cells of 10-20 ms vary by "
    "5-15% run to run here)."
)

BACKEND = Backend(
    name="sdpa",
    run=sdpa_attention,
    capabilities=Capabilities(),
    rows=(
        Measured(
            "sdpa",
            speed=0.90,
            device="cuda",
            dtypes=(torch.bfloat16, torch.float16),
            max_tokens=1024,
            training=False,
            options=(("one_call", True),),
            evidence=CUDA_EVIDENCE_ONE_CALL,
        ),
        Measured("sdpa", speed=0.67, device="cuda", max_tokens=1024, evidence=CUDA_EVIDENCE_SPLIT),
        Measured("sdpa", speed=0.76, device="cuda", min_tokens=1025, training=False, evidence=CUDA_EVIDENCE_SPLIT),
        Measured("sdpa", speed=0.60, device="cuda", min_tokens=1025, training=True, evidence=CUDA_EVIDENCE_SPLIT),
        Measured("sdpa", speed=0.90, device="cpu", evidence=CPU_EVIDENCE_SDPA),
    ),
)
"""SDPA runs every call (the fallback of every other kernel and of ``auto``)."""
