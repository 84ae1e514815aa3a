"""The fused Triton kernel (backend="triton") against the float64 definition.

Without a GPU these run on CPU tensors through Triton's interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1`` before the kernel is defined): small shapes, the kernel's logic. On a
CUDA machine the same tests run on the GPU.
"""

import pytest
import torch
from helpers import brute_force_mask, naive_attention
from hypothesis import given
from hypothesis import strategies as st
from strategies import geometries

from attnmask.kernels import fused
from attnmask.kernels.blocked import blocked_attention
from attnmask.kernels.fused import local_forward, triton_attention
from attnmask.masks import LocalMask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EXACT = torch.float64 if DEVICE == "cpu" else torch.float32  # the interpreter computes float64 exactly
TOL = 1e-10 if EXACT == torch.float64 else 2e-5

pytestmark = pytest.mark.skipif(fused.unavailable(torch.device(DEVICE)) is not None, reason=str(fused.unavailable(torch.device(DEVICE))))


def qkv(batch, heads, tokens, dim, seed, dtype=EXACT, grad=False, dim_v=None):
    g = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, tokens, dim)] * 2 + [(batch, heads, tokens, dim_v or dim)]
    return [torch.randn(s, generator=g, dtype=torch.float64).to(DEVICE, dtype).requires_grad_(grad) for s in shapes]


def definition(q, k, v, geometry):
    grid, window, prefix_tokens, num_heads, heads, prefix = geometry
    allowed = brute_force_mask(grid, window, prefix_tokens, num_heads, heads, prefix).to(DEVICE)
    return naive_attention(q.double(), k.double(), v.double(), allowed)


@given(geometry=geometries(max_side=11), dim=st.sampled_from([4, 8, 16]), seed=st.integers(0, 999))
def test_matches_float64_definition_with_gradients(geometry, dim, seed):
    grid, window, prefix_tokens, num_heads, heads, prefix = geometry
    mask = LocalMask(grid, window, prefix_tokens, num_heads, heads, prefix)
    q, k, v = qkv(2, num_heads, mask.num_tokens, dim, seed, grad=True)
    out = triton_attention(q, k, v, mask)
    expected = definition(q, k, v, geometry)
    torch.testing.assert_close(out.double(), expected, rtol=TOL, atol=TOL)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(DEVICE)
    got = torch.autograd.grad((out.double() * weights).sum(), (q, k, v))
    want = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a.double(), b, rtol=TOL * 10, atol=TOL * 10, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("grid, window, prefix_tokens, prefix", [((13, 9), (7, 7), 1, "global"), ((6, 17), (3, 5), 4, "isolated"), ((20, 3), (5, 1), 0, "global"), ((3, 3), (3, 3), 20, "global")])
def test_one_launch_writes_every_row(grid, window, prefix_tokens, prefix):
    """One launch writes every row of ``out``, prefix queries (their own programs) and patch
    queries alike: ``out`` is poisoned with NaN before the run."""
    mask = LocalMask(grid, window, prefix_tokens, 2, (0, 1), prefix)
    q, k, v = qkv(2, 2, mask.num_tokens, 16, 0)
    out = torch.full_like(q, float("nan"))
    local_forward(q, k, v, mask, 16**-0.5, out)
    assert torch.isfinite(out).all()
    expected = definition(q, k, v, (grid, window, prefix_tokens, 2, (0, 1), prefix))
    torch.testing.assert_close(out.double(), expected, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("dim, dim_v", [(32, 32), (64, 64), (96, 96), (128, 128), (16, 32)])
def test_head_dims_and_dtypes_in_the_hosts_layout(dtype, tol, dim, dim_v):
    """Head dims 32/64/96/128 (96 padded inside the kernel) and a value dim of its own, on
    q, k, v laid out as timm hands them over (views of one ``(B, N, 3, H, D)`` projection),
    forward and gradients."""
    mask = LocalMask((9, 10), (7, 7), 1, 3, (0, 2))
    g = torch.Generator().manual_seed(1)
    if dim == dim_v:
        qkv_ = torch.randn(2, mask.num_tokens, 3, 3, dim, generator=g).to(DEVICE, dtype)
        qkv_.requires_grad_()
        q, k, v = qkv_.permute(2, 0, 3, 1, 4).unbind(0)
        assert not q.is_contiguous()
        leaves = [qkv_]
    else:
        q, k, v = qkv(2, 3, mask.num_tokens, dim, 1, dtype=dtype, dim_v=dim_v, grad=True)
        leaves = [q, k, v]
    out = triton_attention(q, k, v, mask)
    expected = definition(q, k, v, ((9, 10), (7, 7), 1, 3, (0, 2), "global"))
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(DEVICE)
    got = torch.autograd.grad((out.double() * weights).sum(), leaves)
    want = torch.autograd.grad((expected * weights).sum(), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=tol * 5, atol=tol * 5)


def test_what_the_kernel_does_not_run_goes_to_blocked():
    """Soft mode, a host mask and per-sample positions are declared unsupported and run the
    blocked backend instead, with its results."""
    mask = LocalMask((5, 6), (3, 3), 1, 2, (0,))
    q, k, v = qkv(2, 2, mask.num_tokens, 8, 3)
    host = torch.randn(mask.num_tokens, mask.num_tokens, dtype=q.dtype, device=DEVICE)
    assert torch.equal(triton_attention(q, k, v, mask, attn_mask=host), blocked_attention(q, k, v, mask, attn_mask=host))
    soft = LocalMask((5, 6), (3, 3), 1, 2, (0,), mode="soft")
    assert torch.equal(triton_attention(q, k, v, soft), blocked_attention(q, k, v, soft))
    refusals = fused.BACKEND.capabilities
    assert "soft" not in refusals.modes and not refusals.host_masks and not refusals.positions and not refusals.dropout


def test_refuses_a_device_it_cannot_run_on(monkeypatch):
    monkeypatch.setattr(fused, "interpreted", lambda: False)
    mask = LocalMask((4, 4), (3, 3), 0, 1, (0,))
    q = torch.zeros(1, 1, 16, 16)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run here: it needs a CUDA device"):
        triton_attention(q, q, q, mask)


def test_tuner_times_each_candidate_once_per_key_and_keeps_the_fastest(monkeypatch):
    monkeypatch.setattr(fused, "TUNED", {})
    mask = LocalMask((8, 8), (7, 7), 1, 2, (0, 1))
    q = torch.zeros(1, 2, mask.num_tokens, 16)
    fastest = fused.TUNE_CANDIDATES[2]
    failing = fused.TUNE_CANDIDATES[0]
    timed = []

    def run(tile, warps):
        if (tile, warps) == failing:
            raise RuntimeError("out of shared memory")
        timed.append((tile, warps))

    def timer(fn):
        fn()
        return 1.0 if timed[-1] == fastest else 2.0

    assert fused.tuned_config(q, q, mask, run, timer) == fastest
    assert sorted(timed) == sorted(c for c in fused.TUNE_CANDIDATES if c != failing)
    timed.clear()
    assert fused.tuned_config(q, q, mask, run, timer) == fastest and timed == []  # cached per key
    assert fused.tuned_config(q, q, LocalMask((8, 8), (3, 3), 1, 2, (0,)), run, timer) == fastest and timed  # a new window: timed again
