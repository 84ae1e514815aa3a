"""The ``attnmask`` command line: one module per command.

Each command module defines ``add_parser(commands)``, which adds its sub-parser to the
``argparse`` sub-parsers object and sets ``handler=run`` on it, and ``run(args) -> int``,
which returns the exit code. Parsers import nothing heavy (no torch, no host library), so
``attnmask --help`` is instant; ``run`` imports what it needs.

Exit codes, for every command: 0 success, 1 failure (with a one-line reason on stderr),
2 usage error.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

COMMANDS = ("demo", "bench", "convert", "inspect")
"""Command modules under :mod:`attnmask.cli`, in the order ``--help`` lists them."""


def parse_heads(text: str) -> Any:
    """``"3"`` -> 3, ``"0.5"`` -> 0.5, ``"all"``/``"none"``, a schedule preset (``"mait"``, see
    :data:`attnmask.schedules.PRESETS`), ``"0,2,5"`` -> [0, 2, 5]."""
    from ..schedules import PRESETS

    if text in ("all", "none") or text in PRESETS:
        return text
    try:
        if "," in text:
            return [int(part) for part in text.split(",") if part.strip()]
        return float(text) if "." in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--heads {text!r} is not accepted: expected a count (3), a fraction (0.5), 'all', 'none', "
            f"a schedule ({', '.join(PRESETS)}) or comma-separated head indices (0,2,5)"
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
    """The ``attnmask`` parser with every command of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="attnmask",
        description="Locality-masked attention heads (MaiT) for existing vision transformers.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(commands)
    return parser
