"""Patched models run from many threads at once, at different image sizes.

Each thread's forward must see its own grid: the grid recorded by the patch embedding's hook
is per thread, and masks are looked up in the installation's locked cache. Two sizes with
the same token count (an 8 x 2 and a 2 x 8 grid) are the case a shared "last grid" gets
wrong without failing loudly.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import attnmask

timm = pytest.importorskip("timm")

SIZES = [(64, 16), (16, 64), (40, 24), (32, 32)]
"""Image sizes (patch 8): grids 8x2, 2x8 (same 16 tokens), 5x3 and 4x4."""
REPETITIONS = 50


def dynamic_vit(**extra) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=4,
        num_classes=0,
        dynamic_img_size=True,
        **extra,
    )
    return model.eval()


def run_concurrently(model, images: list[torch.Tensor], repetitions: int) -> list[list[torch.Tensor]]:
    """Every repetition, one thread per image starts its forward at the same moment (a barrier)."""
    barrier = threading.Barrier(len(images))

    def forward(x: torch.Tensor) -> torch.Tensor:
        barrier.wait()
        with torch.no_grad():
            return model(x)

    results = []
    with ThreadPoolExecutor(max_workers=len(images)) as pool:
        for _ in range(repetitions):
            results.append(list(pool.map(forward, images)))
    return results


@pytest.mark.parametrize("backend", ["sdpa", "blocked", "auto"])
def test_concurrent_forwards_at_different_sizes_equal_sequential_ones(backend):
    model = dynamic_vit(reg_tokens=1)
    attnmask.apply(model, heads=2, window=3, backend=backend)
    images = [torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(i)) for i, size in enumerate(SIZES)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many Python threads, one intra-op thread each (and the same
    # one thread for the sequential run: kernels may sum in another order with more threads)
    try:
        with torch.no_grad():
            sequential = [model(x) for x in images]
        results = run_concurrently(model, images, REPETITIONS)
    finally:
        torch.set_num_threads(threads)
    # The masks really differ between the two 16-token grids: a swapped mask would show.
    swapped = attnmask.apply(dynamic_vit(reg_tokens=1), heads=2, window=3, backend=backend)
    with torch.no_grad():
        assert not torch.allclose(swapped(images[1].transpose(-1, -2)), sequential[0])
    for repetition, outputs in enumerate(results):
        for size, out, expected in zip(SIZES, outputs, sequential):
            assert torch.equal(out, expected), f"repetition {repetition}, image {size}: differs from the sequential run"


def test_grids_with_equal_token_counts_get_their_own_masks():
    """The 8 x 2 and 2 x 8 grids hold 16 tokens each; each must be masked on its own grid."""
    model = dynamic_vit()
    attnmask.apply(model, heads="all", window=3, backend="sdpa")
    tall = torch.randn(1, 3, 64, 16)
    wide = tall.transpose(-1, -2).contiguous()
    with torch.no_grad():
        out_tall = model(tall)
        model(wide)
        again = model(tall)
    assert torch.equal(out_tall, again)
    cache = attnmask.mask_cache(model)
    keys = [k for k in cache._entries if k[0] == "additive"]
    assert {k[1] for k in keys} == {(8, 2), (2, 8)}


def test_thread_grid_is_its_own():
    """A thread's own forward decides its grid; another thread's later forward does not change it."""
    model = dynamic_vit()
    attnmask.apply(model, heads=2, window=3)
    layout = model.blocks[0].attn._attnmask_tokens
    assert layout.last_grid is None  # no forward yet, in any thread
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 16))
    assert layout.last_grid == (8, 2)
    seen = []

    def other():
        with torch.no_grad():
            model(torch.randn(1, 3, 16, 64))
        seen.append(layout.last_grid)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert seen == [(2, 8)]
    assert layout.last_grid == (8, 2)  # the main thread still reads its own


def test_thread_without_a_forward_reads_the_latest_grid():
    """Activation checkpointing reruns blocks during backward, and on CUDA the backward runs on
    autograd's own thread, which never ran the patch embedding: that thread masks the block
    with the latest forward's grid (8 x 2 here), not the configured one (4 x 4, which holds
    as many tokens and fitted silently before). A recompute on another thread is simulated
    on the CPU by running the block from a fresh thread."""
    model = dynamic_vit()
    attnmask.apply(model, heads="all", window=3, backend="sdpa")
    block = model.blocks[0]
    tokens = {}
    hook = block.register_forward_pre_hook(lambda module, args: tokens.setdefault("x", args[0].detach().clone()))
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 16, generator=torch.Generator().manual_seed(1)))  # an 8 x 2 grid
    hook.remove()
    with torch.no_grad():
        here = block(tokens["x"])
    recomputed = []

    def recompute():
        with torch.no_grad():
            recomputed.append(block(tokens["x"]))

    thread = threading.Thread(target=recompute)
    thread.start()
    thread.join()
    assert len(recomputed) == 1  # the recompute raised nothing
    torch.testing.assert_close(recomputed[0], here, rtol=0, atol=0)
    attnmask.remove(model)
    with torch.no_grad():
        unmasked = block(tokens["x"])
    assert not torch.allclose(unmasked, here, atol=1e-4)  # the block is masked: the check can fail


def test_activation_checkpointing_gives_the_gradients_of_a_plain_backward():
    """timm's grad checkpointing recomputes masked blocks during backward; gradients equal
    those of a plain backward. (On the CPU the recompute runs on the calling thread: the
    CUDA case, autograd's own thread, is the test above's.)"""
    images = torch.randn(2, 3, 64, 16, generator=torch.Generator().manual_seed(3))
    grads = []
    for checkpointing in (False, True):
        model = attnmask.apply(dynamic_vit().train(), heads="all", window=3)
        model.set_grad_checkpointing(checkpointing)
        model(images).square().sum().backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_kept_patches_are_never_another_threads():
    """Kept patches are per-sample indices of one forward: a thread that recorded none reads
    ``None`` (and a shuffled layout then refuses the call), never another forward's indices."""
    from attnmask.adapters.layouts import KeptPatches

    kept = KeptPatches.from_patch_drop()
    keep = torch.tensor([[0, 2, 3]])
    kept(None, (), (torch.zeros(1, 3, 4), keep))
    assert kept.keep is keep
    seen = []
    thread = threading.Thread(target=lambda: seen.append(kept.keep))
    thread.start()
    thread.join()
    assert seen == [None]
