"""Where the blocked backend wins, and with which query block: the evidence of its rows.

Times, side by side in one process (interleaved rounds, medians), dense SDPA against the
``sdpa`` and ``flex`` backends and ``blocked`` with several query blocks, for ViT-B/16
attention shapes (12 heads of 64, one class token, a square grid, a 7 x 7 window), half or
all heads masked, forward and forward+backward, hard and soft mode. The ``speed`` of a row
is dense time / backend time. Writes ``benchmarks/results/blocked_sweep_<device>.json``;
:data:`attnmask.kernels.blocked.BLOCK_TABLE` and the blocked rows of ``auto`` cite it.

    python benchmarks/blocked_sweep.py                 # CPU: about 6 minutes on 2 cores
    python benchmarks/blocked_sweep.py --tokens 1025,4097 --passes forward --quick
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys

import torch
import torch.nn.functional as F

from attnmask.bench.timing import DTYPES, default_dtype, device_slug, environment, time_interleaved
from attnmask.kernels import blocked_attention, flex_attention, sdpa_attention
from attnmask.masks import LocalMask

BLOCKS = ((8, 8), (8, 16), (16, 16), (7, 7), (4, 8))
BATCH = {"cpu": {197: 8, 577: 2}, "cuda": {197: 256, 577: 64, 1025: 32, 2305: 8, 4097: 4}}


def candidates(mask: LocalMask, train: bool, device: torch.device, blocks) -> dict:
    """Backend label -> ``kernel(q, k, v)`` with the mask bound."""
    fns = {"sdpa": functools.partial(sdpa_attention, mask=mask)}
    for block in blocks:
        fns[f"blocked-{block[0]}x{block[1]}"] = functools.partial(blocked_attention, mask=mask, block=block)
    flex_ok = mask.mode == "hard" and (device.type == "cuda" or not train) and mask.num_tokens >= 1025
    if flex_ok:
        fns["flex-b64"] = functools.partial(flex_attention, mask=mask, block_size=64)
    return fns


def measure(tokens: int, heads: str, mode: str, train: bool, args, device: torch.device) -> list[dict]:
    side = int((tokens - 1) ** 0.5)
    masked = tuple(range(6)) if heads == "half" else tuple(range(12))
    mask = LocalMask((side, side), (7, 7), 1, 12, masked, mode=mode)
    batch = BATCH[device.type].get(tokens, 1)
    dtype = DTYPES[args.dtype]
    q, k, v = (torch.randn(batch, 12, tokens, 64, device=device, dtype=dtype, requires_grad=train) for _ in range(3))
    grad = torch.randn_like(q)

    def wrap(op):
        if train:
            return lambda: torch.autograd.grad(op(q, k, v), (q, k, v), grad)

        def forward():
            with torch.no_grad():
                op(q, k, v)

        return forward

    ops = {"dense": lambda q_, k_, v_: F.scaled_dot_product_attention(q_, k_, v_)}
    ops.update({name: (lambda fn: lambda q_, k_, v_: fn(q_, k_, v_))(fn) for name, fn in candidates(mask, train, device, args.blocks).items()})
    timings = time_interleaved({name: wrap(op) for name, op in ops.items()}, device, repeats=args.repeats, max_seconds=args.max_seconds)
    base = timings["dense"].ms
    rows = []
    for name, timing in timings.items():
        row = dict(tokens=tokens, heads=heads, mode=mode, passes="forward+backward" if train else "forward", batch=batch, backend=name)
        if timing.error is not None or base is None:
            rows.append(dict(row, error=timing.error or "baseline failed"))
        else:
            rows.append(dict(row, ms=timing.ms, baseline_ms=base, speed=base / timing.ms, samples_ms=timing.samples_ms))
    best = max((r for r in rows if "speed" in r and r["backend"] != "dense"), key=lambda r: r["speed"], default=None)
    print(
        f"{tokens:5d} {heads:4s} {mode:4s} {'fwd+bwd' if train else 'fwd':7s} dense {base:.4g} ms | "
        + ", ".join(f"{r['backend']} {r['speed']:.2f}x" for r in rows if "speed" in r and r["backend"] != "dense")
        + (f" | best {best['backend']}" if best else ""),
        flush=True,
    )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    parser.add_argument("--tokens", default="197,577,1025,2305,4097")
    parser.add_argument("--passes", default="forward,forward+backward")
    parser.add_argument("--modes", default="hard,soft")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--max-seconds", type=float, default=8.0)
    parser.add_argument("--quick", action="store_true", help="two block shapes, 3 repeats")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.dtype = args.dtype or default_dtype(device)
    args.blocks = BLOCKS[:2] if args.quick else BLOCKS
    if args.quick:
        args.repeats = 3
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        for mode in args.modes.split(","):
            for passes in args.passes.split(","):
                for heads in ("half", "all"):
                    rows += measure(tokens, heads, mode, passes == "forward+backward", args, device)
    out = pathlib.Path(args.out or f"benchmarks/results/blocked_sweep_{device_slug(device)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": environment(device, args.dtype), "window": [7, 7], "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
