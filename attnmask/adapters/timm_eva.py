"""timm adapter for EVA, EVA-02 and other models on ``timm.models.eva.EvaAttention``.

:class:`MaskedEvaAttention` repeats the host's forward (fused ``qkv`` or separate q/k/v
projections, q/k norms, rotary embeddings on the patch tokens only, the host's
``attn_mask``/``is_causal``, inner norm, gate and projection) and runs the attention through
the layer's kernel. The grid of each forward comes from the patch embedding through
:class:`~attnmask.adapters.timm_vit.TokenLayout`, so ``dynamic_img_size=True`` models work at
any input size. In training with patch dropout (``patch_drop_rate > 0``) each sample keeps a
random subset of patches: the indices the dropout kept are recorded by a forward hook on
``model.patch_drop`` and the mask is read at each kept patch's true grid position.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from timm.models.eva import EvaAttention
from torch import nn

from ..kernels import get_kernel
from ..masks import LocalMask, combine_masks
from ..spec import LayerPlan
from . import Site
from .timm_vit import TokenLayout


class KeptPatches:
    """Forward hook on ``patch_drop``: the patch indices kept by the latest forward.

    ``keep`` is ``(batch, kept)`` indices into the patch grid (row-major), or ``None`` when
    every patch was kept (eval mode, or no dropout).
    """

    def __init__(self) -> None:
        self.keep: Optional[torch.Tensor] = None

    def __call__(self, module: nn.Module, args, output) -> None:
        keep = output[1] if isinstance(output, tuple) and len(output) == 2 else None
        self.keep = keep if isinstance(keep, torch.Tensor) else None


def local_mask(plan: LayerPlan, tokens: TokenLayout, kept: Optional[KeptPatches], num_tokens: int) -> LocalMask:
    """The layer's mask for a sequence of ``num_tokens`` tokens.

    With patch dropout, the sequence holds the prefix tokens and each sample's kept patches;
    ``positions`` then maps every token to its index in the full layout.
    """
    prefix_tokens = tokens.prefix_tokens
    keep = kept.keep if kept is not None else None
    positions = None
    if keep is not None and keep.shape[-1] == num_tokens - prefix_tokens:
        grid = tokens.last_grid or tokens.static_grid
        prefix = torch.arange(prefix_tokens, device=keep.device).expand(keep.shape[0], -1)
        positions = torch.cat([prefix, keep + prefix_tokens], dim=1)
    else:
        grid = tokens.grid(num_tokens)
    return LocalMask(
        grid=grid,
        window=plan.window,
        prefix_tokens=prefix_tokens,
        num_heads=plan.num_heads,
        heads=plan.heads,
        prefix=plan.prefix,
        positions=positions,
    )


class MaskedEvaAttention(EvaAttention):
    """``EvaAttention`` whose chosen heads are local; rotary embeddings applied as before."""

    _attnmask_plan: LayerPlan
    _attnmask_tokens: TokenLayout
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

        mask = local_mask(plan, self._attnmask_tokens, self._attnmask_kept, N)
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


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if type(m) in (EvaAttention, MaskedEvaAttention)]


class TimmEvaAdapter:
    """Adapter for timm's EVA family (registered as ``"timm.eva"``)."""

    name = "timm.eva"

    def matches(self, model: nn.Module) -> bool:
        return bool(_attention_modules(model))

    def sites(self, model: nn.Module) -> list[Site]:
        patch_embed = getattr(model, "patch_embed", None)
        if not hasattr(patch_embed, "grid_size") or not hasattr(model, "num_prefix_tokens"):
            raise TypeError(
                f"attnmask: timm model {type(model).__name__} has EvaAttention layers but no patch grid "
                "(expected an Eva-like model with `patch_embed.grid_size` and `num_prefix_tokens`)"
            )
        return [
            Site(name=name, layer=i, num_heads=int(m.num_heads), module=m)
            for i, (name, m) in enumerate(_attention_modules(model))
        ]

    def install(self, model: nn.Module, sites: Sequence[Site], plans: Sequence[LayerPlan]) -> None:
        tokens = TokenLayout(model.patch_embed, int(model.num_prefix_tokens))
        if getattr(model, "dynamic_img_size", False):
            model.patch_embed.register_forward_hook(tokens)
        patch_drop = getattr(model, "patch_drop", None)
        kept = None
        if isinstance(patch_drop, nn.Module):
            kept = KeptPatches()
            patch_drop.register_forward_hook(kept)
        for site, plan in zip(sites, plans):
            module = site.module
            module.__class__ = MaskedEvaAttention
            module._attnmask_plan = plan
            module._attnmask_tokens = tokens
            module._attnmask_kept = kept

    def uninstall(self, model: nn.Module, names: Sequence[str]) -> None:
        for name in names:
            module = model.get_submodule(name)
            if isinstance(module, MaskedEvaAttention):
                module.__class__ = EvaAttention
                for attr in ("_attnmask_plan", "_attnmask_tokens", "_attnmask_kept"):
                    module.__dict__.pop(attr, None)
        hooked = ((getattr(model, "patch_embed", None), TokenLayout), (getattr(model, "patch_drop", None), KeptPatches))
        for owner, kind in hooked:
            if isinstance(owner, nn.Module):
                for key in [k for k, hook in owner._forward_hooks.items() if isinstance(hook, kind)]:
                    del owner._forward_hooks[key]

    def grid(self, model: nn.Module) -> Optional[tuple[int, int]]:
        for _, module in _attention_modules(model):
            if isinstance(module, MaskedEvaAttention):
                tokens = module._attnmask_tokens
                return tokens.last_grid or tokens.static_grid
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        return (int(grid[0]), int(grid[1])) if grid is not None else None


ADAPTER = TimmEvaAdapter()
