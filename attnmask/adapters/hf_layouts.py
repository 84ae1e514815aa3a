"""Where the tokens of a Hugging Face vision model sit, per forward (used by :mod:`.hf`).

- :class:`PatchLayout`: prefix tokens, then the row-major patch grid of the latest input,
  read from the patch-embedding convolution's output by a forward hook.
- :class:`ShuffledPatchLayout`: ViTMAE's encoder, whose random masking keeps a shuffled
  subset of patches per sample (read from the embeddings' ``ids_restore``).
- :class:`WindowLayout`: Swin, whose attention sees one square window at a time.

Each gives the layer's :class:`~attnmask.masks.LocalMask` for a sequence of ``N`` tokens.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..masks import LocalMask, kept_positions
from ..spec import LayerPlan


def pair(value) -> tuple[int, int]:
    """``7`` or ``(7, 7)`` -> ``(7, 7)`` (config sizes come as either)."""
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


class PatchLayout:
    """Prefix tokens, then the row-major patch grid of the latest forward.

    Registered as a forward hook on the patch-embedding convolution, whose ``(B, D, h, w)``
    output gives the grid of each input. ``static_grid`` (image size // patch size of the
    config) is used when no forward has run.
    """

    def __init__(self, prefix_tokens: int, static_grid: tuple[int, int]) -> None:
        self.prefix_tokens = prefix_tokens
        self.static_grid = static_grid
        self.last_grid: Optional[tuple[int, int]] = None

    def __call__(self, module: nn.Module, args, output) -> None:
        if isinstance(output, torch.Tensor) and output.dim() == 4:
            self.last_grid = (output.shape[-2], output.shape[-1])

    @property
    def grid(self) -> tuple[int, int]:
        return self.last_grid or self.static_grid

    def mask(self, plan: LayerPlan, batch: int, num_tokens: int) -> LocalMask:
        grid = self.grid
        if self.prefix_tokens + grid[0] * grid[1] != num_tokens:
            raise ValueError(
                f"attnmask: a sequence of {num_tokens} tokens does not fit the patch grid "
                f"({self.prefix_tokens} prefix tokens + a {grid[0]}x{grid[1]} grid); feed images "
                "through the model's patch embedding so the grid of each input is known"
            )
        return plan.local_mask(grid, self.prefix_tokens)


class ShuffledPatchLayout(PatchLayout):
    """ViTMAE's encoder: a class token, then each sample's kept patches in shuffled order.

    Also a forward hook on the embeddings module, whose output ``(embeddings, mask,
    ids_restore)`` says where every kept token came from: ``argsort(ids_restore)`` is the
    shuffle, and its first ``N - 1`` entries are the kept patches, in sequence order.
    """

    def __init__(self, prefix_tokens: int, static_grid: tuple[int, int]) -> None:
        super().__init__(prefix_tokens, static_grid)
        self.shuffle: Optional[torch.Tensor] = None

    def record_shuffle(self, module: nn.Module, args, output) -> None:
        if isinstance(output, (tuple, list)) and len(output) >= 3 and isinstance(output[-1], torch.Tensor):
            self.shuffle = torch.argsort(output[-1], dim=1)

    def mask(self, plan: LayerPlan, batch: int, num_tokens: int) -> LocalMask:
        grid = self.grid
        shuffle = self.shuffle
        kept = num_tokens - self.prefix_tokens
        if shuffle is None or shuffle.shape[0] != batch or not 0 <= kept <= shuffle.shape[1]:
            raise ValueError(
                f"attnmask: cannot place the {num_tokens} tokens of this ViTMAE encoder layer on the "
                f"{grid[0]}x{grid[1]} grid: run the model (or its embeddings) on the images first"
            )
        positions = kept_positions(shuffle[:, :kept], self.prefix_tokens)
        return plan.local_mask(grid, self.prefix_tokens, positions)


class WindowLayout:
    """Swin: each attention call sees the tokens of one square window, row-major, no prefix."""

    def __init__(self, window_size: int) -> None:
        self.window_size = window_size
        self.last_grid: Optional[tuple[int, int]] = None

    @property
    def grid(self) -> tuple[int, int]:
        return self.last_grid or (self.window_size, self.window_size)

    def mask(self, plan: LayerPlan, batch: int, num_tokens: int) -> LocalMask:
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(f"attnmask: a Swin window of {num_tokens} tokens is not square")
        self.last_grid = (side, side)
        return plan.local_mask((side, side), 0)
