"""The table of model families every adapter is tested on (see ``test_families.py``).

Each :class:`FamilyCase` says how to build a tiny model of one family without downloads,
how to feed it, where its first block is and how image patches map to that block's tokens.
The generic property tests in ``test_families.py`` run on every row. Rows are added by
the ``cases_*.py`` modules, one per host library, each with a ``CASES`` list, gathered by
:func:`collect_cases`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn


def chebyshev_reach(q: tuple[int, int], p: tuple[int, int], window: int) -> bool:
    """Whether a ``window x window`` neighbourhood of patch ``q`` contains patch ``p``."""
    return abs(q[0] - p[0]) <= window // 2 and abs(q[1] - p[1]) <= window // 2


def swin_reach(attention_window: int) -> Callable[[tuple[int, int], tuple[int, int], int], bool]:
    """Reach in a Swin block without shift: same attention window, and within the locality window."""

    def reach(q, p, window):
        same = q[0] // attention_window == p[0] // attention_window and q[1] // attention_window == p[1] // attention_window
        return same and chebyshev_reach(q, p, window)

    return reach


def first_output(out: Any) -> torch.Tensor:
    """The main tensor of a model's output: a tensor, ``out[0]`` of a tuple, or a HF ModelOutput."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "last_hidden_state", "pooler_output"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    return out[0]


@dataclass
class FamilyCase:
    """One model family in the test table.

    Attributes:
        id: pytest id.
        family: Adapter name ``describe()`` must report.
        build: ``seed -> model``: a tiny, randomly initialised model in eval mode.
        images: ``(batch, seed) -> images`` of the default test size.
        grid: Patch grid of those images.
        patch: Pixels per patch side (the locality test perturbs one patch's pixels).
        first_block: ``model -> module`` whose output is the first block's output.
        token_of: ``(row, col) -> index`` of an image patch's token in :attr:`block_tokens`.
        block_tokens: ``block output -> (B, T, C)`` tensor.
        reach: ``(query patch, other patch, window) -> bool``: whether a masked head of the
            first layer lets the query see the other patch.
        forward: ``(model, images) -> tensor`` compared between runs.
        kernel_backed: Whether masked heads go through ``attnmask.kernels`` (then
            ``backend="reference"`` computes them in float64).
        reference_check: A callable ``(model, images)`` asserting the patched attention equals
            a float64 computation written from the host's weights (required where
            ``kernel_backed`` is False; kernel-backed families whose adapter prepares the
            kernel's inputs itself, such as the Swin families, have one too).
        other_images: ``(batch, seed) -> images`` of another size the host accepts, with
            :attr:`other_grid`; ``None`` if the host accepts one size only.
        window: Locality window for the locality test (small, so that far patches exist).
        compile_in_default_run: Whether the torch.compile test runs without ``-m slow``.
    """

    id: str
    family: str
    build: Callable[[int], nn.Module]
    images: Callable[[int, int], torch.Tensor]
    grid: tuple[int, int]
    patch: int
    first_block: Callable[[nn.Module], nn.Module]
    token_of: Callable[[int, int], int]
    block_tokens: Callable[[Any], torch.Tensor] = lambda out: first_output(out)
    reach: Callable[[tuple[int, int], tuple[int, int], int], bool] = chebyshev_reach
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lambda m, x: first_output(m(x))
    kernel_backed: bool = True
    reference_check: Optional[Callable[[nn.Module, torch.Tensor], None]] = None
    other_images: Optional[Callable[[int, int], torch.Tensor]] = None
    other_grid: Optional[tuple[int, int]] = None
    window: int = 3
    compile_in_default_run: bool = False
    marks: tuple = field(default_factory=tuple)


def random_images(size: tuple[int, int]) -> Callable[[int, int], torch.Tensor]:
    def images(batch: int = 2, seed: int = 1) -> torch.Tensor:
        return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))

    return images


def row_major(prefix_tokens: int, width: int) -> Callable[[int, int], int]:
    """Token index of patch ``(row, col)`` for prefix tokens followed by a row-major grid."""
    return lambda row, col: prefix_tokens + row * width + col


def randomize_tokens(model: nn.Module, names: tuple[str, ...]) -> None:
    """Give zero-initialised tokens/embeddings (class, registers, positions) random values."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.split(".")[-1] in names:
                param.normal_(std=0.5)


def unit_layer_scale(model: nn.Module) -> None:
    """Set layer-scale factors (initialised near 0, e.g. 1e-5) to 1, so blocks visibly change outputs."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.split(".")[-1]
            if leaf in ("gamma", "gamma_1", "gamma_2", "lambda1", "lambda_1", "lambda_2", "ls1", "ls2"):
                param.fill_(1.0)


def collect_cases() -> list[FamilyCase]:
    """Every ``CASES`` row of the ``cases_*.py`` modules next to this file."""
    import importlib
    import pkgutil
    from pathlib import Path

    cases: list[FamilyCase] = []
    here = Path(__file__).parent
    for info in sorted(pkgutil.iter_modules([str(here)]), key=lambda i: i.name):
        if info.name.startswith("cases_"):
            module = importlib.import_module(info.name)
            cases.extend(module.CASES)
    return cases

