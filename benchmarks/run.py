"""The full benchmark suite: attention level and whole models, saved as JSON for the docs.

Run ``python benchmarks/run.py`` (CPU: 10 to 15 minutes on 2 cores): it writes ``benchmarks/results/<device>.json`` (e.g.
``nvidia-h100-80gb-hbm3.json``, ``cpu-amd-epyc.json``); then ``python benchmarks/plot.py``
draws the figures and regenerates ``docs/performance.md``. ``--quick`` runs the quick preset
(what ``attnmask bench`` runs) into ``<device>-quick.json``. Every option of ``attnmask
bench`` is accepted (``--tokens``, ``--models``, ``--sizes``, ``--backends 'sdpa,flex*'``,
``--repeats``, ``--depth``, ``--model-heads``, ...). To stay under a per-command time limit,
run parts separately into one file: ``--only attention``, then ``--only models --merge``,
and split further with ``--modes`` or ``--sizes`` (``--merge`` keeps every row of an
existing file taken on the same device with the same versions that this run does not
re-measure: a row is re-measured when its token count, heads setting and pass, or its model,
image size, mode and heads setting, are run again). The CPU command lines for the docs are
on the Performance page (``docs/performance.md``, Reproduce). See :mod:`attnmask.bench` for
what is timed and how.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attnmask.cli.bench import add_options, execute, settings_from  # noqa: E402

LEVELS = ("attention", "models")
SAME = ("device", "dtype", "torch", "cuda", "triton", "timm", "allocator")
"""What must agree for ``--merge`` to put results of two runs into one file."""


def default_out(args: argparse.Namespace) -> str:
    """``benchmarks/results/<device slug>.json`` (``-quick`` added for the quick preset)."""
    import torch

    from attnmask.bench.timing import device_slug

    device = torch.device(settings_from(args).device)
    suffix = "-quick" if args.preset == "quick" else ""
    return str(ROOT / "benchmarks" / "results" / f"{device_slug(device)}{suffix}.json")


def commit() -> Optional[str]:
    """The checkout's commit, with ``+dirty`` when files differ from it (``None`` outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def mismatch(old_env: dict[str, Any], new_env: dict[str, Any]) -> list[str]:
    """What differs between two ``env`` records among :data:`SAME` (empty: they may merge)."""
    return [f"{key} {old_env.get(key)!r} != {new_env.get(key)!r}" for key in SAME if old_env.get(key) != new_env.get(key)]


def row_key(level: str, row: dict[str, Any]) -> tuple:
    """What a row compares (one key per comparison, shared by its backends' rows)."""
    if level == "attention":
        return row.get("tokens"), row.get("heads_label"), row.get("pass")
    from attnmask.bench.report import model_heads

    return row.get("model"), row.get("image_size"), row.get("mode"), model_heads(row)


def _ordered(level: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` sorted into the order a single run writes them (stable: backends keep theirs)."""
    from attnmask.bench.settings import HEADS_MASKED, MODES, PASSES

    if level == "attention":
        def key(r):
            return (r.get("tokens", 0), _index(HEADS_MASKED, r.get("heads_label")), _index(PASSES, r.get("pass")))
    else:
        names = list(dict.fromkeys(r.get("model") for r in rows))

        def key(r):
            heads = r.get("heads") if isinstance(r.get("heads"), (int, float)) else 0.0
            return (names.index(r.get("model")), r.get("image_size", 0), _index(MODES, r.get("mode")), heads)
    return sorted(rows, key=key)


def _index(values: tuple, value: Any) -> int:
    return values.index(value) if value in values else len(values)


def merged(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new``, plus every row of ``old`` whose comparison ``new`` did not re-run (a level
    ``new`` did not run at all is taken whole, with its settings)."""
    out = dict(new, settings=dict(new["settings"]))
    for level in LEVELS:
        if not old.get(level):
            continue
        if not new[level]:
            out[level] = old[level]
            out["settings"][f"{level}_settings"] = old["settings"].get(f"{level}_settings", old["settings"])
            continue
        rerun = {row_key(level, r) for r in new[level]}
        kept = [r for r in old[level] if row_key(level, r) not in rerun]
        if kept:
            out[level] = _ordered(level, kept + new[level])
            out["settings"][f"{level}_merged"] = f"{len(kept)} rows kept from the earlier run"
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_options(parser, default_preset="full")
    parser.add_argument("--out", help="where to write the JSON (default: benchmarks/results/<device>.json)")
    parser.add_argument("--merge", action="store_true", help="keep the other level's rows of an existing --out file")
    args = parser.parse_args(argv)
    try:
        out = args.out or args.json or default_out(args)
    except ValueError as error:
        print(f"benchmarks/run.py: {error}", file=sys.stderr)
        return 2
    old = json.loads(Path(out).read_text()) if args.merge and Path(out).exists() else None
    if old is not None:
        import torch

        from attnmask.bench.timing import environment

        settings = settings_from(args)
        differ = mismatch(old.get("env", {}), environment(torch.device(settings.device), settings.dtype))
        if differ:
            print(f"benchmarks/run.py: cannot --merge into {out}: {'; '.join(differ)}", file=sys.stderr)
            return 1
        print(f"merging into {out} (its {', '.join(level for level in LEVELS if old.get(level))} rows are kept where not re-run)")
    finish = (lambda new: merged(old, new)) if old is not None else None
    return execute(args, "benchmarks/run.py", out, extra_env={"git_commit": commit()}, finish=finish)


if __name__ == "__main__":
    sys.exit(main())
