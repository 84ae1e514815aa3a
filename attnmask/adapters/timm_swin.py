"""timm adapter for Swin and SwinV2 (``WindowAttention`` of ``swin_transformer(_v2)``).

Swin attends inside non-overlapping attention windows (e.g. 7 x 7 tokens), shifted every
other block. The locality mask is laid on each attention window's own token grid: a window
token of a masked head attends only to the window tokens in its ``kh x kw`` neighbourhood.
Inside one (shifted) window, neighbours on that grid are neighbours in the image, so this is
the paper's spatial locality; the shifted-window mask still separates tokens that the cyclic
shift brought together. There are no prefix tokens.

- Swin v1: :class:`MaskedWindowAttention` only overrides ``_get_rel_pos_bias``, which both of
  the host's paths (fused SDPA and explicit softmax) add to the logits before the shift mask.
  The bias of masked heads gets ``-inf`` where the mask forbids attention; global heads keep
  the host's bias, so their outputs are bit-for-bit the original ones.
- SwinV2: the host computes cosine attention and its continuous position bias inline, so
  :class:`MaskedWindowAttentionV2` repeats the host's forward and fills the position bias of
  masked heads with ``-inf`` in the same way.

Both read the window from ``module.window_size`` on every call, so they follow
``set_input_size``/``set_window_size``. No attnmask kernel is involved: ``backend="auto"``
runs the host's own arithmetic, ``backend="reference"`` computes the logits, softmax and
weighted sum in float64 (for tests), and ``"sdpa"`` is refused.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import WindowAttention
from timm.models.swin_transformer_v2 import WindowAttention as WindowAttentionV2
from torch import nn

from ..masks import LocalMask, mask_logits
from ..spec import LayerPlan
from .swap import ClassSwapAdapter
from .timm_vit import timm_qkv


def _local_mask(module: nn.Module) -> LocalMask:
    """The mask of a patched window attention for its current attention window."""
    plan: LayerPlan = module._attnmask_plan
    height, width = module.window_size
    return plan.local_mask((height, width), 0)


def _add_shift_mask(attn: torch.Tensor, mask: Optional[torch.Tensor], num_heads: int) -> torch.Tensor:
    """Add the host's shifted-window mask ``(num_windows, N, N)`` to ``(B * num_windows, H, N, N)`` logits."""
    if mask is None:
        return attn
    num_win, n = mask.shape[0], attn.shape[-1]
    attn = attn.view(-1, num_win, num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0).to(attn.dtype)
    return attn.view(-1, num_heads, n, n)


class MaskedWindowAttention(WindowAttention):
    """Swin v1 ``WindowAttention`` whose chosen heads are local inside each attention window."""

    _attnmask_plan: LayerPlan

    def _get_rel_pos_bias(self) -> torch.Tensor:
        return mask_logits(super()._get_rel_pos_bias(), _local_mask(self))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self._attnmask_plan.backend != "reference":
            return super().forward(x, mask)
        # Float64 reference: the host's explicit path, computed in double precision.
        B_, N, _ = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.double().unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1) + self._get_rel_pos_bias().double()
        attn = self.attn_drop(_add_shift_mask(attn, mask, self.num_heads).softmax(dim=-1))
        x = (attn @ v).to(x.dtype).transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))


class MaskedWindowAttentionV2(WindowAttentionV2):
    """SwinV2 ``WindowAttention`` (cosine attention, continuous position bias) with local heads.

    Repeats the host's forward; the only change is ``-inf`` on the position bias of masked
    heads where the locality mask forbids attention (before the shift mask and the softmax).
    """

    _attnmask_plan: LayerPlan

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B_, N, C = x.shape
        reference = self._attnmask_plan.backend == "reference"

        qkv = timm_qkv(self, x)
        qkv = qkv.reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        if reference:
            qkv = qkv.double()
        q, k, v = qkv.unbind(0)

        # cosine attention
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        logit_scale = torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
        attn = attn * logit_scale.to(attn.dtype)

        window_area = self.window_size[0] * self.window_size[1]
        relative_position_bias_table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        relative_position_bias = relative_position_bias_table[self.relative_position_index.view(-1)].view(
            window_area, window_area, -1
        )
        relative_position_bias = relative_position_bias.permute(2, 0, 1).contiguous()
        relative_position_bias = 16 * torch.sigmoid(relative_position_bias)
        relative_position_bias = mask_logits(relative_position_bias, _local_mask(self))
        attn = attn + relative_position_bias.unsqueeze(0).to(attn.dtype)

        attn = _add_shift_mask(attn, mask, self.num_heads)
        attn = self.softmax(attn)
        attn = self.attn_drop(attn)

        x = (attn @ v).to(x.dtype).transpose(1, 2).reshape(B_, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


_MASKED = {WindowAttention: MaskedWindowAttention, WindowAttentionV2: MaskedWindowAttentionV2}


def _layer_ranges(layers: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


class TimmSwinAdapter(ClassSwapAdapter):
    """Adapter for timm's Swin and SwinV2 (registered as ``"timm.swin"``)."""

    name = "timm.swin"
    masked = _MASKED
    # Masked heads run in the host's own window attention, not an attnmask kernel.
    backends = ("auto", "reference")
    modes = ("hard",)
    backend_label = "timm's window attention, mask on the position bias (float64 with backend='reference')"

    def grid(self, model: nn.Module) -> Optional[tuple[int, int]]:
        """The first attention window: the grid the locality mask is laid on."""
        modules = self.attention_modules(model)
        if not modules:
            return None
        height, width = modules[0][1].window_size
        return int(height), int(width)

    def notes(self, model: nn.Module) -> list[str]:
        by_window: dict[tuple[int, int], list[int]] = {}
        covered: list[int] = []
        for layer, (_, module) in enumerate(self.attention_modules(model)):
            window = (int(module.window_size[0]), int(module.window_size[1]))
            by_window.setdefault(window, []).append(layer)
            plan = module.__dict__.get("_attnmask_plan")
            if plan is not None and _local_mask(module).covers_grid:
                covered.append(layer)
        sizes = "; ".join(f"{h}x{w} in layers {_layer_ranges(layers)}" for (h, w), layers in by_window.items())
        notes = [f"the locality window is applied inside each attention window ({sizes})"]
        if covered:
            notes.append(
                f"layers {_layer_ranges(covered)}: the locality window covers the whole attention window, "
                "so their masked heads are unchanged"
            )
        return notes


ADAPTER = TimmSwinAdapter()
