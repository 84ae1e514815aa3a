"""State that must survive threads and faults: per-installation mask caches and expiring
refusals of the one-call cuDNN path."""

from __future__ import annotations

import copy

import pytest
import torch

import attnmask
from attnmask.kernels import sdpa
from attnmask.masks import LocalMask

timm = pytest.importorskip("timm")


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4
    ).eval()


def test_each_installation_has_its_own_cache_dropped_by_remove():
    a, b = tiny_vit(), tiny_vit()
    attnmask.apply(a, heads=2, window=3, backend="sdpa")
    attnmask.apply(b, heads=2, window=3, backend="sdpa")
    with torch.no_grad():
        a(torch.randn(1, 3, 32, 32))
    cache = attnmask.mask_cache(a)
    assert cache is not attnmask.mask_cache(b)
    assert cache.info()["entries"] >= 1 and attnmask.mask_cache(b).info()["entries"] == 0
    assert all(m._attnmask_plan.cache is cache for m in a.modules() if hasattr(m, "_attnmask_plan"))
    attnmask.apply(a, heads=1, window=3, backend="sdpa")  # a re-apply is a new installation
    assert attnmask.mask_cache(a) is not cache
    attnmask.remove(a)
    assert attnmask.mask_cache(a) is None
    assert not any(k.startswith("_attnmask") for m in a.modules() for k in m.__dict__)


def test_copies_of_a_patched_model_get_their_own_empty_cache():
    model = attnmask.apply(tiny_vit(), heads=2, window=3, backend="sdpa")
    with torch.no_grad():
        expected = model(torch.ones(1, 3, 32, 32))
    copied = copy.deepcopy(model)
    assert attnmask.mask_cache(copied) is not attnmask.mask_cache(model)
    assert attnmask.mask_cache(copied).info()["entries"] == 0
    with torch.no_grad():
        assert torch.equal(copied(torch.ones(1, 3, 32, 32)), expected)
    assert attnmask.mask_cache(copied).info()["entries"] >= 1


def test_the_cache_bound_holds_while_a_model_runs():
    model = attnmask.apply(tiny_vit(), heads=2, window=3, backend="sdpa")
    cache = attnmask.mask_cache(model)
    one_mask = 17 * 32 * 4  # 17 tokens, rows padded to 32, fp32
    cache.max_bytes = one_mask  # room for the additive mask, not for its boolean window too
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32))
        again = model(torch.randn(1, 3, 32, 32))
    assert torch.isfinite(out).all() and torch.isfinite(again).all()
    info = cache.info()
    assert info["bytes"] <= one_mask and info["peak_bytes"] <= one_mask


def test_a_cudnn_refusal_expires():
    """A refused combination is retried after a while (doubling while it keeps failing), and
    forgotten once it runs: a transient failure does not disable the path for the process."""
    mask = LocalMask((2, 2), (1, 1), 1, 2, (0,))
    q = torch.randn(1, 2, mask.num_tokens, 8, dtype=torch.bfloat16)
    key = (q.dtype, 8, 8, q.shape[-2], q.shape[1], q.device)
    sdpa._CUDNN_REFUSED.pop(key, None)
    try:
        assert sdpa._cudnn_one_call(q, q, q, mask, None) is None  # no cuDNN on CPU: refused
        start, length = sdpa._CUDNN_REFUSED[key][0] - sdpa.RETRY_AFTER_S, sdpa.RETRY_AFTER_S
        assert sdpa.cudnn_refused(key, start + length / 2)
        assert not sdpa.cudnn_refused(key, start + length + 1)
        sdpa.refuse_cudnn(key, start + length + 1)  # refused again: twice as long
        assert sdpa._CUDNN_REFUSED[key][1] == 2 * length
        assert sdpa.cudnn_refused(key, start + 2 * length)
        sdpa.accept_cudnn(key)
        assert not sdpa.cudnn_refused(key)
    finally:
        sdpa._CUDNN_REFUSED.pop(key, None)


def kept_bytes(backend: str, grid: tuple[int, int]) -> tuple[int, int]:
    """(tokens, peak bytes of a fresh cache) after one call of ``backend`` on ``grid``,
    checked against the float64 reference."""
    from attnmask.kernels import KERNELS
    from attnmask.masks import MaskCache

    cache = MaskCache()
    mask = LocalMask(grid, (7, 7), 1, 4, (0, 1), cache=cache)
    n = mask.num_tokens
    q, k, v = (torch.randn(1, 4, n, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    with torch.no_grad():
        out = KERNELS[backend](q, k, v, mask)
    reference = KERNELS["reference"](q.double(), k.double(), v.double(), mask)
    torch.testing.assert_close(out.double(), reference, rtol=1e-4, atol=1e-5)
    return n, cache.info()["peak_bytes"]


def test_only_sdpa_keeps_an_n_by_n_mask():
    """SDPA needs an ``N x N`` mask tensor and keeps exactly one (the additive form). The
    blocked backend keeps per-block gather indices and windows (linear in the tokens), flex a
    block-level mask; the fused kernel (see the next test) keeps nothing."""
    n, sdpa = kept_bytes("sdpa", (32, 32))
    assert sdpa == n * (-(-n // 16) * 16) * 4  # one fp32 additive mask, rows padded
    small_n, small = kept_bytes("blocked", (16, 16))
    n, blocked = kept_bytes("blocked", (32, 32))
    assert blocked / small < 6, f"blocked: {small} bytes at {small_n} tokens, {blocked} at {n}: not linear"
    assert blocked < n * n, f"blocked keeps {blocked} bytes at {n} tokens"
    n, flex = kept_bytes("flex", (32, 32))
    assert flex < 16 * n, f"flex keeps {flex} bytes at {n} tokens"


def test_the_fused_kernel_keeps_no_mask():
    from attnmask.kernels import fused

    why = fused.unavailable(torch.device("cpu"))
    if why is not None:
        pytest.skip(why)
    _, kept = kept_bytes("triton", (6, 6))  # the Triton interpreter is slow: a small grid
    assert kept == 0
