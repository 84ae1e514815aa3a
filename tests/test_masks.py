"""The mask definition: geometry against a brute-force reading of the definition."""

import torch
from helpers import brute_force_mask
from hypothesis import given
from strategies import geometries

from attnmask import masks
from attnmask.masks import LocalMask


@given(geometries())
def test_dense_mask_matches_definition(geometry):
    grid, window, prefix_tokens, num_heads, heads, prefix = geometry
    mask = LocalMask(grid, window, prefix_tokens, num_heads, heads, prefix)
    expected = brute_force_mask(grid, window, prefix_tokens, num_heads, heads, prefix)
    assert torch.equal(mask.dense(), expected)
    for h in heads:
        assert torch.equal(mask.window_mask(torch.device("cpu")), expected[h])


@given(geometries())
def test_covers_grid_exactly_when_nothing_is_masked(geometry):
    grid, window, prefix_tokens, num_heads, _, prefix = geometry
    mask = LocalMask(grid, window, prefix_tokens, num_heads, tuple(range(num_heads)), prefix)
    assert mask.covers_grid == bool(mask.dense().all())


def test_windows_are_clipped_at_the_border():
    mask = LocalMask((5, 5), (3, 3), 0, 1, (0,))
    visible = mask.dense()[0].sum(-1).view(5, 5)
    assert visible[0, 0] == 4 and visible[0, 4] == 4 and visible[4, 4] == 4  # corners
    assert visible[0, 2] == 6 and visible[2, 0] == 6  # edges
    assert visible[2, 2] == 9  # inside


def test_rectangular_window_is_rows_by_columns():
    mask = LocalMask((7, 7), (3, 5), 0, 1, (0,))
    centre = mask.dense()[0, 3 * 7 + 3].view(7, 7)
    rows, cols = centre.any(1).nonzero().flatten(), centre.any(0).nonzero().flatten()
    assert rows.tolist() == [2, 3, 4] and cols.tolist() == [1, 2, 3, 4, 5]


def test_prefix_policies():
    glob = LocalMask((3, 3), (1, 1), 2, 1, (0,), "global").dense()[0]
    iso = LocalMask((3, 3), (1, 1), 2, 1, (0,), "isolated").dense()[0]
    assert glob[:2].all() and iso[:2].all()  # prefix queries see everything
    assert glob[2:, :2].all()  # patches see prefix tokens
    assert not iso[2:, :2].any()  # ... unless isolated
    assert torch.equal(glob[2:, 2:], torch.eye(9, dtype=torch.bool))  # 1x1 window: itself only


def test_window_mask_is_cached_per_geometry_and_device():
    masks.clear_cache()
    a = LocalMask((4, 6), (3, 3), 1, 4, (0, 1))
    b = LocalMask((4, 6), (3, 3), 1, 8, (5,))  # same geometry, other heads: same mask
    first = a.window_mask(torch.device("cpu"))
    assert b.window_mask(torch.device("cpu")) is first
    assert masks.cache_info()["entries"] == 1
    LocalMask((6, 4), (3, 3), 1, 4, (0,)).window_mask(torch.device("cpu"))
    assert masks.cache_info()["entries"] == 2


@given(geometries())
def test_positions_read_the_full_layout_mask_per_sample(geometry):
    """Per-sample subsets/reorderings (ViTMAE): token i of sample b is full-layout token positions[b, i]."""
    grid, window, prefix_tokens, num_heads, heads, prefix = geometry
    full = brute_force_mask(grid, window, prefix_tokens, num_heads, heads, prefix)
    patches = grid[0] * grid[1]
    generator = torch.Generator().manual_seed(patches + prefix_tokens)
    kept = max(1, patches // 2)
    order = torch.stack([torch.randperm(patches, generator=generator)[:kept] for _ in range(3)])
    positions = torch.cat([torch.arange(prefix_tokens).expand(3, -1), order + prefix_tokens], dim=1)
    mask = LocalMask(grid, window, prefix_tokens, num_heads, heads, prefix, positions)
    dense = mask.dense()
    assert dense.shape == (3, num_heads, prefix_tokens + kept, prefix_tokens + kept)
    for b in range(3):
        idx = positions[b]
        assert torch.equal(dense[b], full[:, idx][:, :, idx])
        if heads:
            assert torch.equal(mask.window_mask()[b, 0], full[heads[0]][idx][:, idx])


@given(geometries())
def test_forbidden_is_the_negated_per_head_mask_and_cached(geometry):
    grid, window, prefix_tokens, num_heads, heads, prefix = geometry
    mask = LocalMask(grid, window, prefix_tokens, num_heads, heads, prefix)
    expected = ~brute_force_mask(grid, window, prefix_tokens, num_heads, heads, prefix)
    assert torch.equal(mask.forbidden(), expected)
    assert mask.forbidden() is mask.forbidden()  # built once per geometry, heads and device
    logits = torch.randn(2, num_heads, mask.num_tokens, mask.num_tokens)
    out = masks.mask_logits(logits, mask)
    assert torch.equal(out.isneginf(), expected.expand_as(out) if not mask.is_identity else torch.zeros_like(out, dtype=torch.bool))
    assert torch.equal(out[~out.isneginf()], logits[~out.isneginf()])


def test_cache_is_bounded_in_bytes():
    cache = masks.MaskCache(max_bytes=3 * 400 * 4)  # room for three 20 x 20 fp32 masks
    for side in range(1, 8):
        cache.get(("test-bytes", side), lambda: torch.zeros(20, 20))
    info = cache.info()
    assert info["entries"] == 3 and info["bytes"] == 3 * 1600 and info["peak_bytes"] == 3 * 1600
    assert cache.get(("test-bytes", 7), lambda: None) is not None  # the newest stay
    assert cache.get(("test-bytes", 1), lambda: None) is None  # the oldest went
    too_big = torch.zeros(40, 40)  # 6400 bytes: more than the whole bound
    assert cache.get(("test-bytes", "big"), lambda: too_big) is too_big
    assert cache.info()["bytes"] == 3 * 1600  # returned, not kept
    cache.clear()
    assert cache.info()["bytes"] == 0 and cache.info()["peak_bytes"] == 3 * 1600


def test_masks_go_to_their_own_cache():
    own = masks.MaskCache()
    masks.clear_cache()
    mask = LocalMask((4, 6), (3, 3), 1, 4, (0, 1), cache=own)
    mask.additive_mask()
    mask.forbidden()
    assert own.info()["entries"] == 2  # additive (its boolean window is not kept) and forbidden
    assert masks.cache_info()["entries"] == 0
    assert mask == LocalMask((4, 6), (3, 3), 1, 4, (0, 1))  # the cache is not part of the geometry


def test_cache_copies_are_new_and_empty():
    import copy
    import pickle

    cache = masks.MaskCache(max_bytes=1 << 20)
    cache.get(("x",), lambda: torch.zeros(4))
    for copied in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        assert copied is not cache and copied.id != cache.id
        assert copied.info()["entries"] == 0 and copied.max_bytes == 1 << 20
        assert masks.cache_by_id(copied.id) is copied
