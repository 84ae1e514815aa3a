"""The MaiT models registered in timm (attnmask.models): sizes, masks, arguments, registry.

Parameter counts and GFLOPs are checked against the paper's table (docs/models.md) within 3%. GFLOPs are the
paper's: multiply-accumulates (fvcore's convention, DeiT-S 4.6) of one 224 px image.
``FlopCounterMode`` counts 2 FLOPs per MAC, and does not count CPU SDPA's fused kernel
(``_scaled_dot_product_flash_attention_for_cpu`` has no FLOP formula): the count runs
under SDPA's math backend, whose matmuls it sees. Masked heads are counted densely, as the
paper computes them.
"""

import importlib
import subprocess
import sys
import warnings

import pytest
import torch

timm = pytest.importorskip("timm")

import attnmask  # noqa: E402
import attnmask.models  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

NAMES = (
    "mait_xt_patch16_224",
    "mait_t_patch16_224",
    "mait_xs_patch16_224",
    "mait_s_patch16_224",
    "mait_s_ls_patch16_224",
)

# name: (width, heads, params in millions, GFLOPs) from the paper's table (docs/models.md)
PAPER = {
    "mait_xt_patch16_224": (144, 3, 6.3, 1.5),
    "mait_t_patch16_224": (192, 3, 11.0, 2.5),
    "mait_xs_patch16_224": (288, 3, 24.5, 5.3),
    "mait_s_patch16_224": (384, 6, 43.3, 9.1),
    "mait_s_ls_patch16_224": (384, 6, 43.3, 9.1),
}
TOLERANCE = 0.03
TOKENS = 197  # class token + 14 x 14 patches at 224 px
slow = pytest.mark.slow


def count_gflops(model: torch.nn.Module, img_size: int = 224) -> tuple[float, dict]:
    """Multiply-accumulates (in G) of one image, and FlopCounterMode's per-op FLOP counts."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model.eval()(torch.zeros(1, 3, img_size, img_size))
    counts = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops() / 2 / 1e9, counts


def parameters(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def assert_mait_schedule(model: torch.nn.Module, num_heads: int) -> None:
    report = attnmask.describe(model)
    assert report.window == (3, 3) and report.grid == (14, 14) and report.prefix == "global"
    assert len(report.layers) == 24
    expected = [tuple(range(num_heads))] * 8 + [(0,)] * 8 + [()] * 8
    assert [row.heads for row in report.layers] == expected
    assert [row.num_heads for row in report.layers] == [num_heads] * 24
    spec = attnmask.get_spec(model)
    assert spec.heads == tuple(expected) and spec.window == (3, 3) and spec.mode == "hard"


def test_every_model_is_registered_without_weights():
    assert timm.list_models("mait_*") == sorted(NAMES)
    assert not timm.list_models("mait_*", pretrained=True)
    for name in NAMES:
        cfg = timm.models.get_pretrained_cfg(name)
        assert not (cfg.url or cfg.hf_hub_id or cfg.file) and not cfg.has_weights
        assert cfg.input_size == (3, 224, 224) and cfg.num_classes == 1000


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("mait_xt_patch16_224", marks=slow),
        pytest.param("mait_t_patch16_224", marks=slow),
        pytest.param("mait_xs_patch16_224", marks=slow),
        "mait_s_patch16_224",
        pytest.param("mait_s_ls_patch16_224", marks=slow),
    ],
)
def test_parameters_and_masks_match_the_paper(name):
    width, heads, params, _ = PAPER[name]
    model = timm.create_model(name)
    assert isinstance(model, timm.models.VisionTransformer)
    assert model.embed_dim == width and len(model.blocks) == 24 and model.num_classes == 1000
    assert model.patch_embed.patch_size == (16, 16) and model.cls_token is not None
    assert model.blocks[0].mlp.fc1.out_features == 4 * width
    assert parameters(model) == pytest.approx(params, rel=TOLERANCE)
    assert_mait_schedule(model, heads)
    if "_ls_" in name:
        gamma = model.blocks[0].ls1.gamma
        assert torch.equal(gamma, torch.full_like(gamma, 1e-5))
    else:
        assert isinstance(model.blocks[0].ls1, torch.nn.Identity)


@pytest.mark.parametrize(
    "name",
    [
        "mait_xt_patch16_224",
        pytest.param("mait_t_patch16_224", marks=slow),
        pytest.param("mait_xs_patch16_224", marks=slow),
        pytest.param("mait_s_patch16_224", marks=slow),
        pytest.param("mait_s_ls_patch16_224", marks=slow),
    ],
)
def test_gflops_match_the_paper(name):
    width, _, _, gflops = PAPER[name]
    measured, counts = count_gflops(timm.create_model(name))
    # the attention matmuls (q k^T and attn v: 2 N^2 d MACs a layer) are counted, densely
    assert counts["aten.bmm"] == 2 * (2 * TOKENS * TOKENS * width * 24)
    assert measured == pytest.approx(gflops, rel=TOLERANCE)


def test_forward_and_keyword_arguments():
    model = timm.create_model("mait_xt_patch16_224", num_classes=10, img_size=112, drop_path_rate=0.1)
    assert model.num_classes == 10 and model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert attnmask.describe(model).grid == (7, 7)
    with torch.no_grad():
        out = model.eval()(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_mask_arguments():
    # depth=3 (a VisionTransformer argument) keeps these builds cheap
    model = timm.create_model("mait_xt_patch16_224", depth=3, img_size=64, mask_heads="one-head", mask_window=5)
    spec = attnmask.get_spec(model)
    assert spec.window == (5, 5) and spec.heads == ((0,),) * 3
    default = attnmask.get_spec(timm.create_model("mait_xt_patch16_224", depth=3, img_size=64))
    assert default.heads == ((0, 1, 2), (0,), ())  # the "mait" schedule by thirds of any depth
    with pytest.raises(ValueError, match="window"):
        timm.create_model("mait_xt_patch16_224", depth=3, img_size=64, mask_window=4)


def test_pretrained_raises():
    with pytest.raises(ValueError, match=r"pretrained=True .*no pretrained MaiT weights exist"):
        timm.create_model("mait_t_patch16_224", pretrained=True)


def test_features_only_raises():
    with pytest.raises(ValueError, match="features_only=True"):
        timm.create_model("mait_xt_patch16_224", depth=3, img_size=64, features_only=True)


def test_remove_gives_a_plain_timm_vit(tmp_path):
    model = timm.create_model("mait_xt_patch16_224", depth=3, img_size=64)
    plain = timm.models.VisionTransformer(img_size=64, patch_size=16, embed_dim=144, depth=3, num_heads=3)
    plain.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        masked = model.eval()(images)
        attnmask.remove(model)
        assert not attnmask.is_patched(model)
        for module in model.modules():
            assert not any(key.startswith("_attnmask") for key in module.__dict__)
        attention = [m for m in model.modules() if "Attention" in type(m).__name__]
        assert len(attention) == 3 and {type(m) for m in attention} == {timm.layers.Attention}
        torch.testing.assert_close(model(images), plain.eval()(images), rtol=0, atol=0)
        assert not torch.allclose(masked, plain(images))
    # a checkpoint of a MaiT model is a plain ViT checkpoint: timm's checkpoint_path loads it
    torch.save(plain.state_dict(), tmp_path / "mait.pth")
    loaded = timm.create_model("mait_xt_patch16_224", depth=3, img_size=64, checkpoint_path=str(tmp_path / "mait.pth"))
    assert attnmask.is_patched(loaded)
    for key, value in plain.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_reimport_registers_quietly():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.reload(attnmask.models)
    assert timm.list_models("mait_*") == sorted(NAMES)
    assert timm.models.model_entrypoint("mait_xt_patch16_224") is attnmask.models.mait_xt_patch16_224


def test_import_attnmask_does_not_import_the_models():
    code = "import sys, attnmask; print('attnmask.models' in sys.modules, 'timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
