"""Small tensor helpers shared by the kernels."""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..masks import restrict

HeadIndex = Union[slice, list]


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
