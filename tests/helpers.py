"""Shared test helpers: a brute-force mask definition and tiny timm models."""

from __future__ import annotations

import copy

import torch


def allowed(q: int, kv: int, grid, window, prefix_tokens: int, prefix: str = "global") -> bool:
    """The locality mask written out from its definition, on plain Python ints."""
    if q < prefix_tokens:
        return True
    if kv < prefix_tokens:
        return prefix == "global"
    width = grid[1]
    q_row, q_col = divmod(q - prefix_tokens, width)
    kv_row, kv_col = divmod(kv - prefix_tokens, width)
    return abs(q_row - kv_row) <= window[0] // 2 and abs(q_col - kv_col) <= window[1] // 2


def brute_force_mask(grid, window, prefix_tokens, num_heads, heads, prefix="global") -> torch.Tensor:
    """``(num_heads, N, N)`` boolean mask from :func:`allowed`; unmasked heads all True."""
    n = prefix_tokens + grid[0] * grid[1]
    out = torch.ones(num_heads, n, n, dtype=torch.bool)
    for h in heads:
        for q in range(n):
            for kv in range(n):
                out[h, q, kv] = allowed(q, kv, grid, window, prefix_tokens, prefix)
    return out


def naive_attention(q, k, v, allowed_mask, scale=None):
    """Float64 softmax attention from scratch, for checking the kernels."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * scale
    logits = logits.masked_fill(~allowed_mask, float("-inf"))
    weights = torch.exp(logits - logits.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    return torch.einsum("bhqk,bhkd->bhqd", weights, v.double())


# Tiny configurations of the timm families the adapter supports: (model name, overrides,
# prefix tokens). Non-square grids on purpose (5 x 7 patches of 8 px).
SMALL = dict(img_size=(40, 56), patch_size=8, embed_dim=32, depth=2, num_heads=4)
TIMM_FAMILIES = {
    "vit": ("vit_tiny_patch16_224", {}, 1),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}, 2),
    "deit3": ("deit3_small_patch16_224", {}, 1),
    "vit_reg4": ("vit_small_patch14_reg4_dinov2", {}, 5),
    "siglip": ("vit_base_patch16_siglip_224", {}, 0),
    "vit_dynamic": ("vit_tiny_patch16_224", {"dynamic_img_size": True}, 1),
}


def make_timm(family: str, seed: int = 0, **extra):
    """A tiny, randomly initialised timm model of ``family`` in eval mode (no download)."""
    import timm

    name, overrides, _ = TIMM_FAMILIES[family]
    torch.manual_seed(seed)
    kwargs = {**SMALL, **overrides, **extra}
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    # Non-trivial class/register tokens and position embeddings (some init to zeros).
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in ("cls_token", "reg_token", "dist_token", "pos_embed"):
                param.normal_(std=0.5)
    return model


def images_for(family: str, batch: int = 2, seed: int = 1) -> torch.Tensor:
    """Random images for a tiny model: a different, non-square size for dynamic models."""
    generator = torch.Generator().manual_seed(seed)
    size = (48, 32) if family == "vit_dynamic" else (40, 56)
    return torch.randn(batch, 3, *size, generator=generator)


def grid_of(family: str) -> tuple[int, int]:
    size = (48, 32) if family == "vit_dynamic" else (40, 56)
    return size[0] // 8, size[1] // 8


def snapshot(model: torch.nn.Module) -> dict:
    """Everything that patching could touch: tensors, classes, attributes, hooks."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "classes": [(n, type(m)) for n, m in model.named_modules()],
        "attrs": [(n, sorted(m.__dict__)) for n, m in model.named_modules()],
        "hooks": [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()],
    }


def same_snapshot(a: dict, b: dict) -> bool:
    return (
        a["state"].keys() == b["state"].keys()
        and all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
        and a["classes"] == b["classes"]
        and a["attrs"] == b["attrs"]
        and a["hooks"] == b["hooks"]
    )


def clone(model):
    return copy.deepcopy(model)
