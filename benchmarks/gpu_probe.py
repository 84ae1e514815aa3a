"""Where masked attention's time goes on a GPU, and which SDPA arrangement is fastest.

Issue 4 follow-up, run on the device machine (bf16). The first GPU run found every masked
kernel slower than dense flash SDPA (ViT-B/16 inference: 0.85-0.93x at 224 px, 0.86x at
1024 px), FlexAttention's time nearly constant from 197 to 4097 tokens (so: per-call
overhead, not attention work), and 64-token flex blocks failing to build. This script
measures, in one process, against dense SDPA:

- attention level (12 heads, head dim 64, 7 x 7 window, class token): each candidate timed
  per call (synchronised each time, as the benchmark suite does) and back to back (20 calls
  between two events: what a model that keeps the GPU queue full sees);
- model level (timm ViT-B/16, half the heads masked, inference): the unpatched model vs the
  patched one with each candidate swapped in as the ``"sdpa"`` kernel.

Candidates: ``split`` (attnmask's sdpa kernel: global heads dense, masked heads with the
additive mask), ``onecall-efficient`` / ``onecall-cudnn`` (every head in one SDPA call with a
per-head additive mask, zeros on global heads, forced to one SDPA backend), ``split-cudnn``
(split, masked heads on cuDNN), ``flex-b128`` / ``flex-b64`` (attnmask's flex kernel).
Candidates a backend refuses are reported as errors, not dropped.

Run: ``python benchmarks/gpu_probe.py --out probe.json`` (``--device cpu --quick`` checks the
script itself on a CPU).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attnmask  # noqa: E402
from attnmask import kernels  # noqa: E402
from attnmask.bench.timing import environment  # noqa: E402
from attnmask.kernels.flex import flex_attention  # noqa: E402
from attnmask.kernels.common import split_heads  # noqa: E402
from attnmask.kernels.sdpa import sdpa_attention  # noqa: E402
from attnmask.masks import LocalMask  # noqa: E402


def onecall(backend: SDPBackend) -> Callable:
    def kernel(q, k, v, mask, *, attn_mask=None, dropout_p=0.0, scale=None):
        if mask.is_identity or attn_mask is not None:
            return sdpa_attention(q, k, v, mask, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.head_additive_mask(q.device, q.dtype), scale=scale)

    return kernel


def split_cudnn(q, k, v, mask, *, attn_mask=None, dropout_p=0.0, scale=None):
    if mask.is_identity or attn_mask is not None:
        return sdpa_attention(q, k, v, mask, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)

    def masked(q_, k_, v_, host):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask.additive_mask(q_.device, q_.dtype), scale=scale)

    return split_heads(q, k, v, mask, attn_mask, masked, scale=scale)


def candidates(device: str) -> dict[str, Callable]:
    found = {"split": sdpa_attention, "onecall-efficient": onecall(SDPBackend.EFFICIENT_ATTENTION)}
    if device == "cuda":
        found["onecall-cudnn"] = onecall(SDPBackend.CUDNN_ATTENTION)
        found["split-cudnn"] = split_cudnn
    found["flex-b128"] = functools.partial(flex_attention, block_size=128)
    found["flex-b64"] = functools.partial(flex_attention, block_size=64)
    found["flex-b128-tiles"] = functools.partial(flex_attention, block_size=128, order="tiles")
    return found


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_calls(fn: Callable, device: str, calls: int) -> float:
    """ms per call over ``calls`` back-to-back calls (one pair of events / clock reads)."""
    sync(device)
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - begin) * 1e3 / calls


def interleaved(fns: dict[str, Callable], device: str, rounds: int, calls: int) -> dict[str, dict]:
    """Median ms per call for each fn, single synchronised calls and back-to-back calls,
    rounds interleaved across fns; errors recorded per fn."""
    results: dict[str, dict] = {}
    live = {}
    for name, fn in fns.items():
        try:
            fn()
            fn()
            sync(device)
            live[name] = fn
        except Exception as error:  # a backend refusing a case is a result
            results[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    single = {name: [] for name in live}
    burst = {name: [] for name in live}
    for _ in range(rounds):
        for name, fn in live.items():
            single[name].append(time_calls(fn, device, 1))
            burst[name].append(time_calls(fn, device, calls))
    for name in live:
        results[name] = {"ms_single": statistics.median(single[name]), "ms_back_to_back": statistics.median(burst[name])}
    return results


def attention_level(device: str, dtype, cases, rounds: int, calls: int) -> list[dict]:
    rows = []
    for side, batch, masked_heads in cases:
        mask = LocalMask((side, side), (7, 7), 1, 12, tuple(range(masked_heads)))
        g = torch.Generator().manual_seed(side * 100 + masked_heads)
        q, k, v = (torch.randn(batch, 12, mask.num_tokens, 64, generator=g).to(device, dtype) for _ in range(3))
        fns = {"dense": lambda: F.scaled_dot_product_attention(q, k, v)}
        if device == "cuda":
            def dense_cudnn():
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    return F.scaled_dot_product_attention(q, k, v)
            fns["dense-cudnn"] = dense_cudnn
        for name, kernel in candidates(device).items():
            fns[name] = functools.partial(kernel, q, k, v, mask)
        with torch.no_grad():
            # correctness first: every candidate against the float64 reference
            ref = kernels.reference_attention(q[:1], k[:1], v[:1], mask).float()
            errors = {}
            for name, kernel in candidates(device).items():
                try:
                    out = kernel(q[:1], k[:1], v[:1], mask).float()
                    errors[name] = float((out - ref).norm() / ref.norm())
                except Exception as error:
                    errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            results = interleaved(fns, device, rounds, calls)
        base = results["dense"]
        for name, res in results.items():
            row = {"tokens": mask.num_tokens, "batch": batch, "heads_masked": masked_heads, "candidate": name, **res}
            if "ms_single" in res:
                row["ratio_single"] = base["ms_single"] / res["ms_single"]
                row["ratio_back_to_back"] = base["ms_back_to_back"] / res["ms_back_to_back"]
            if name in errors:
                row["rel_error_vs_float64"] = errors[name]
            rows.append(row)
            print(f"attn {mask.num_tokens:>5} tok b{batch:<3} {masked_heads:>2}/12  {name:<18} "
                  + (f"{res['ms_single']:.4f} ms ({row['ratio_single']:.2f}x)  b2b {res['ms_back_to_back']:.4f} ms "
                     f"({row['ratio_back_to_back']:.2f}x)  err {errors.get(name, '')}" if "ms_single" in res else res["error"]),
                  flush=True)
    return rows


def model_level(device: str, dtype, sizes, rounds: int, names) -> list[dict]:
    import timm

    rows = []
    for size, batch in sizes:
        model = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=size).to(device, dtype).eval()
        images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size)).to(device, dtype)
        patched = attnmask.apply(copy.deepcopy(model), heads=0.5, window=7, backend="sdpa")
        original = kernels.KERNELS["sdpa"]
        variants = {name: fn for name, fn in candidates(device).items() if name in names}

        def run_with(kernel):
            def call():
                kernels.KERNELS["sdpa"] = kernel
                try:
                    return patched(images)
                finally:
                    kernels.KERNELS["sdpa"] = original
            return call

        fns = {"unpatched": lambda: model(images), **{name: run_with(fn) for name, fn in variants.items()}}
        with torch.no_grad():
            results = interleaved(fns, device, rounds, 3)
        base = results["unpatched"]
        for name, res in results.items():
            row = {"model": "vit_base_patch16_224", "image_size": size, "batch": batch, "candidate": name, **res}
            if "ms_single" in res:
                row["ratio_single"] = base["ms_single"] / res["ms_single"]
                row["ratio_back_to_back"] = base["ms_back_to_back"] / res["ms_back_to_back"]
            rows.append(row)
            print(f"model {size:>4} px b{batch:<3} {name:<18} "
                  + (f"{res['ms_single']:.3f} ms ({row['ratio_single']:.3f}x)  b2b {res['ms_back_to_back']:.3f} ms "
                     f"({row['ratio_back_to_back']:.3f}x)" if "ms_single" in res else res["error"]), flush=True)
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (checks the script on a CPU)")
    parser.add_argument("--out", help="write the rows and the environment as JSON")
    parser.add_argument("--skip-models", action="store_true")
    args = parser.parse_args(argv)
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.quick:
        cases, sizes, rounds, calls = [(4, 2, 6), (4, 2, 12)], [(64, 2)], 2, 2
    else:
        cases = [(14, 256, 6), (14, 256, 12), (32, 32, 6), (64, 4, 6), (64, 4, 12)]
        sizes, rounds, calls = [(224, 64), (1024, 4)], 15, 20
    data = {"probe": "benchmarks/gpu_probe.py", "env": environment(torch.device(device), str(dtype).replace("torch.", ""))}
    data["attention"] = attention_level(device, dtype, cases, rounds, calls)
    if args.out:
        Path(args.out).write_text(json.dumps(data, indent=1))
    if not args.skip_models:
        names = ("split", "onecall-efficient", "onecall-cudnn", "split-cudnn", "flex-b128", "flex-b64")
        data["models"] = model_level(device, dtype, sizes, max(rounds // 2, 2), names)
        if args.out:
            Path(args.out).write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
