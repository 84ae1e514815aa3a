"""timm adapter for BEiT and BEiT v2 (``timm.models.beit.Attention``).

BEiT's attention is its own class, not ``timm.layers.Attention``: it adds a relative position
bias (per layer, or one shared by all layers via ``shared_rel_pos_bias``) to the logits.
:class:`MaskedBeitAttention` computes q, k, v exactly as the host does and passes that bias to
the layer's kernel as the additive ``attn_mask``: kernels add the locality mask to it, so the
bias is kept. The class token is the one prefix token; the grid is the patch embedding's.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from timm.models.beit import Attention as BeitAttention
from torch import nn

from ..kernels import get_kernel
from ..masks import LocalMask
from ..spec import LayerPlan
from . import Site
from .timm_vit import TokenLayout


class MaskedBeitAttention(BeitAttention):
    """BEiT ``Attention`` whose chosen heads are local; the relative position bias is kept."""

    _attnmask_plan: LayerPlan
    _attnmask_tokens: TokenLayout

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, N, C = x.shape
        plan = self._attnmask_plan
        tokens = self._attnmask_tokens

        if self.q_bias is None:
            qkv = self.qkv(x)
        else:
            qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            if getattr(self, "qkv_bias_separate", False):
                qkv = self.qkv(x)
                qkv += qkv_bias
            else:
                qkv = F.linear(x, weight=self.qkv.weight, bias=qkv_bias)
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

        mask = LocalMask(
            grid=tokens.grid(N),
            window=plan.window,
            prefix_tokens=tokens.prefix_tokens,
            num_heads=plan.num_heads,
            heads=plan.heads,
            prefix=plan.prefix,
        )
        x = get_kernel(plan.backend)(
            q, k, v, mask, attn_mask=rel_pos_bias, dropout_p=self.attn_drop.p if self.training else 0.0
        )

        x = x.transpose(1, 2).reshape(B, N, -1)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if type(m) in (BeitAttention, MaskedBeitAttention)]


class TimmBeitAdapter:
    """Adapter for timm's BEiT and BEiT v2 (registered as ``"timm.beit"``)."""

    name = "timm.beit"

    def matches(self, model: nn.Module) -> bool:
        return bool(_attention_modules(model))

    def sites(self, model: nn.Module) -> list[Site]:
        if not hasattr(getattr(model, "patch_embed", None), "grid_size"):
            raise TypeError(
                f"attnmask: timm model {type(model).__name__} has BEiT attention layers but no patch "
                "grid (expected a Beit-like model with `patch_embed.grid_size`)"
            )
        return [
            Site(name=name, layer=i, num_heads=int(m.num_heads), module=m)
            for i, (name, m) in enumerate(_attention_modules(model))
        ]

    def install(self, model: nn.Module, sites: Sequence[Site], plans: Sequence[LayerPlan]) -> None:
        tokens = TokenLayout(model.patch_embed, int(getattr(model, "num_prefix_tokens", 1)))
        for site, plan in zip(sites, plans):
            module = site.module
            module.__class__ = MaskedBeitAttention
            module._attnmask_plan = plan
            module._attnmask_tokens = tokens

    def uninstall(self, model: nn.Module, names: Sequence[str]) -> None:
        for name in names:
            module = model.get_submodule(name)
            if isinstance(module, MaskedBeitAttention):
                module.__class__ = BeitAttention
                for attr in ("_attnmask_plan", "_attnmask_tokens"):
                    module.__dict__.pop(attr, None)

    def grid(self, model: nn.Module) -> Optional[tuple[int, int]]:
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        return (int(grid[0]), int(grid[1])) if grid is not None else None


ADAPTER = TimmBeitAdapter()
