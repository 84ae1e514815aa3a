"""The blocked neighbourhood backend: exact against the float64 definition on random
geometries and query blocks (hard and soft mode, host masks, gradients), small caches."""

import pytest
import torch
from helpers import brute_force_mask, naive_attention
from hypothesis import given
from hypothesis import strategies as st
from strategies import geometries

from attnmask.kernels import reference_attention
from attnmask.kernels.blocked import blocked_attention, blocking, build_blocking, choose_block
from attnmask.masks import LocalMask

blocks = st.tuples(st.integers(1, 5), st.integers(1, 5))


def qkv(batch, num_heads, num_tokens, dim, seed, dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, num_heads, num_tokens, dim, generator=g, dtype=dtype).requires_grad_(grad) for _ in range(3)]


@given(geometry=geometries(max_side=9), block=blocks, mode=st.sampled_from(["hard", "soft"]), seed=st.integers(0, 999))
def test_matches_float64_reference_with_gradients(geometry, block, mode, seed):
    grid, window, prefix_tokens, num_heads, heads, prefix = geometry
    mask = LocalMask(grid, window, prefix_tokens, num_heads, heads, prefix, mode=mode)
    q, k, v = qkv(2, num_heads, mask.num_tokens, 8, seed, grad=True)
    out = blocked_attention(q, k, v, mask, block=block)
    expected = reference_attention(q, k, v, mask)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    got = torch.autograd.grad((out * weights).sum(), (q, k, v))
    want = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {name}: {m}")


@given(geometry=geometries(max_side=9), block=blocks, seed=st.integers(0, 999), per_head=st.booleans())
def test_host_mask_is_combined_in_block_space(geometry, block, seed, per_head):
    grid, window, prefix_tokens, num_heads, heads, prefix = geometry
    mask = LocalMask(grid, window, prefix_tokens, num_heads, heads, prefix)
    n = mask.num_tokens
    q, k, v = qkv(2, num_heads, n, 8, seed)
    g = torch.Generator().manual_seed(seed + 1)
    bias = torch.randn((1, num_heads, n, n) if per_head else (2, 1, n, n), generator=g, dtype=torch.float64)
    allowed = brute_force_mask(grid, window, prefix_tokens, num_heads, heads, prefix)
    scale = 8**-0.5
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale + bias
    expected = logits.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(blocked_attention(q, k, v, mask, attn_mask=bias, block=block), expected, rtol=1e-10, atol=1e-10)


def test_shifted_blocks_on_a_grid_the_block_does_not_divide():
    # 10 x 13 patches in 4 x 4 blocks: the last block of each row and column overlaps its
    # neighbour; every patch must still get exactly its own output.
    mask = LocalMask((10, 13), (5, 3), 2, 3, (0, 2))
    q, k, v = qkv(1, 3, mask.num_tokens, 16, seed=3)
    expected = naive_attention(q, k, v, brute_force_mask((10, 13), (5, 3), 2, 3, (0, 2)))
    torch.testing.assert_close(blocked_attention(q, k, v, mask, block=(4, 4)), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_dtypes_close_to_reference(dtype):
    mask = LocalMask((12, 12), (7, 7), 1, 4, (0, 1, 2))
    q, k, v = qkv(2, 4, mask.num_tokens, 32, seed=1, dtype=dtype)
    out = blocked_attention(q, k, v, mask, block=(4, 4))
    assert out.dtype == dtype and torch.isfinite(out).all()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), reference_attention(q, k, v, mask).float(), rtol=tol, atol=tol)


def test_output_layout_merges_heads_without_copy():
    mask = LocalMask((8, 8), (3, 3), 1, 4, (0, 1))
    q, k, v = qkv(2, 4, mask.num_tokens, 8, seed=0, dtype=torch.float32)
    out = blocked_attention(q, k, v, mask, block=(4, 4))
    merged = out.transpose(1, 2).reshape(2, mask.num_tokens, -1)
    assert merged.data_ptr() == out.data_ptr() and merged._base is not None


def test_blocking_is_small_and_cached():
    mask = LocalMask((64, 64), (7, 7), 1, 12, tuple(range(12)))
    layout = blocking(mask, (8, 8), torch.device("cpu"))
    assert blocking(mask, (8, 8), torch.device("cpu")).keys is layout.keys  # cached, not rebuilt
    n = mask.num_tokens
    assert layout.halo_keys == 14 * 14 + 1 and layout.block_tokens == 64 and layout.blocks == 64
    assert layout.nbytes < n * n / 10  # O(N x halo), never N x N
    isolated = build_blocking(LocalMask((64, 64), (7, 7), 1, 12, (0,), "isolated"), (8, 8), torch.device("cpu"))
    assert isolated.halo_keys == 14 * 14  # patch queries of isolated heads never see prefix keys


def test_block_choice_is_clipped_and_validated():
    assert choose_block((3, 40), (7, 7), "cpu")[0] == 3
    mask = LocalMask((4, 4), (3, 3), 0, 1, (0,))
    q, k, v = qkv(1, 1, 16, 4, seed=0)
    for bad in [(0, 4), (4,), "8x8", (2.0, 2), (True, 2)]:
        with pytest.raises(ValueError, match="block="):
            blocked_attention(q, k, v, mask, block=bad)


def test_per_sample_positions_fall_back_to_sdpa():
    positions = torch.tensor([[0, 3, 1, 7], [0, 2, 5, 6]])
    mask = LocalMask((3, 3), (3, 3), 1, 2, (0,), positions=positions)
    q, k, v = qkv(2, 2, 4, 8, seed=0)
    torch.testing.assert_close(blocked_attention(q, k, v, mask), reference_attention(q, k, v, mask), rtol=1e-10, atol=1e-10)


def test_compiles_to_one_graph_that_builds_nothing():
    """Under torch.compile the blocking is looked up at trace time: one graph, no breaks, and
    no index or mask arithmetic in the graph (only the gathers, SDPA and the scatter)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    mask = LocalMask((9, 9), (3, 3), 1, 2, (0,))
    q, k, v = qkv(2, 2, mask.num_tokens, 8, seed=0, dtype=torch.float32)
    backend = CompileCounterWithBackend("eager")
    compiled = torch.compile(lambda q, k, v: blocked_attention(q, k, v, mask, block=(4, 4)), backend=backend, fullgraph=True)
    out = compiled(q, k, v)
    compiled(q + 1, k, v)
    assert backend.frame_count == 1
    torch.testing.assert_close(out, blocked_attention(q, k, v, mask, block=(4, 4)))
    ops = {str(node.target) for node in backend.graphs[0].graph.nodes if node.op == "call_function"}
    assert not any(name in op for op in ops for name in ("arange", "stack", "masked_fill", "remainder", "floor"))
