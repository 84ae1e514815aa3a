"""Where FlexAttention's per-call time goes, and every masked kernel side by side, in one process.

Written for one device call (``benchmarks/device_check.sh`` runs it; ``--budget`` keeps it
inside its share). Three sections, run in this order (the cheapest and most decisive first;
each writes ``--out`` as soon as any case ends, so a run cut short still leaves a file):

- ``one_call`` (brief item 3): does the direct cuDNN call of ``sdpa_attention(...,
  one_call=True)`` run, or does cuDNN refuse it (and the split path run instead)? Calls
  :func:`attnmask.kernels.sdpa._cudnn_one_call` and the raw operator (to keep the exception
  text that ``_cudnn_one_call`` swallows), bf16 and fp16, 197 and 1025 tokens, contiguous
  and timm-layout inputs, and records the largest absolute difference to the float64
  reference (compared in float32) and whether gradients through it are right.
- ``flex_profile`` (item 1): the flex kernel as ``auto`` calls it (no grad; block size 64
  and 128, token order rows and tiles, half and all of 12 heads masked, 7 x 7 window, one
  class token, head dim 64, 197/1025/4097 tokens at batch 256/32/4 on CUDA) after warm-up:
  wall time per call (synchronised single calls, back-to-back calls, and the host-side time
  of a call without synchronising), time inside CUDA kernels (profiler), and the host time
  split by ``torch.profiler`` into dynamo guard evaluation, compiled-function dispatch,
  block-mask work (the cache lookups), ``index_select`` (the tiles permutation), the global
  heads' SDPA, other tensor ops (head split / merge), CUDA runtime calls and plain Python;
  the top 15 CPU ops and top 10 CUDA kernels; recompilations (dynamo counters, cache
  entries and the recompile log) and signs of an eager fallback (warnings, dynamo warnings,
  unfused ops, no FlexAttention kernel on the device). Two uncompiled controls (the sdpa
  split path and the blocked kernel) are profiled the same way.
- ``timing_forward`` / ``timing_forward_backward`` (item 2): dense SDPA (the baseline) vs
  ``sdpa`` (split), ``sdpa one_call=True``, ``flex`` b64 / b128 (rows), ``blocked`` with
  three query blocks, the fused ``triton`` kernel and ``auto``, at 197/1025/4097 tokens,
  half / all heads masked,
  interleaved in one process (:func:`attnmask.bench.timing.time_interleaved`, medians);
  ratio to dense, achieved FLOP/s of dense and useful FLOP/s of each masked kernel (4 x
  queries x keys-per-query x head dim per head, from the exact window counts; forward plus
  backward counted as 3.5 x forward, FlashAttention's convention), and each kernel's largest
  difference to the float64 reference on the first sample (forward). Each row also gives
  the bytes the call must move at least (q, k, v, output; the backward's gradients) and the
  achieved bytes/s, and both rates as fractions of the device's measured ceilings
  (``ceilings``: a device-to-device copy's bandwidth and a large matrix product's FLOP/s,
  measured first).

Every case is guarded: an exception is recorded (``error``) and the run goes on; a case
that would not fit the budget is recorded as ``skipped`` with the reason.

Run: ``python benchmarks/gpu_profile.py --out gpu_profile.json`` (defaults to CUDA when
there is one); ``--small`` checks the script on a CPU in a couple of minutes (tiny shapes,
few repeats, one thread).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import logging
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import attnmask.masks as masks_module  # noqa: E402
from attnmask import kernels  # noqa: E402
from attnmask.bench.timing import environment, one_line, synchronize, time_interleaved  # noqa: E402
from attnmask.kernels import blocked as blocked_module  # noqa: E402
from attnmask.kernels import flex as flex_module  # noqa: E402
from attnmask.kernels import sdpa as sdpa_module  # noqa: E402
from attnmask.kernels.blocked import blocked_attention  # noqa: E402
from attnmask.kernels.flex import flex_attention  # noqa: E402
from attnmask.kernels.reference import reference_attention  # noqa: E402
from attnmask.kernels.sdpa import sdpa_attention  # noqa: E402
from attnmask.masks import LocalMask  # noqa: E402

HEADS, HEAD_DIM, WINDOW, PREFIX = 12, 64, (7, 7), 1
CALL = "gpu_profile::call"
FWD_BWD_FLOP_FACTOR = 3.5
"""Forward plus backward FLOPs as a multiple of forward: the backward's five matmuls (with
recomputation) against the forward's two, as FlashAttention's benchmarks count."""


class Terminated(BaseException):
    """SIGTERM arrived (``timeout`` in device_check.sh): record, write, stop."""


def _on_sigterm(signum, frame):
    raise Terminated(f"signal {signum}")


# ----------------------------------------------------------------------------------------
# Run bookkeeping: budget, results file, environment


class Budget:
    """Seconds left of ``--budget``, and per-section deadlines carved out of them."""

    def __init__(self, seconds: Optional[float]):
        self.start = time.monotonic()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - self.elapsed()

    def deadline(self, share: float) -> float:
        """A monotonic deadline ``share`` of what is left from now."""
        left = self.left()
        return math.inf if left == math.inf else time.monotonic() + share * max(left, 0.0)


class Results:
    """The JSON document; :meth:`write` after every case (atomically: tmp file, rename)."""

    def __init__(self, path: Optional[str], data: dict[str, Any]):
        self.path = Path(path) if path else None
        self.data = data

    def write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)


def git_commit() -> str:
    """The ``COMMIT`` file's content if present (device copies have a stale .git), else
    ``git rev-parse HEAD`` (``+dirty`` when tracked files differ), else ``unknown``."""
    commit_file = ROOT / "COMMIT"
    if commit_file.is_file():
        text = commit_file.read_text().strip()
        if text:
            return text.splitlines()[0].strip()
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_environment(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    env = environment(device, str(dtype).replace("torch.", ""))
    env["git_commit"] = git_commit()
    try:
        import triton

        env["triton"] = getattr(triton, "__version__", env.get("triton"))
    except Exception as error:  # no triton (CPU-only installs): say so
        env["triton_import"] = one_line(error)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_capability=list(torch.cuda.get_device_capability(device)),
            device_memory_gib=round(props.total_memory / 2**30, 1),
            cudnn=torch.backends.cudnn.version(),
            sdp_flags={
                "flash": torch.backends.cuda.flash_sdp_enabled(),
                "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                "math": torch.backends.cuda.math_sdp_enabled(),
            },
        )
    config = torch._dynamo.config
    env["dynamo_recompile_limit"] = getattr(config, "recompile_limit", getattr(config, "cache_size_limit", None))
    return env


# ----------------------------------------------------------------------------------------
# Shapes, inputs, FLOPs


def make_mask(side: int, masked: int) -> LocalMask:
    return LocalMask((side, side), WINDOW, PREFIX, HEADS, tuple(range(masked)))


def make_qkv(batch: int, mask: LocalMask, device: torch.device, dtype: torch.dtype, seed: int, grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, HEADS, mask.num_tokens, HEAD_DIM, generator=g).to(device, dtype).requires_grad_(grad)
        for _ in range(3)
    ]


def allowed_pairs(mask: LocalMask) -> int:
    """(query, key) pairs a masked head computes: the clipped windows of the patches, the
    prefix keys every patch sees (``"global"``) and the prefix queries' full rows."""
    (height, width), (kh, kw) = mask.grid, mask.window

    def along(size: int, k: int) -> int:
        r = k // 2
        return sum(min(i + r, size - 1) - max(i - r, 0) + 1 for i in range(size))

    patches = along(height, kh) * along(width, kw)
    if mask.prefix == "global":
        patches += mask.prefix_tokens * height * width
    return patches + mask.prefix_tokens * mask.num_tokens


def flops(mask: LocalMask, batch: int, masked: bool, backward: bool) -> float:
    """Forward FLOPs 4 x queries x keys x head dim per head (QK^T and PV), all keys for
    dense / global heads, the window's keys for masked heads (``masked``); times
    :data:`FWD_BWD_FLOP_FACTOR` with the backward."""
    n = mask.num_tokens
    pairs = (len(mask.global_heads) * n * n + len(mask.heads) * allowed_pairs(mask)) if masked else HEADS * n * n
    return 4.0 * batch * HEAD_DIM * pairs * (FWD_BWD_FLOP_FACTOR if backward else 1.0)


def min_bytes(mask: LocalMask, batch: int, dtype: torch.dtype, backward: bool) -> float:
    """The fewest bytes one call must move through device memory: q, k, v read and the output
    written once (forward); the backward also reads the output and its gradient and writes
    dq, dk, dv (8 tensors of the q shape in all, against 4)."""
    size = torch.empty((), dtype=dtype).element_size()
    return float(size * batch * HEADS * mask.num_tokens * HEAD_DIM * (8 if backward else 4))


def measure_ceilings(device: torch.device, dtype: torch.dtype, small: bool) -> dict[str, Any]:
    """The device's measured ceilings: device-to-device copy bandwidth (bytes read plus
    written) and a large matrix product's FLOP/s in ``dtype``, medians of interleaved rounds."""
    n_bytes = (16 if small else 1024) * 2**20
    source = torch.empty(n_bytes // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    side = 256 if small else 8192
    a = torch.randn(side, side, device=device, dtype=dtype)
    b = torch.randn(side, side, device=device, dtype=dtype)
    timings = time_interleaved(
        {"copy": lambda: target.copy_(source), "matmul": lambda: a @ b}, device, warmup=2, repeats=5 if small else 10
    )
    out: dict[str, Any] = {"copy_bytes": n_bytes, "matmul_side": side, "dtype": str(dtype).replace("torch.", "")}
    if timings["copy"].ms:
        out["bandwidth_gb_s"] = 2 * n_bytes / (timings["copy"].ms * 1e-3) / 1e9
    if timings["matmul"].ms:
        out["matmul_tflops"] = 2 * side**3 / (timings["matmul"].ms * 1e-3) / 1e12
    del source, target, a, b
    release(device)
    return out


CEILINGS: dict[str, Any] = {}
"""Filled by :func:`main` before the timing sections (rows report fractions of them)."""


def error_text(error: BaseException) -> str:
    return one_line(error, 400)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------
# Compilation state: dynamo counters, cache entries, recompile log, warnings


def dynamo_counters() -> dict[str, dict[str, int]]:
    from torch._dynamo.utils import counters

    return {group: {key: int(value) for key, value in values.items()} for group, values in counters.items()}


def counter_delta(before: dict, after: dict) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for group, values in after.items():
        for key, value in values.items():
            diff = value - before.get(group, {}).get(key, 0)
            if diff:
                out.setdefault(group, {})[key] = diff
    return out


def flex_cache_entries() -> Optional[int]:
    """Dynamo cache entries of torch's ``flex_attention`` (one per compiled variant/shape);
    every call evaluates guards of entries until one matches."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
        from torch.nn.attention import flex_attention as flex_api

        return len(_debug_get_cache_entry_list(flex_api.flex_attention.__code__))
    except Exception:
        return None


class LogCapture(logging.Handler):
    """Dynamo's recompile log (``torch._logging`` artifact ``recompiles``) and warnings of
    torch's loggers, kept per case."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.endswith("__recompiles") or record.levelno >= logging.WARNING:
            self.records.append(f"{record.name}: {record.getMessage()[:600]}")

    def take(self) -> list[str]:
        out, self.records = self.records, []
        return out


def install_log_capture() -> LogCapture:
    capture = LogCapture()
    try:
        import torch._dynamo.guards  # noqa: F401  (creates the recompiles artifact logger)

        torch._logging.set_logs(recompiles=True)
    except Exception:
        pass
    names = [name for name in logging.root.manager.loggerDict if name.endswith("__recompiles")]
    for name in {*names, "torch"}:
        logging.getLogger(name).addHandler(capture)
    return capture


@contextlib.contextmanager
def watched(capture: LogCapture):
    """Warnings (all, recorded) and torch log records during the block: yields a dict that
    is filled in on exit."""
    state: dict[str, Any] = {}
    capture.take()
    before = dynamo_counters()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield state
        finally:
            state["warnings"] = sorted({f"{w.category.__name__}: {str(w.message)[:400]}" for w in caught})
            state["torch_logs"] = capture.take()[:20]
            state["dynamo_counters_delta"] = counter_delta(before, dynamo_counters())


EAGER_SIGNS = ("without torch.compile", "unfused implementation", "recompile_limit", "cache_size_limit", "hit config.")


def fallback_signals(texts: list[str]) -> list[str]:
    return [text for text in texts if any(sign in text for sign in EAGER_SIGNS)]


# ----------------------------------------------------------------------------------------
# Profiler attribution


@contextlib.contextmanager
def labelled_functions():
    """Wrap attnmask's Python helpers in ``record_function`` ranges so the profiler can
    attribute their time (restored on exit; only while profiling)."""
    from torch.profiler import record_function

    def wrap(module, name: str, label: str):
        original = getattr(module, name)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            with record_function(label):
                return original(*args, **kwargs)

        setattr(module, name, wrapper)
        return module, name, original

    patches = [
        wrap(flex_module, "block_mask", "attnmask::block_mask"),
        wrap(flex_module, "token_order", "attnmask::token_order"),
        wrap(flex_module, "create_block_mask", "attnmask::create_block_mask"),
        wrap(flex_module, "_run_compiled", "attnmask::compiled_flex"),
        wrap(flex_module, "cached", "attnmask::cached"),
        wrap(masks_module, "cached", "attnmask::cached"),
        wrap(blocked_module, "cached", "attnmask::cached"),
    ]
    try:
        yield
    finally:
        for module, name, original in reversed(patches):
            setattr(module, name, original)


# innermost-first does not work for block-mask work (a cache miss runs aten ops); the
# ancestor with the highest-priority scope wins.
SCOPES = (
    ("block_mask", lambda n: n in ("attnmask::block_mask", "attnmask::token_order", "attnmask::cached", "attnmask::create_block_mask")),
    ("dynamo_guards", lambda n: n == "TorchDynamo Cache Lookup"),
    ("compiled_graph_call", lambda n: n.startswith("## Call CompiledFxGraph") or n.startswith("CompiledFunction")),
    ("compiled_region_python", lambda n: n.startswith("Torch-Compiled Region") or n == "Pregraph bytecode" or n.startswith("AOTDispatcher")),
    ("compile_wrapper", lambda n: n == "attnmask::compiled_flex"),
    ("sdpa", lambda n: n == "aten::scaled_dot_product_attention"),
    ("index_select", lambda n: n == "aten::index_select"),
)
COARSE = {
    "dynamo_guards": "dynamo_guards_and_dispatch",
    "compile_wrapper": "dynamo_guards_and_dispatch",
    "compiled_region_python": "dynamo_guards_and_dispatch",
    "compiled_graph_call": "compiled_graph_call",
    "block_mask": "block_mask",
    "index_select": "index_select_permutation",
    "sdpa": "sdpa_global_heads",
    "tensor_ops": "tensor_ops_head_split_merge",
    "cuda_runtime": "cuda_runtime_other",
    "python": "python_other",
}
CATEGORY_NOTES = {
    "dynamo_guards_and_dispatch": "TorchDynamo Cache Lookup (guard evaluation) + torch.compile's Python wrapper + the compiled frame's bytecode and AOTDispatcher wrappers",
    "compiled_graph_call": "inductor's compiled graph: Triton launches on CUDA (the CPU kernel itself on CPU)",
    "block_mask": "attnmask's block-mask / token-order / mask cache lookups (create_block_mask on a miss)",
    "index_select_permutation": "aten::index_select outside the scopes above (tiles order; the blocked kernel's gathers)",
    "sdpa_global_heads": "aten::scaled_dot_product_attention and its children (flex: the global heads; controls: every SDPA call)",
    "tensor_ops_head_split_merge": "other aten ops (output buffer, head slices, copies into the merged layout)",
    "cuda_runtime_other": "CUDA runtime calls outside any op",
    "python_other": "time in the call not inside any profiler range: attnmask / torch Python",
}


def classify(event, root) -> str:
    ranks = {name: index for index, (name, _) in enumerate(SCOPES)}
    best = None
    node = event
    while node is not None and node is not root:
        for name, test in SCOPES:
            if test(node.name) and (best is None or ranks[name] < ranks[best]):
                best = name
        node = node.cpu_parent
    if best is not None:
        return best
    if event is root:
        return "python"
    name = event.name
    if name.startswith("cuda") or name.startswith("cu") and name[2:3].isupper():
        return "cuda_runtime"
    return "tensor_ops"


def attribute(prof, calls: int, device: torch.device) -> dict[str, Any]:
    """Per-call host time by category, top ops and kernels, from one profiler session."""
    from torch.autograd import DeviceType

    events = list(prof.events())
    cpu = [e for e in events if e.device_type == DeviceType.CPU and not getattr(e, "is_async", False)]
    roots = [e for e in cpu if e.name == CALL]
    n = max(len(roots), 1)
    root_ids = {id(r) for r in roots}

    def root_of(event):
        node = event
        while node is not None:
            if id(node) in root_ids:
                return node
            node = node.cpu_parent
        return None

    fine: dict[str, float] = {}
    ops_per_call = 0
    runtime_us = 0.0
    launches = 0
    eager_ops: set[str] = set()
    compiled_regions = 0
    for event in cpu:
        root = root_of(event)
        if root is None:
            continue
        category = classify(event, root)
        fine[category] = fine.get(category, 0.0) + event.self_cpu_time_total
        if event.name.startswith("aten::"):
            ops_per_call += 1
            if category not in ("sdpa", "compiled_graph_call") and event.name in ("aten::bmm", "aten::matmul", "aten::_softmax", "aten::_safe_softmax", "aten::baddbmm"):
                eager_ops.add(event.name)
        if event.name.startswith("Torch-Compiled Region"):
            compiled_regions += 1
        if event.name.startswith("cuda") or (event.name.startswith("cu") and event.name[2:3].isupper()):
            runtime_us += event.cpu_time_total
            if "Launch" in event.name:
                launches += 1
    coarse: dict[str, float] = {}
    for category, us in fine.items():
        coarse[COARSE[category]] = coarse.get(COARSE[category], 0.0) + us
    host_total = sum(r.cpu_time_total for r in roots) / n

    device_events = [e for e in events if e.device_type != DeviceType.CPU]
    kernel_us, memory_us, kernels_by_name = 0.0, 0.0, {}
    for event in device_events:
        activity = str(getattr(event, "activity_type", "") or "").lower()
        if "annotation" in activity or event.name == CALL:
            continue
        duration = event.time_range.elapsed_us()
        if "memcpy" in activity or "memset" in activity or event.name.startswith(("Memcpy", "Memset")):
            memory_us += duration
            continue
        kernel_us += duration
        entry = kernels_by_name.setdefault(event.name, [0, 0.0])
        entry[0] += 1
        entry[1] += duration
    top_kernels = sorted(kernels_by_name.items(), key=lambda item: -item[1][1])[:10]

    averages = [a for a in prof.key_averages() if a.key != CALL]
    top_cpu = sorted(averages, key=lambda a: -a.self_cpu_time_total)[:15]
    return {
        "profiled_calls": len(roots),
        "host_us_per_call_profiled": round(host_total, 2),
        "host_us_per_call_by_category": {key: round(value / n, 2) for key, value in sorted(coarse.items(), key=lambda kv: -kv[1])},
        "host_us_per_call_by_scope": {key: round(value / n, 2) for key, value in sorted(fine.items(), key=lambda kv: -kv[1])},
        "aten_ops_per_call": round(ops_per_call / n, 1),
        "cuda_runtime_us_per_call": round(runtime_us / n, 2) if device.type == "cuda" else None,
        "kernel_launches_per_call": round(launches / n, 2) if device.type == "cuda" else None,
        "device_kernel_us_per_call": round(kernel_us / n, 2) if device.type == "cuda" else None,
        "device_memcpy_memset_us_per_call": round(memory_us / n, 2) if device.type == "cuda" else None,
        "device_events_seen": len(device_events),
        "top_cpu_ops": [
            {
                "name": a.key[:160],
                "calls_per_call": round(a.count / n, 2),
                "self_cpu_us_per_call": round(a.self_cpu_time_total / n, 2),
                "cpu_total_us_per_call": round(a.cpu_time_total / n, 2),
            }
            for a in top_cpu
        ],
        "top_cuda_kernels": [
            {"name": name[:200], "launches_per_call": round(count / n, 2), "us_per_call": round(us / n, 2)}
            for name, (count, us) in top_kernels
        ],
        "eager_flex_ops_outside_compiled_code": sorted(eager_ops),
        "compiled_regions_per_call": round(compiled_regions / n, 2),
    }


def profile_calls(fn: Callable[[], Any], device: torch.device, calls: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with labelled_functions():
        fn()  # once through the wrappers before the session
        synchronize(device)
        with profile(activities=activities, record_shapes=False, with_stack=False) as prof:
            for _ in range(calls):
                with record_function(CALL):
                    fn()
            synchronize(device)
    return attribute(prof, calls, device)


def host_ms(fn: Callable[[], Any], device: torch.device, rounds: int) -> float:
    """Median host-side time of one call (synchronised before, not after): what the CPU spends
    issuing it. Close to the synchronised time means the call is bound by the host."""
    samples = []
    for _ in range(rounds):
        synchronize(device)
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    synchronize(device)
    return statistics.median(samples)


def block_mask_info(mask: LocalMask, block_size: int, order: str, device: torch.device) -> dict[str, Any]:
    """The cached FlexAttention block mask of this variant: partial and full blocks."""
    orders = flex_module.token_order(mask, order, block_size, device)
    blocks = flex_module.block_mask(mask, block_size, order, device, None if orders is None else orders[0])
    info: dict[str, Any] = {"shape": list(blocks.shape), "block_size": list(getattr(blocks, "BLOCK_SIZE", (block_size, block_size)))}
    try:
        info["sparsity_percent"] = round(float(blocks.sparsity()), 2)
    except Exception as error:
        info["sparsity_error"] = error_text(error)
    partial = getattr(blocks, "kv_num_blocks", None)
    full = getattr(blocks, "full_kv_num_blocks", None)
    if partial is not None:
        info["partial_blocks"] = int(partial.sum())
    info["full_blocks"] = int(full.sum()) if full is not None else None
    rows = -(-mask.num_tokens // block_size)
    info["blocks_total"] = rows * rows
    return info


# ----------------------------------------------------------------------------------------
# Section: flex profile


def flex_profile_cases(small: bool) -> list[dict[str, Any]]:
    """Cases by priority: the floor at each size and the tiles question first."""
    if small:
        return [
            # grids larger than the window (a 7 x 7 window covers a 4 x 4 grid: no mask at all)
            {"kernel": "flex", "side": 8, "batch": 2, "masked": 6, "block_size": 128, "order": "rows"},
            {"kernel": "flex", "side": 8, "batch": 2, "masked": 6, "block_size": 128, "order": "tiles"},
            {"kernel": "sdpa", "side": 8, "batch": 2, "masked": 6},
            {"kernel": "flex", "side": 12, "batch": 2, "masked": 12, "block_size": 64, "order": "rows"},
            {"kernel": "blocked", "side": 12, "batch": 2, "masked": 12, "block": (4, 4)},
        ]
    sizes = {14: 256, 32: 32, 64: 4}
    first = [
        ("flex", 14, 6, 128, "rows"),
        ("flex", 14, 6, 128, "tiles"),
        ("sdpa", 14, 6, None, None),
        ("flex", 64, 6, 64, "rows"),
        ("flex", 64, 6, 128, "rows"),
        ("flex", 32, 6, 128, "rows"),
        ("flex", 14, 6, 64, "rows"),
        ("flex", 64, 6, 128, "tiles"),
        ("blocked", 64, 6, None, None),
        ("flex", 32, 6, 64, "rows"),
        ("flex", 14, 6, 64, "tiles"),
        ("flex", 14, 12, 128, "rows"),
        ("flex", 64, 12, 64, "rows"),
        ("flex", 64, 12, 128, "rows"),
        ("flex", 32, 12, 128, "rows"),
        ("flex", 14, 12, 64, "rows"),
        ("flex", 32, 12, 64, "rows"),
    ]
    rest = [
        ("flex", side, masked, size, order)
        for order in ("tiles",)
        for masked in (6, 12)
        for side in (14, 32, 64)
        for size in (128, 64)
    ]
    seen, cases = set(), []
    for kernel, side, masked, size, order in first + rest:
        key = (kernel, side, masked, size, order)
        if key in seen:
            continue
        seen.add(key)
        case = {"kernel": kernel, "side": side, "batch": sizes[side], "masked": masked}
        if kernel == "flex":
            case.update(block_size=size, order=order)
        elif kernel == "blocked":
            case["block"] = (8, 8)
        cases.append(case)
    return cases


def case_label(case: dict[str, Any]) -> str:
    tokens = 1 + case["side"] ** 2
    label = f"{case['kernel']} {tokens} tok b{case['batch']} {case['masked']}/{HEADS}"
    if case["kernel"] == "flex":
        label += f" b{case['block_size']} {case['order']}"
    if "block" in case:
        label += f" block {case['block'][0]}x{case['block'][1]}"
    return label


def run_flex_profile_case(case, device, dtype, settings, capture) -> dict[str, Any]:
    mask = make_mask(case["side"], case["masked"])
    q, k, v = make_qkv(case["batch"], mask, device, dtype, seed=case["side"] * 100 + case["masked"])
    if case["kernel"] == "flex":
        call = functools.partial(flex_attention, q, k, v, mask, block_size=case["block_size"], order=case["order"])
    elif case["kernel"] == "blocked":
        call = functools.partial(blocked_attention, q, k, v, mask, block=case["block"])
    else:
        call = functools.partial(sdpa_attention, q, k, v, mask)
    row: dict[str, Any] = {"label": case_label(case), **{key: list(val) if isinstance(val, tuple) else val for key, val in case.items()}}
    row.update(tokens=mask.num_tokens, dtype=str(dtype).replace("torch.", ""), head_dim=HEAD_DIM, window=list(WINDOW))
    with torch.no_grad():
        row["cache_entries_before"] = flex_cache_entries()
        with watched(capture) as warm:
            start = time.perf_counter()
            call()
            synchronize(device)
            row["first_call_s"] = round(time.perf_counter() - start, 3)
            for _ in range(settings["warmup"]):
                call()
            synchronize(device)
        row["warmup"] = warm
        row["cache_entries_after_warmup"] = flex_cache_entries()
        with watched(capture) as steady:
            single = time_interleaved({"call": call}, device, warmup=1, repeats=settings["rounds"])["call"]
            burst = time_interleaved(
                {"call": call}, device, warmup=1, repeats=max(settings["rounds"] // 2, 3), min_sample_s=settings["min_sample_s"]
            )["call"]
            row["wall_ms_single"] = single.ms
            row["wall_ms_back_to_back"] = burst.ms
            row["back_to_back_calls_per_sample"] = burst.inner
            row["host_ms"] = host_ms(call, device, settings["rounds"])
            row["profile"] = profile_calls(call, device, settings["profiled_calls"])
        row["steady"] = steady
        row["cache_entries_after"] = flex_cache_entries()
        if case["kernel"] == "flex":
            try:
                row["block_mask"] = block_mask_info(mask, case["block_size"], case["order"], device)
            except Exception as error:
                row["block_mask"] = {"error": error_text(error)}
    steady_compiles = steady["dynamo_counters_delta"].get("stats", {}).get("unique_graphs", 0)
    signals = fallback_signals(warm["warnings"] + warm["torch_logs"] + steady["warnings"] + steady["torch_logs"])
    profile = row["profile"]
    eager_ops = profile.get("eager_flex_ops_outside_compiled_code", [])
    flex_kernel = None
    compiled_region = None
    if case["kernel"] == "flex":
        compiled_region = profile.get("compiled_regions_per_call", 0) >= 1
    if device.type == "cuda" and case["kernel"] == "flex":
        names = [k["name"] for k in profile.get("top_cuda_kernels", [])]
        flex_kernel = any("flex" in name or "triton_tem" in name for name in names)
    row["recompiles_during_timing"] = steady_compiles
    row["compiles_during_warmup"] = warm["dynamo_counters_delta"].get("stats", {}).get("unique_graphs", 0)
    row["eager_fallback"] = {
        "suspected": bool(signals or eager_ops or flex_kernel is False or compiled_region is False or steady_compiles),
        "compiled_region_every_call": compiled_region,
        "signals": signals[:10],
        "unfused_ops": eager_ops,
        "flex_kernel_on_device": flex_kernel,
    }
    if device.type == "cuda" and profile.get("device_kernel_us_per_call") is not None and row["wall_ms_single"]:
        row["kernel_fraction_of_back_to_back"] = round(profile["device_kernel_us_per_call"] / 1e3 / row["wall_ms_back_to_back"], 3)
    return row


# ----------------------------------------------------------------------------------------
# Section: side-by-side timing


def timing_cases(small: bool, backward: bool) -> list[tuple[int, int, int]]:
    """(grid side, batch, masked heads), by priority."""
    if small:
        return [(8, 2, 6), (12, 2, 12)]
    if backward:
        return [(64, 4, 6), (14, 256, 6), (64, 4, 12), (32, 32, 6), (14, 256, 12), (32, 32, 12)]
    return [(14, 256, 6), (64, 4, 6), (32, 32, 6), (14, 256, 12), (64, 4, 12), (32, 32, 12)]


def candidates(blocks: list[tuple[int, int]]) -> dict[str, Callable]:
    found: dict[str, Callable] = {
        "sdpa": sdpa_attention,
        "sdpa-onecall": functools.partial(sdpa_attention, one_call=True),
        "flex-b64": functools.partial(flex_attention, block_size=64),
        "flex-b128": functools.partial(flex_attention, block_size=128),
    }
    for bh, bw in blocks:
        found[f"blocked-{bh}x{bw}"] = functools.partial(blocked_attention, block=(bh, bw))
    if "triton" in kernels.KERNELS:  # the fused Triton kernel (forward and backward)
        found["triton"] = kernels.KERNELS["triton"]
    if "auto" in kernels.KERNELS:
        found["auto"] = kernels.KERNELS["auto"]
    return found


def run_timing_case(side, batch, masked, backward, device, dtype, settings) -> list[dict[str, Any]]:
    mask = make_mask(side, masked)
    q, k, v = make_qkv(batch, mask, device, dtype, seed=side * 10 + masked, grad=backward)
    grad_out = torch.randn_like(q) if backward else None
    pass_name = "forward+backward" if backward else "forward"
    base = {"tokens": mask.num_tokens, "batch": batch, "heads_masked": masked, "pass": pass_name, "dtype": str(dtype).replace("torch.", "")}

    def forward(kernel):
        def call():
            with torch.no_grad():
                return kernel(q, k, v, mask)

        return call

    def forward_backward(kernel):
        def call():
            out = kernel(q, k, v, mask)
            return torch.autograd.grad(out, (q, k, v), grad_out)

        return call

    dense = lambda q_, k_, v_, mask_: F.scaled_dot_product_attention(q_, k_, v_)  # noqa: E731
    named = {"dense": dense, **candidates(settings["blocks"])}
    wrap = forward_backward if backward else forward
    fns = {name: wrap(kernel) for name, kernel in named.items()}
    refused_before = set(sdpa_module._CUDNN_REFUSED)
    timings = time_interleaved(
        fns, device, warmup=settings["warmup"], repeats=settings["repeats"],
        max_seconds=settings["max_seconds"], min_sample_s=settings["min_sample_s"],
    )
    errors: dict[str, Any] = {}
    if not backward:
        with torch.no_grad():
            reference = reference_attention(q[:1].double(), k[:1].double(), v[:1].double(), mask).float()
            for name, kernel in named.items():
                if timings[name].error is not None or name == "dense":
                    continue
                try:
                    errors[name] = float((kernel(q, k, v, mask)[:1].float() - reference).abs().max())
                except Exception as error:
                    errors[name] = error_text(error)
    dense_ms = timings["dense"].ms
    rows = []
    for name, timing in timings.items():
        row = dict(base, candidate=name, first_call_ms=timing.first_call_ms)
        if timing.error is not None:
            row["error"] = timing.error
        else:
            row.update(ms=timing.ms, samples=len(timing.samples_ms), calls_per_sample=timing.inner)
            work = flops(mask, batch, masked=name != "dense", backward=backward)
            key = "achieved_tflops" if name == "dense" else "useful_tflops"
            row[key] = work / (timing.ms * 1e-3) / 1e12
            row["flops"] = work
            moved = min_bytes(mask, batch, dtype, backward)
            row["min_bytes"] = moved
            row["achieved_gb_s"] = moved / (timing.ms * 1e-3) / 1e9
            if CEILINGS.get("matmul_tflops"):
                row["fraction_of_matmul_flops"] = row[key] / CEILINGS["matmul_tflops"]
            if CEILINGS.get("bandwidth_gb_s"):
                row["fraction_of_bandwidth"] = row["achieved_gb_s"] / CEILINGS["bandwidth_gb_s"]
            if dense_ms:
                row["ratio_to_dense"] = dense_ms / timing.ms
        if name in errors:
            row["max_abs_err_vs_float64_first_sample"] = errors[name]
        if name == "sdpa-onecall":
            key = (dtype, HEAD_DIM, HEAD_DIM, mask.num_tokens, HEADS, q.device)
            row["one_call_path"] = (
                "cudnn" if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and not sdpa_module.cudnn_refused(key)
                else "split (cuDNN refused)" if sdpa_module.cudnn_refused(key) else "split (not CUDA half precision)"
            )
            row["cudnn_newly_refused"] = [str(item) for item in set(sdpa_module._CUDNN_REFUSED) - refused_before]
        if name == "auto":
            try:
                rule = kernels.auto_rule(q, mask, 0.0, k, v)
                row["auto_choice"] = {"backend": rule.backend, "options": dict(rule.options)}
            except Exception as error:
                row["auto_choice"] = error_text(error)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------
# Section: one_call verification


def one_call_cases(device: torch.device, small: bool) -> list[dict[str, Any]]:
    dtypes = (torch.bfloat16, torch.float16) if device.type == "cuda" else (torch.float32,)
    sides = (8,) if small else (14, 32)
    cases = []
    for dtype in dtypes:
        for side in sides:
            for heads in (tuple(range(6)), tuple(range(12)), (1, 5, 7)):
                for layout in ("contiguous", "timm"):
                    if layout == "timm" and heads != tuple(range(6)):
                        continue
                    cases.append({"dtype": dtype, "side": side, "heads": heads, "layout": layout})
    return cases


def one_call_inputs(case, device, grad=False):
    mask = LocalMask((case["side"], case["side"]), WINDOW, PREFIX, HEADS, case["heads"])
    g = torch.Generator().manual_seed(case["side"] + len(case["heads"]))
    n, batch = mask.num_tokens, 2
    if case["layout"] == "timm":
        qkv = torch.randn(batch, n, 3, HEADS, HEAD_DIM, generator=g).to(device, case["dtype"])
        tensors = list(qkv.permute(2, 0, 3, 1, 4).unbind(0))
    else:
        tensors = [torch.randn(batch, HEADS, n, HEAD_DIM, generator=g).to(device, case["dtype"]) for _ in range(3)]
    if grad:
        tensors = [t.detach().requires_grad_() for t in tensors]
    return mask, tensors


def run_one_call_case(case, device) -> dict[str, Any]:
    mask, (q, k, v) = one_call_inputs(case, device)
    row: dict[str, Any] = {
        "dtype": str(case["dtype"]).replace("torch.", ""), "tokens": mask.num_tokens, "heads_masked": list(case["heads"]),
        "layout": case["layout"], "q_contiguous": q.is_contiguous(),
        "one_call_possible": bool(sdpa_module._one_call_possible(q, mask)),
    }
    key = (q.dtype, q.shape[-1], v.shape[-1], q.shape[-2], q.shape[1], q.device)
    row["refused_before"] = sdpa_module.cudnn_refused(key)
    sdpa_module.accept_cudnn(key)  # try it for real, whatever an earlier case did
    with torch.no_grad():
        reference = reference_attention(q.double(), k.double(), v.double(), mask).float()
        try:
            out = sdpa_module._cudnn_one_call(q, k, v, mask, None)
            row["cudnn_one_call_ran"] = out is not None
        except Exception as error:
            out, row["cudnn_one_call_ran"] = None, False
            row["cudnn_one_call_exception"] = error_text(error)
        row["refused_after"] = key in sdpa_module._CUDNN_REFUSED
        bias = mask.head_additive_mask(q.device, q.dtype).expand(q.shape[0], -1, -1, -1)
        try:  # the raw operator, to keep the exception text _cudnn_one_call swallows
            raw = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, bias, False, 0.0, False, False, scale=None)[0]
            row["raw_op"] = "ok"
            row["raw_op_max_abs_diff_vs_reference_fp32"] = float((raw.float() - reference).abs().max())
        except Exception as error:
            row["raw_op"] = error_text(error)
        if out is not None:
            row["max_abs_diff_vs_reference_fp32"] = float((out.float() - reference).abs().max())
            row["output_finite"] = bool(torch.isfinite(out).all())
            row["output_layout_stride"] = list(out.stride())
        split = sdpa_attention(q, k, v, mask)
        row["split_max_abs_diff_vs_reference_fp32"] = float((split.float() - reference).abs().max())
        via_api = sdpa_attention(q, k, v, mask, one_call=True)
        row["api_equals_direct_call"] = bool(out is not None and torch.equal(via_api, out))
    # gradients through one_call (auto never trains on it; a direct caller could)
    mask, leaves = one_call_inputs(case, device, grad=True)
    reference_leaves = [t.detach().double().requires_grad_() for t in leaves]
    try:
        out = sdpa_attention(*leaves, mask, one_call=True)
        expected = reference_attention(*reference_leaves, mask)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
        got = torch.autograd.grad((out.double() * weights).sum(), leaves)
        want = torch.autograd.grad((expected * weights).sum(), reference_leaves)
        row["backward_max_abs_diff_vs_reference_fp32"] = {
            name: float((a.float() - b.float()).abs().max()) for name, a, b in zip("qkv", got, want)
        }
        row["backward_grad_scale"] = {name: float(b.abs().max()) for name, b in zip("qkv", want)}
        row["backward_finite"] = all(bool(torch.isfinite(a).all()) for a in got)
    except Exception as error:
        row["backward_error"] = error_text(error)
    return row


# ----------------------------------------------------------------------------------------
# Driver


def run_section(name, results, budget, share, cases, run_case, label, need_s, echo) -> None:
    """Run ``cases`` into ``results.data["sections"][name]``: each guarded, skipped past the
    section's deadline (``share`` of what is left) or when ``need_s(case)`` seconds do not
    remain; the file is rewritten after every case."""
    section = results.data["sections"].setdefault(name, {"cases": []})
    section.update(status="running", started_at_s=round(budget.elapsed(), 1))
    deadline = budget.deadline(share)
    start = time.monotonic()
    results.write()
    try:
        for case in cases:
            left = min(deadline - time.monotonic(), budget.left())
            need = need_s(case)
            if left < need:
                section["cases"].append({"label": label(case), "skipped": f"{left:.0f} s of the budget left for this section, needs about {need:.0f} s"})
                echo(f"  {label(case)}: skipped ({left:.0f} s left, needs {need:.0f} s)")
                continue
            case_start = time.monotonic()
            try:
                out = run_case(case)
                rows = out if isinstance(out, list) else [out]
                for row in rows:
                    row.setdefault("label", label(case))
                    row["seconds"] = round(time.monotonic() - case_start, 2)
                section["cases"].extend(rows)
                echo(f"  {label(case)} [{time.monotonic() - case_start:.1f} s]")
            except Terminated:
                raise
            except Exception as error:
                section["cases"].append({"label": label(case), "error": error_text(error), "traceback": traceback.format_exc()[-2000:]})
                echo(f"  {label(case)}: error {error_text(error)}")
                release(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
            results.write()
        section["status"] = "done"
    finally:
        section["seconds"] = round(time.monotonic() - start, 1)
        results.write()


def summarize(data: dict[str, Any]) -> list[str]:
    lines = []
    one_call = data["sections"].get("one_call", {}).get("cases", [])
    for row in one_call:
        if "cudnn_one_call_ran" not in row:
            lines.append(f"one_call {row.get('label')}: {row.get('skipped') or row.get('error')}")
            continue
        back = row.get("backward_error") or row.get("backward_max_abs_diff_vs_reference_fp32")
        lines.append(
            f"one_call {row['dtype']} {row['tokens']} tok heads {len(row['heads_masked'])} {row['layout']}: "
            f"ran={row['cudnn_one_call_ran']} max|diff|={row.get('max_abs_diff_vs_reference_fp32', '-')}"
            f" raw={row['raw_op'][:120]} backward={str(back)[:160]}"
        )
    for row in data["sections"].get("flex_profile", {}).get("cases", []):
        if "profile" not in row:
            lines.append(f"profile {row.get('label')}: {row.get('skipped') or row.get('error')}")
            continue
        p = row["profile"]
        cats = ", ".join(f"{k} {v:.0f}" for k, v in list(p["host_us_per_call_by_category"].items())[:5])
        lines.append(
            f"profile {row['label']}: single {row['wall_ms_single']:.3f} ms, b2b {row['wall_ms_back_to_back']:.3f} ms, "
            f"host {row['host_ms']:.3f} ms, kernels {p.get('device_kernel_us_per_call')} us, "
            f"recompiles {row['recompiles_during_timing']}, eager? {row['eager_fallback']['suspected']} | host us: {cats}"
        )
    for section in ("timing_forward", "timing_forward_backward"):
        groups: dict[str, list] = {}
        for row in data["sections"].get(section, {}).get("cases", []):
            key = f"{row.get('pass', section)} {row.get('tokens', '?')} tok {row.get('heads_masked', '?')}/12"
            if "candidate" not in row:
                lines.append(f"{section} {row.get('label')}: {row.get('skipped') or row.get('error')}")
                continue
            groups.setdefault(key, []).append(
                f"{row['candidate']} {row['ratio_to_dense']:.2f}x" if "ratio_to_dense" in row else f"{row['candidate']} error"
            )
        for key, parts in groups.items():
            lines.append(f"{key}: " + ", ".join(parts))
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out", help="JSON file (rewritten after every case)")
    parser.add_argument("--small", action="store_true", help="tiny shapes, few repeats, one thread: checks the script on a CPU")
    parser.add_argument("--budget", type=float, help="seconds for the whole run (default: 170 with --small, else none)")
    parser.add_argument(
        "--sections", default="one_call,flex_profile,timing_forward,timing_forward_backward",
        help="comma-separated sections, in the order to run them",
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_profile.py: --device cuda but no CUDA device", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    budget = Budget(args.budget if args.budget is not None else (170.0 if args.small else None))
    if args.small:
        torch.set_num_threads(1)
        try:
            import torch._inductor.config as inductor_config

            inductor_config.compile_threads = 1
        except Exception:
            pass
    cuda = device.type == "cuda"
    profile_settings = {
        "warmup": 3 if cuda else 1,
        "rounds": 3 if args.small else (20 if cuda else 5),
        "profiled_calls": 2 if args.small else (10 if cuda else 3),
        "min_sample_s": 0.0 if args.small else (0.02 if cuda else 0.05),
    }
    timing_settings = {
        "warmup": 3 if cuda else 1,
        "repeats": 3 if args.small else (15 if cuda else 5),
        "max_seconds": 2.0 if args.small else (6.0 if cuda else 20.0),
        "min_sample_s": 0.0 if args.small else (0.005 if cuda else 0.0),
        "blocks": [(2, 2), (2, 4), (4, 4)] if args.small else [(8, 8), (8, 16), (16, 16)],
    }
    data: dict[str, Any] = {
        "script": "benchmarks/gpu_profile.py",
        "args": vars(args),
        "env": run_environment(device, dtype),
        "settings": {"profile": profile_settings, "timing": {**timing_settings, "blocks": [list(b) for b in timing_settings["blocks"]]}},
        "conventions": {
            "times": "ms per call unless the key says us; medians over interleaved rounds (attnmask.bench.timing)",
            "ratio_to_dense": "dense ms / candidate ms, same process, same tensors (above 1: faster than dense)",
            "flops": f"forward 4*queries*keys*head_dim per (batch, head), exact window counts for masked heads; forward+backward {FWD_BWD_FLOP_FACTOR}x forward",
            "host_categories": CATEGORY_NOTES,
            "profiler_overhead": "profiled host times include the profiler's own overhead (a few us per op): use the shares, and host_ms/wall_ms for absolute figures",
        },
        "sections": {},
        "finished": False,
    }
    results = Results(args.out, data)
    try:
        CEILINGS.update(measure_ceilings(device, dtype, args.small))
        data["ceilings"] = dict(CEILINGS)
    except Exception as error:  # recorded; rows then carry no fractions
        data["ceilings"] = {"error": error_text(error)}
    results.write()
    capture = install_log_capture()
    echo = lambda line: print(line, flush=True)  # noqa: E731
    echo(f"gpu_profile on {data['env']['device']} ({device.type}, {str(dtype).replace('torch.', '')}), torch {torch.__version__}, "
         f"commit {data['env']['git_commit']}, budget {budget.seconds or 'none'} s")
    compiled: set = set()
    compile_s = {"forward": 25.0 if cuda else 20.0, "backward": 45.0 if cuda else 5.0}
    if args.small:
        compile_s = {"forward": 20.0, "backward": 5.0}

    def flex_need(case) -> float:
        if case["kernel"] != "flex":
            return 5.0
        key = (case["side"], case["batch"], case["masked"], case["block_size"], case["order"], "forward")
        return 5.0 if key in compiled else compile_s["forward"]

    def profile_case(case):
        row = run_flex_profile_case(case, device, dtype, profile_settings, capture)
        if case["kernel"] == "flex":
            key = (case["side"], case["batch"], case["masked"], case["block_size"], case["order"], "forward")
            if key not in compiled and row.get("first_call_s"):  # learn what a compilation costs here
                compile_s["forward"] = min(row["first_call_s"] + 5.0, 90.0)
            compiled.add(key)
        release(device)
        return row

    def timing_need(backward):
        def need(case):
            side, batch, masked = case
            fresh = sum(
                (side, batch, masked, size, "rows", "backward" if backward else "forward") not in compiled for size in (64, 128)
            )
            per = compile_s["backward" if backward else "forward"]
            return 8.0 + fresh * per * (0.6 if backward or not cuda else 1.0)

        return need

    def timing_case(backward):
        def run(case):
            side, batch, masked = case
            rows = run_timing_case(side, batch, masked, backward, device, dtype, timing_settings)
            for size in (64, 128):
                compiled.add((side, batch, masked, size, "rows", "backward" if backward else "forward"))
            release(device)
            return rows

        return run

    def timing_label(backward):
        return lambda case: f"{'fwd+bwd' if backward else 'fwd'} {1 + case[0] ** 2} tok b{case[1]} {case[2]}/{HEADS}"

    sections = {
        "one_call": dict(
            share=1.0, cases=one_call_cases(device, args.small), run_case=lambda case: run_one_call_case(case, device),
            label=lambda c: f"one_call {str(c['dtype']).replace('torch.', '')} {1 + c['side'] ** 2} tok {len(c['heads'])} heads {c['layout']}",
            need_s=lambda c: 3.0,
        ),
        "flex_profile": dict(share=0.5, cases=flex_profile_cases(args.small), run_case=profile_case, label=case_label, need_s=flex_need),
        "timing_forward": dict(
            share=0.6, cases=timing_cases(args.small, False), run_case=timing_case(False), label=timing_label(False), need_s=timing_need(False)
        ),
        "timing_forward_backward": dict(
            share=1.0, cases=timing_cases(args.small, True), run_case=timing_case(True), label=timing_label(True), need_s=timing_need(True)
        ),
    }
    order = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = [name for name in order if name not in sections]
    if unknown:
        print(f"gpu_profile.py: unknown sections {unknown}: expected some of {list(sections)}", file=sys.stderr)
        return 2
    status = 0
    try:
        for name in order:
            spec = sections[name]
            echo(f"== {name} (t={budget.elapsed():.0f} s, {budget.left():.0f} s left)")
            try:
                run_section(name, results, budget, spec["share"], spec["cases"], spec["run_case"], spec["label"], spec["need_s"], echo)
            except Terminated:
                raise
            except Exception as error:  # the section's own machinery failed: record, go on
                data["sections"].setdefault(name, {})["error"] = error_text(error)
                data["sections"][name]["traceback"] = traceback.format_exc()[-2000:]
                results.write()
        data["finished"] = True
    except Terminated as stop:
        data["terminated"] = str(stop)
        status = 143
    finally:
        data["elapsed_s"] = round(budget.elapsed(), 1)
        data["dynamo_counters_total"] = dynamo_counters()
        data["flex_cache_entries_total"] = flex_cache_entries()
        config = torch._dynamo.config
        data["dynamo_recompile_limit_end"] = getattr(config, "recompile_limit", getattr(config, "cache_size_limit", None))
        data["cudnn_refused"] = [str(item) for item in sdpa_module._CUDNN_REFUSED]
        try:
            data["summary"] = summarize(data)
        except Exception as error:
            data["summary"] = [f"summary failed: {error_text(error)}"]
        results.write()
    echo("\n== summary")
    for line in data["summary"]:
        echo(line)
    echo(f"({data['elapsed_s']} s{'' if data['finished'] else ', not finished'}; written to {args.out or 'nowhere (no --out)'})")
    return status


if __name__ == "__main__":
    sys.exit(main())
