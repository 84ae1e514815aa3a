"""Family cases for timm's CaiT, Swin, SwinV2, BEiT and EVA adapters.

CaiT computes its masked attention itself (talking heads), so its row carries a
``reference_check``: the patched attention modules' outputs against a float64 computation
written here from the modules' weights, with the locality mask taken from
``helpers.brute_force_mask`` (independent of ``attnmask.masks``). Swin and SwinV2 run their
attention through attnmask's kernels (position bias and shift mask as the host mask); their
rows carry the same kind of check too, since what the adapter hands the kernel (SwinV2's
cosine attention as ``normalize(q) * logit_scale``, the bias, the shift mask) is its own code.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from families import FamilyCase, randomize_tokens, random_images, row_major, swin_reach, unit_layer_scale
from helpers import brute_force_mask

import attnmask

timm = pytest.importorskip("timm")

SWIN = dict(img_size=(32, 48), embed_dim=16, depths=(2, 2), num_heads=(4, 8), window_size=4, strict_img_size=False)
"""Two stages of two blocks (the second block of each stage is shifted); 4 x 4 attention windows
on an 8 x 12 patch grid (patch 4), then 4 x 6."""

VIT_LIKE = dict(img_size=(40, 56), patch_size=8, embed_dim=32, depth=2, num_heads=4)


def build_timm(name: str, tokens: tuple[str, ...] = (), **overrides):
    """``seed -> model``: a tiny timm model whose blocks visibly change their inputs."""

    def build(seed: int):
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False, **overrides).eval()
        randomize_tokens(model, tokens)
        unit_layer_scale(model)
        if name.startswith("swinv2"):
            # SwinV2 starts its residual post-norms at 0 (blocks are no-ops at init). 0.25, not 1:
            # at 1 the eager/compiled float32 noise of the unpatched host already reaches 1e-5.
            with torch.no_grad():
                for layer in model.layers:
                    for block in layer.blocks:
                        block.norm1.weight.fill_(0.25)
                        block.norm2.weight.fill_(0.25)
        return model

    return build


# ----------------------------------------------------------------------------------------
# Float64 references of the attention the explicit adapters compute themselves.


def attention_calls(model, modules, images) -> list[tuple[torch.Tensor, dict, torch.Tensor]]:
    """``(input, kwargs, output)`` of each module in ``modules`` during one forward."""
    seen: dict[int, tuple] = {}

    def record(index: int):
        def hook(module, args, kwargs, out) -> None:
            seen.setdefault(index, (args[0], dict(kwargs), out))

        return hook

    handles = [module.register_forward_hook(record(i), with_kwargs=True) for i, module in enumerate(modules)]
    try:
        with torch.no_grad():
            model.forward_features(images)
    finally:
        for handle in handles:
            handle.remove()
    return [seen[i] for i in range(len(modules))]


def linear64(layer: torch.nn.Linear, x: torch.Tensor, bias=None) -> torch.Tensor:
    bias = layer.bias if bias is None else bias
    return F.linear(x.double(), layer.weight.double(), None if bias is None else bias.double())


def softmax_attend(logits, bias, v, allowed, shift_mask=None, mode="hard"):
    """Windowed softmax attention: scaled ``logits (B*nW, H, N, N)``, position ``bias (H, N, N)``,
    host shift mask ``(nW, N, N)``. Hard: ``-inf`` where not ``allowed``; soft (Eq. 2): the
    logits (not the bias, not the shift mask) are 0 there."""
    if mode == "soft":
        logits = logits * allowed
    logits = logits + bias
    if shift_mask is not None:
        num_win = shift_mask.shape[0]
        windows = logits.view(-1, num_win, *logits.shape[1:]) + shift_mask.double()[None, :, None]
        logits = windows.view(-1, *logits.shape[1:])
    if mode == "hard":
        logits = logits.masked_fill(~allowed, float("-inf"))
    return logits.softmax(dim=-1) @ v


def swin_v1_attention64(attn, x, shift_mask, allowed, mode="hard"):
    B_, N, _ = x.shape
    q, k, v = linear64(attn.qkv, x).reshape(B_, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    bias = attn.relative_position_bias_table.double()[attn.relative_position_index.view(-1)]
    bias = bias.view(N, N, -1).permute(2, 0, 1)
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    out = softmax_attend(logits, bias, v, allowed, shift_mask, mode)
    return linear64(attn.proj, out.transpose(1, 2).reshape(B_, N, -1))


def swin_v2_attention64(attn, x, shift_mask, allowed, mode="hard"):
    B_, N, _ = x.shape
    bias = None
    if attn.q_bias is not None:
        bias = torch.cat((attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias))
    q, k, v = linear64(attn.qkv, x, bias).reshape(B_, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    scale = attn.logit_scale.double().clamp(max=math.log(100.0)).exp()
    logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * scale
    hidden = F.relu(linear64(attn.cpb_mlp[0], attn.relative_coords_table))
    table = linear64(attn.cpb_mlp[2], hidden).view(-1, attn.num_heads)
    position_bias = table[attn.relative_position_index.view(-1)].view(N, N, -1).permute(2, 0, 1)
    out = softmax_attend(logits, 16 * torch.sigmoid(position_bias), v, allowed, shift_mask, mode)
    return linear64(attn.proj, out.transpose(1, 2).reshape(B_, N, -1))


def check_swin(model, images, attention64, layers: int = 2) -> None:
    """The first ``layers`` window attentions (unshifted, then shifted) against float64, in the
    model's mask mode."""
    spec = attnmask.get_spec(model)
    modules = [model.get_submodule(name) for name in spec.layers[:layers]]
    for layer, (module, (x, kwargs, out)) in enumerate(zip(modules, attention_calls(model, modules, images))):
        grid = tuple(module.window_size)
        allowed = brute_force_mask(grid, spec.window, 0, module.num_heads, spec.heads[layer])
        expected = attention64(module, x, kwargs.get("mask"), allowed, spec.mode)
        torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
        if spec.heads[layer]:
            unmasked = attention64(module, x, kwargs.get("mask"), torch.ones_like(allowed))
            assert not torch.allclose(out.double(), unmasked, atol=1e-4), f"layer {layer} is not masked"


def cait_attention64(attn, x, allowed):
    B, N, C = x.shape
    q, k, v = linear64(attn.qkv, x).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    logits = linear64(attn.proj_l, logits.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    weights = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    weights = linear64(attn.proj_w, weights.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return linear64(attn.proj, (weights @ v).transpose(1, 2).reshape(B, N, C))


def check_cait(model, images) -> None:
    spec = attnmask.get_spec(model)
    module = model.get_submodule(spec.layers[0])
    (x, _, out), = attention_calls(model, [module], images)
    grid = tuple(model.patch_embed.grid_size)
    allowed = brute_force_mask(grid, spec.window, 0, module.num_heads, spec.heads[0])
    torch.testing.assert_close(out.double(), cait_attention64(module, x, allowed), rtol=1e-4, atol=1e-5)
    unmasked = cait_attention64(module, x, torch.ones_like(allowed))
    assert not torch.allclose(out.double(), unmasked, atol=1e-4)


# ----------------------------------------------------------------------------------------
# Rows.


def swin_case(id: str, name: str, attention64) -> FamilyCase:
    return FamilyCase(
        id=id,
        family="timm.swin",
        build=build_timm(name, **SWIN),
        images=random_images((32, 48)),
        grid=(8, 12),
        patch=4,
        first_block=lambda m: m.layers[0].blocks[0],
        block_tokens=lambda out: out.flatten(1, 2),
        token_of=row_major(0, 12),
        reach=swin_reach(4),
        forward=lambda m, x: m.forward_features(x),
        reference_check=lambda m, x: check_swin(m, x, attention64),
        # 40 x 32 pixels: 10 x 8 patches, padded to whole windows; the mask's grid stays the window.
        other_images=random_images((40, 32)),
        other_grid=(4, 4),
    )


def vit_like_case(id: str, family: str, name: str, prefix_tokens: int, dynamic: bool = False, **extra) -> FamilyCase:
    if dynamic:
        extra["dynamic_img_size"] = True
    return FamilyCase(
        id=id,
        family=family,
        build=build_timm(name, ("cls_token", "reg_token", "pos_embed"), **VIT_LIKE, **extra),
        images=random_images((40, 56)),
        grid=(5, 7),
        patch=8,
        first_block=lambda m: m.blocks[0],
        forward=lambda m, x: m.forward_features(x),
        token_of=row_major(prefix_tokens, 7),
        other_images=random_images((48, 32)) if dynamic else None,
        other_grid=(6, 4) if dynamic else None,
    )


CASES = [
    FamilyCase(
        id="timm-cait",
        family="timm.cait",
        build=build_timm("cait_xxs24_224", ("cls_token", "pos_embed"), **{**VIT_LIKE, "img_size": (32, 48)}),
        images=random_images((32, 48)),
        grid=(4, 6),
        patch=8,
        first_block=lambda m: m.blocks[0],
        # The self-attention blocks see the patch tokens only (the class token comes later).
        token_of=row_major(0, 6),
        forward=lambda m, x: m.forward_features(x),
        kernel_backed=False,
        reference_check=check_cait,
    ),
    swin_case("timm-swin", "swin_tiny_patch4_window7_224", swin_v1_attention64),
    swin_case("timm-swinv2", "swinv2_tiny_window8_256", swin_v2_attention64),
    vit_like_case("timm-beit", "timm.beit", "beit_base_patch16_224", 1),
    vit_like_case("timm-eva02-rope", "timm.eva", "eva02_tiny_patch14_224", 1, dynamic=True),
    vit_like_case("timm-eva", "timm.eva", "eva_giant_patch14_224", 1, mlp_ratio=4.0),
    vit_like_case("timm-eva-dinov3-reg4", "timm.eva", "vit_small_patch16_dinov3", 5),
    # No family adapter claims ROPE-ViT's AttentionRope: the structural adapter patches it.
    vit_like_case("timm-generic-vit-rope", "generic", "vit_small_patch16_rope_224", 1, dynamic=True),
]
