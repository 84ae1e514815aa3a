"""``torch.compile`` of patched models: no graph break or recompilation added by attnmask,
and no mask built inside the compiled graph.

Every family of the test table (``families.py``) is compiled with ``fullgraph=True`` before
and after ``apply`` and run on three batches of one shape. Graphs are captured with a
backend that records them (dynamo's tracing is what adds breaks and recompilations; inductor
is exercised by ``test_families.test_compile_same_outputs``). Masks are looked up at trace
time and enter the graph as constants, so a patched graph holds no more ``arange`` calls over
the tokens (where every dense mask starts) than the unpatched one.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import attnmask
from families import collect_cases

CASES = collect_cases()
DEFAULT_RUN = {
    "timm-vit",
    "timm-vit-dynamic",
    "timm-swin",
    "timm-cait",
    "timm-eva02-rope",
    "timm-generic-vit-rope",
    "hf-vit",
    "hf-swin",
    "hf-beit",
    "hf-ijepa",
    "hf-vit-mae",
    "torchvision-vit",
    "torchvision-swin",
}
"""Families compiled without ``-m slow`` (one or two per adapter; the others are slow)."""


def params():
    return [pytest.param(c, id=c.id, marks=() if c.id in DEFAULT_RUN else (pytest.mark.slow,)) for c in CASES]


class Capture:
    """A dynamo backend that keeps the graphs it is given and runs them as they are."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def calls(self, name: str, min_numel: int = 0) -> int:
        """Calls of ``name`` in the graphs whose result has more than ``min_numel`` elements."""

        def numel(node) -> int:
            value = node.meta.get("example_value")
            return value.numel() if isinstance(value, torch.Tensor) else 0

        return sum(
            1
            for gm in self.graphs
            for node in gm.graph.nodes
            if node.op == "call_function" and getattr(node.target, "__name__", "") == name and numel(node) > min_numel
        )


def compiled_run(case, model, batches, fullgraph: bool) -> tuple[Capture, list, dict]:
    """Compile ``case.forward`` on ``model``, run it on every batch; eager outputs first (the
    eager runs must not change what the compiled ones see)."""
    torch._dynamo.reset()
    expected = [case.forward(model, x) for x in batches]
    capture = Capture()
    compiled = torch.compile(lambda x: case.forward(model, x), fullgraph=fullgraph, backend=capture)
    counters.clear()
    outputs = [compiled(x) for x in batches]
    for out, ref in zip(outputs, expected):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    stats = {"breaks": sum(counters["graph_break"].values()), "graphs": len(capture.graphs)}
    return capture, outputs, stats


@pytest.mark.parametrize("case", params())
@torch.no_grad()
def test_fullgraph_without_added_breaks_recompiles_or_masks_in_the_graph(case):
    batches = [case.images(2, seed) for seed in range(3)]
    model = case.build(0)
    try:
        plain, _, plain_stats = compiled_run(case, model, batches, fullgraph=True)
        fullgraph = True
    except torch._dynamo.exc.Unsupported:  # the host itself does not compile in one graph
        plain, _, plain_stats = compiled_run(case, model, batches, fullgraph=False)
        fullgraph = False
    attnmask.apply(model, heads=0.5, window=case.window)
    patched, outputs, stats = compiled_run(case, model, batches, fullgraph=fullgraph)
    unpatched_outputs = [case.forward(attnmask.remove(model), x) for x in batches]
    assert not torch.allclose(outputs[0], unpatched_outputs[0]), "the compiled model ran without masks"
    assert stats["breaks"] == plain_stats["breaks"], f"graph breaks: {plain_stats} unpatched, {stats} patched"
    assert stats["graphs"] == plain_stats["graphs"], f"graphs over 3 batches: {plain_stats} unpatched, {stats} patched"
    if fullgraph:
        assert stats["graphs"] == 1, f"recompiled across batches of one shape: {stats}"
    # Token-index aranges (more elements than any prefix) are where a dense mask would start.
    assert patched.calls("arange", 16) <= plain.calls("arange", 16), (
        f"the patched graph builds masks: {patched.calls('arange', 16)} arange calls over the tokens, "
        f"{plain.calls('arange', 16)} unpatched"
    )


@torch.no_grad()
def test_layers_with_equal_plans_share_one_graph():
    """Regional compilation (each block compiled on its own): blocks whose masks are the same
    run one compiled graph, not one per layer."""
    case = next(c for c in CASES if c.id == "timm-vit")
    model = case.build(0)
    attnmask.apply(model, heads=2, window=case.window)
    images = case.images(2, 0)
    expected = model(images)
    torch._dynamo.reset()
    capture = Capture()
    blocks = list(model.blocks)
    assert len(blocks) >= 2
    for block in blocks:
        block.compile(fullgraph=True, backend=capture)
    for seed in range(3):
        out = model(case.images(2, seed))
        if seed == 0:
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert len(capture.graphs) == 1, f"{len(capture.graphs)} graphs for {len(blocks)} blocks with equal masks"


@torch.no_grad()
def test_compiled_graph_holds_the_mask_as_a_constant():
    """The mask the compiled graph uses is the installation's cached one, looked up once."""
    case = next(c for c in CASES if c.id == "timm-vit")
    model = case.build(0)
    attnmask.apply(model, heads=2, window=case.window, backend="sdpa")
    torch._dynamo.reset()
    capture = Capture()
    compiled = torch.compile(model, fullgraph=True, backend=capture)
    compiled(case.images(2, 0))
    cache = attnmask.mask_cache(model)
    held = cache.info()
    assert held["entries"] >= 1 and held["bytes"] > 0
    cache.clear()  # the graph keeps its constant: nothing is rebuilt or looked up per call
    compiled(case.images(2, 1))
    assert cache.info()["entries"] == 0
    assert len(capture.graphs) == 1


def _block_list(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's first list of two or more modules: its transformer blocks."""
    return next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) >= 2)


def _regional_run(case, model, batches) -> tuple[list, Capture, dict]:
    torch._dynamo.reset()
    counters.clear()
    capture = Capture()
    blocks = _block_list(model)
    for block in blocks:
        block.compile(fullgraph=True, backend=capture)
    try:
        outputs = [case.forward(model, x) for x in batches]
    finally:
        for block in blocks:  # Module.compile is undone by dropping its compiled call
            block._compiled_call_impl = None
    return outputs, capture, {"breaks": sum(counters["graph_break"].values()), "graphs": len(capture.graphs), "blocks": len(blocks)}


@pytest.mark.parametrize("case_id", ["timm-generic-vit-rope", "hf-ijepa"])
@torch.no_grad()
def test_regional_compile_of_structurally_patched_models(case_id):
    """Blocks compiled on their own, the patch embedding and the model's own hooks eager: a
    structurally patched layer reads the grid the eager part of this forward recorded (the
    compiled region has no model-level hook of its own)."""
    case = next(c for c in CASES if c.id == case_id)
    model = case.build(0)
    batches = [case.images(2, seed) for seed in range(3)]
    _, _, plain = _regional_run(case, model, batches)
    attnmask.apply(model, heads=0.5, window=case.window)
    expected = [case.forward(model, x) for x in batches]
    outputs, _, stats = _regional_run(case, model, batches)
    for out, ref in zip(outputs, expected):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outputs[0], case.forward(attnmask.remove(model), batches[0]))
    assert stats["breaks"] == plain["breaks"] == 0
    # One graph for all blocks (no block-specific value is read while tracing), as unpatched.
    assert stats["graphs"] == plain["graphs"], f"{plain} unpatched, {stats} patched"


def resolution_params():
    """(case, backend, dynamic): every kernel under both kinds of dynamic shapes; one of each
    kernel by default, the rest with ``-m slow``."""
    default = {("blocked", True), ("flex", True), ("flex", None), ("sdpa", None), ("generic", None), ("generic", True)}
    out = []
    for case_id, backend in [("timm-vit-dynamic", b) for b in ("sdpa", "blocked", "flex", "auto")] + [("timm-generic-vit-rope", "auto")]:
        for dynamic in (True, None):
            key = ("generic" if "generic" in case_id else backend, dynamic)
            name = f"{case_id}-{backend}-{'dynamic' if dynamic else 'automatic-dynamic'}"
            out.append(pytest.param(case_id, backend, dynamic, id=name, marks=() if key in default else (pytest.mark.slow,)))
    return out


@pytest.mark.parametrize("case_id, backend, dynamic", resolution_params())
@torch.no_grad()
def test_compiled_at_several_resolutions(case_id, backend, dynamic):
    """``dynamic=True``, or the default's automatic dynamic shapes once a second resolution
    arrives: the grid stays a plain number (masks are per grid, looked up at trace time);
    the outputs are the eager ones, and the patched model compiles no more graphs over the
    resolutions than the unpatched one (timm's dynamic-size ViT: one per resolution)."""
    case = next(c for c in CASES if c.id == case_id)
    model = case.build(0)
    images = [torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(i)) for i, size in enumerate([(32, 32), (48, 32), (64, 48)])]
    counts = []
    for patched in (False, True):
        if patched:
            attnmask.apply(model, heads=0.5, window=case.window, backend=backend)
        expected = [case.forward(model, x) for x in images]
        torch._dynamo.reset()
        counters.clear()
        capture = Capture()
        compiled = torch.compile(lambda x: case.forward(model, x), fullgraph=True, dynamic=dynamic, backend=capture)
        for x, ref in zip(images, expected):
            torch.testing.assert_close(compiled(x), ref, rtol=1e-5, atol=1e-5)
        counts.append(len(capture.graphs))
    assert counts[1] <= counts[0], f"graphs over 3 resolutions: {counts[0]} unpatched, {counts[1]} patched"
    assert not torch.allclose(expected[0], case.forward(attnmask.remove(model), images[0]))


@torch.no_grad()
def test_compiled_below_the_model_root_recompiles_only_per_resolution():
    """``torch.compile(model.forward_features)`` skips the model's own hooks: a structurally
    patched model must not carry grids of earlier forwards into the traced region (dynamo
    would guard on them and recompile as they change). Alternating resolutions, with eager
    calls in between, compile as many graphs as unpatched."""
    case = next(c for c in CASES if c.id == "timm-generic-vit-rope")
    images = [torch.randn(2, 3, *size) for size in [(32, 32), (48, 32)] * 3]
    counts = []
    for patched in (False, True):
        model = case.build(0)
        if patched:
            attnmask.apply(model, heads=0.5, window=case.window)
        torch._dynamo.reset()
        capture = Capture()
        compiled = torch.compile(model.forward_features, backend=capture)
        for x in images:
            torch.testing.assert_close(compiled(x), model.forward_features(x), rtol=1e-5, atol=1e-5)
        counts.append(len(capture.graphs))
    assert counts[1] == counts[0], f"graphs: {counts[0]} unpatched, {counts[1]} patched"
