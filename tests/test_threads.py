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
    with torch.no_grad():
        sequential = [model(x) for x in images]
    # The masks really differ between the two 16-token grids: a swapped mask would show.
    swapped = attnmask.apply(dynamic_vit(reg_tokens=1), heads=2, window=3, backend=backend)
    with torch.no_grad():
        assert not torch.allclose(swapped(images[1].transpose(-1, -2)), sequential[0])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many Python threads, one intra-op thread each
    try:
        results = run_concurrently(model, images, REPETITIONS)
    finally:
        torch.set_num_threads(threads)
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
    """A thread that has not run a forward sees no grid of another thread's forward."""
    model = dynamic_vit()
    attnmask.apply(model, heads=2, window=3)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 16))
    layout = model.blocks[0].attn._attnmask_tokens
    assert layout.last_grid == (8, 2)
    seen = []
    thread = threading.Thread(target=lambda: seen.append(layout.last_grid))
    thread.start()
    thread.join()
    assert seen == [None]
