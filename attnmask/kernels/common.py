"""Small tensor helpers shared by the kernels."""

from __future__ import annotations

from typing import Optional, Union

import torch

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
