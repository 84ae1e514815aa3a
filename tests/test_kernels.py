"""Every backend against the float64 definition; global heads bit-for-bit; locality."""

import pytest
import torch
import torch.nn.functional as F
from helpers import brute_force_mask, naive_attention
from hypothesis import given
from hypothesis import strategies as st
from strategies import geometries

from attnmask.kernels import KERNELS, reference_attention, resolve_backend, sdpa_attention
from attnmask.masks import LocalMask


def qkv(batch, num_heads, num_tokens, dim, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, num_heads, num_tokens, dim, generator=g, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("backend", sorted(KERNELS))
@given(geometry=geometries(), batch=st.integers(1, 2), dim=st.sampled_from([4, 8]), seed=st.integers(0, 1000))
def test_backend_matches_float64_definition(backend, geometry, batch, dim, seed):
    grid, window, prefix_tokens, num_heads, heads, prefix = geometry
    mask = LocalMask(grid, window, prefix_tokens, num_heads, heads, prefix)
    q, k, v = qkv(batch, num_heads, mask.num_tokens, dim, seed=seed)
    expected = naive_attention(q, k, v, brute_force_mask(grid, window, prefix_tokens, num_heads, heads, prefix))
    out = KERNELS[backend](q, k, v, mask)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def trains_on_cpu(name):
    from attnmask.kernels import REGISTRY

    backward = REGISTRY[name].capabilities.backward if name in REGISTRY else None  # auto: picks one that trains
    return backward is None or "cpu" in backward


@pytest.mark.parametrize("backend", sorted(name for name in KERNELS if trains_on_cpu(name)))
@given(geometry=geometries(max_side=8), dim=st.sampled_from([4, 8]), seed=st.integers(0, 1000))
def test_backend_gradients_match_float64_definition(backend, geometry, dim, seed):
    """Gradients of q, k and v of every backend that trains on this device, against autograd
    through the naive float64 definition (random geometries, upstream weights)."""
    grid, window, prefix_tokens, num_heads, heads, prefix = geometry
    mask = LocalMask(grid, window, prefix_tokens, num_heads, heads, prefix)
    inputs = [t.requires_grad_() for t in qkv(2, num_heads, mask.num_tokens, dim, seed=seed)]
    weights = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    got = torch.autograd.grad((KERNELS[backend](*inputs, mask) * weights).sum(), inputs)
    expected = naive_attention(*inputs, brute_force_mask(grid, window, prefix_tokens, num_heads, heads, prefix))
    want = torch.autograd.grad((expected * weights).sum(), inputs)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"{backend} grad {name}: {m}")


def test_every_backend_but_flex_trains_on_cpu():
    """The gradient test above covers each kernel that declares a CPU backward (triton
    through Triton's interpreter, which the tests switch on without a GPU)."""
    assert {name for name in KERNELS if trains_on_cpu(name)} == {"auto", "sdpa", "blocked", "triton", "reference"}


@pytest.mark.parametrize("host", ["bool", "float", "bool_per_head", "float_per_batch", "float_per_key"])
@given(geometry=geometries(), seed=st.integers(0, 1000))
def test_host_mask_is_added_not_replaced(host, geometry, seed):
    grid, window, prefix_tokens, num_heads, heads, prefix = geometry
    mask = LocalMask(grid, window, prefix_tokens, num_heads, heads, prefix)
    n = mask.num_tokens
    q, k, v = qkv(2, num_heads, n, 8, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    eye = torch.eye(n, dtype=torch.bool)  # keeps every row attendable
    if host == "bool":
        attn_mask = (torch.rand(n, n, generator=g) > 0.3) | eye
        additive = torch.zeros(n, n, dtype=torch.float64).masked_fill(~attn_mask, float("-inf"))
    elif host == "bool_per_head":
        attn_mask = (torch.rand(1, num_heads, n, n, generator=g) > 0.3) | eye
        additive = torch.zeros(1, num_heads, n, n, dtype=torch.float64).masked_fill(~attn_mask, float("-inf"))
    elif host == "float":
        attn_mask = additive = torch.randn(num_heads, n, n, generator=g, dtype=torch.float64)
    elif host == "float_per_batch":
        attn_mask = additive = torch.randn(2, 1, n, n, generator=g, dtype=torch.float64)
    else:  # a (B, 1, 1, N) key bias, as padding masks come
        attn_mask = additive = torch.randn(2, 1, 1, n, generator=g, dtype=torch.float64)
    allowed = brute_force_mask(grid, window, prefix_tokens, num_heads, heads, prefix)
    scale = 8**-0.5
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale + additive
    logits = logits.masked_fill(~allowed, float("-inf"))
    expected = logits.softmax(-1) @ v
    for name, kernel in KERNELS.items():
        out = kernel(q, k, v, mask, attn_mask=attn_mask)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("heads", [(0,), (1, 2), (0, 3), (0, 1, 2, 3), ()])
def test_global_heads_bit_for_bit_float32(heads):
    mask = LocalMask((6, 5), (3, 3), 1, 4, heads)
    q, k, v = qkv(3, 4, mask.num_tokens, 16, dtype=torch.float32)
    plain = F.scaled_dot_product_attention(q, k, v)
    out = sdpa_attention(q, k, v, mask)
    for h in range(4):
        if h not in heads:
            assert torch.equal(out[:, h], plain[:, h])
        else:
            assert not torch.equal(out[:, h], plain[:, h])
    torch.testing.assert_close(out, reference_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_covering_window_is_plain_attention():
    mask = LocalMask((4, 3), (7, 5), 2, 4, (0, 1, 2, 3))
    assert mask.is_identity
    q, k, v = qkv(2, 4, mask.num_tokens, 8, dtype=torch.float32)
    assert torch.equal(sdpa_attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v))


@given(geometry=geometries(max_side=7), data=st.data())
def test_locality_outside_window_never_moves_masked_heads(geometry, data):
    grid, window, prefix_tokens, num_heads, heads, prefix = geometry
    mask = LocalMask(grid, window, prefix_tokens, num_heads, heads, prefix)
    n = mask.num_tokens
    query = data.draw(st.integers(prefix_tokens, n - 1), label="query")
    token = data.draw(st.integers(0, n - 1), label="perturbed token")
    q, k, v = qkv(1, num_heads, n, 8, dtype=torch.float32)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, token] += 1.0
    v2[:, :, token] += 1.0
    before = sdpa_attention(q, k, v, mask)[0, :, query]
    after = sdpa_attention(q, k2, v2, mask)[0, :, query]
    visible = brute_force_mask(grid, window, prefix_tokens, num_heads, heads, prefix)[:, query, token]
    for h in heads:
        if visible[h]:
            assert not torch.equal(before[h], after[h])
        else:
            assert torch.equal(before[h], after[h])


def test_reference_rejects_dropout():
    mask = LocalMask((2, 2), (3, 3), 0, 1, (0,))
    q, k, v = qkv(1, 1, 4, 4)
    with pytest.raises(ValueError, match="dropout_p=0.1"):
        reference_attention(q, k, v, mask, dropout_p=0.1)


def test_sdpa_dropout_runs_in_training():
    mask = LocalMask((3, 3), (3, 3), 1, 2, (0,))
    q, k, v = qkv(2, 2, mask.num_tokens, 8, dtype=torch.float32)
    out = sdpa_attention(q, k, v, mask, dropout_p=0.5)
    assert out.shape == q.shape and torch.isfinite(out).all()


def test_backend_names():
    assert resolve_backend("auto") == "auto"  # decided per call
    assert resolve_backend("flex") == "flex"
    with pytest.raises(ValueError, match="backend='flash'.*'auto', 'sdpa', 'flex', 'blocked', 'triton', 'reference'"):
        resolve_backend("flash")
