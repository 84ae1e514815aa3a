"""timm adapter for EVA, EVA-02 and other models on ``timm.models.eva.EvaAttention``.

:class:`MaskedEvaAttention` repeats the host's forward (fused ``qkv`` or separate q/k/v
projections, q/k norms, rotary embeddings on the patch tokens only, the host's
``attn_mask``/``is_causal``, inner norm, gate and projection) and runs the attention through
the layer's kernel. The grid of each forward comes from the patch embedding through
:class:`~attnmask.adapters.layouts.PatchLayout`, so ``dynamic_img_size=True`` models work at
any input size. In training with patch dropout (``patch_drop_rate > 0``) each sample keeps a
random subset of patches: the indices the dropout kept are recorded by a forward hook on
``model.patch_drop`` and the mask is read at each kept patch's true grid position.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from timm.layers import apply_rot_embed_cat
from timm.models.eva import EvaAttention
from torch import nn

from ..kernels import get_kernel
from ..masks import combine_masks
from ..spec import LayerPlan
from . import Site
from .layouts import KeptPatches, PatchLayout
from .swap import keep_hook
from .timm_vit import TimmPatchAdapter, timm_qkv


class MaskedEvaAttention(EvaAttention):
    """``EvaAttention`` whose chosen heads are local; rotary embeddings applied as before."""

    _attnmask_plan: LayerPlan
    _attnmask_tokens: PatchLayout
    _attnmask_kept: Optional[KeptPatches]

    def forward(
        self,
        x: torch.Tensor,
        rope: Optional[torch.Tensor] = None,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        B, N, C = x.shape
        plan = self._attnmask_plan
        gate_layer = getattr(self, "gate", None)
        gate = gate_layer(x).sigmoid() if gate_layer is not None else None

        if self.qkv is not None:
            qkv = timm_qkv(self, x)
            qkv = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)  # B, num_heads, N, head_dim
        else:
            q = self.q_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
            k = self.k_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
            v = self.v_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)

        q_norm, k_norm = getattr(self, "q_norm", None), getattr(self, "k_norm", None)
        if q_norm is not None:
            q, k = q_norm(q), k_norm(k)

        if rope is not None:
            # Prefix tokens carry no rotary embedding.
            npt = self.num_prefix_tokens
            half = getattr(self, "rotate_half", False)
            q = torch.cat([q[:, :, :npt, :], apply_rot_embed_cat(q[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :npt, :], apply_rot_embed_cat(k[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)

        if is_causal:
            causal = torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
            attn_mask = combine_masks(attn_mask, causal, q.dtype)

        mask = self._attnmask_tokens.mask(plan, B, N, self._attnmask_kept)
        x = get_kernel(plan.backend)(
            q, k, v, mask, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0
        )

        x = x.transpose(1, 2).reshape(B, N, -1)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class TimmEvaAdapter(TimmPatchAdapter):
    """Adapter for timm's EVA family (registered as ``"timm.eva"``)."""

    name = "timm.eva"
    masked = {EvaAttention: MaskedEvaAttention}
    layers = "EvaAttention"

    def attach(self, model: nn.Module, sites: Sequence[Site]) -> None:
        super().attach(model, sites)
        # Patch dropout (training) keeps a per-sample subset of patches: record which.
        patch_drop = getattr(model, "patch_drop", None)
        kept = None
        if isinstance(patch_drop, nn.Module):
            kept = KeptPatches.from_patch_drop()
            keep_hook(model, patch_drop.register_forward_hook(kept))
        for site in sites:
            site.module._attnmask_kept = kept


ADAPTER = TimmEvaAdapter()
