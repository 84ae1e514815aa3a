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


def test_inference_reuses_gather_buffers_without_aliasing_outputs():
    """Without gradients the gathers go into per-thread buffers: a later call (another layer,
    another geometry, another dtype) must not change an earlier output, and each output stays
    exact; with gradients nothing is reused (autograd saves the gathered tensors)."""
    from attnmask.kernels import blocked

    blocked.release_workspace()
    big = LocalMask((9, 7), (3, 5), 1, 4, (0, 2, 3))
    small = LocalMask((5, 6), (3, 3), 2, 4, (1,))
    calls = [(big, 0, torch.float32), (small, 1, torch.float32), (big, 2, torch.float64), (big, 3, torch.float32)]
    with torch.no_grad():
        outs = [blocked_attention(*qkv(2, 4, mask.num_tokens, 8, seed, dtype=dtype), mask, block=(2, 3)) for mask, seed, dtype in calls]
    assert blocked.workspace_bytes() > 0
    for (mask, seed, dtype), out in zip(calls, outs):
        q, k, v = qkv(2, 4, mask.num_tokens, 8, seed, dtype=dtype)
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(out, reference_attention(q, k, v, mask).to(dtype), rtol=tol, atol=tol)
    with torch.inference_mode():  # buffers made outside inference mode are not written inside it, and back
        blocked_attention(*qkv(1, 4, big.num_tokens, 8, 5), big, block=(2, 3))
    with torch.no_grad():
        blocked_attention(*qkv(1, 4, big.num_tokens, 8, 5), big, block=(2, 3))
    blocked.release_workspace()
    assert blocked.workspace_bytes() == 0
    q, k, v = qkv(2, 4, big.num_tokens, 8, 7, dtype=torch.float32, grad=True)
    blocked_attention(q, k, v, big, block=(2, 3)).sum().backward()
    assert blocked.workspace_bytes() == 0


def test_threads_get_their_own_gather_buffers():
    import threading

    mask = LocalMask((12, 12), (3, 3), 1, 4, (0, 1, 2, 3))
    inputs = [qkv(2, 4, mask.num_tokens, 16, seed, dtype=torch.float32) for seed in range(4)]
    expected = [reference_attention(*t, mask).float() for t in inputs]
    errors = []

    def work(i):
        try:
            with torch.no_grad():
                for _ in range(20):
                    torch.testing.assert_close(blocked_attention(*inputs[i], mask, block=(4, 4)), expected[i], rtol=1e-5, atol=1e-5)
        except Exception as error:  # reported below: a thread's failure must fail the test
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
