"""torchvision adapter for Swin and Swin V2 (``swin_t``/``s``/``b``, ``swin_v2_t``/``s``/``b``).

``ShiftedWindowAttention(V2).forward`` hands its weights and its ``(1, heads, N, N)`` relative
position bias to torchvision's functional ``shifted_window_attention``, which pads the feature
map to whole windows, rolls it (shifted blocks), partitions it into windows, computes q, k, v,
runs explicit softmax attention with the bias and the shifted-window mask added, projects,
and undoes partition, roll and padding. Patching swaps each chosen instance's class to a
module-level subclass whose ``forward`` calls :func:`shifted_window_attention`, a copy of that
functional whose attention step is the layer's kernel (:func:`attnmask.kernels.get_kernel`):
the host's bias plus the shifted-window mask (``-100`` between tokens the roll brought
together) is the kernel's additive ``attn_mask``, and the kernel adds the locality mask to it.
Padding, roll, qkv (V2: no key bias), projections and dropout are torchvision's arithmetic.

- Swin: the kernel's scale is torchvision's ``head_dim ** -0.5``.
- Swin V2 (cosine attention): the kernel gets ``q' = normalize(q) * logit_scale``,
  ``k' = normalize(k)`` and ``scale=1.0``, so its scaled logits are torchvision's
  ``cos(q, k) * logit_scale``; the continuous position bias (``16 * sigmoid``) is the bias.

So every backend applies, both modes do (``mode="soft"`` sets the scaled ``q k^T`` logits
outside the window to 0 before the bias and shift mask are added), and ``locality_scores``
can record the probabilities. torchvision's attention is explicit (matmul, softmax, matmul);
global heads run through SDPA, so they equal the unpatched outputs up to float32 rounding,
not bit for bit.

The geometry is each attention window's own token grid (``window_size``, 7 x 7 for ``swin_t``,
8 x 8 for ``swin_v2_t``), with no prefix tokens. torchvision never shrinks the window: a
feature map smaller than the window (or not a multiple of it) is zero-padded to whole windows
and the shift is dropped where the window covers the map, so every attention call sees
``window_size[0] * window_size[1]`` tokens laid out row-major in the window.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

from ..kernels import get_kernel
from ..spec import LayerPlan
from .swap import ClassSwapAdapter


def shift_mask(pad_h: int, pad_w: int, window_size: list[int], shift_size: list[int], like: torch.Tensor) -> torch.Tensor:
    """torchvision's shifted-window mask ``(num_windows, N, N)``: 0 within a region, -100 across."""
    mask = like.new_zeros((pad_h, pad_w))
    h_slices = ((0, -window_size[0]), (-window_size[0], -shift_size[0]), (-shift_size[0], None))
    w_slices = ((0, -window_size[1]), (-window_size[1], -shift_size[1]), (-shift_size[1], None))
    count = 0
    for h in h_slices:
        for w in w_slices:
            mask[h[0] : h[1], w[0] : w[1]] = count
            count += 1
    num_windows = (pad_h // window_size[0]) * (pad_w // window_size[1])
    mask = mask.view(pad_h // window_size[0], window_size[0], pad_w // window_size[1], window_size[1])
    mask = mask.permute(0, 2, 1, 3).reshape(num_windows, window_size[0] * window_size[1])
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    return mask.masked_fill(mask != 0, float(-100.0)).masked_fill(mask == 0, float(0.0))


def shifted_window_attention(
    input: torch.Tensor,
    plan: LayerPlan,
    qkv_weight: torch.Tensor,
    proj_weight: torch.Tensor,
    relative_position_bias: torch.Tensor,
    window_size: list[int],
    num_heads: int,
    shift_size: list[int],
    attention_dropout: float = 0.0,
    dropout: float = 0.0,
    qkv_bias: Optional[torch.Tensor] = None,
    proj_bias: Optional[torch.Tensor] = None,
    logit_scale: Optional[torch.Tensor] = None,
    training: bool = True,
) -> torch.Tensor:
    """torchvision's ``shifted_window_attention`` with the attention run by ``plan``'s kernel.

    Same arguments as torchvision's function (after ``plan``), same ``(B, H, W, C)`` result;
    the locality mask is laid on the attention window's ``window_size`` grid.
    """
    B, H, W, C = input.shape
    # pad feature maps to multiples of window size
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_H, pad_W, _ = x.shape

    shift_size = shift_size.copy()
    # If window size is larger than feature size, there is no need to shift window
    if window_size[0] >= pad_H:
        shift_size[0] = 0
    if window_size[1] >= pad_W:
        shift_size[1] = 0

    # cyclic shift
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))

    # partition windows
    num_windows = (pad_H // window_size[0]) * (pad_W // window_size[1])
    x = x.view(B, pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, window_size[0] * window_size[1], C)  # B*nW, Ws*Ws, C
    N = x.size(1)

    # multi-head attention
    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = qkv_bias.clone()
        length = qkv_bias.numel() // 3
        qkv_bias[length : 2 * length].zero_()
    qkv = F.linear(x, qkv_weight, qkv_bias)
    qkv = qkv.reshape(x.size(0), N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:
        # cosine attention: (normalize(q) * logit_scale) @ normalize(k)^T, unscaled
        logit_scale = torch.clamp(logit_scale, max=math.log(100.0)).exp()
        q = F.normalize(q, dim=-1) * logit_scale.to(q.dtype)
        k = F.normalize(k, dim=-1)
        scale = 1.0
    else:
        scale = (C // num_heads) ** -0.5

    # the host's mask: relative position bias, plus the shifted-window mask
    attn_mask = relative_position_bias
    if sum(shift_size) > 0:
        shift = shift_mask(pad_H, pad_W, window_size, shift_size, x)
        shift = shift.view(1, num_windows, 1, N, N).expand(B, -1, num_heads, -1, -1).reshape(-1, num_heads, N, N)
        attn_mask = attn_mask + shift

    mask = plan.local_mask(window_size, 0)
    x = get_kernel(plan.backend)(
        q,
        k,
        v,
        mask,
        attn_mask=attn_mask.to(q.dtype),
        dropout_p=attention_dropout if training else 0.0,
        scale=scale,
    )

    x = x.transpose(1, 2).reshape(B * num_windows, N, C)
    x = F.linear(x, proj_weight, proj_bias)
    x = F.dropout(x, p=dropout, training=training)

    # reverse windows
    x = x.view(B, pad_H // window_size[0], pad_W // window_size[1], window_size[0], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, C)

    # reverse cyclic shift
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))

    # unpad features
    x = x[:, :H, :W, :].contiguous()
    return x


class KernelWindowAttention:
    """Mixin: ``forward`` runs :func:`shifted_window_attention` with the module's plan."""

    _attnmask_plan: LayerPlan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return shifted_window_attention(
            x,
            self._attnmask_plan,
            self.qkv.weight,
            self.proj.weight,
            self.get_relative_position_bias(),
            self.window_size,
            self.num_heads,
            shift_size=self.shift_size,
            attention_dropout=self.attention_dropout,
            dropout=self.dropout,
            qkv_bias=self.qkv.bias,
            proj_bias=self.proj.bias,
            logit_scale=getattr(self, "logit_scale", None),
            training=self.training,
        )


class MaskedShiftedWindowAttention(KernelWindowAttention, ShiftedWindowAttention):
    """``ShiftedWindowAttention`` whose chosen heads are local inside each attention window."""


class MaskedShiftedWindowAttentionV2(KernelWindowAttention, ShiftedWindowAttentionV2):
    """``ShiftedWindowAttentionV2`` whose chosen heads are local inside each attention window."""


MASKED = {
    ShiftedWindowAttention: MaskedShiftedWindowAttention,
    ShiftedWindowAttentionV2: MaskedShiftedWindowAttentionV2,
}
"""Host class -> its masked subclass (only exact host classes are patched)."""


class TorchvisionSwinAdapter(ClassSwapAdapter):
    """Adapter for torchvision's Swin and Swin V2 (registered as ``"torchvision.swin"``)."""

    name = "torchvision.swin"
    masked = MASKED

    def grid(self, model: nn.Module) -> Optional[tuple[int, int]]:
        """The first attention window's token grid: the geometry the masks are built on."""
        modules = self.attention_modules(model)
        if not modules:
            return None
        size = modules[0][1].window_size
        return int(size[0]), int(size[1])

    def notes(self, model: nn.Module) -> list[str]:
        sizes = sorted({tuple(int(s) for s in m.window_size) for _, m in self.attention_modules(model)})
        shown = ", ".join(f"{h}x{w}" for h, w in sizes)
        return [
            f"the locality window applies inside each attention window ({shown} tokens), not across the "
            "image; feature maps smaller than the window are zero-padded to one window",
        ]


ADAPTER = TorchvisionSwinAdapter()
