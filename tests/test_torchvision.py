"""torchvision-specific checks (the generic properties run in ``test_families.py``).

ViT: the masked ``nn.MultiheadAttention`` refuses calls it cannot mask, and its global heads
are bit-for-bit those of ``nn.MultiheadAttention``'s unfused path (the fused fast path that
an unpatched eval model takes differs from it by rounding). Swin: shifted windows, feature
maps smaller than the window, V2's cosine attention and continuous position bias, an
attention computed from scratch in float64 (hard and soft), and every backend through the
kernel seam.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from cases_torchvision import SWIN_WINDOW, build_swin, build_vit, host_class
from helpers import brute_force_mask

import attnmask
from attnmask.kernels import BACKENDS

torchvision = pytest.importorskip("torchvision")
from torchvision.models import swin_transformer as tv_swin  # noqa: E402
from torchvision.models.vision_transformer import VisionTransformer  # noqa: E402

from attnmask.adapters import find_adapter, torchvision_swin, torchvision_vit  # noqa: E402

BUILDERS = {
    "vit": build_vit,
    "swin": lambda seed: build_swin(seed, v2=False),
    "swin_v2": lambda seed: build_swin(seed, v2=True),
}
IMAGES = {"vit": (40, 40), "swin": (32, 48), "swin_v2": (32, 48)}


def images_of(kind: str, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *IMAGES[kind], generator=torch.Generator().manual_seed(1))


def run(model, images):
    with torch.no_grad():
        return model(images)


# ViT --------------------------------------------------------------------------------------


def vit_head_outputs(mha: torch.nn.MultiheadAttention, x: torch.Tensor, *, fast_path: bool = True) -> torch.Tensor:
    """Per-head outputs ``(B, N, heads, head_dim)`` of an MHA whose ``out_proj`` is the identity."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(fast_path)
    try:
        with torch.no_grad():
            out = mha(x, x, x, need_weights=False)[0]
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)
    return out.reshape(*x.shape[:2], mha.num_heads, -1)


def identity_out_proj(model: VisionTransformer) -> VisionTransformer:
    with torch.no_grad():
        for block in model.encoder.layers:
            block.self_attention.out_proj.weight.copy_(torch.eye(block.self_attention.embed_dim))
            block.self_attention.out_proj.bias.zero_()
    return model


@pytest.mark.parametrize("heads", [[1, 3], [0, 1, 2], [2]])
def test_vit_global_heads_bit_for_bit_with_the_unfused_path(heads):
    model = identity_out_proj(build_vit(0))
    x = torch.randn(2, 26, 32, generator=torch.Generator().manual_seed(2))
    mha = model.encoder.layers[0].self_attention
    unfused = vit_head_outputs(mha, x, fast_path=False)
    fused = vit_head_outputs(mha, x)  # what an unpatched eval model runs
    patched = attnmask.apply(copy.deepcopy(model), heads={0: heads}, window=3)
    got = vit_head_outputs(patched.encoder.layers[0].self_attention, x)
    for h in range(4):
        if h in heads:
            assert not torch.allclose(got[:, :, h], unfused[:, :, h], atol=1e-4)
        else:
            assert torch.equal(got[:, :, h], unfused[:, :, h])
            # The fused kernel rounds differently: equal up to float32 rounding only.
            torch.testing.assert_close(got[:, :, h], fused[:, :, h], rtol=0, atol=1e-6)


def self_attention(m, x):
    return m(x, x, x, need_weights=False)


NO_MASK = torch.zeros(26, 26, dtype=torch.bool)
MISUSE = {
    "need_weights": (lambda m, x: m(x, x, x), "need_weights=True"),
    "cross": (lambda m, x: m(x, x.clone(), x.clone(), need_weights=False), "self-attention"),
    "padding": (lambda m, x: m(x, x, x, need_weights=False, key_padding_mask=NO_MASK[:2]), "key_padding_mask"),
    "attn_mask": (lambda m, x: m(x, x, x, need_weights=False, attn_mask=NO_MASK), "attn_mask"),
    "causal": (lambda m, x: m(x, x, x, need_weights=False, is_causal=True, attn_mask=NO_MASK), "is_causal"),
    "tokens": (lambda m, x: self_attention(m, x[:, :20].contiguous()), "20 tokens"),
}


@pytest.mark.parametrize("misuse", sorted(MISUSE))
def test_vit_masked_attention_refuses_calls_it_cannot_mask(misuse):
    call, fragment = MISUSE[misuse]
    model = attnmask.apply(build_vit(0), heads=2, window=3)
    with pytest.raises(ValueError, match=fragment):
        call(model.encoder.layers[0].self_attention, torch.randn(2, 26, 32))


@pytest.mark.parametrize("prefix", ["global", "isolated"])
def test_vit_sdpa_matches_float64_reference(prefix):
    model = build_vit(0).double()
    images = images_of("vit").double()
    sdpa = attnmask.apply(copy.deepcopy(model), heads=[0, 2], window=(3, 5), prefix=prefix, backend="sdpa")
    reference = attnmask.apply(copy.deepcopy(model), heads=[0, 2], window=(3, 5), prefix=prefix, backend="reference")
    torch.testing.assert_close(run(sdpa, images), run(reference, images), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(run(sdpa, images), run(model, images), atol=1e-6)


def test_vit_covering_window_falls_back_to_the_parent_exactly():
    model = build_vit(0)
    mha = model.encoder.layers[0].self_attention
    x = torch.randn(2, 26, 32)
    with torch.no_grad():
        expected = mha(x, x, x)  # need_weights=True, the parent's default
    attnmask.apply(model, heads="all", window=9)
    with torch.no_grad():
        got = mha(x, x, x)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_vit_encoder_alone_is_refused_and_left_untouched():
    encoder = build_vit(0).encoder
    classes = [type(m) for m in encoder.modules()]
    with pytest.raises(TypeError, match="outside a VisionTransformer"):
        attnmask.apply(encoder, heads=2, window=3)
    assert [type(m) for m in encoder.modules()] == classes and not attnmask.is_patched(encoder)


def test_vit_attention_dropout_in_training():
    torch.manual_seed(0)
    model = build_vit(0)
    for block in model.encoder.layers:
        block.self_attention.dropout = 0.5
    attnmask.apply(model, heads=2, window=3).train()
    images = images_of("vit")
    first, second = model(images), model(images)
    assert torch.isfinite(first).all() and not torch.equal(first, second)


def test_vit_inside_a_wrapper_model():
    wrapper = torch.nn.Sequential(build_vit(0))
    images = images_of("vit")
    expected = run(attnmask.apply(build_vit(0), heads=[1], window=3), images)
    attnmask.apply(wrapper, heads=[1], window=3)
    assert attnmask.describe(wrapper).grid == (5, 5)
    assert torch.equal(run(wrapper, images), expected)


# Swin -------------------------------------------------------------------------------------


def identity_proj(attn: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        attn.proj.weight.copy_(torch.eye(attn.proj.in_features))
        attn.proj.bias.zero_()
    return attn


def swin_output(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return attn(x)


def changes_at(attn, x, query, cell) -> bool:
    """Whether adding 1 to the input token at ``cell`` changes the output token at ``query``."""
    moved = x.clone()
    moved[:, cell[0], cell[1]] += 1.0
    return not torch.equal(swin_output(attn, moved)[:, query[0], query[1]], swin_output(attn, x)[:, query[0], query[1]])


def shifted_reach(query, cell, shift: int, window: int, size) -> bool:
    """Same shifted attention window (in rolled coordinates) and within the 3 x 3 neighbourhood."""
    rq = ((query[0] - shift) % size[0], (query[1] - shift) % size[1])
    rc = ((cell[0] - shift) % size[0], (cell[1] - shift) % size[1])
    same = rq[0] // SWIN_WINDOW == rc[0] // SWIN_WINDOW and rq[1] // SWIN_WINDOW == rc[1] // SWIN_WINDOW
    return same and abs(rq[0] - rc[0]) <= window // 2 and abs(rq[1] - rc[1]) <= window // 2


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_swin_shifted_block_is_local_inside_its_shifted_window(v2):
    model = attnmask.apply(build_swin(0, v2), heads="all", window=3)
    attn = model.features[1][1].attn
    assert attn.shift_size == [2, 2]
    x = torch.randn(1, 8, 12, 16, generator=torch.Generator().manual_seed(3))
    # Query (4, 6) sits in the shifted window of image rows 2-5 and columns 6-9.
    query = (4, 6)
    for row in range(8):
        for col in range(12):
            if (row, col) != query:
                reach = shifted_reach(query, (row, col), 2, 3, (8, 12))
                assert changes_at(attn, x, query, (row, col)) == reach, (row, col)
    attnmask.remove(model)
    assert changes_at(attn, x, query, (4, 8))  # same shifted window, outside the 3 x 3 neighbourhood
    assert not changes_at(attn, x, query, (4, 5))  # next to it in the image, another shifted window


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("block", [0, 1], ids=["plain", "shifted"])
def test_swin_feature_map_smaller_than_the_window(v2, block):
    """torchvision pads a 2 x 3 map to one 4 x 4 window (and drops the shift): same geometry."""
    model = attnmask.apply(build_swin(0, v2), heads="all", window=3)
    attn = model.features[3][block].attn
    x = torch.randn(1, 2, 3, 32, generator=torch.Generator().manual_seed(4))
    assert attn.get_relative_position_bias().shape == (1, 4, 16, 16)
    assert changes_at(attn, x, (0, 0), (1, 1)) and not changes_at(attn, x, (0, 0), (0, 2))
    assert changes_at(attn, x, (1, 2), (0, 1)) and not changes_at(attn, x, (1, 2), (1, 0))
    attnmask.remove(model)
    assert changes_at(attn, x, (0, 0), (0, 2))


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("heads", [[1, 3], [0], [0, 1, 2]])
def test_swin_global_heads_match_torchvision(v2, heads):
    """Global heads go through SDPA with the host's bias + shift mask; torchvision's attention
    is explicit, so they agree up to float32 rounding (not bit for bit). Masked heads differ."""
    model = build_swin(0, v2)
    attn = identity_proj(model.features[1][1].attn)
    x = torch.randn(2, 8, 12, 16, generator=torch.Generator().manual_seed(5))
    expected = swin_output(attn, x).unflatten(-1, (4, 4))
    attnmask.apply(model, heads={1: heads}, window=3)
    got = swin_output(attn, x).unflatten(-1, (4, 4))
    for h in range(4):
        if h in heads:
            assert not torch.allclose(got[..., h, :], expected[..., h, :], atol=1e-4), h
        else:
            torch.testing.assert_close(got[..., h, :], expected[..., h, :], rtol=1e-5, atol=1e-6)
    attnmask.remove(model)
    assert torch.equal(swin_output(attn, x).unflatten(-1, (4, 4)), expected)


def window_attention_float64(attn: torch.nn.Module, x: torch.Tensor, allowed: torch.Tensor, mode: str = "hard") -> torch.Tensor:
    """Window attention written from scratch in float64 (no shift, no padding), with a mask:
    hard, ``-inf`` where not ``allowed``; soft (Eq. 2), the scaled logits are 0 there, before
    the position bias is added."""
    B, H, W, C = x.shape
    w, heads = attn.window_size[0], attn.num_heads
    v2 = isinstance(attn, tv_swin.ShiftedWindowAttentionV2)
    double = copy.deepcopy(attn).double()
    windows = x.double().view(B, H // w, w, W // w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, C)
    qkv_bias = double.qkv.bias.clone()
    if v2:
        qkv_bias[C : 2 * C] = 0  # Swin V2 has no key bias
    qkv = windows @ double.qkv.weight.T + qkv_bias
    q, k, v = qkv.reshape(-1, w * w, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    if v2:
        scale = double.logit_scale.clamp(max=math.log(100.0)).exp()
        logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * scale
    else:
        logits = q @ k.transpose(-2, -1) * (C // heads) ** -0.5
    if mode == "soft":
        logits = logits * allowed
    logits = logits + host_class(attn).get_relative_position_bias(double)
    if mode == "hard":
        logits = logits.masked_fill(~allowed, float("-inf"))
    out = logits.softmax(-1) @ v
    out = out.transpose(1, 2).reshape(-1, w * w, C) @ double.proj.weight.T + double.proj.bias
    return out.view(B, H // w, W // w, w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_swin_first_block_matches_attention_from_scratch(v2, mode):
    model = build_swin(0, v2)
    attn = model.features[1][0].attn
    with torch.no_grad():  # logits of order 1 (at init V1's q k^T * scale is ~0: soft changes little)
        attn.qkv.weight.normal_(std=0.3)
    attnmask.apply(model, heads=[0, 2], window=(3, 1), mode=mode)
    x = torch.randn(2, 8, 12, 16, generator=torch.Generator().manual_seed(6))
    allowed = brute_force_mask((SWIN_WINDOW, SWIN_WINDOW), (3, 1), 0, 4, [0, 2])
    expected = window_attention_float64(attn, x, allowed, mode).float()
    torch.testing.assert_close(swin_output(attn, x), expected, rtol=1e-5, atol=1e-5)
    other = window_attention_float64(attn, x, allowed, "soft" if mode == "hard" else "hard").float()
    assert not torch.allclose(swin_output(attn, x), other, atol=1e-3)


def test_swin_v2_keeps_logit_scale_and_continuous_position_bias():
    model = attnmask.apply(build_swin(0, v2=True), heads=[0, 2], window=3).train()
    attn = model.features[1][0].attn
    # The bias is the host's, untouched: the locality mask goes to the kernel, not onto the bias.
    host = tv_swin.ShiftedWindowAttentionV2.get_relative_position_bias(attn)
    assert torch.equal(attn.get_relative_position_bias(), host)
    model(images_of("swin_v2")).square().mean().backward()
    assert attn.logit_scale.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in attn.cpb_mlp.parameters())
    x = torch.randn(1, 8, 12, 16)
    model.eval()
    before = swin_output(attn, x)
    with torch.no_grad():
        attn.logit_scale.add_(0.5)
    assert not torch.equal(swin_output(attn, x), before)


# Both families ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_parameters_buffers_and_state_dict_unchanged(kind):
    model = BUILDERS[kind](0)
    params = [(n, p) for n, p in model.named_parameters()]
    buffers = [n for n, _ in model.named_buffers()]
    keys = list(model.state_dict())
    attnmask.apply(model, heads="all", window=3)
    assert [(n, p) for n, p in model.named_parameters()] == params  # same tensors, same names
    assert [n for n, _ in model.named_buffers()] == buffers and list(model.state_dict()) == keys
    attnmask.remove(model)
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_pickle_round_trip(kind):
    model = attnmask.apply(BUILDERS[kind](0), heads=[1], window=3)
    images = images_of(kind)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(run(loaded, images), run(model, images))
    assert attnmask.get_spec(loaded) == attnmask.get_spec(model)


DESCRIBED = [
    ("vit", "torchvision.vit", (5, 5), "encoder.layers.encoder_layer_0.self_attention"),
    ("swin", "torchvision.swin", (4, 4), "features.1.0.attn"),
    ("swin_v2", "torchvision.swin", (4, 4), "features.1.0.attn"),
]


@pytest.mark.parametrize("kind, family, grid, first", DESCRIBED)
def test_adapter_matching_and_describe(kind, family, grid, first):
    model = BUILDERS[kind](0)
    assert find_adapter(model).name == family
    other = torchvision_swin.ADAPTER if family == "torchvision.vit" else torchvision_vit.ADAPTER
    assert not other.matches(model)
    report = attnmask.describe(model)
    assert report.family == family and report.grid == grid and report.notes
    assert len(report.layers) == (2 if kind == "vit" else 4) and report.layers[0].name == first


def test_models_without_torchvision_attention_are_refused():
    resnet = torchvision.models.resnet18()
    with pytest.raises(TypeError, match=r"ResNet: no attention layers found \(no module computes attention between tokens"):
        attnmask.apply(resnet, heads=1, window=3)


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_compile_fullgraph(kind):
    torch._dynamo.reset()
    model = attnmask.apply(BUILDERS[kind](0), heads=[0, 2], window=3)
    images = images_of(kind)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(run(compiled, images), run(model, images), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name, size", [("vit_b_16", 224), ("swin_t", 224), ("swin_v2_t", 256)])
def test_default_architectures_round_trip(name, size):
    """The real configurations (random weights): masking changes outputs, removing restores them."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    if name.startswith("vit"):
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-initialises it
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    expected = run(model, images)
    attnmask.apply(model, heads={0: "all"}, window=3)
    assert not torch.allclose(run(model, images), expected, atol=1e-5)
    attnmask.remove(model)
    assert torch.equal(run(model, images), expected)


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("kind", ["swin", "swin_v2"])
def test_swin_every_backend_and_mode_agrees_with_reference(kind, mode):
    """Swin's attention goes through attnmask's kernels: every backend and both modes are
    accepted, agree with the float64 reference backend, and the kernel is what describe() names."""
    model = BUILDERS[kind](0)
    images = images_of(kind)
    with torch.no_grad():  # logits of order 1 (at init V1's q k^T * scale is ~0: soft changes little)
        for name, param in model.named_parameters():
            if name.endswith("attn.qkv.weight"):
                param.normal_(std=0.3)
    expected = run(model, images)
    reference = run(attnmask.apply(model, heads=[0, 2], window=3, mode=mode, backend="reference"), images)
    assert attnmask.describe(model).resolved_backend == "reference"
    for backend in [b for b in BACKENDS if b != "reference"]:
        attnmask.apply(model, heads=[0, 2], window=3, mode=mode, backend=backend)
        report = attnmask.describe(model)
        assert report.backend == backend and report.mode == mode and report.resolved_backend in set(BACKENDS) - {"auto", "reference"}
        torch.testing.assert_close(run(model, images), reference, rtol=1e-4, atol=1e-5, msg=lambda m: f"{backend}: {m}")
    assert not torch.allclose(reference, expected, atol=1e-3)
    other = run(attnmask.apply(model, heads=[0, 2], window=3, mode="soft" if mode == "hard" else "hard"), images)
    assert not torch.allclose(other, reference, atol=1e-3), "soft and hard gave the same outputs"
    attnmask.remove(model)
    assert torch.equal(run(model, images), expected)
