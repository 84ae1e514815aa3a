"""``attnmask bench``: masked attention against dense SDPA, patched models against unpatched.

The options are shared with ``benchmarks/run.py`` (:func:`add_options`), which runs the full
preset and saves the results for the docs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from . import quiet_host


def comma_list(convert: Callable[[str], Any], name: str) -> Callable[[str], tuple]:
    """An argparse type for ``a,b,c`` whose items go through ``convert``; ``""`` is empty."""

    def parse(text: str) -> tuple:
        try:
            return tuple(convert(part.strip()) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{name} {text!r} is not accepted: expected a comma-separated list") from None

    return parse


def head_fraction(text: str) -> float:
    """``half`` -> 0.5, ``all`` -> 1.0, else a number (see :func:`attnmask.bench.settings.head_fraction`)."""
    from ..bench.settings import head_fraction as parse

    return parse(text)


def add_options(parser: argparse.ArgumentParser, default_preset: str = "quick") -> None:
    """Options of ``attnmask bench`` (and ``benchmarks/run.py``); ``None`` means "the preset's"."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quick", dest="preset", action="store_const", const="quick", help="quick preset (about a minute on CPU)")
    which.add_argument("--full", dest="preset", action="store_const", const="full", help="the full suite (see benchmarks/run.py)")
    parser.set_defaults(preset=default_preset)
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    parser.add_argument("--only", choices=("attention", "models"), help="run only one level")
    parser.add_argument("--tokens", type=comma_list(int, "tokens"), help="attention-level token counts, 1+g*g: 197,577,1025,4097")
    parser.add_argument("--batch", type=int, dest="attention_batch", metavar="N", help="attention-level batch for every token count")
    parser.add_argument("--window", type=int, help="odd side of the locality window (default: 7; Swin models use 3)")
    parser.add_argument("--heads-masked", type=comma_list(str, "heads-masked"), help="half,all")
    parser.add_argument("--passes", type=comma_list(str, "passes"), help="forward,forward+backward")
    parser.add_argument("--backends", type=comma_list(str, "backends"), help="backend name patterns: sdpa,flex* (default: all)")
    parser.add_argument(
        "--variants", "--flex-variants", dest="flex_variants", action=argparse.BooleanOptionalAction, default=None,
        help="also time the labelled variants at the attention level: FlexAttention's (flex-b128-rows, ...) and "
        "the blocked backend's query blocks (blocked-8x8, blocked-8x16, blocked-16x16) (default: full yes, quick no)",
    )
    parser.add_argument("--models", type=comma_list(str, "models"), help="timm model names (random weights)")
    parser.add_argument("--sizes", type=comma_list(int, "sizes"), help="model image sizes: 224,512,1024")
    parser.add_argument("--modes", type=comma_list(str, "modes"), help="inference,train")
    parser.add_argument("--model-batch", type=int, help="model-level batch for every image size")
    parser.add_argument(
        "--model-heads", type=comma_list(head_fraction, "model-heads"), metavar="HEADS",
        help="heads masked at the model level, one comparison each: half,all or fractions 0.5,1 (default: quick half, full half,all)",
    )
    parser.add_argument(
        "--depth", type=int, metavar="N",
        help="build the models with N blocks (ViT and other models whose constructor takes depth; Swin keeps its own): "
        "a shallower ViT-B/16 for CPU runs; each row records the depth",
    )
    parser.add_argument(
        "--skip-train-sizes", type=comma_list(int, "skip-train-sizes"), metavar="SIZES",
        help="image sizes whose training rows are skipped ('' skips none; default: full on CPU 1024)",
    )
    parser.add_argument("--repeats", type=int, help="timed interleaved rounds per comparison")
    parser.add_argument("--warmup", type=int, help="untimed calls per candidate first")
    parser.add_argument("--max-seconds", type=float, help="time budget per comparison (fewer rounds, at least 3)")
    parser.add_argument("--threads", type=int, help="torch threads on CPU (default: torch's)")
    parser.add_argument("--seed", type=int, help="random seed (default: 0)")


OVERRIDES = (
    "dtype", "tokens", "attention_batch", "window", "heads_masked", "passes", "backends", "flex_variants", "models", "sizes", "modes",
    "model_batch", "model_heads", "depth", "skip_train_sizes", "repeats", "warmup", "max_seconds", "threads", "seed",
)
"""Options that override a field of :class:`attnmask.bench.Settings` of the same name."""


def settings_from(args: argparse.Namespace):
    """The :class:`attnmask.bench.Settings` that parsed options ask for (raises ``ValueError``)."""
    import torch

    from ..bench import preset

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    overrides = {name: getattr(args, name) for name in OVERRIDES}
    if args.only == "attention":
        overrides["models"] = ()
    elif args.only == "models":
        overrides["tokens"] = ()
    return preset(args.preset, device, **overrides)


def execute(
    args: argparse.Namespace,
    prog: str,
    out: Optional[str],
    extra_env: Optional[dict] = None,
    finish: Optional[Callable[[dict], dict]] = None,
) -> int:
    """Run, print the tables, write JSON to ``out``; the exit code (0, 1 or 2).

    ``extra_env`` is added to the results' ``env`` (``benchmarks/run.py`` adds the commit);
    ``finish`` may change the results before they are written (``--merge``)."""
    from .. import bench

    try:
        settings = settings_from(args)
    except ValueError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2
    try:
        result = bench.run(settings, echo=lambda line: print(line, flush=True))
    except ValueError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2
    except (RuntimeError, ImportError, OSError) as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 1
    env = result["env"]
    env.update(extra_env or {})
    print(f"\n{env['device']}, {env['dtype']}, torch {env['torch']}, timm {env['timm']}, {env['threads']} thread(s)\n")
    print(bench.tables(result))
    if finish is not None:
        result = finish(result)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"results written to {out}")
    if not bench.measured(result):
        print(f"{prog}: nothing could be measured (see the errors above)", file=sys.stderr)
        return 1
    return 0


def add_parser(commands) -> None:
    bench = commands.add_parser(
        "bench",
        help="time masked attention and patched models against their unpatched baselines",
        description=(
            "Time each masked-attention backend against dense SDPA on the same tensors, and patched "
            "timm models (random weights, nothing downloaded) against the unpatched model, side by "
            "side in one process. Prints ratios (above 1: faster than the baseline). Runs the quick "
            "preset by default (about a minute on CPU); --full runs the whole suite."
        ),
    )
    add_options(bench)
    bench.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    quiet_host()
    return execute(args, "attnmask bench", args.json)
