"""Benchmarks of masked attention: attention level and whole models, side by side.

Every figure is a ratio to a baseline timed in the same process, on the same device and
inputs, in interleaved rounds (:func:`~attnmask.bench.timing.time_interleaved`):

- attention level (:mod:`.attention`): each backend against dense
  ``F.scaled_dot_product_attention(q, k, v)``;
- model level (:mod:`.models`): each patched timm model against the unpatched one.

``ratio`` is always ``baseline_ms / ms``: above 1 the measured thing is faster than its
baseline. :func:`run` returns the results as plain data (``{"env", "settings", "attention",
"models"}``); ``attnmask bench`` prints them, ``benchmarks/run.py`` saves them and
``benchmarks/plot.py`` turns saved results into ``docs/performance.md``.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from .attention import run_attention
from .models import run_models
from .report import tables
from .settings import Settings, preset
from .timing import environment, time_interleaved

RATIO = "baseline_ms / ms: throughput relative to the baseline timed in the same process (above 1: faster)"
"""What ``ratio`` means in every row (also stored in the results' settings)."""


def run(settings: Settings, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run what ``settings`` asks for and return the results.

    Args:
        settings: What to measure (see :func:`preset`).
        echo: Where progress lines go (one per comparison).

    Returns:
        ``{"env": ..., "settings": ..., "attention": [rows], "models": [rows]}``. A backend
        that fails on a row gets ``{"error": "one-line reason"}`` there; the run goes on.

    Raises:
        ValueError: For bad settings.
        RuntimeError: When CUDA is asked for and not available.
    """
    settings.validate()
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but torch.cuda.is_available() is False")
    threads = torch.get_num_threads()
    if settings.threads and device.type == "cpu":
        torch.set_num_threads(settings.threads)
    try:
        start = time.perf_counter()
        env = environment(device, settings.dtype)
        echo(f"attnmask bench ({settings.preset}) on {env['device']}, {settings.dtype}, torch {env['torch']}, {env['threads']} thread(s)")
        attention, unavailable = run_attention(settings, echo) if settings.tokens else ([], {})
        models = run_models(settings, echo) if settings.models and settings.sizes and settings.modes else []
        env["duration_s"] = round(time.perf_counter() - start, 1)
    finally:
        torch.set_num_threads(threads)  # the setting is for this run only
    recorded = dict(settings.to_dict(), ratio=RATIO, unavailable=unavailable)
    return {"env": env, "settings": recorded, "attention": attention, "models": models}


def measured(result: dict[str, Any]) -> int:
    """How many rows of ``result`` hold a time (not an error or a skip)."""
    return sum("ms" in row for row in result.get("attention", []) + result.get("models", []))


__all__ = ["RATIO", "Settings", "environment", "measured", "preset", "run", "run_attention", "run_models", "tables", "time_interleaved"]
