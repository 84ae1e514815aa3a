"""``attnmask COMMAND`` and ``python -m attnmask COMMAND``: see :mod:`attnmask.cli`."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from .cli import build_parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` and run the chosen command; returns the exit code."""
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
