"""Compiled patched vs compiled unpatched models, and the mask cache's peak bytes per backend.

Two measurements for the docs (``docs/performance.md``):

1. ``torch.compile`` (inductor): a patched ViT against the same ViT unpatched, both compiled,
   timed interleaved in one process (forward, no grad), at 224 and 512 px. The ratio is
   patched time / unpatched time (below 1: the patched model is faster), the median of the
   per-round ratios; eager ratios are measured the same way for comparison.
2. The peak bytes of a patched model's mask cache (:func:`attnmask.mask_cache`) after one
   forward of ViT-B/16 at 1024 px (4097 tokens), per backend.

Usage::

    python benchmarks/compile_and_cache.py                 # both, writes benchmarks/results/compile_cache_<device>.json
    python benchmarks/compile_and_cache.py --only cache    # or --only compile
    python benchmarks/compile_and_cache.py --rounds 9 --model vit_small_patch16_224

Random weights (no downloads). Ratios on a busy or small machine move by 5-30 % run to run:
rerun before resting a decision on one figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import timm
import torch

import attnmask
from attnmask.bench.timing import device_slug, environment

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn, x: torch.Tensor, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.no_grad()
def compare(plain, patched, x: torch.Tensor, rounds: int, device: torch.device) -> dict:
    """Interleaved timings (the order alternates each round); median of per-round ratios."""
    for _ in range(2):
        plain(x), patched(x)
    plain_times, patched_times, ratios = [], [], []
    for i in range(rounds):
        if i % 2:
            b = timed(patched, x, device)
            a = timed(plain, x, device)
        else:
            a = timed(plain, x, device)
            b = timed(patched, x, device)
        plain_times.append(a)
        patched_times.append(b)
        ratios.append(b / a)
    return {
        "ratio": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
        "unpatched_ms": round(1e3 * statistics.median(plain_times), 2),
        "patched_ms": round(1e3 * statistics.median(patched_times), 2),
    }


def compile_rows(model_name: str, sizes, batch: int, rounds: int, backends, device: torch.device) -> list[dict]:
    rows = []
    for size in sizes:
        torch.manual_seed(0)
        plain = timm.create_model(model_name, pretrained=False, img_size=size).eval().to(device)
        x = torch.randn(batch, 3, size, size, device=device)
        for backend in backends:
            patched = attnmask.apply(copy.deepcopy(plain), heads=0.5, window=7, backend=backend)
            with torch.no_grad():
                torch.testing.assert_close(patched(x), patched(x))  # runs, deterministic
                chosen = attnmask.describe(patched).to_dict().get("backend")
            torch._dynamo.reset()
            start = time.perf_counter()
            compiled_plain, compiled_patched = torch.compile(plain), torch.compile(patched)
            with torch.no_grad():
                eager_out = patched(x)
                torch.testing.assert_close(compiled_patched(x), eager_out, rtol=1e-3, atol=1e-3)
                compiled_plain(x)
            compile_s = time.perf_counter() - start
            row = {
                "model": model_name,
                "size": size,
                "tokens": plain.patch_embed.num_patches + plain.num_prefix_tokens,
                "batch": batch,
                "backend": backend,
                "backend_reported": chosen,
                "heads": "half",
                "window": 7,
                "compile_s": round(compile_s, 1),
                "compiled": compare(compiled_plain, compiled_patched, x, rounds, device),
                "eager": compare(plain, patched, x, rounds, device),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


@torch.no_grad()
def cache_rows(size: int, backends, device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    base = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=size).eval().to(device)
    x = torch.randn(1, 3, size, size, device=device)
    rows = []
    for backend in backends:
        model = attnmask.apply(copy.deepcopy(base), heads=0.5, window=7, backend=backend)
        start = time.perf_counter()
        try:
            model(x)
        except RuntimeError as error:  # e.g. triton without a GPU
            rows.append({"backend": backend, "error": str(error).splitlines()[0]})
            print(json.dumps(rows[-1]), flush=True)
            continue
        info = attnmask.mask_cache(model).info()
        rows.append(
            {
                "model": "vit_base_patch16_224",
                "size": size,
                "tokens": base.patch_embed.num_patches + base.num_prefix_tokens,
                "backend": backend,
                "entries": info["entries"],
                "peak_bytes": info["peak_bytes"],
                "peak_mib": round(info["peak_bytes"] / 2**20, 2),
                "forward_s": round(time.perf_counter() - start, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("compile", "cache"), default=None)
    parser.add_argument("--model", default="vit_small_patch16_224", help="timm model for the compile ratios")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--compile-backends", nargs="+", default=["auto"])
    parser.add_argument("--cache-size", type=int, default=1024)
    parser.add_argument("--cache-backends", nargs="+", default=["sdpa", "blocked", "flex", "auto", "triton"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    result = {"script": "benchmarks/compile_and_cache.py", "env": environment(device, "float32")}
    if args.only in (None, "compile"):
        result["compile"] = compile_rows(args.model, args.sizes, args.batch, args.rounds, args.compile_backends, device)
    if args.only in (None, "cache"):
        result["cache"] = cache_rows(args.cache_size, args.cache_backends, device)
    out = Path(args.out) if args.out else RESULTS / f"compile_cache_{device_slug(device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
