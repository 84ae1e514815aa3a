"""The FlexAttention backend, the ``auto`` choice and the SDPA fast-path details."""

import functools

import pytest
import torch
from helpers import brute_force_mask, naive_attention
from hypothesis import given
from hypothesis import strategies as st
from strategies import geometries

from attnmask.kernels import AUTO_TABLE, KERNELS, auto_choice, auto_rule, choose_backend, flex_attention, sdpa_attention
from attnmask.kernels import REGISTRY, Call, Measured
from attnmask.kernels.auto import DEFAULT, choose_rule
from attnmask.kernels.flex import FLEX_VARIANTS, inverse, tile_order
from attnmask.masks import ALIGN, LocalMask, clear_cache

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def qkv(batch, num_heads, num_tokens, dim, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, num_heads, num_tokens, dim, generator=g, dtype=dtype).to(device) for _ in range(3)]


@pytest.mark.parametrize("variant", sorted(FLEX_VARIANTS))
@given(geometry=geometries(max_side=9), seed=st.integers(0, 1000))
def test_every_flex_variant_matches_float64_definition(variant, geometry, seed):
    """Block size and token order change speed, never the result (eager FlexAttention, float64)."""
    grid, window, prefix_tokens, num_heads, heads, prefix = geometry
    mask = LocalMask(grid, window, prefix_tokens, num_heads, heads, prefix)
    q, k, v = qkv(2, num_heads, mask.num_tokens, 8, seed=seed)
    expected = naive_attention(q, k, v, brute_force_mask(grid, window, prefix_tokens, num_heads, heads, prefix))
    out = flex_attention(q, k, v, mask, compiled=False, **FLEX_VARIANTS[variant])
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("order", ["rows", "tiles"])
def test_flex_host_bias_follows_token_order(order):
    """A per-head additive host bias (BEiT's relative position bias) lands on the right
    (query, key) pair even when the kernel runs in tile order."""
    mask = LocalMask((10, 12), (3, 5), 1, 4, (0, 2))
    n = mask.num_tokens
    q, k, v = qkv(2, 4, n, 8, seed=3)
    bias = torch.randn(1, 4, n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    allowed = brute_force_mask((10, 12), (3, 5), 1, 4, (0, 2))
    logits = (q @ k.transpose(-2, -1)) * 8**-0.5 + bias
    expected = logits.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    out = flex_attention(q, k, v, mask, attn_mask=bias, compiled=False, block_size=64, order=order)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_flex_per_sample_positions():
    """ViTMAE-style subsets: a block mask per call, with a batch dimension."""
    grid, prefix_tokens = (6, 7), 1
    g = torch.Generator().manual_seed(0)
    kept = torch.stack([torch.randperm(42, generator=g)[:11] for _ in range(3)])
    positions = torch.cat([torch.zeros(3, 1, dtype=torch.long), kept + prefix_tokens], dim=1)
    mask = LocalMask(grid, (3, 3), prefix_tokens, 2, (1,), positions=positions)
    q, k, v = qkv(3, 2, 12, 8)
    expected = naive_attention(q, k, v, mask.dense())
    torch.testing.assert_close(flex_attention(q, k, v, mask, compiled=False, order="tiles"), expected, rtol=1e-10, atol=1e-10)


def test_compiled_flex_float32_matches_reference():
    """The fused (compiled) CPU kernel on a token count that is not a multiple of the block."""
    mask = LocalMask((14, 14), (7, 7), 1, 4, (0, 1))
    q, k, v = qkv(2, 4, mask.num_tokens, 16, dtype=torch.float32)
    with torch.no_grad():
        out = flex_attention(q, k, v, mask)
    torch.testing.assert_close(out, KERNELS["reference"](q, k, v, mask), rtol=2e-5, atol=2e-5)


MULTI_BLOCK = [
    # (variant, grid, window, prefix tokens, prefix policy): grids of several blocks, so the
    # compiled kernel really skips blocks (eager FlexAttention reads only the mask_mod).
    ("flex-b64-rows", (20, 23), (5, 7), 2, "isolated"),
    ("flex-b128-tiles", (20, 23), (7, 5), 1, "global"),
]


@pytest.mark.parametrize("variant, grid, window, prefix_tokens, prefix", MULTI_BLOCK)
def test_compiled_flex_block_sparsity_on_multi_block_grids(variant, grid, window, prefix_tokens, prefix):
    mask = LocalMask(grid, window, prefix_tokens, 4, (0, 2), prefix)
    q, k, v = qkv(1, 4, mask.num_tokens, 16, dtype=torch.float32, seed=5)
    with torch.no_grad():
        out = flex_attention(q, k, v, mask, **FLEX_VARIANTS[variant])
    torch.testing.assert_close(out, KERNELS["reference"](q, k, v, mask), rtol=2e-5, atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(FLEX_VARIANTS))
@pytest.mark.parametrize("prefix", ["global", "isolated"])
def test_compiled_flex_variants_float32(variant, prefix):
    mask = LocalMask((24, 26), (7, 5), 1, 2, (0, 1), prefix)
    q, k, v = qkv(1, 2, mask.num_tokens, 16, dtype=torch.float32)
    with torch.no_grad():
        out = flex_attention(q, k, v, mask, **FLEX_VARIANTS[variant])
    torch.testing.assert_close(out, KERNELS["reference"](q, k, v, mask), rtol=2e-5, atol=2e-5)


def test_tile_order_is_a_permutation_with_prefix_last():
    perm = tile_order((10, 19), 2, (8, 16))
    assert sorted(perm.tolist()) == list(range(2 + 190))
    assert perm[-2:].tolist() == [0, 1]
    # The first 128 tokens are the first full 8 x 16 tile: rows 0-7, columns 0-15.
    first = perm[:128] - 2
    assert set((first // 19).tolist()) == set(range(8)) and set((first % 19).tolist()) == set(range(16))
    assert torch.equal(perm[inverse(perm)], torch.arange(192))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dropout_p": 0.1}, "dropout_p=0.1"),
        ({"block_size": 32}, "block_size=32"),
        ({"order": "hilbert"}, "order='hilbert'"),
    ],
)
def test_flex_rejects_what_it_cannot_do(kwargs, message):
    mask = LocalMask((3, 3), (3, 3), 1, 2, (0,))
    q, k, v = qkv(1, 2, 10, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match=message):
        flex_attention(q, k, v, mask, **kwargs)


def test_flex_names_the_cpu_training_limit():
    mask = LocalMask((3, 3), (3, 3), 1, 2, (0,))
    q, k, v = qkv(1, 2, 10, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="no backward on CPU.*'sdpa'"):
        flex_attention(q.requires_grad_(), k, v, mask)


def test_auto_cuda_rows():
    """The H100 measurements decide CUDA calls (no blocked row on CUDA: never measured there)."""
    bf16 = torch.bfloat16
    assert choose_backend("cuda", bf16, 197, 0.5, False) == "sdpa"
    assert dict(choose_rule(Call("cuda", bf16, 197, 0.5, False)).options) == {"one_call": True}
    assert dict(choose_rule(Call("cuda", bf16, 1024, 0.5, False)).options) == {"one_call": True}
    assert choose_backend("cuda", bf16, 1025, 0.5, False) == "sdpa"  # ViT-B/16 at 512 px: flex 0.68x, sdpa 0.90x
    assert dict(choose_rule(Call("cuda", bf16, 1025, 0.5, False)).options) == {}
    assert choose_backend("cuda", bf16, 4097, 0.5, False) == "flex"
    assert dict(choose_rule(Call("cuda", bf16, 4097, 0.5, False)).options) == {"block_size": 64}
    assert choose_backend("cuda", bf16, 4097, 1.0, True) == "flex"  # measured: 0.71x / 0.99x vs SDPA's 0.60x / 0.56x
    assert dict(choose_rule(Call("cuda", bf16, 4097, 1.0, True)).options) == {}  # 64-token blocks: forward only
    assert choose_backend("cuda", bf16, 4097, 1.0, True, host_mask=True) == "sdpa"  # flex: no host-bias gradients
    assert choose_backend("cuda", bf16, 1025, 1.0, True) == "sdpa"
    assert dict(choose_rule(Call("cuda", bf16, 1025, 1.0, True)).options) == {}  # no one-call in training
    assert choose_backend("cuda", torch.float32, 4097, 1.0, False) == "sdpa"
    assert choose_backend("cuda", bf16, 4097, 1.0, False, "soft") == "sdpa"
    assert choose_backend("cuda", bf16, 4097, 1.0, False, positions=True) == "sdpa"


def test_auto_table_rows_are_measured_kernels_that_qualify():
    assert AUTO_TABLE[-1] is DEFAULT and DEFAULT.backend == "sdpa"
    assert all(row.evidence and row.backend in REGISTRY for row in AUTO_TABLE)
    assert not any(row.backend == "reference" for row in AUTO_TABLE)  # float64, tests only
    assert all(row.speed > 0 for row in AUTO_TABLE[:-1])
    # The default runs every call whatever its facts.
    odd = Call("xpu", torch.float64, 3, 0.3, True, "soft", host_mask=True, positions=True, dropout=True)
    assert REGISTRY["sdpa"].capabilities.refusal(odd) is None
    assert choose_rule(odd) is DEFAULT


def test_capabilities_name_what_they_refuse():
    flex = REGISTRY["flex"].capabilities
    assert "training on cpu" in flex.refusal(Call("cpu", torch.float32, 4097, 1.0, True))
    assert flex.refusal(Call("cuda", torch.bfloat16, 4097, 1.0, True)) is None
    assert "dropout" in flex.refusal(Call("cuda", torch.bfloat16, 4097, 1.0, False, dropout=True))
    blocked = REGISTRY["blocked"].capabilities
    assert "positions" in blocked.refusal(Call("cpu", torch.float32, 4097, positions=True))
    assert "soft mode with a host mask" in blocked.refusal(Call("cpu", torch.float32, 4097, mode="soft", host_mask=True))
    assert blocked.refusal(Call("cpu", torch.float32, 4097, training=True, host_mask=True, dropout=True)) is None


def test_auto_ranks_qualifying_rows_by_measured_speed(monkeypatch):
    """The fastest matching row wins, unless its kernel does not qualify for the call."""
    import attnmask.kernels.auto as auto

    rows = (
        Measured("flex", speed=3.0, device="cpu", evidence="test"),
        Measured("blocked", speed=2.0, device="cpu", evidence="test"),
        Measured("sdpa", speed=1.0, device="cpu", evidence="test"),
        Measured("blocked", speed=9.0, device="cpu", min_tokens=10_000, evidence="test"),
        auto.DEFAULT,
    )
    monkeypatch.setattr(auto, "AUTO_TABLE", rows)
    assert choose_backend("cpu", torch.float32, 4097, 1.0, False) == "flex"
    assert choose_backend("cpu", torch.float32, 4097, 1.0, True) == "blocked"  # flex: no CPU backward
    assert choose_backend("cpu", torch.float32, 4097, 1.0, True, positions=True) == "sdpa"
    assert choose_backend("cpu", torch.float32, 20_000, 1.0, False) == "blocked"
    assert choose_backend("cuda", torch.float32, 4097, 1.0, False) == "sdpa"  # no CUDA row: the default
    assert [row.speed for row, _ in auto.candidates(Call("cpu", torch.float32, 4097, training=True))] == [3.0, 2.0, 1.0]


def test_auto_choice_reads_the_call():
    mask = LocalMask((48, 48), (7, 7), 1, 4, (0, 1))
    q = torch.zeros(1, 4, mask.num_tokens, 8)
    assert auto_choice(q, mask) == "blocked"  # CPU fp32 inference at 2305 tokens
    assert auto_choice(q, mask, dropout_p=0.1) == "blocked"  # blocked applies dropout in block space
    assert auto_choice(q.bfloat16(), mask) == "sdpa"  # no measured bf16 CPU row
    assert auto_choice(q.double(), mask) == "sdpa"
    assert auto_choice(q, LocalMask((48, 48), (7, 7), 1, 4, (0, 1), positions=torch.zeros(1, 2305, dtype=torch.long))) == "sdpa"
    small = LocalMask((14, 14), (7, 7), 1, 4, (0, 1))
    assert auto_choice(torch.zeros(1, 4, small.num_tokens, 8), small) == "sdpa"  # 197 tokens
    assert auto_choice(q, LocalMask((48, 48), (95, 95), 1, 4, (0, 1))) == "sdpa"  # the window covers the grid
    with torch.no_grad():
        assert auto_choice(q.requires_grad_(), mask) == "blocked"
        assert auto_rule(q, mask).training is False


def test_auto_counts_gradients_of_keys_and_values():
    """Only the value projection trained (e.g. LoRA on v): still training, no FlexAttention on CPU."""
    mask = LocalMask((48, 48), (7, 7), 1, 2, (0,))
    q, k, v = qkv(1, 2, mask.num_tokens, 8, dtype=torch.float32)
    v.requires_grad_()
    assert auto_rule(q, mask, k=k, v=v).training is True
    assert auto_choice(q, mask, k=k, v=v) == "blocked"  # flex would not qualify: no CPU backward
    out = KERNELS["auto"](q, k, v, mask)
    out.sum().backward()
    assert v.grad is not None


def test_describe_reports_what_auto_runs_prefix_tokens_included():
    """768 px ViT-Ti/16: 48 x 48 patches + the class token = 2305 tokens, a blocked row; 224 px:
    197 tokens, no blocked row (one block covers the grid)."""
    timm = pytest.importorskip("timm")
    import attnmask

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=768, depth=1)
    attnmask.apply(model, heads=1, window=7)
    assert attnmask.describe(model).resolved_backend == "blocked"
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=224, depth=1)
    attnmask.apply(model, heads=1, window=7)
    assert attnmask.describe(model).resolved_backend == "sdpa"


def test_auto_runs_the_rule_with_its_options(monkeypatch):
    """auto runs the kernel of the chosen row with that row's options."""
    import dataclasses

    import attnmask.kernels.auto as auto

    row = Measured("blocked", speed=5.0, device="cpu", evidence="test", options=(("block", (4, 8)),))
    monkeypatch.setattr(auto, "AUTO_TABLE", (row, auto.DEFAULT))
    seen = {}
    spy = dataclasses.replace(REGISTRY["blocked"], run=lambda q, k, v, mask, **kw: seen.update(kw) or q)
    monkeypatch.setitem(REGISTRY, "blocked", spy)
    mask = LocalMask((64, 64), (7, 7), 1, 2, (0,))
    q = torch.zeros(1, 2, mask.num_tokens, 8)
    with torch.no_grad():
        auto.auto_attention(q, q, q, mask)
    assert seen["block"] == (4, 8)


def test_auto_on_cpu_is_the_sdpa_kernel_bit_for_bit():
    mask = LocalMask((6, 5), (3, 3), 1, 4, (1, 3))
    q, k, v = qkv(2, 4, mask.num_tokens, 8, dtype=torch.float32)
    assert torch.equal(KERNELS["auto"](q, k, v, mask), sdpa_attention(q, k, v, mask))


def test_additive_mask_is_cached_aligned_and_equal_to_the_boolean_mask():
    clear_cache()
    mask = LocalMask((14, 14), (7, 7), 1, 6, (0, 1, 2))
    additive = mask.additive_mask("cpu", torch.bfloat16)
    assert additive.dtype == torch.bfloat16 and additive.shape == (197, 197)
    assert additive.stride(0) % ALIGN == 0 and additive.stride(0) >= 197
    assert torch.equal(additive == 0, mask.window_mask("cpu"))
    assert torch.isneginf(additive[~mask.window_mask("cpu")]).all()
    assert mask.additive_mask("cpu", torch.bfloat16) is additive


def test_split_heads_output_needs_no_copy_to_merge_heads():
    """The caller's ``transpose(1, 2).reshape(B, N, C)`` is a view of what the kernel returns."""
    mask = LocalMask((6, 6), (3, 3), 1, 4, (0, 1))
    q, k, v = qkv(2, 4, 37, 8, dtype=torch.float32)
    out = sdpa_attention(q, k, v, mask)
    merged = out.transpose(1, 2).reshape(2, 37, 32)
    assert merged.data_ptr() == out.data_ptr() and out.transpose(1, 2).is_contiguous()


def test_sdpa_fp32_uses_the_additive_mask_equal_to_float64(monkeypatch):
    mask = LocalMask((9, 7), (5, 3), 2, 3, (0, 2), "isolated")
    q, k, v = qkv(2, 3, mask.num_tokens, 16, dtype=torch.float32)
    import attnmask.kernels.sdpa as sdpa

    masks = []
    real = sdpa.F.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return real(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(sdpa.F, "scaled_dot_product_attention", spy)
    sdpa_attention(q, k, v, mask)
    monkeypatch.undo()
    cached_mask = mask.additive_mask("cpu", torch.float32)
    assert masks[0] is None  # global heads: no mask, as the host calls SDPA
    assert masks[1].dtype == torch.float32 and masks[1].data_ptr() == cached_mask.data_ptr()
    expected = naive_attention(q.double(), k.double(), v.double(), mask.dense())
    torch.testing.assert_close(sdpa_attention(q, k, v, mask), expected.float(), rtol=1e-5, atol=1e-5)


@cuda
@pytest.mark.parametrize("backend", ["sdpa", "flex", "auto"])
@pytest.mark.parametrize("tokens_side", [14, 32])
def test_cuda_backends_bf16_match_reference(backend, tokens_side):
    mask = LocalMask((tokens_side, tokens_side), (7, 7), 1, 12, tuple(range(6)))
    q, k, v = qkv(2, 12, mask.num_tokens, 64, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        out = KERNELS[backend](q, k, v, mask)
    torch.testing.assert_close(out.float(), KERNELS["reference"](q, k, v, mask).float(), rtol=2e-2, atol=2e-2)


@cuda
def test_cuda_flex_backward_matches_sdpa():
    mask = LocalMask((16, 16), (7, 7), 1, 4, (0, 1, 2, 3))
    q, k, v = (t.requires_grad_() for t in qkv(2, 4, mask.num_tokens, 64, dtype=torch.float32, device="cuda"))
    grads = []
    for kernel in (sdpa_attention, functools.partial(flex_attention, order="tiles")):
        out = kernel(q, k, v, mask)
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@cuda
def test_cuda_auto_picks_flex_for_large_bf16_inference():
    mask = LocalMask((64, 64), (7, 7), 1, 12, tuple(range(6)))
    q = torch.zeros(1, 12, mask.num_tokens, 64, dtype=torch.bfloat16, device="cuda")
    assert auto_choice(q, mask) == "flex"


def test_flex_compiles_once_per_shape_not_per_layer():
    """One compiled FlexAttention for every layer: 4 layers and 2 batch sizes, seen twice,
    compile exactly 2 graphs."""
    timm = pytest.importorskip("timm")
    import attnmask
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=4).eval()
    attnmask.apply(model, heads=0.5, window=3, backend="flex")
    with torch.no_grad():
        for batch in (1, 2, 1, 2):
            out = model(torch.randn(batch, 3, 64, 64))
            assert out.shape == (batch, 1000)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


@pytest.mark.slow
def test_more_shapes_than_torchs_default_recompile_limit_stay_compiled():
    """torch's default limit (8) would send the 9th shape to the unfused eager path."""
    from torch._dynamo.utils import counters

    from attnmask.kernels.flex import RECOMPILE_LIMIT

    assert RECOMPILE_LIMIT > 10
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        for side in range(4, 14):
            mask = LocalMask((side, side), (3, 3), 1, 2, (0, 1))
            q, k, v = qkv(1, 2, mask.num_tokens, 16, dtype=torch.float32)
            torch.testing.assert_close(
                flex_attention(q, k, v, mask), KERNELS["reference"](q, k, v, mask), rtol=2e-5, atol=2e-5
            )
    assert counters["stats"]["unique_graphs"] == 10, dict(counters["stats"])


@given(geometries())
def test_head_additive_mask_is_the_dense_mask_of_every_head(geometry):
    mask = LocalMask(*geometry)
    additive = mask.head_additive_mask("cpu", torch.float32)
    n = mask.num_tokens
    assert additive.shape == (1, mask.num_heads, n, n) and additive.stride(-2) % ALIGN == 0
    expected = torch.zeros(mask.num_heads, n, n).masked_fill(~brute_force_mask(*geometry), float("-inf"))
    assert torch.equal(additive[0], expected)


def test_one_call_off_cuda_is_the_split_path_bit_for_bit():
    mask = LocalMask((6, 5), (3, 3), 1, 4, (0, 2))
    q, k, v = qkv(2, 4, mask.num_tokens, 8, dtype=torch.float32)
    assert torch.equal(sdpa_attention(q, k, v, mask, one_call=True), sdpa_attention(q, k, v, mask))


@cuda
@pytest.mark.parametrize("heads", [(0, 1, 2, 3, 4, 5), tuple(range(12)), (1, 5, 7)])
def test_cuda_one_call_bf16_matches_reference(heads):
    mask = LocalMask((14, 14), (7, 7), 1, 12, heads)
    q, k, v = qkv(4, 12, mask.num_tokens, 64, dtype=torch.bfloat16, device="cuda", seed=len(heads))
    from attnmask.kernels import sdpa

    with torch.no_grad():
        out = sdpa_attention(q, k, v, mask, one_call=True)
    assert not sdpa._CUDNN_REFUSED, "cuDNN refused the one-call path: the split path ran instead"
    torch.testing.assert_close(out.float(), KERNELS["reference"](q, k, v, mask).float(), rtol=2e-2, atol=2e-2)


@cuda
def test_cuda_one_call_leaves_sdpa_backends_alone():
    """The one-call path must not switch SDPA's process-wide backend flags (another thread's
    SDPA calls would fail while they are switched)."""
    mask = LocalMask((14, 14), (7, 7), 1, 12, tuple(range(6)))
    q, k, v = qkv(2, 12, mask.num_tokens, 64, dtype=torch.bfloat16, device="cuda", seed=9)
    flags = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())
    seen = []
    real = torch.ops.aten._scaled_dot_product_cudnn_attention

    with torch.no_grad():
        sdpa_attention(q, k, v, mask, one_call=True)
        seen.append((torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()))
    assert seen == [flags] and real is torch.ops.aten._scaled_dot_product_cudnn_attention


@cuda
@pytest.mark.parametrize("variant", sorted(FLEX_VARIANTS))
def test_cuda_flex_variants_bf16_match_reference(variant):
    mask = LocalMask((20, 20), (7, 7), 1, 12, tuple(range(6)))
    q, k, v = qkv(2, 12, mask.num_tokens, 64, dtype=torch.bfloat16, device="cuda", seed=3)
    with torch.no_grad():
        out = flex_attention(q, k, v, mask, **FLEX_VARIANTS[variant])
    torch.testing.assert_close(out.float(), KERNELS["reference"](q, k, v, mask).float(), rtol=2e-2, atol=2e-2)


@cuda
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_cuda_soft_mode_matches_reference(backend):
    mask = LocalMask((14, 14), (3, 3), 1, 6, (0, 1, 4), mode="soft")
    q, k, v = qkv(2, 6, mask.num_tokens, 64, dtype=torch.bfloat16, device="cuda", seed=5)
    with torch.no_grad():
        out = KERNELS[backend](q, k, v, mask)
    torch.testing.assert_close(out.float(), KERNELS["reference"](q, k, v, mask).float(), rtol=2e-2, atol=2e-2)
