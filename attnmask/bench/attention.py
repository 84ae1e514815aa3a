"""Attention level: each masked-attention backend against dense SDPA on the same tensors.

ViT-B/16 shapes: 12 heads of 64, one class token and a square grid, a 7 x 7 window, the
first half or all heads masked. Besides the registered kernels
(:data:`attnmask.kernels.KERNELS`, less the float64 reference: ``auto``, ``sdpa``, ``flex``,
``blocked``), the labelled variants (every FlexAttention variant,
:data:`attnmask.kernels.flex.FLEX_VARIANTS`, and the blocked backend's query blocks,
:data:`BLOCKED_VARIANTS`) and ``"sdpa-bool"``, SDPA with the plain boolean mask of every head:
the naive way, for comparison.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import time
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from ..masks import LocalMask
from .settings import Settings, grid_of
from .timing import DTYPES, Timing, one_line, time_interleaved

Op = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(q, k, v) -> out`` with the mask already bound."""

BASELINE = "dense"
"""Name of the baseline: ``F.scaled_dot_product_attention(q, k, v)``, no mask."""


def selected(name: str, patterns: Optional[tuple[str, ...]]) -> bool:
    """Whether backend ``name`` matches one of the shell-style ``patterns`` (``None``: all)."""
    return patterns is None or any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


BLOCKED_VARIANTS: dict[str, dict] = {f"blocked-{rows}x{cols}": {"block": (rows, cols)} for rows, cols in ((8, 8), (8, 16), (16, 16))}
"""Labelled query blocks of the ``blocked`` backend (``block=(rows, cols)``), for the
benchmarks; ``blocked`` itself takes its block from
:data:`attnmask.kernels.blocked.BLOCK_TABLE`."""

VARIANT_SOURCES = (
    ("flex", "attnmask.kernels.flex", "flex_attention", "FLEX_VARIANTS"),
    ("blocked", "attnmask.kernels.blocked", "blocked_attention", None),
)
"""``(label, module, kernel function, variants table in the module)`` of each backend with
labelled variants; ``None``: the table is :data:`BLOCKED_VARIANTS` (kept here, not in the kernel)."""


def kernel_candidates(variants: bool = True) -> tuple[dict[str, Callable[..., torch.Tensor]], dict[str, str]]:
    """Every kernel to benchmark by name, and the ones that could not be loaded (with why).

    Registered kernels first (less ``"reference"``, which is float64 and only for tests),
    then, with ``variants``, the labelled variants as ``functools.partial``s of their kernel:
    FlexAttention's (``flex-b128-rows``, ...) and the blocked backend's (``blocked-8x8``, ...).
    """
    from ..kernels import KERNELS

    kernels = {name: kernel for name, kernel in KERNELS.items() if name != "reference"}
    unavailable: dict[str, str] = {}
    if not variants:
        return kernels, unavailable
    for label, module_name, function, table in VARIANT_SOURCES:
        try:
            module = importlib.import_module(module_name)
            kernel = getattr(module, function)
        except Exception as error:  # an old torch without FlexAttention, or not written yet
            unavailable[f"{label} variants"] = one_line(error)
            continue
        for name, kwargs in (getattr(module, table, {}) if table else BLOCKED_VARIANTS).items():
            kernels[name] = functools.partial(kernel, **kwargs)
    return kernels, unavailable


def bool_mask_sdpa(mask: LocalMask, device: torch.device) -> Op:
    """SDPA with the boolean mask of every head, built once: ``(N, N)`` when all heads are
    masked, else ``(heads, N, N)`` with the global heads all True."""
    allowed = mask.window_mask(device) if len(mask.heads) == mask.num_heads else mask.dense(device)

    def sdpa_bool(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)

    return sdpa_bool


def _forward(op: Op, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    with torch.no_grad():
        op(q, k, v)


def _forward_backward(op: Op, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor) -> None:
    # autograd.grad returns fresh gradients instead of accumulating into .grad: no extra add.
    torch.autograd.grad(op(q, k, v), (q, k, v), grad)


def row(base: dict[str, Any], name: str, timing: Timing, baseline: Timing) -> dict[str, Any]:
    """One result row: ``base`` plus the backend's time and its ratio to the baseline."""
    out = dict(base, backend=name)
    if baseline.error is not None:
        return dict(out, error=f"baseline failed: {baseline.error}")
    if timing.error is not None:
        return dict(out, error=timing.error)
    return dict(
        out,
        ms=timing.ms,
        baseline_ms=baseline.ms,
        ratio=baseline.ms / timing.ms,
        first_call_ms=timing.first_call_ms,
        repeats=len(timing.samples_ms),
        inner=timing.inner,
        samples_ms=[round(ms, 4) for ms in timing.samples_ms],
    )


def summary(rows: list[dict[str, Any]]) -> str:
    """``"dense 0.20 ms; sdpa 0.59 ms (0.34x); flex error"`` for a progress line."""
    parts = [f"baseline {rows[0]['baseline_ms']:.4g} ms"] if rows and "baseline_ms" in rows[0] else []
    for r in rows:
        parts.append(f"{r['backend']} {r['ms']:.4g} ms ({r['ratio']:.2f}x)" if "ms" in r else f"{r['backend']} error")
    return "; ".join(parts)


def run_attention(settings: Settings, echo: Callable[[str], None] = print) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Every (tokens, heads masked, pass) comparison of ``settings``.

    Returns:
        The rows (one per backend and comparison; ``ratio`` is ``baseline_ms / ms``, so above
        1 the masked op is faster than dense SDPA) and the backends that could not be loaded.
    """
    device, dtype = torch.device(settings.device), DTYPES[settings.dtype]
    kernels, unavailable = kernel_candidates(settings.flex_variants)
    names = [name for name in ("sdpa-bool", *kernels) if selected(name, settings.backends)]
    rows: list[dict[str, Any]] = []
    heads, dim = settings.num_heads, settings.head_dim
    for tokens in settings.tokens:
        grid, batch = grid_of(tokens), settings.batch_for_tokens(tokens)
        generator = torch.Generator(device=device).manual_seed(settings.seed)
        q, k, v, grad = (
            torch.randn(batch, heads, tokens, dim, device=device, dtype=dtype, generator=generator) for _ in range(4)
        )
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        for label in settings.heads_masked:
            masked = heads // 2 if label == "half" else heads
            mask = LocalMask(
                grid=(grid, grid), window=(settings.window,) * 2, prefix_tokens=1, num_heads=heads, heads=tuple(range(masked))
            )
            ops: dict[str, Op] = {BASELINE: F.scaled_dot_product_attention}
            for name in names:
                if name == "sdpa-bool":
                    ops[name] = bool_mask_sdpa(mask, device)
                else:
                    ops[name] = functools.partial(kernels[name], mask=mask)
            for pass_ in settings.passes:
                if pass_ == "forward":
                    fns = {name: functools.partial(_forward, op, q, k, v) for name, op in ops.items()}
                else:
                    fns = {name: functools.partial(_forward_backward, op, *leaves, grad) for name, op in ops.items()}
                start = time.perf_counter()
                timings = time_interleaved(
                    fns, device, warmup=settings.warmup, repeats=settings.repeats, max_seconds=settings.max_seconds,
                    min_sample_s=0.01 if device.type == "cuda" else 0.0,
                )
                base = {
                    "tokens": tokens, "grid": [grid, grid], "batch": batch, "heads": heads, "heads_masked": masked,
                    "heads_label": label, "head_dim": dim, "window": [settings.window] * 2, "pass": pass_,
                }
                group = [row(base, name, timings[name], timings[BASELINE]) for name in names]
                rows.extend(group)
                echo(
                    f"attention {tokens} tokens (batch {batch}), {label} heads masked, {pass_} "
                    f"[{time.perf_counter() - start:.0f} s]: {summary(group)}"
                )
        del q, k, v, grad, leaves
    return rows, unavailable
