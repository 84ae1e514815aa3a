"""Masked attention on torch's ``scaled_dot_product_attention``."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..masks import LocalMask, combine_masks
from .common import head_index, heads_of_mask


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: LocalMask,
    *,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Attention with the locality mask on the masked heads, through SDPA.

    Global heads go through SDPA exactly as the host would call it (no locality mask), so
    their outputs are bit-for-bit the unpatched ones. Masked heads go through SDPA with the
    cached ``(N, N)`` boolean window mask (combined with the host's ``attn_mask``). When the
    mask restricts nothing (no masked heads, or a window covering the grid) this is plain SDPA.

    Args:
        q: Queries ``(batch, heads, tokens, head_dim)``.
        k: Keys, same shape as ``q``.
        v: Values ``(batch, heads, tokens, head_dim_v)``.
        mask: The layer's :class:`~attnmask.masks.LocalMask` for this input size.
        attn_mask: The host model's own mask, if any (boolean or additive).
        dropout_p: Attention dropout probability (training only).
        scale: Softmax scale; ``None`` is SDPA's default ``head_dim ** -0.5``.

    Returns:
        ``(batch, heads, tokens, head_dim_v)``.
    """
    num_heads = q.shape[1]
    if mask.is_identity:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    local = mask.window_mask(q.device)
    if len(mask.heads) == num_heads:
        masked = combine_masks(attn_mask, local, q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=masked, dropout_p=dropout_p, scale=scale)

    local_heads = head_index(mask.heads)
    global_heads = head_index(mask.global_heads)
    out = q.new_empty(q.shape[:-1] + v.shape[-1:])
    out[:, global_heads] = F.scaled_dot_product_attention(
        q[:, global_heads],
        k[:, global_heads],
        v[:, global_heads],
        attn_mask=heads_of_mask(attn_mask, global_heads, num_heads),
        dropout_p=dropout_p,
        scale=scale,
    )
    out[:, local_heads] = F.scaled_dot_product_attention(
        q[:, local_heads],
        k[:, local_heads],
        v[:, local_heads],
        attn_mask=combine_masks(heads_of_mask(attn_mask, local_heads, num_heads), local, q.dtype),
        dropout_p=dropout_p,
        scale=scale,
    )
    return out
