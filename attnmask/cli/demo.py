"""``attnmask demo``: the README's main job on a built-in example (no downloads)."""

from __future__ import annotations

import argparse
import json
import sys

from . import parse_heads, parse_window, quiet_host


def add_parser(commands) -> None:
    demo = commands.add_parser(
        "demo",
        help="patch a small timm ViT (random weights, no download), check and time it",
        description=(
            "Build a timm vision transformer from its config (random weights, nothing downloaded), mask "
            "some heads with attnmask.apply, print the describe() table, check locality on a random image, "
            "compare outputs with the unpatched model and time both forward passes side by side."
        ),
    )
    demo.add_argument(
        "--model", default="vit_small_patch16_224",
        help="timm model name: a ViT, DeiT, Swin, BEiT, EVA, ... (default: %(default)s)",
    )
    demo.add_argument("--heads", type=parse_heads, default=0.5, help="heads to mask per layer: 3, 0.5, all, 0,2 (default: 0.5)")
    demo.add_argument("--window", type=parse_window, default=7, help="window: 7 or 3x5 (default: 7)")
    demo.add_argument("--batch", type=int, default=8, help="batch size (default: %(default)s)")
    demo.add_argument("--repeats", type=int, default=10, help="timed forward passes per model (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    demo.add_argument("--json", metavar="PATH", help="also write the measurements as JSON to PATH")
    demo.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    quiet_host()
    from .. import demo

    try:
        result = demo.run(args.model, args.heads, args.window, args.batch, args.repeats, args.seed)
    except (TypeError, ValueError) as error:  # what the user asked for is not accepted
        print(f"attnmask demo: {_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("attnmask demo: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a failure: one line, no traceback
        print(f"attnmask demo: error: {type(error).__name__}: {_line(error)}", file=sys.stderr)
        return 1
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return 0 if result["ok"] else 1


def _line(error: BaseException) -> str:
    """An error as one line (host libraries' messages may span several)."""
    return " ".join(str(error).split()) or type(error).__name__
