"""The properties of ``tests/families.py``'s table, on every supported family (tiny configs, CPU).

Each test is parametrised over :data:`families.CASES`: identity, float64 reference,
locality in the first block, round trip with the state_dict unchanged, deepcopy, gradients,
other input sizes and ``torch.compile``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from families import FamilyCase, collect_cases
from helpers import same_snapshot, snapshot

import attnmask

CASES = collect_cases()


def params(select=lambda case: True, slow_unless=None):
    out = []
    for case in CASES:
        if not select(case):
            continue
        marks = list(case.marks)
        if slow_unless is not None and not slow_unless(case):
            marks.append(pytest.mark.slow)
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


def run(case: FamilyCase, model, images):
    with torch.no_grad():
        return case.forward(model, images)


def first_block_tokens(case: FamilyCase, model, images) -> torch.Tensor:
    seen = {}
    handle = case.first_block(model).register_forward_hook(lambda m, args, out: seen.update(out=out))
    try:
        run(case, model, images)
    finally:
        handle.remove()
    return case.block_tokens(seen["out"])


def some_heads(layer: int, num_layers: int, num_heads: int) -> list[int]:
    """Heads 0 and 2 (a non-contiguous subset) where a layer has more than 2 heads, else head 0."""
    return [0, 2] if num_heads > 2 else [0]


def covering(grid) -> tuple[int, int]:
    return 2 * grid[0] - 1, 2 * grid[1] - 1


def test_every_registered_family_has_a_case():
    tested = {case.family for case in CASES}
    registered = {row["family"] for row in attnmask.supported()}
    assert registered <= tested, f"families without a test case: {sorted(registered - tested)}"


@pytest.mark.parametrize("case", params())
def test_identity(case):
    model = case.build(0)
    images = case.images(2, 1)
    expected = run(case, model, images)
    attnmask.apply(model, heads=0, window=3)
    assert torch.equal(run(case, model, images), expected)
    attnmask.apply(model, heads="all", window=covering(case.grid))
    torch.testing.assert_close(run(case, model, images), expected, rtol=1e-5, atol=1e-5)
    attnmask.apply(model, heads="all", window=case.window)
    assert describe_family(model) == case.family
    assert not torch.allclose(run(case, model, images), expected, atol=1e-4)


def describe_family(model) -> str:
    report = attnmask.describe(model)
    assert report.patched
    return report.family


@pytest.mark.parametrize("case", params())
def test_matches_float64_reference(case):
    model = case.build(0)
    images = case.images(2, 1)
    if not case.kernel_backed:
        attnmask.apply(model, heads=some_heads, window=case.window)
        case.reference_check(model, images)
        return
    attnmask.apply(model, heads=some_heads, window=case.window, backend="sdpa")
    fast = run(case, model, images)
    attnmask.apply(model, heads=some_heads, window=case.window, backend="reference")
    reference = run(case, model, images)
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-5)
    if case.reference_check is not None:  # what the adapter hands the kernel, checked from the weights
        attnmask.apply(model, heads=some_heads, window=case.window, backend="sdpa")
        case.reference_check(model, images)
    attnmask.remove(model)
    assert not torch.allclose(run(case, model, images), reference, atol=1e-4)


def perturb_patch(images: torch.Tensor, patch: int, row: int, col: int) -> torch.Tensor:
    out = images.clone()
    out[:, :, row * patch : (row + 1) * patch, col * patch : (col + 1) * patch] += 1.0
    return out


@pytest.mark.parametrize("case", params())
def test_locality_in_first_block(case):
    model = case.build(0)
    attnmask.apply(model, heads={0: "all"}, window=case.window)
    images = case.images(1, 1)
    height, width = case.grid
    query = (height // 2, width // 2)
    cells = [(r, c) for r in range(height) for c in range(width) if (r, c) != query]
    far = [p for p in cells if not case.reach(query, p, case.window)]
    near = [p for p in cells if case.reach(query, p, case.window)]
    assert far and near, "the test grid is too small for this window"
    before = first_block_tokens(case, model, images)[:, case.token_of(*query)]
    for p in (far[0], far[-1]):
        after = first_block_tokens(case, model, perturb_patch(images, case.patch, *p))[:, case.token_of(*query)]
        assert torch.equal(after, before), f"query {query} saw patch {p} outside its window"
    for p in (near[0], near[-1]):
        after = first_block_tokens(case, model, perturb_patch(images, case.patch, *p))[:, case.token_of(*query)]
        assert not torch.allclose(after, before), f"query {query} did not see patch {p} inside its window"
    # The same perturbation reaches the query once the mask is removed.
    attnmask.remove(model)
    before = first_block_tokens(case, model, images)[:, case.token_of(*query)]
    after = first_block_tokens(case, model, perturb_patch(images, case.patch, *far[0]))[:, case.token_of(*query)]
    if case.reach(query, far[0], max(covering(case.grid))):
        assert not torch.allclose(after, before)


@pytest.mark.parametrize("case", params())
def test_round_trip_and_state_dict(case):
    model = case.build(0)
    images = case.images(2, 1)
    expected = run(case, model, images)
    before = snapshot(model)
    attnmask.apply(model, heads=0.5, window=case.window)
    state = model.state_dict()
    assert list(state) == list(before["state"])
    assert all(torch.equal(state[k], before["state"][k]) for k in state)
    assert not torch.equal(run(case, model, images), expected)
    attnmask.remove(model)
    assert same_snapshot(before, snapshot(model))
    assert torch.equal(run(case, model, images), expected)


@pytest.mark.parametrize("case", params())
def test_deepcopy_and_gradients(case):
    model = case.build(0)
    images = case.images(2, 1)
    attnmask.apply(model, heads=0.5, window=case.window)
    expected = run(case, model, images)
    copied = copy.deepcopy(model)
    assert attnmask.is_patched(copied)
    assert torch.equal(run(case, copied, images), expected)
    attnmask.remove(copied)
    assert attnmask.is_patched(model) and not attnmask.is_patched(copied)
    assert torch.equal(run(case, model, images), expected)

    model.train()
    case.forward(model, images).float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(torch.isfinite(g).all() for g in grads if g is not None)


@pytest.mark.parametrize("case", params(lambda c: c.other_images is not None))
def test_other_input_sizes(case):
    model = case.build(0)
    images = case.other_images(2, 1)
    attnmask.apply(model, heads=some_heads, window=case.window)
    fast = run(case, model, images)
    assert attnmask.describe(model).grid == case.other_grid
    if case.kernel_backed:
        attnmask.apply(model, heads=some_heads, window=case.window, backend="reference")
        torch.testing.assert_close(run(case, model, images), fast, rtol=1e-4, atol=1e-5)
    if case.reference_check is not None:
        attnmask.apply(model, heads=some_heads, window=case.window)
        case.reference_check(model, images)


@pytest.mark.parametrize("case", params(slow_unless=lambda c: c.compile_in_default_run))
def test_compile_same_outputs(case):
    torch._dynamo.reset()
    model = case.build(0)
    images = case.images(2, 1)
    attnmask.apply(model, heads=0.5, window=case.window)
    expected = run(case, model, images)
    # Compile the case's whole forward (``torch.compile(model).forward_features`` would hand
    # back the eager method and compile nothing).
    compiled = torch.compile(lambda x: case.forward(model, x))
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), expected, rtol=1e-5, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"


@pytest.mark.parametrize("case", params(lambda c: c.kernel_backed))
def test_flex_backend_matches_reference_in_float64(case):
    """``backend="flex"`` inside every kernel-backed family (host masks, per-sample positions,
    prefix tokens) against the float64 reference; float64 runs FlexAttention's eager path."""
    model = case.build(0).double()
    images = case.images(2, 1).double()
    attnmask.apply(model, heads=some_heads, window=case.window, backend="flex")
    flex = run(case, model, images)
    attnmask.apply(model, heads=some_heads, window=case.window, backend="reference")
    torch.testing.assert_close(flex, run(case, model, images), rtol=1e-7, atol=1e-9)
