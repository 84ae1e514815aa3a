"""Command line: ``attnmask demo`` (also ``python -m attnmask demo``).

Exit codes: 0 success, 1 failure (a check failed), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional, Sequence


def parse_heads(text: str) -> Any:
    """``"3"`` -> 3, ``"0.5"`` -> 0.5, ``"all"``/``"none"``, ``"0,2,5"`` -> [0, 2, 5]."""
    if text in ("all", "none"):
        return text
    try:
        if "," in text:
            return [int(part) for part in text.split(",") if part.strip()]
        return float(text) if "." in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--heads {text!r} is not accepted: expected a count (3), a fraction (0.5), 'all', 'none' "
            "or comma-separated head indices (0,2,5)"
        ) from None


def parse_window(text: str) -> Any:
    """``"7"`` -> 7, ``"3x5"`` or ``"3,5"`` -> (3, 5)."""
    parts = text.replace("x", ",").split(",")
    try:
        sizes = [int(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--window {text!r} is not accepted: expected an odd int (7) or two odd ints (3x5)"
        ) from None
    if len(sizes) not in (1, 2):
        raise argparse.ArgumentTypeError(f"--window {text!r} is not accepted: expected one or two sizes")
    return sizes[0] if len(sizes) == 1 else tuple(sizes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnmask",
        description="Locality-masked attention heads (MaiT) for existing vision transformers.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    demo = commands.add_parser(
        "demo",
        help="patch a small timm ViT (random weights, no download), check and time it",
        description=(
            "Build a timm ViT from its config (random weights, nothing downloaded), mask some heads "
            "with attnmask.apply, print the describe() table, check locality on a random image, "
            "compare outputs with the unpatched model and time both forward passes side by side."
        ),
    )
    demo.add_argument("--model", default="vit_small_patch16_224", help="timm model name (default: %(default)s)")
    demo.add_argument("--heads", type=parse_heads, default=0.5, help="heads to mask per layer: 3, 0.5, all, 0,2 (default: 0.5)")
    demo.add_argument("--window", type=parse_window, default=7, help="window: 7 or 3x5 (default: 7)")
    demo.add_argument("--batch", type=int, default=8, help="batch size (default: %(default)s)")
    demo.add_argument("--repeats", type=int, default=10, help="timed forward passes per model (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    demo.add_argument("--json", metavar="PATH", help="also write the measurements as JSON to PATH")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from . import demo

        try:
            result = demo.run(args.model, args.heads, args.window, args.batch, args.repeats, args.seed)
        except (TypeError, ValueError) as error:
            print(f"attnmask demo: {error}", file=sys.stderr)
            return 2
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(result, handle, indent=2)
        return 0 if result["ok"] else 1
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
