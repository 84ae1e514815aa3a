"""torchvision adapter for Swin and Swin V2 (``swin_t``/``s``/``b``, ``swin_v2_t``/``s``/``b``).

``ShiftedWindowAttention(V2).forward`` asks ``self.get_relative_position_bias()`` for a
``(1, heads, N, N)`` bias and hands it to torchvision's ``shifted_window_attention``, which
adds it to the logits before the shifted-window mask and the softmax. Patching swaps each
chosen instance's class to a module-level subclass whose ``get_relative_position_bias`` returns
the host's bias with ``-inf`` where a masked head may not attend: everything else (cosine
attention and logit scale of V2, the continuous position bias, padding, shift, dropout) is
torchvision's own code, and global heads get the host's bias values unchanged.

The geometry is each attention window's own token grid (``window_size``, 7 x 7 for ``swin_t``,
8 x 8 for ``swin_v2_t``), with no prefix tokens. torchvision never shrinks the window: a
feature map smaller than the window (or not a multiple of it) is zero-padded to whole windows
and the shift is dropped where the window covers the map, so every attention call sees
``window_size[0] * window_size[1]`` tokens laid out row-major in the window.

This family is not kernel-backed: the attention itself stays torchvision's.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

from ..masks import mask_logits
from ..spec import LayerPlan
from .swap import ClassSwapAdapter


class LocalityBias:
    """Mixin: adds the locality mask of ``_attnmask_plan`` to the host's relative position bias."""

    _attnmask_plan: LayerPlan
    window_size: list[int]

    def get_relative_position_bias(self) -> torch.Tensor:
        bias = super().get_relative_position_bias()  # (1, heads, N, N)
        plan = self._attnmask_plan
        mask = plan.local_mask(self.window_size, 0)
        # Global heads keep the host's bias values exactly (selected, not recomputed). The
        # shift mask torchvision adds next (-100) leaves -inf as -inf, and every query keeps
        # itself, so no softmax row is empty.
        return mask_logits(bias, mask)


class MaskedShiftedWindowAttention(LocalityBias, ShiftedWindowAttention):
    """``ShiftedWindowAttention`` whose chosen heads are local inside each attention window."""


class MaskedShiftedWindowAttentionV2(LocalityBias, ShiftedWindowAttentionV2):
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
    backends = ("auto",)
    modes = ("hard",)
    backend_label = "torchvision's window attention, mask added to the position bias"

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
            "masked heads run in torchvision's own window attention (the mask is added to the relative "
            "position bias): backend='auto' is the only choice",
        ]


ADAPTER = TorchvisionSwinAdapter()
