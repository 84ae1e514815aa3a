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
import logging
import os
import sys
import warnings
from typing import Any

COMMANDS = ("demo", "bench", "convert", "inspect")
"""Command modules under :mod:`attnmask.cli`, in the order ``--help`` lists them."""


def quiet_host() -> None:
    """Keep host libraries' chatter out of command output: Hugging Face progress bars (Hub
    downloads, transformers' "Loading weights") and torch's notices that this machine has no
    CUDA runtime or driver (a CPU machine is a normal place to run attnmask). Errors, and
    every other warning (attnmask's included), still show. Commands call it first."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when huggingface_hub is imported
    for name in ("huggingface_hub", "transformers"):
        if name in sys.modules:  # imported already: switch the bars off directly
            _disable_bars(name)
    warnings.filterwarnings("ignore", message=r"CUDA initialization", category=UserWarning)
    logging.getLogger("torch.utils.cpp_extension").addFilter(_NO_CUDA_RUNTIME)  # added once, however often called
    warnings.showwarning = _one_line_warning


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line on stderr (``UserWarning: ...``), without the source line of the
    library code that raised them."""
    print(f"{category.__name__}: {' '.join(str(message).split())}", file=file or sys.stderr)


class _NoCudaRuntime(logging.Filter):
    """Drops torch's "No CUDA runtime is found, using CUDA_HOME=..." notice, nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


_NO_CUDA_RUNTIME = _NoCudaRuntime()


def _disable_bars(name: str) -> None:
    try:
        if name == "huggingface_hub":
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        else:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
    except (ImportError, AttributeError):  # pragma: no cover - older host versions
        pass


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
