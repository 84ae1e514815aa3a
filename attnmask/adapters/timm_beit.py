"""timm adapter for BEiT and BEiT v2 (``timm.models.beit.Attention``).

BEiT's attention is its own class, not ``timm.layers.Attention``: it adds a relative position
bias (per layer, or one shared by all layers via ``shared_rel_pos_bias``) to the logits.
:class:`MaskedBeitAttention` computes q, k, v exactly as the host does and passes that bias to
the layer's kernel as the additive ``attn_mask``: kernels add the locality mask to it, so the
bias is kept. The class token is the one prefix token; the grid is the patch embedding's.
"""

from __future__ import annotations

from typing import Optional

import torch
from timm.models.beit import Attention as BeitAttention
from torch import nn

from ..kernels import get_kernel
from ..spec import LayerPlan
from .layouts import PatchLayout
from .timm_vit import TimmPatchAdapter, timm_qkv


class MaskedBeitAttention(BeitAttention):
    """BEiT ``Attention`` whose chosen heads are local; the relative position bias is kept."""

    _attnmask_plan: LayerPlan
    _attnmask_tokens: PatchLayout

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, N, C = x.shape
        plan = self._attnmask_plan
        tokens = self._attnmask_tokens

        qkv = timm_qkv(self, x)
        qkv = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # B, num_heads, N, head_dim

        # The host's fused path: the bias travels as SDPA's additive mask.
        rel_pos_bias = None
        if self.relative_position_bias_table is not None:
            rel_pos_bias = self._get_rel_pos_bias()
            if shared_rel_pos_bias is not None:
                rel_pos_bias = rel_pos_bias + shared_rel_pos_bias
        elif shared_rel_pos_bias is not None:
            rel_pos_bias = shared_rel_pos_bias

        mask = tokens.mask(plan, B, N)
        x = get_kernel(plan.backend)(
            q, k, v, mask, attn_mask=rel_pos_bias, dropout_p=self.attn_drop.p if self.training else 0.0
        )

        x = x.transpose(1, 2).reshape(B, N, -1)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class TimmBeitAdapter(TimmPatchAdapter):
    """Adapter for timm's BEiT and BEiT v2 (registered as ``"timm.beit"``)."""

    name = "timm.beit"
    masked = {BeitAttention: MaskedBeitAttention}
    layers = "BEiT attention"

    def prefix_tokens(self, model: nn.Module) -> int:
        return int(getattr(model, "num_prefix_tokens", 1))  # older timm Beit: just the class token


ADAPTER = TimmBeitAdapter()
