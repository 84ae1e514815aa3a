"""Small tensor helpers shared by the kernels."""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from ..masks import LocalMask, restrict

HeadIndex = Union[slice, list]

MaskedPath = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
"""``(q, k, v, host_mask_of_these_heads) -> out``: attention of the masked heads only."""

MaskedFill = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor], None]
"""``(q, k, v, host_mask_of_these_heads, out) -> None``: attention of the masked heads,
written into ``out`` shaped ``(batch, tokens, masked heads, head_dim_v)``."""


def head_index(heads: tuple[int, ...]) -> HeadIndex:
    """Index selecting ``heads`` on the head dimension: a slice (a view) when they are
    consecutive, else a list (a copy)."""
    if heads and heads[-1] - heads[0] + 1 == len(heads):
        return slice(heads[0], heads[-1] + 1)
    return list(heads)


def heads_of_mask(attn_mask: Optional[torch.Tensor], index: HeadIndex, num_heads: int) -> Optional[torch.Tensor]:
    """The part of a host ``attn_mask`` that applies to the selected heads.

    Masks without a per-head dimension broadcast over heads and are returned unchanged.
    """
    if attn_mask is None or attn_mask.dim() < 3:
        return attn_mask
    if attn_mask.dim() == 4 and attn_mask.shape[1] == num_heads and num_heads > 1:
        return attn_mask[:, index]
    if attn_mask.dim() == 3 and attn_mask.shape[0] == num_heads and num_heads > 1:
        return attn_mask[index]
    return attn_mask


def explicit_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    allowed: torch.Tensor,
    mode: str,
    host: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Attention probabilities computed explicitly, in the order every backend follows:
    scaled ``q k^T``, :func:`~attnmask.masks.restrict` where ``allowed`` is False (``-inf``
    in hard mode, 0 in soft mode), the host's mask (boolean: ``-inf`` where False; float:
    added), softmax over the keys.

    Args:
        q: Queries ``(batch, heads, tokens, head_dim)``.
        k: Keys, same shape as ``q``.
        allowed: Boolean, broadcastable to ``(batch, heads, tokens, tokens)``.
        mode: ``"hard"`` or ``"soft"``.
        host: The host model's mask or bias for these heads, or ``None``.
        scale: Softmax scale; ``None`` means ``head_dim ** -0.5``.
        dtype: Computation dtype; ``None``: ``q``'s dtype promoted to at least float32.
    """
    dtype = torch.promote_types(q.dtype, torch.float32) if dtype is None else dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = restrict((q.to(dtype) @ k.to(dtype).transpose(-2, -1)) * scale, allowed, mode)
    if host is not None:
        logits = logits.masked_fill(~host, float("-inf")) if host.dtype == torch.bool else logits + host.to(dtype)
    return logits.softmax(dim=-1)


def split_heads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: LocalMask,
    attn_mask: Optional[torch.Tensor],
    masked_path: MaskedPath,
    *,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Run the masked heads through ``masked_path`` and the global heads through plain SDPA.

    With every head masked, ``masked_path`` gets the whole tensors (no copy). Otherwise both
    results are written into one ``(batch, tokens, heads, head_dim_v)`` buffer, returned as its
    ``(batch, heads, tokens, head_dim_v)`` view.
    """
    if len(mask.heads) == q.shape[1]:
        return masked_path(q, k, v, attn_mask)

    def fill(q_, k_, v_, host, out):
        out.copy_(masked_path(q_, k_, v_, host).transpose(1, 2))

    return split_heads_into(q, k, v, mask, attn_mask, fill, dropout_p=dropout_p, scale=scale)


def split_heads_into(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: LocalMask,
    attn_mask: Optional[torch.Tensor],
    fill: MaskedFill,
    *,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """:func:`split_heads` for masked paths that write their output in place (``fill``).

    The output is one ``(batch, tokens, heads, head_dim_v)`` buffer, returned as its
    ``(batch, heads, tokens, head_dim_v)`` view: global heads are written by plain SDPA,
    and ``fill`` writes the masked heads into their part of it (a view when the masked heads
    are consecutive, else a separate buffer copied in), so the caller's head merge is a view.
    """
    num_heads = q.shape[1]
    batch, _, tokens, _ = q.shape
    # Written through the (batch, tokens, heads, dim) buffer itself, not its transposed view:
    # autograd rejects an index_put_ on a view of a buffer that an earlier write made require
    # grad ("a leaf Variable that requires grad is being used in an in-place operation").
    out = q.new_empty(batch, tokens, num_heads, v.shape[-1])
    if len(mask.heads) == num_heads:
        fill(q, k, v, attn_mask, out)
        return out.transpose(1, 2)
    local_heads = head_index(mask.heads)
    global_heads = head_index(mask.global_heads)
    # ``.to(out.dtype)``: under autocast, float32 queries give a bf16/fp16 SDPA result, and
    # an index_put (global heads not consecutive) does not cast as a slice's copy_ does.
    out[:, :, global_heads] = F.scaled_dot_product_attention(
        q[:, global_heads],
        k[:, global_heads],
        v[:, global_heads],
        attn_mask=heads_of_mask(attn_mask, global_heads, num_heads),
        dropout_p=dropout_p,
        scale=scale,
    ).transpose(1, 2).to(out.dtype)
    host = heads_of_mask(attn_mask, local_heads, num_heads)
    q_, k_, v_ = q[:, local_heads], k[:, local_heads], v[:, local_heads]
    if isinstance(local_heads, slice):
        fill(q_, k_, v_, host, out[:, :, local_heads])
    else:
        part = q.new_empty(batch, tokens, len(mask.heads), v.shape[-1])
        fill(q_, k_, v_, host, part)
        out[:, :, local_heads] = part
    return out.transpose(1, 2)
