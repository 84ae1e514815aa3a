"""timm adapter for the VisionTransformer family built on ``timm.layers.Attention``.

Covers ViT, DeiT, DeiT-III, distilled DeiT (2 prefix tokens), register-token ViTs and
SigLIP-style ViTs without a class token, including ``dynamic_img_size=True`` models.

Patching swaps each chosen ``Attention`` instance's class to :class:`MaskedAttention`, a
module-level subclass (``module.__class__ = MaskedAttention``): parameters, buffers and the
state_dict stay as they were, and deepcopy, pickling and ``torch.compile`` keep working.
Undoing swaps the class back and deletes the two attributes the patch added.
"""

from __future__ import annotations

from typing import ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn

from ..kernels import get_kernel
from ..masks import combine_masks
from ..spec import LayerPlan
from . import Site
from .layouts import PatchLayout
from .swap import ClassSwapAdapter, keep_hook


def timm_qkv(module, x: torch.Tensor) -> torch.Tensor:
    """``(B, N, 3 * dim)`` projections as timm's BEiT/EVA/SwinV2 attention compute them.

    These modules keep separate ``q_bias``/``k_bias``/``v_bias`` (``k_bias`` a zero buffer)
    next to a bias-free ``qkv`` linear; ``qkv_bias_separate`` (newer timm) adds the bias after
    the matmul instead of inside it. Read with getattr: older timm releases lack the flag.
    """
    if module.q_bias is None:
        return module.qkv(x)
    qkv_bias = torch.cat((module.q_bias, module.k_bias, module.v_bias))
    if getattr(module, "qkv_bias_separate", False):
        return module.qkv(x) + qkv_bias
    return F.linear(x, weight=module.qkv.weight, bias=qkv_bias)


class MaskedAttention(Attention):
    """``timm.layers.Attention`` whose chosen heads are local (see :mod:`attnmask.masks`).

    Computes q, k, v exactly as ``Attention`` does and hands them to the layer's kernel.
    """

    _attnmask_plan: LayerPlan
    _attnmask_tokens: PatchLayout

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        B, N, _ = x.shape
        plan = self._attnmask_plan
        tokens = self._attnmask_tokens
        gate_layer = getattr(self, "gate", None)
        gate = gate_layer(x).sigmoid() if gate_layer is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if is_causal:
            causal = torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
            attn_mask = combine_masks(attn_mask, causal, q.dtype)

        mask = tokens.mask(plan, B, N)
        x = get_kernel(plan.backend)(
            q, k, v, mask, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0
        )

        x = x.transpose(1, 2).reshape(B, N, getattr(self, "attn_dim", self.num_heads * self.head_dim))
        norm = getattr(self, "norm", None)
        if norm is not None:
            x = norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class TimmPatchAdapter(ClassSwapAdapter):
    """Base of the timm adapters whose layers see prefix tokens, then the patch grid.

    The grid comes from ``model.patch_embed`` through one :class:`~attnmask.adapters.layouts.PatchLayout` per model
    (a forward hook for ``dynamic_img_size`` models), shared by the patched layers.
    """

    layers: ClassVar[str]
    """What the attention layers are called, for errors."""

    @staticmethod
    def vit(model: nn.Module) -> nn.Module:
        """The ViT holding the patch embedding: ``model``, or the model inside timm's feature
        wrapper (``features_only=True`` gives a ``FeatureGetterNet`` whose ``.model`` is the ViT)."""
        if not hasattr(model, "patch_embed") and hasattr(getattr(model, "model", None), "patch_embed"):
            return model.model
        return model

    def prefix_tokens(self, model: nn.Module) -> int:
        """Tokens before the patches in the patched layers' sequences."""
        return int(self.vit(model).num_prefix_tokens)

    def matches(self, model: nn.Module) -> bool:
        """Has the attention layers and a ViT's patch grid (otherwise the structural adapter,
        :mod:`attnmask.adapters.generic`, learns the grid at run time)."""
        if not super().matches(model):
            return False
        try:
            self.check(model)
        except TypeError:
            return False
        return True

    def check(self, model: nn.Module) -> None:
        try:
            self.prefix_tokens(model)
            self.vit(model).patch_embed.grid_size
        except AttributeError:
            raise TypeError(
                f"attnmask: timm model {type(model).__name__} has {self.layers} layers but no patch grid "
                "(expected `patch_embed.grid_size` and `num_prefix_tokens`, as timm's ViTs have)"
            ) from None

    def attach(self, model: nn.Module, sites: Sequence[Site]) -> None:
        vit = self.vit(model)
        tokens = PatchLayout(self.prefix_tokens(model), vit.patch_embed, channels_last=True)
        if getattr(vit, "dynamic_img_size", False):
            keep_hook(model, vit.patch_embed.register_forward_hook(tokens))
        for site in sites:
            site.module._attnmask_tokens = tokens

    def grid(self, model: nn.Module) -> Optional[tuple[int, int]]:
        for module in self.patched_modules(model):
            tokens = module._attnmask_tokens
            return tokens.last_grid or tokens.static_grid
        return super().grid(self.vit(model))


class TimmViTAdapter(TimmPatchAdapter):
    """Adapter for timm's VisionTransformer family (registered as ``"timm.vit"``)."""

    name = "timm.vit"
    masked = {Attention: MaskedAttention}
    layers = "timm.layers.Attention"


ADAPTER = TimmViTAdapter()
