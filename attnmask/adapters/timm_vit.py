"""timm adapter for the VisionTransformer family built on ``timm.layers.Attention``.

Covers ViT, DeiT, DeiT-III, distilled DeiT (2 prefix tokens), register-token ViTs and
SigLIP-style ViTs without a class token, including ``dynamic_img_size=True`` models.

Patching swaps each chosen ``Attention`` instance's class to :class:`MaskedAttention`, a
module-level subclass (``module.__class__ = MaskedAttention``): parameters, buffers and the
state_dict stay as they were, and deepcopy, pickling and ``torch.compile`` keep working.
Undoing swaps the class back and deletes the two attributes the patch added.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from timm.layers import Attention
from torch import nn

from ..kernels import get_kernel
from ..masks import LocalMask, combine_masks
from ..spec import LayerPlan
from . import Site


class TokenLayout:
    """Where a ViT's tokens sit: prefix tokens first, then the patch grid of this forward.

    One instance per patched model, shared by its masked layers. The grid comes from the
    patch embedding: its configured ``grid_size``, or, for ``dynamic_img_size`` models, the
    ``(B, H, W, C)`` output of the latest forward, recorded by this object as a forward hook
    on ``patch_embed``. It is never guessed from the token count (which cannot tell 8 x 16
    from 16 x 8), only checked against it.
    """

    def __init__(self, patch_embed: nn.Module, prefix_tokens: int) -> None:
        self.patch_embed = patch_embed
        self.prefix_tokens = prefix_tokens
        self.last_grid: Optional[tuple[int, int]] = None

    def __call__(self, module: nn.Module, args, output) -> None:
        """Forward hook on ``patch_embed``: records the grid of a ``(B, H, W, C)`` output."""
        if isinstance(output, torch.Tensor) and output.dim() == 4:
            self.last_grid = (output.shape[1], output.shape[2])

    @property
    def static_grid(self) -> tuple[int, int]:
        """The grid of the model's configured image size."""
        grid = self.patch_embed.grid_size
        return int(grid[0]), int(grid[1])

    def grid(self, num_tokens: int) -> tuple[int, int]:
        """The patch grid for an input of ``num_tokens`` tokens.

        Raises:
            ValueError: If the token count fits neither the latest nor the configured grid.
        """
        patches = num_tokens - self.prefix_tokens
        last = self.last_grid
        if last is not None and last[0] * last[1] == patches:
            return last
        static = self.static_grid
        if static[0] * static[1] == patches:
            return static
        tried = f"{static[0]}x{static[1]}" + (f" or {last[0]}x{last[1]}" if last is not None else "")
        raise ValueError(
            f"attnmask: a sequence of {num_tokens} tokens does not fit the patch grid "
            f"({self.prefix_tokens} prefix tokens + a {tried} grid); feed images through the "
            "model's patch embedding so the grid of each input is known"
        )


class MaskedAttention(Attention):
    """``timm.layers.Attention`` whose chosen heads are local (see :mod:`attnmask.masks`).

    Computes q, k, v exactly as ``Attention`` does and hands them to the layer's kernel.
    """

    _attnmask_plan: LayerPlan
    _attnmask_tokens: TokenLayout

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

        mask = LocalMask(
            grid=tokens.grid(N),
            window=plan.window,
            prefix_tokens=tokens.prefix_tokens,
            num_heads=plan.num_heads,
            heads=plan.heads,
            prefix=plan.prefix,
        )
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


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if type(m) in (Attention, MaskedAttention)]


class TimmViTAdapter:
    """Adapter for timm's VisionTransformer family (registered as ``"timm.vit"``)."""

    name = "timm.vit"

    def matches(self, model: nn.Module) -> bool:
        return bool(_attention_modules(model))

    def sites(self, model: nn.Module) -> list[Site]:
        patch_embed = getattr(model, "patch_embed", None)
        if patch_embed is None or not hasattr(patch_embed, "grid_size") or not hasattr(model, "num_prefix_tokens"):
            raise TypeError(
                f"attnmask: timm model {type(model).__name__} has timm.layers.Attention layers but no "
                "patch grid (expected a VisionTransformer-like model with `patch_embed.grid_size` and "
                "`num_prefix_tokens`)"
            )
        return [
            Site(name=name, layer=i, num_heads=int(m.num_heads), module=m)
            for i, (name, m) in enumerate(_attention_modules(model))
        ]

    def install(self, model: nn.Module, sites: Sequence[Site], plans: Sequence[LayerPlan]) -> None:
        tokens = TokenLayout(model.patch_embed, int(model.num_prefix_tokens))
        if getattr(model, "dynamic_img_size", False):
            model.patch_embed.register_forward_hook(tokens)
        for site, plan in zip(sites, plans):
            module = site.module
            module.__class__ = MaskedAttention
            module._attnmask_plan = plan
            module._attnmask_tokens = tokens

    def uninstall(self, model: nn.Module, names: Sequence[str]) -> None:
        for name in names:
            module = model.get_submodule(name)
            if isinstance(module, MaskedAttention):
                module.__class__ = Attention
                for attr in ("_attnmask_plan", "_attnmask_tokens"):
                    module.__dict__.pop(attr, None)
        patch_embed = getattr(model, "patch_embed", None)
        if patch_embed is not None:
            for key in [k for k, hook in patch_embed._forward_hooks.items() if isinstance(hook, TokenLayout)]:
                del patch_embed._forward_hooks[key]

    def grid(self, model: nn.Module) -> Optional[tuple[int, int]]:
        for _, module in _attention_modules(model):
            if isinstance(module, MaskedAttention):
                tokens = module._attnmask_tokens
                return tokens.last_grid or tokens.static_grid
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        return (int(grid[0]), int(grid[1])) if grid is not None else None


ADAPTER = TimmViTAdapter()
