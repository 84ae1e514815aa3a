"""Write a folder all at once: into a staging folder next to it, then rename.

A failure while writing leaves nothing behind (the staging folder is deleted), and an
existing folder is replaced only when the new one is complete.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator

PARTIAL = ".attnmask-partial-"


def check_target(out: Path, overwrite: bool) -> None:
    """Raise unless ``out`` may be written.

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is false, or ``out`` is a file, or
            it is a non-empty folder without ``config.json`` (not a model folder: attnmask does
            not delete it even with ``overwrite``).
    """
    if not os.path.lexists(out):
        return
    if not out.is_dir() or out.is_symlink():
        raise FileExistsError(f"output {str(out)!r} exists and is not a folder: choose another output path")
    if not overwrite:
        raise FileExistsError(f"output folder {str(out)!r} already exists: pass overwrite=True (--overwrite) to replace it")
    if any(out.iterdir()) and not (out / "config.json").is_file():
        raise FileExistsError(
            f"output folder {str(out)!r} exists and is not a model folder (no config.json): attnmask does not "
            "replace it even with overwrite; choose another output path"
        )


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder next to ``out``; on success it becomes ``out``.

    Args:
        out: The folder to write.
        overwrite: Replace ``out`` if it exists (a model folder or an empty folder).

    Raises:
        FileExistsError: See :func:`check_target` (checked before anything is written).
    """
    out = Path(out)
    check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}{PARTIAL}{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        yield staging
        _replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out``; an existing ``out`` is moved aside first and deleted last."""
    old = None
    if os.path.lexists(out):
        old = out.parent / f".{out.name}.attnmask-old-{secrets.token_hex(4)}"
        os.rename(out, old)
    try:
        os.rename(staging, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
