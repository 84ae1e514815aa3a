"""Measure each change to the SDPA path, one at a time.

Steps, each adding one change to the previous one, all timed as the kernel call plus the
caller's head merge (``transpose(1, 2).reshape(B, N, C)``), interleaved with dense SDPA in
the same process (ratio = step / dense, lower is better):

- ``bool-one-call``: one SDPA call with a boolean mask for every head (``(N, N)`` when all
  heads are masked, else ``(H, N, N)`` with the global heads all True): the naive baseline;
- ``bool-split``: global heads on dense SDPA, masked heads with the boolean mask, both
  written into a contiguous ``(B, H, N, D)`` buffer (attnmask before this change);
- ``additive-split``: as above with the cached additive mask in the query dtype, rows
  padded to an aligned stride;
- ``additive-split-layout``: as above, both head groups written into a ``(B, N, H, D)``
  buffer so the head merge is a view (what ``sdpa_attention`` does now).

Run: ``python benchmarks/sdpa_changes.py --out benchmarks/results/sdpa_changes_cpu.json``
(on CUDA add ``--device cuda``; bf16 there by default).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from attnmask.bench.timing import environment
from attnmask.kernels import sdpa_attention
from attnmask.kernels.common import head_index
from attnmask.masks import LocalMask


def merge(out: torch.Tensor) -> torch.Tensor:
    batch, heads, tokens, dim = out.shape
    return out.transpose(1, 2).reshape(batch, tokens, heads * dim)


def steps(mask: LocalMask, device: str) -> dict[str, Callable]:
    local, global_ = head_index(mask.heads), head_index(mask.global_heads)

    per_head = mask.window_mask(device) if len(mask.heads) == mask.num_heads else mask.dense(device)

    def bool_one_call(q, k, v):
        return merge(F.scaled_dot_product_attention(q, k, v, attn_mask=per_head))

    def split_contiguous(attn_mask_of):
        def run(q, k, v):
            out = q.new_empty(q.shape[:-1] + v.shape[-1:])
            if mask.global_heads:
                out[:, global_] = F.scaled_dot_product_attention(q[:, global_], k[:, global_], v[:, global_])
            out[:, local] = F.scaled_dot_product_attention(
                q[:, local], k[:, local], v[:, local], attn_mask=attn_mask_of(q)
            )
            return merge(out)

        return run

    return {
        "bool-one-call": bool_one_call,
        "bool-split": split_contiguous(lambda q: mask.window_mask(q.device)),
        "additive-split": split_contiguous(lambda q: mask.additive_mask(q.device, q.dtype)),
        "additive-split-layout": lambda q, k, v: merge(sdpa_attention(q, k, v, mask)),
    }


def timed(fn: Callable, args, device: str) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - begin) * 1e3


def measure(device: str, dtype: torch.dtype, repeats: int, cases) -> list[dict]:
    rows = []
    for side, batch, fraction in cases:
        heads = 12
        masked = tuple(range(int(heads * fraction)))
        mask = LocalMask((side, side), (7, 7), 1, heads, masked)
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(batch, heads, mask.num_tokens, 64, generator=g).to(device, dtype) for _ in range(3))
        candidates = {"dense": lambda q, k, v: merge(F.scaled_dot_product_attention(q, k, v)), **steps(mask, device)}
        times: dict[str, list[float]] = {name: [] for name in candidates}
        with torch.no_grad():
            for fn in candidates.values():  # warm-up (and cache fill)
                fn(q, k, v)
            for _ in range(repeats):
                for name, fn in candidates.items():
                    times[name].append(timed(fn, (q, k, v), device))
        dense = statistics.median(times["dense"])
        for name, values in times.items():
            ms = statistics.median(values)
            rows.append(
                {"tokens": mask.num_tokens, "batch": batch, "heads_masked": len(masked), "step": name,
                 "ms": round(ms, 4), "ratio_to_dense": round(ms / dense, 3)}
            )
            print(f"{mask.num_tokens:>5} tokens, {len(masked):>2}/12 masked, {name:<22} {ms:8.3f} ms  {ms / dense:6.2f}x dense")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", help="write the rows and the environment as JSON")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.device == "cuda":
        cases = [(14, 256, 0.5), (14, 256, 1.0), (32, 32, 0.5), (32, 32, 1.0), (64, 4, 0.5), (64, 4, 1.0)]
    else:
        cases = [(14, 8, 0.5), (14, 8, 1.0), (32, 1, 0.5), (32, 1, 1.0)]
    rows = measure(args.device, dtype, args.repeats, cases)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"env": environment(torch.device(args.device), str(dtype).replace("torch.", "")), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
