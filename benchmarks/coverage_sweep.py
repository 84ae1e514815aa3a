"""Which timm architectures attnmask patches today, and why it refuses the others.

For every timm model module (``timm.list_modules()``) the smallest-sounding model name is
built with random weights (``pretrained=False``: nothing is downloaded) and
:func:`attnmask.apply` is tried with half the heads masked and a 3 x 3 window. A patched
model must run a forward pass, and :func:`attnmask.remove` must give back the unpatched
outputs bit for bit. Each module gets one row: ``patched``, ``refused`` (attnmask's reason),
``no attention`` (refused and the model has no attention-like module) or ``error`` (building
or running the model failed; the exception).

    python benchmarks/coverage_sweep.py                      # every module, about 5 minutes on 2 cores
    python benchmarks/coverage_sweep.py --modules vision_transformer,swin_transformer

Writes ``benchmarks/results/coverage_timm.json`` and prints a Markdown table. A baseline for
detecting attention by structure rather than by family name: it says which modules a user of
timm would be refused on, and with which message.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
import time
from typing import Any, Optional

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import attnmask  # noqa: E402
from attnmask.bench.timing import environment, one_line  # noqa: E402

SMALL = ("pico", "nano", "atto", "femto", "xxs", "tiny", "xs", "small", "s", "b0", "base")
"""Name parts that suggest a small model, best first."""


def smallest(names: list[str]) -> Optional[str]:
    """The name that sounds smallest (``SMALL`` order, then the shortest), at 224 px if any."""

    def rank(name: str) -> tuple:
        parts = re.split(r"[_.]", name)
        size = min((i for p in parts for i, tag in enumerate(SMALL) if re.fullmatch(rf"{tag}\d*", p)), default=len(SMALL))
        return size, "224" not in name, len(name), name

    return min(names, key=rank) if names else None


def has_attention(model: torch.nn.Module) -> bool:
    """Whether any module looks like attention by its class name (a hint for the table)."""
    return any("attn" in type(m).__name__.lower() or "attention" in type(m).__name__.lower() for m in model.modules())


def try_module(module: str, max_params: float) -> dict[str, Any]:
    import timm

    name = smallest(timm.list_models(module=module))
    row: dict[str, Any] = {"module": module, "model": name}
    if name is None:
        return dict(row, status="error", reason="no model names")
    start = time.perf_counter()
    try:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
    except Exception as error:
        return dict(row, status="error", reason=f"build: {one_line(error)}")
    params = sum(p.numel() for p in model.parameters()) / 1e6
    row["params_m"] = round(params, 1)
    if params > max_params:
        return dict(row, status="skipped", reason=f"{params:.0f}M parameters (over --max-params {max_params:g}M)")
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = cfg.get("input_size", (3, 224, 224))
    images = torch.randn(1, *size)
    try:
        with torch.no_grad():
            before = model(images)
    except Exception as error:
        return dict(row, status="error", reason=f"forward: {one_line(error)}")
    try:
        attnmask.apply(model, heads=0.5, window=3)
    except Exception as error:
        status = "refused" if has_attention(model) else "no attention"
        return dict(row, status=status, reason=one_line(error), seconds=round(time.perf_counter() - start, 1))
    try:
        with torch.no_grad():
            model(images)
        attnmask.remove(model)
        with torch.no_grad():
            after = model(images)
        exact = bool(torch.equal(before, after))
    except Exception as error:
        return dict(row, status="error", reason=f"patched model: {one_line(error)}")
    row.update(status="patched" if exact else "error", seconds=round(time.perf_counter() - start, 1))
    if not exact:
        row["reason"] = "remove() did not restore the outputs bit for bit"
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| timm module | model | status | reason |", "|---|---|---|---|"]
    for r in rows:
        reason = (r.get("reason") or "").replace("|", "/")
        lines.append(f"| `{r['module']}` | `{r.get('model')}` | {r['status']} | {reason[:200]} |")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("patched", "refused", "no attention", "skipped", "error")}
    return "\n".join(lines) + "\n\n" + ", ".join(f"{k}: {v}" for k, v in counts.items())


def main(argv: Optional[list[str]] = None) -> int:
    import timm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", help="comma-separated timm modules (default: all)")
    parser.add_argument("--max-params", type=float, default=120.0, help="skip models with more parameters (millions)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "coverage_timm.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    modules = args.modules.split(",") if args.modules else sorted(timm.list_modules())
    rows = []
    for module in modules:
        row = try_module(module, args.max_params)
        print(f"{module}: {row['status']} {row.get('model')} {row.get('reason', '')[:160]}", flush=True)
        rows.append(row)
    data = {"script": "benchmarks/coverage_sweep.py", "env": environment(torch.device("cpu"), "float32"), "rows": rows}
    pathlib.Path(args.out).write_text(json.dumps(data, indent=1))
    print(table(rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
