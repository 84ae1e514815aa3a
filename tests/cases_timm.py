"""Family cases for timm's VisionTransformer family (adapter ``timm.vit``)."""

from __future__ import annotations

import pytest
from families import FamilyCase, randomize_tokens, random_images, row_major, unit_layer_scale

timm = pytest.importorskip("timm")

SMALL = dict(img_size=(40, 56), patch_size=8, embed_dim=32, depth=2, num_heads=4)


def _vit(name: str, **extra):
    def build(seed: int):
        import torch

        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False, **{**SMALL, **extra}).eval()
        randomize_tokens(model, ("cls_token", "reg_token", "dist_token", "pos_embed"))
        unit_layer_scale(model)
        return model

    return build


def vit_case(id: str, name: str, prefix_tokens: int, **extra) -> FamilyCase:
    return FamilyCase(
        id=id,
        family="timm.vit",
        build=_vit(name, **extra),
        images=random_images((40, 56)),
        grid=(5, 7),
        patch=8,
        first_block=lambda m: m.blocks[0],
        forward=lambda m, x: m.forward_features(x),
        token_of=row_major(prefix_tokens, 7),
        other_images=random_images((48, 32)) if extra.get("dynamic_img_size") else None,
        other_grid=(6, 4) if extra.get("dynamic_img_size") else None,
        compile_in_default_run=id == "timm-vit",
    )


CASES = [
    vit_case("timm-vit", "vit_tiny_patch16_224", 1),
    vit_case("timm-deit-distilled", "deit_tiny_distilled_patch16_224", 2),
    vit_case("timm-vit-reg4", "vit_small_patch14_reg4_dinov2", 5),
    vit_case("timm-siglip", "vit_base_patch16_siglip_224", 0),
    vit_case("timm-vit-dynamic", "vit_tiny_patch16_224", 1, dynamic_img_size=True),
]
