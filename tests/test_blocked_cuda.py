"""The blocked backend on CUDA in half precision: every output element and every gradient
against the float64 reference, on the geometries the GPU benchmarks use and two awkward ones.

CUDA only (skipped elsewhere, with the reason); run on a machine with a CUDA GPU by
``benchmarks/device_check.sh``. The CPU-side exactness tests are in ``tests/test_blocked.py``.
"""

import pytest
import torch

from attnmask.kernels import reference_attention
from attnmask.kernels.blocked import blocked_attention
from attnmask.masks import LocalMask

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GEOMETRIES = {
    # name: (grid, window, prefix tokens, prefix policy, heads, masked heads, batch)
    "64x64-w7-p1-all": ((64, 64), (7, 7), 1, "global", 4, (0, 1, 2, 3), 1),
    "14x14-w7-p1-half": ((14, 14), (7, 7), 1, "global", 12, tuple(range(6)), 2),
    "24x40-w3x5-p5-split": ((24, 40), (3, 5), 5, "global", 6, (0, 2, 3), 2),
    "24x40-w3x5-p5-isolated": ((24, 40), (3, 5), 5, "isolated", 6, (1, 4), 2),
}
TOL = 2e-2


def timm_layout_qkv(batch, heads, tokens, dim, dtype, device, seed):
    """q, k, v as timm hands them to attention: non-contiguous views of one (B, N, 3, H, D)
    projection, so the kernel's gathers and views see the strides a model gives them."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, tokens, 3, heads, dim, generator=g).to(device=device, dtype=dtype)
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def check_close(name, got, want, tol=TOL):
    """Every element of ``got`` (low precision) against ``want`` (float64): finite, and within
    ``tol`` relative to each element plus ``tol`` times the tensor's largest magnitude."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: {int((~torch.isfinite(got)).sum())} non-finite elements (unwritten or overflowed)"
    scale = max(float(want.detach().abs().max()), 1e-6)
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


def run_case(geometry, dtype, block, device="cuda", seed=0):
    grid, window, prefix_tokens, prefix, heads, masked, batch = GEOMETRIES[geometry]
    mask = LocalMask(grid, window, prefix_tokens, heads, masked, prefix)
    q, k, v = timm_layout_qkv(batch, heads, mask.num_tokens, 64, dtype, device, seed)
    assert torch.isfinite(q).all() and torch.isfinite(k).all() and torch.isfinite(v).all()
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = blocked_attention(*leaves, mask, block=block)
    assert out.dtype == dtype and out.device.type == torch.device(device).type
    reference_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = reference_attention(*reference_leaves, mask)
    check_close("output", out, expected)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(device)
    got = torch.autograd.grad((out.double() * weights).sum(), leaves)
    want = torch.autograd.grad((expected * weights).sum(), reference_leaves)
    for name, a, b in zip(("grad q", "grad k", "grad v"), got, want):
        assert a.dtype == dtype
        check_close(name, a, b)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
@pytest.mark.parametrize("block", [None, (8, 16)], ids=["table-block", "block8x16"])
def test_cuda_blocked_half_precision_matches_reference(geometry, dtype, block):
    run_case(geometry, dtype, block)


@cuda
@pytest.mark.parametrize("block", [(8, 8), (16, 16), (5, 7)])
def test_cuda_blocked_bf16_block_shapes_on_vit_b_1024px(block):
    """ViT-B/16 at 1024 px (64 x 64 patches, 4097 tokens), with the block shapes the GPU
    profile times and one that divides nothing (shifted border blocks)."""
    run_case("64x64-w7-p1-all", torch.bfloat16, block, seed=7)


@cuda
def test_cuda_blocked_global_heads_are_plain_sdpa_bit_for_bit():
    """Global heads run dense SDPA exactly as the unpatched model would."""
    mask = LocalMask((14, 14), (7, 7), 1, 12, tuple(range(6)))
    q, k, v = timm_layout_qkv(2, 12, mask.num_tokens, 64, torch.bfloat16, "cuda", seed=3)
    with torch.no_grad():
        out = blocked_attention(q, k, v, mask)
        dense = torch.nn.functional.scaled_dot_product_attention(q[:, 6:], k[:, 6:], v[:, 6:])
    assert torch.equal(out[:, 6:], dense)
