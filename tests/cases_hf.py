"""Family cases for Hugging Face transformers models (adapters ``hf.*``), tiny configs."""

from __future__ import annotations

import pytest
import torch
from families import FamilyCase, first_output, randomize_tokens, random_images, row_major, swin_reach, unit_layer_scale

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=40, patch_size=8)
TOKENS = ("cls_token", "position_embeddings", "distillation_token", "register_tokens", "mask_token", "class_embedding")


def first_layer(model):
    """The first transformer block: the first ``*Layer`` module of transformers (innermost stage)."""
    return next(
        m for _, m in model.named_modules() if type(m).__name__.endswith("Layer") and type(m).__module__.startswith("transformers.models")
    )


def builder(model_cls, config_cls, **config):
    def build(seed: int):
        torch.manual_seed(seed)
        model = model_cls(config_cls(**config)).eval()
        randomize_tokens(model, TOKENS)
        unit_layer_scale(model)
        return model

    return build


def interpolating(model, images):
    return first_output(model(images, interpolate_pos_encoding=True))


def mae_noise(batch: int, patches: int) -> torch.Tensor:
    """Fixed per-sample noise, so sample ``b``'s shuffle does not depend on the batch size."""
    return torch.stack([torch.rand(patches, generator=torch.Generator().manual_seed(7 + b)) for b in range(batch)])


def mae_forward(model, images):
    patches = (images.shape[-2] // 8) * (images.shape[-1] // 8)
    return first_output(model(images, noise=mae_noise(images.shape[0], patches), interpolate_pos_encoding=True))


def mae_token_of(width: int, patches: int):
    """Token of patch (row, col) of sample 0 after ViTMAE's shuffle (mask_ratio 0 keeps all)."""
    order = torch.argsort(mae_noise(1, patches)[0]).tolist()
    return lambda row, col: 1 + order.index(row * width + col)


def vit_like(id, family, model_cls, config_cls, prefix_tokens, **config):
    return FamilyCase(
        id=id,
        family=family,
        build=builder(model_cls, config_cls, **{**SMALL, **config}),
        images=random_images((40, 56)),
        grid=(5, 7),
        patch=8,
        first_block=first_layer,
        token_of=row_major(prefix_tokens, 7),
        forward=interpolating,
        other_images=random_images((48, 32)),
        other_grid=(6, 4),
        compile_in_default_run=id == "hf-vit",
    )


T = transformers
CASES = [
    vit_like("hf-vit", "hf.vit", T.ViTModel, T.ViTConfig, 1),
    vit_like("hf-deit", "hf.deit", T.DeiTModel, T.DeiTConfig, 2),
    vit_like("hf-beit", "hf.beit", T.BeitModel, T.BeitConfig, 1, use_relative_position_bias=True),
    vit_like("hf-dinov2", "hf.dinov2", T.Dinov2Model, T.Dinov2Config, 1),
    vit_like("hf-dinov2-reg", "hf.dinov2", T.Dinov2WithRegistersModel, T.Dinov2WithRegistersConfig, 5, num_register_tokens=4),
    vit_like("hf-clip", "hf.clip", T.CLIPVisionModel, T.CLIPVisionConfig, 1),
    vit_like("hf-siglip", "hf.siglip", T.SiglipVisionModel, T.SiglipVisionConfig, 0),
    # No family adapter of their own: I-JEPA through the structural transformers adapter,
    # Data2VecVision (its own SDPA call) through the structural adapter.
    vit_like("hf-ijepa", "hf", T.IJepaModel, T.IJepaConfig, 0),
    vit_like("hf-data2vec-vision", "generic", T.Data2VecVisionModel, T.Data2VecVisionConfig, 1, use_relative_position_bias=True),
    FamilyCase(
        id="hf-vit-mae",
        family="hf.vit_mae",
        build=builder(T.ViTMAEModel, T.ViTMAEConfig, **SMALL, mask_ratio=0.0),
        images=random_images((40, 56)),
        grid=(5, 7),
        patch=8,
        first_block=first_layer,
        token_of=mae_token_of(7, 35),
        forward=mae_forward,
        other_images=random_images((48, 32)),
        other_grid=(6, 4),
    ),
    FamilyCase(
        id="hf-swin",
        family="hf.swin",
        build=builder(
            T.SwinModel, T.SwinConfig, image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4
        ),
        images=random_images((32, 48)),
        grid=(16, 24),
        patch=2,
        first_block=first_layer,
        token_of=row_major(0, 24),
        reach=swin_reach(4),
        other_images=random_images((40, 32)),
        other_grid=(4, 4),
    ),
]
