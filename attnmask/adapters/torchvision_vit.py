"""torchvision adapter for ``VisionTransformer`` (``vit_b_16``, ``vit_b_32``, ``vit_l_*``, ``vit_h_14``).

Every ``EncoderBlock`` of a torchvision ViT calls its ``nn.MultiheadAttention`` as
``self.self_attention(x, x, x, need_weights=False)``. Patching swaps each chosen instance's
class to :class:`MaskedMultiheadAttention`, a module-level subclass that computes q, k, v
from the module's own packed ``in_proj_weight``/``in_proj_bias``, runs the layer's kernel and
applies ``out_proj``: the parameters and the state_dict stay as they were, and deepcopy,
pickling and ``torch.compile`` keep working. Undoing swaps the class back and deletes the
attributes the patch added.

The token layout is fixed by the owning ``VisionTransformer``: one class token, then the
``image_size // patch_size`` square patch grid in row-major order (torchvision's ViT accepts
its configured image size only).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.vision_transformer import EncoderBlock, VisionTransformer

from ..kernels import get_kernel
from ..kernels.record import is_recording
from ..spec import LayerPlan
from . import Site
from .swap import ClassSwapAdapter

CLASS_TOKENS = 1
"""torchvision's ViT puts one class token before the patches."""


class MaskedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose chosen heads are local (see :mod:`attnmask.masks`).

    Supports the call torchvision's ``EncoderBlock`` makes: batch-first self-attention
    ``(x, x, x)`` with no masks and ``need_weights=False``. Any other call raises, except when
    the mask restricts nothing (a window covering the grid): then the parent's forward runs
    unchanged.
    """

    _attnmask_plan: LayerPlan
    _attnmask_grid: tuple[int, int]

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling: fail here, clearly,
        # rather than deep inside TorchScript on the masked forward's Python (kernels chosen per
        # call, mask caches), which it cannot compile.
        raise RuntimeError(
            "attnmask: torch.jit.script cannot compile a masked attention layer (its kernel is chosen per call "
            "in Python). Use torch.compile or torch.export on the patched model, or script the model before "
            "attnmask.apply (the scripted copy is then unmasked)"
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[torch.Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        plan = self._attnmask_plan
        mask = plan.local_mask(self._attnmask_grid, CLASS_TOKENS)
        if mask.is_identity and not is_recording():
            # Nothing is restricted: the parent (and its fused fast path) is exact. While
            # attention is recorded (locality_scores), the kernel must see every layer.
            return super().forward(
                query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            )
        self._check_call(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal)

        B, N, E = query.shape
        if N != mask.num_tokens:
            raise ValueError(
                f"attnmask: a sequence of {N} tokens does not fit this ViT's layout ({CLASS_TOKENS} class "
                f"token + a {mask.grid[0]}x{mask.grid[1]} patch grid = {mask.num_tokens} tokens)"
            )
        head_dim = E // self.num_heads
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = get_kernel(plan.backend)(q, k, v, mask, dropout_p=self.dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(B, N, E)
        return F.linear(out, self.out_proj.weight, self.out_proj.bias), None

    def _check_call(self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal) -> None:
        """Raise a ValueError naming what this masked layer cannot do."""
        problems = []
        if not (query is key and key is value):
            problems.append("query, key and value must be the same tensor (self-attention)")
        if not self.batch_first or query.dim() != 3:
            problems.append("the module must be batch_first with (batch, tokens, features) inputs")
        if not self._qkv_same_embed_dim or self.bias_k is not None or self.add_zero_attn:
            problems.append("kdim/vdim, add_bias_kv and add_zero_attn are not supported")
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            problems.append("key_padding_mask, attn_mask and is_causal are not supported")
        if need_weights:
            problems.append("need_weights=True is not supported (call with need_weights=False)")
        if problems:
            raise ValueError(
                "attnmask: this masked nn.MultiheadAttention supports only the call torchvision's "
                "EncoderBlock makes, attn(x, x, x, need_weights=False): " + "; ".join(problems)
            )


def _owned_blocks(model: nn.Module) -> dict[int, tuple[int, int]]:
    """``id(block) -> patch grid`` for every ``EncoderBlock`` inside a ``VisionTransformer``."""
    grids: dict[int, tuple[int, int]] = {}
    for vit in model.modules():
        if isinstance(vit, VisionTransformer):
            side = int(vit.image_size) // int(vit.patch_size)
            for block in vit.encoder.modules():
                if isinstance(block, EncoderBlock):
                    grids[id(block)] = (side, side)
    return grids


def _attention_modules(model: nn.Module) -> list[tuple[str, EncoderBlock]]:
    """``(name of the attention module, its block)`` for every EncoderBlock whose attention is
    an ``nn.MultiheadAttention`` (or a subclass: the adapter patches or refuses it), in module order."""
    return [
        (f"{name}.self_attention" if name else "self_attention", block)
        for name, block in model.named_modules()
        if isinstance(block, EncoderBlock) and isinstance(block.self_attention, nn.MultiheadAttention)
    ]


class TorchvisionViTAdapter(ClassSwapAdapter):
    """Adapter for torchvision's ``VisionTransformer`` (registered as ``"torchvision.vit"``)."""

    name = "torchvision.vit"
    masked = {nn.MultiheadAttention: MaskedMultiheadAttention}

    def candidates(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The ``self_attention`` of every ``EncoderBlock`` (other MHA modules are left alone)."""
        return [(name, block.self_attention) for name, block in _attention_modules(model)]

    def check(self, model: nn.Module) -> None:
        grids = _owned_blocks(model)
        orphans = [name for name, block in _attention_modules(model) if id(block) not in grids]
        if orphans:
            raise TypeError(
                f"attnmask: torchvision EncoderBlocks outside a VisionTransformer have no known patch grid "
                f"({orphans[0]}, ...): apply attnmask to the VisionTransformer that owns them"
            )

    def attach(self, model: nn.Module, sites: Sequence[Site]) -> None:
        grids = _owned_blocks(model)
        block_of = dict(_attention_modules(model))
        for site in sites:
            site.module._attnmask_grid = grids[id(block_of[site.name])]

    def prefix_tokens(self, model: nn.Module) -> int:
        """The class token."""
        return 1

    def grid(self, model: nn.Module) -> Optional[tuple[int, int]]:
        grids = _owned_blocks(model)
        return next(iter(grids.values()), None)

    def notes(self, model: nn.Module) -> list[str]:
        return [
            "torchvision's ViT accepts only its configured image size",
            "masked layers run all their heads through attnmask's kernel, outside nn.MultiheadAttention's "
            "fused eval path: their global heads match the unfused path exactly, the fused one to rounding",
        ]


ADAPTER = TorchvisionViTAdapter()
