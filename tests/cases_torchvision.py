"""Family cases for torchvision's ViT and Swin (adapters ``torchvision.vit``, ``torchvision.swin``).

Tiny models built straight from torchvision's classes (no download). Rows compare the full
model's logits (``m(x)``), so ``torch.compile(model)`` compiles what the test runs; the heads
are re-initialised because torchvision zero-initialises the ViT head.
"""

from __future__ import annotations

import copy

import pytest
import torch
from families import FamilyCase, randomize_tokens, random_images, row_major, swin_reach
from helpers import brute_force_mask

import attnmask

torchvision = pytest.importorskip("torchvision")
from torchvision.models import swin_transformer as tv_swin  # noqa: E402
from torchvision.models.vision_transformer import VisionTransformer  # noqa: E402

NUM_CLASSES = 16
SWIN_WINDOW = 4
SWIN_PATCH = 4


def _random_head(head: torch.nn.Linear) -> None:
    """Random head weights (torchvision zero-initialises ViT's), so logits depend on the features."""
    with torch.no_grad():
        head.weight.normal_(std=0.5)
        head.bias.normal_(std=0.5)


def build_vit(seed: int) -> VisionTransformer:
    """A 2-layer, 4-head torchvision ViT on 40 x 40 images (5 x 5 patches of 8 px)."""
    torch.manual_seed(seed)
    model = VisionTransformer(
        image_size=40, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=NUM_CLASSES
    ).eval()
    randomize_tokens(model, ("class_token", "pos_embedding"))
    _random_head(model.heads.head)
    return model


def build_swin(seed: int, v2: bool = False) -> tv_swin.SwinTransformer:
    """A 2-stage torchvision Swin (V1 or V2): 4 px patches, 4 x 4 windows, 2 blocks per stage
    (the second one shifted), 4 heads in every layer."""
    torch.manual_seed(seed)
    extra = dict(block=tv_swin.SwinTransformerBlockV2, downsample_layer=tv_swin.PatchMergingV2) if v2 else {}
    model = tv_swin.SwinTransformer(
        patch_size=[SWIN_PATCH, SWIN_PATCH],
        embed_dim=16,
        depths=[2, 2],
        num_heads=[4, 4],
        window_size=[SWIN_WINDOW, SWIN_WINDOW],
        stochastic_depth_prob=0.0,
        num_classes=NUM_CLASSES,
        **extra,
    ).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                param.normal_(std=0.5)  # visible position biases (initialised at std 0.02)
    _random_head(model.head)
    return model


def host_class(module: torch.nn.Module) -> type:
    """The torchvision attention class a (possibly patched) Swin attention module came from."""
    if isinstance(module, tv_swin.ShiftedWindowAttentionV2):
        return tv_swin.ShiftedWindowAttentionV2
    return tv_swin.ShiftedWindowAttention


def swin_reference_check(model: torch.nn.Module, images: torch.Tensor) -> None:
    """Every masked Swin attention layer (hard mode), checked without ``attnmask.masks``.

    Its relative position bias must be the host's, untouched (the locality mask goes to the
    kernel), and its output must equal torchvision's own ``shifted_window_attention`` run in
    float64 with that bias set to ``-inf`` where the brute-force mask of :mod:`helpers`
    forbids attention (which also checks that shift, padding and V2's cosine attention and
    logit scale reach the kernel as torchvision computes them).
    """
    spec = attnmask.get_spec(model)
    assert spec.mode == "hard"
    masked = {name: heads for name, heads in zip(spec.layers, spec.heads) if heads}
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    def record(name: str):
        return lambda module, args, out: seen.update({name: (args[0], out)})

    handles = [model.get_submodule(name).register_forward_hook(record(name)) for name in masked]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    assert masked and set(seen) == set(masked)
    for name, heads in masked.items():
        module = model.get_submodule(name)
        cls = host_class(module)
        size = tuple(module.window_size)
        allowed = brute_force_mask(size, spec.window, 0, module.num_heads, heads)
        with torch.no_grad():
            host_bias = cls.get_relative_position_bias(module)
            assert torch.equal(module.get_relative_position_bias(), host_bias)
            module64 = copy.deepcopy(module).double()
            bias64 = cls.get_relative_position_bias(module64).masked_fill(~allowed, float("-inf"))
            x, y = seen[name]
            expected = tv_swin.shifted_window_attention(
                x.double(),
                module64.qkv.weight,
                module64.proj.weight,
                bias64,
                module64.window_size,
                module64.num_heads,
                shift_size=module64.shift_size,
                qkv_bias=module64.qkv.bias,
                proj_bias=module64.proj.bias,
                logit_scale=getattr(module64, "logit_scale", None),
                training=False,
            )
        torch.testing.assert_close(y, expected.to(y.dtype), rtol=1e-4, atol=1e-5)


def swin_case(id: str, v2: bool) -> FamilyCase:
    # 32 x 48 images: an 8 x 12 patch grid, 2 x 3 attention windows in stage 1; stage 2 is
    # 4 x 6, padded to 4 x 8. The other size (40 x 24, a 10 x 6 grid) needs padding in both.
    return FamilyCase(
        id=id,
        family="torchvision.swin",
        build=lambda seed: build_swin(seed, v2=v2),
        images=random_images((32, 48)),
        grid=(8, 12),
        patch=SWIN_PATCH,
        first_block=lambda m: m.features[1][0],
        block_tokens=lambda out: out.flatten(1, 2),
        token_of=row_major(0, 12),
        reach=swin_reach(SWIN_WINDOW),
        reference_check=swin_reference_check,
        other_images=random_images((40, 24)),
        other_grid=(SWIN_WINDOW, SWIN_WINDOW),  # describe() reports the attention window's grid
    )


CASES = [
    FamilyCase(
        id="torchvision-vit",
        family="torchvision.vit",
        build=build_vit,
        images=random_images((40, 40)),
        grid=(5, 5),
        patch=8,
        first_block=lambda m: m.encoder.layers[0],
        token_of=row_major(1, 5),
    ),
    swin_case("torchvision-swin", v2=False),
    swin_case("torchvision-swin-v2", v2=True),
]
