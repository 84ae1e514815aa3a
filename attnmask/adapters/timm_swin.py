"""timm adapter for Swin and SwinV2 (``WindowAttention`` of ``swin_transformer(_v2)``).

Swin attends inside non-overlapping attention windows (e.g. 7 x 7 tokens), shifted every
other block. The locality mask is laid on each attention window's own token grid: a window
token of a masked head attends only to the window tokens in its ``kh x kw`` neighbourhood.
Inside one (shifted) window, neighbours on that grid are neighbours in the image, so this is
the paper's spatial locality; the shifted-window mask still separates tokens that the cyclic
shift brought together. There are no prefix tokens.

Both masked classes repeat the host's forward up to the attention itself and hand it to the
layer's kernel (:func:`attnmask.kernels.get_kernel`), as the Hugging Face Swin adapter does:
the host's position bias plus the shifted-window mask is the kernel's additive ``attn_mask``,
built as timm's fused path builds it, and the kernel adds the locality mask to it. So every
backend applies, both modes do (``mode="soft"`` sets the scaled ``q k^T`` logits outside the
window to 0 *before* the bias and shift mask are added) and ``locality_scores`` can record
the probabilities.

- Swin v1 (:class:`MaskedWindowAttention`): ``softmax(q k^T * scale + bias + shift) v``. Global
  heads run through plain SDPA with the host's mask, which is exactly timm's fused path
  (``fused_attn=True``, e.g. ``TIMM_FUSED_ATTN=2``): their outputs are then bit-for-bit the
  unpatched ones. timm's default for Swin is its explicit path (``fused_attn`` is experimental
  there); against that, global heads agree up to float32 rounding (SDPA's softmax is not the
  explicit one).
- SwinV2 (:class:`MaskedWindowAttentionV2`): cosine attention with a per-head logit scale and
  a continuous position bias (``16 * sigmoid(cpb_mlp(...))``). The kernel gets
  ``q' = normalize(q) * logit_scale``, ``k' = normalize(k)`` and ``scale=1.0``, so its scaled
  logits are timm's ``cos(q, k) * logit_scale``; the bias plus the shift mask is its
  ``attn_mask``. timm computes this attention explicitly (there is no fused SwinV2 path), so
  global heads agree with the unpatched model up to float32 rounding, not bit for bit.

Both read the window from ``module.window_size`` on every call, so they follow
``set_input_size``/``set_window_size``. ``backend="reference"`` is the float64 reference kernel
(explicit softmax attention in float64 on the q, k, v and host mask computed here).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import WindowAttention
from timm.models.swin_transformer_v2 import WindowAttention as WindowAttentionV2
from torch import nn

from ..kernels import get_kernel
from ..masks import LocalMask
from ..spec import LayerPlan
from .swap import ClassSwapAdapter
from .timm_vit import timm_qkv


def _local_mask(module: nn.Module) -> LocalMask:
    """The mask of a patched window attention for its current attention window."""
    plan: LayerPlan = module._attnmask_plan
    height, width = module.window_size
    return plan.local_mask((height, width), 0)


def host_attn_mask(bias: torch.Tensor, shift_mask: Optional[torch.Tensor], num_heads: int, batch_windows: int) -> torch.Tensor:
    """The additive mask timm's fused path hands SDPA: the ``(1, H, N, N)`` position bias, plus
    the shifted-window mask ``(num_windows, N, N)`` when there is one, as ``(B * num_windows, H, N, N)``
    (windows of one image are consecutive in the batch)."""
    if shift_mask is None:
        return bias
    num_win, n = shift_mask.shape[0], shift_mask.shape[-1]
    shift = shift_mask.view(1, num_win, 1, n, n).expand(batch_windows // num_win, -1, num_heads, -1, -1)
    return bias + shift.reshape(-1, num_heads, n, n)


class MaskedWindowAttention(WindowAttention):
    """Swin v1 ``WindowAttention`` whose chosen heads are local inside each attention window.

    Computes q, k, v and the host's mask (relative position bias + shifted-window mask) as
    timm's fused path does and hands them to the layer's kernel.
    """

    _attnmask_plan: LayerPlan

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B_, N, _ = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)

        attn_mask = host_attn_mask(self._get_rel_pos_bias(), mask, self.num_heads, B_)
        x = get_kernel(self._attnmask_plan.backend)(
            q,
            k,
            v,
            _local_mask(self),
            attn_mask=attn_mask.to(q.dtype),
            dropout_p=self.attn_drop.p if self.training else 0.0,
            scale=self.scale,
        )

        x = x.transpose(1, 2).reshape(B_, N, -1)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


def continuous_position_bias(module: nn.Module) -> torch.Tensor:
    """SwinV2's ``(1, H, N, N)`` position bias, ``16 * sigmoid(cpb_mlp(...))``, as timm computes it."""
    window_area = module.window_size[0] * module.window_size[1]
    table = module.cpb_mlp(module.relative_coords_table).view(-1, module.num_heads)
    bias = table[module.relative_position_index.view(-1)].view(window_area, window_area, -1)
    bias = bias.permute(2, 0, 1).contiguous()
    return (16 * torch.sigmoid(bias)).unsqueeze(0)


class MaskedWindowAttentionV2(WindowAttentionV2):
    """SwinV2 ``WindowAttention`` (cosine attention, continuous position bias) with local heads.

    Computes q, k, v as the host does; the cosine attention becomes kernel inputs
    (``normalize(q) * logit_scale``, ``normalize(k)``, ``scale=1.0``) and the continuous
    position bias plus the shifted-window mask the kernel's ``attn_mask``. timm's own forward
    is explicit softmax attention, so outputs (global heads included) equal the unpatched
    ones up to float32 rounding, not bit for bit.
    """

    _attnmask_plan: LayerPlan

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B_, N, C = x.shape
        qkv = timm_qkv(self, x)
        qkv = qkv.reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)

        # cosine attention: (normalize(q) * logit_scale) @ normalize(k)^T, unscaled
        logit_scale = torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
        q = F.normalize(q, dim=-1) * logit_scale.to(q.dtype)
        k = F.normalize(k, dim=-1)

        attn_mask = host_attn_mask(continuous_position_bias(self), mask, self.num_heads, B_)
        x = get_kernel(self._attnmask_plan.backend)(
            q,
            k,
            v,
            _local_mask(self),
            attn_mask=attn_mask.to(q.dtype),
            dropout_p=self.attn_drop.p if self.training else 0.0,
            scale=1.0,
        )

        x = x.transpose(1, 2).reshape(B_, N, C)
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
