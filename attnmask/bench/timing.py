"""Timing side by side, and the record of where a timing was taken.

Candidates of one comparison are timed in the same process, in interleaved rounds (each
round runs every candidate once, in a rotating order), so drift in clock speed, other load
or memory state hits all of them alike; the figure reported is the median per call. On CUDA
each sample is bracketed by CUDA events after a synchronize; on CPU by ``perf_counter``.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import math
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Dtype names the benchmarks accept."""


def default_dtype(device: torch.device) -> str:
    """``"bfloat16"`` on CUDA (what fused attention kernels are built for), ``"float32"`` on CPU."""
    return "bfloat16" if device.type == "cuda" else "float32"


def one_line(error: BaseException, limit: int = 200) -> str:
    """``"TypeName: first line of the message"``, at most ``limit`` characters."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Timing:
    """What :func:`time_interleaved` measured for one candidate.

    Attributes:
        ms: Median time of one call in milliseconds (``None`` after an error).
        first_call_ms: The first call (includes compilation, mask building, allocation).
        samples_ms: Every timed sample, per call.
        inner: Calls per sample (fast calls are repeated so a sample is long enough to time).
        error: One-line reason when the candidate raised; it is then left out of the rounds.
    """

    ms: Optional[float] = None
    first_call_ms: Optional[float] = None
    samples_ms: list[float] = field(default_factory=list)
    inner: int = 1
    error: Optional[str] = None


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sample(fn: Callable[[], Any], inner: int, device: torch.device) -> float:
    """Seconds per call of ``fn``, over ``inner`` back-to-back calls."""
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    start_s = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start_s) / inner


def _release(device: torch.device) -> None:
    """Give back what a failed call left allocated (after a CUDA out-of-memory error)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    device: torch.device,
    *,
    warmup: int = 2,
    repeats: int = 10,
    min_repeats: int = 3,
    max_seconds: Optional[float] = None,
    min_sample_s: float = 0.0,
) -> dict[str, Timing]:
    """Time several candidates side by side; one that raises is recorded and dropped.

    Args:
        fns: Candidates by name; each call does the whole unit of work (e.g. one forward).
        device: Where they run (CUDA is synchronized and timed with events).
        warmup: Untimed calls of each candidate before the rounds (the first is recorded as
            :attr:`Timing.first_call_ms`).
        repeats: Timed rounds (each runs every candidate once, order rotating per round).
        min_repeats: Fewest rounds, whatever ``max_seconds`` says (never more than ``repeats``).
        max_seconds: Budget for the rounds: fewer rounds (down to ``min_repeats``) when the
            warm-up says they would take longer. ``None``: always ``repeats``.
        min_sample_s: Repeat calls inside one sample until it lasts about this long (timer
            resolution and launch overhead matter for sub-millisecond calls); the same count
            is used for every candidate.

    Returns:
        A :class:`Timing` per candidate, in the order of ``fns``.
    """
    timings = {name: Timing() for name in fns}
    last_s: dict[str, float] = {}
    for name, fn in fns.items():
        try:
            timings[name].first_call_ms = _sample(fn, 1, device) * 1e3
            for _ in range(max(warmup - 1, 0)):
                last_s[name] = _sample(fn, 1, device)
            last_s.setdefault(name, timings[name].first_call_ms / 1e3)
        except Exception as error:  # any backend may be unsupported here: record it, go on
            timings[name].error = one_line(error)
            _release(device)
    alive = [name for name in fns if timings[name].error is None]
    if not alive:
        return timings
    fastest = min(last_s[name] for name in alive)
    inner = max(1, min(1000, math.ceil(min_sample_s / max(fastest, 1e-9)))) if min_sample_s else 1
    rounds = repeats
    if max_seconds is not None:
        round_s = inner * sum(last_s[name] for name in alive)
        rounds = max(min(min_repeats, repeats), min(repeats, int(max_seconds // max(round_s, 1e-9))))
    for index in range(rounds):
        shift = index % len(alive)
        for name in alive[shift:] + alive[:shift]:
            if timings[name].error is not None:
                continue
            try:
                timings[name].samples_ms.append(_sample(fns[name], inner, device) * 1e3)
            except Exception as error:
                timings[name].error = one_line(error)
                _release(device)
    for name in alive:
        timing = timings[name]
        timing.inner = inner
        if timing.error is None:
            timing.ms = statistics.median(timing.samples_ms)
    return timings


def device_name(device: torch.device) -> str:
    """The accelerator's name, or the CPU model (``/proc/cpuinfo``, else ``platform``)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_slug(device: torch.device) -> str:
    """A file name for results of ``device``: ``"nvidia-h100-80gb-hbm3"``, ``"cpu-amd-epyc"``."""
    name = device_name(device).lower()
    if device.type == "cpu" and "cpu" not in name.split():
        name = f"cpu {name}"
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or device.type


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


ALLOCATOR_VARIABLES = ("LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX", "MALLOC_CONF")
"""Environment variables that change how the process allocates host memory (glibc's tunables,
a preloaded jemalloc/tcmalloc and its options)."""


def allocator_setting() -> str:
    """The host allocator the process runs with: ``"default"`` (glibc, as configured by the
    system), or the variables of :data:`ALLOCATOR_VARIABLES` that are set. On CPU it moves
    the figures of kernels that allocate large temporaries (``blocked``): glibc hands freed
    blocks of more than a few MB back to the system, and the next call page-faults them in."""
    found = [f"{name}={os.environ[name]}" for name in ALLOCATOR_VARIABLES if os.environ.get(name)]
    return ", ".join(found) or "default"


def environment(device: torch.device, dtype: str) -> dict[str, Any]:
    """Where and with what a benchmark ran: device, dtype, library versions, threads, date."""
    return {
        "device": device_name(device),
        "device_type": device.type,
        "dtype": dtype,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "timm": _version("timm"),
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "attnmask": _version("attnmask"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "allocator": allocator_setting(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
