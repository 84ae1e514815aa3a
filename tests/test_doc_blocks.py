"""Docs that cannot rot: every code block in README.md and docs/ runs here.

Each page is one test (its id is the page's path). Its ```python blocks run in order in one
namespace, like a notebook, in a fresh temporary working directory, with the Hugging Face Hub
offline and outbound network connections refused, so a block that would download fails here
instead of in a reader's hands. ```bash blocks are not executed: their ``attnmask ...`` and
``python -m attnmask ...`` commands are parsed by attnmask's own argparse parser, and the
repository files they name (scripts, tests, folders) and the flags they give those scripts
must exist. A block that truly cannot run offline carries ``<!-- not-run: reason -->`` on the
line before its fence; ``test_not_run_markers`` lists them and keeps them few.

Also here: every page under docs/ is in mkdocs.yml's nav (or excluded on purpose).
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import socket
import textwrap
import traceback
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

PYTHON_LANGS = {"python", "py", "python3"}
SHELL_LANGS = {"bash", "sh", "shell", "console"}
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(?P<reason>.*?)\s*-->")
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
MAX_NOT_RUN = 3
"""At most this many blocks may be skipped with a not-run marker."""

NAV_EXCLUDED: dict[str, str] = {}
"""Pages under docs/ deliberately left out of mkdocs.yml's nav, with the reason."""


@dataclass(frozen=True)
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    lang: str
    source: str
    not_run: Optional[str]  # the reason, when the block carries a not-run marker

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> list[Path]:
    """README.md and every Markdown page under docs/, in a stable order."""
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def page_id(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of one Markdown page (indented fences inside lists included)."""
    lines = path.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, lang = match["indent"], match["fence"], match["lang"].lower()
        start, body = i, []
        i += 1
        while i < len(lines) and not re.match(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[i]):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        if i >= len(lines):
            raise AssertionError(f"{page_id(path)}:{start + 1}: code fence never closed")
        i += 1
        previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = NOT_RUN.search(previous)
        found.append(Block(page_id(path), start + 1, lang, textwrap.dedent("\n".join(body)) + "\n",
                           marker["reason"] if marker else None))
    return found


def pages_with_code() -> list[Path]:
    """Pages with at least one python or shell block (generated pages without code drop out)."""
    return [p for p in pages() if any(b.lang in PYTHON_LANGS | SHELL_LANGS for b in blocks(p))]


# ---------------------------------------------------------------------------------------------
# Running a page


class NetworkRefused(RuntimeError):
    pass


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A fresh working directory, the Hub offline, and no outbound network connection.

    huggingface_hub reads ``HF_HUB_OFFLINE`` when it is imported, so its constant is patched
    too (for this test only: setting the variable for the whole session would change what
    other tests see)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise NetworkRefused(f"doc blocks must not use the network (tried to connect to {address!r})")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    torch.manual_seed(0)
    yield tmp_path


def run_python(block: Block, namespace: dict) -> None:
    """Run one block; tracebacks and the failure message give the page's own line numbers."""
    code = compile("\n" * block.line + block.source, block.page, "exec")
    try:
        exec(code, namespace)
        return
    except Exception:
        error = traceback.format_exc(limit=-6)
    numbered = "\n".join(f"{n:4d} | {line}" for n, line in enumerate(block.source.splitlines(), block.line + 1))
    pytest.fail(f"python block at {block.where} failed\n--- block ---\n{numbered}\n--- error ---\n{error}", pytrace=False)


@pytest.mark.parametrize("path", pages_with_code(), ids=page_id)
def test_page(path: Path, sandbox) -> None:
    """The page's python blocks run in order in one namespace; its shell blocks check out."""
    namespace: dict = {"__name__": f"doc_{path.stem.replace('-', '_')}"}
    for block in blocks(path):
        if block.not_run is not None:
            continue
        if block.lang in PYTHON_LANGS:
            run_python(block, namespace)
        elif block.lang in SHELL_LANGS:
            problems = check_shell(block.source)
            assert not problems, f"shell block at {block.where}:\n" + "\n".join(problems) + f"\n--- block ---\n{block.source}"


# ---------------------------------------------------------------------------------------------
# Shell blocks

REPO_DIRS = ("attnmask/", "tests/", "docs/", "benchmarks/", "examples/")


def commands(source: str) -> list[list[str]]:
    """The simple commands of a shell block: continuation lines joined, comments dropped,
    split at ``&&``, ``||``, ``;`` and ``|``."""
    text = source.replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        tokens = shlex.split(line, comments=True)
        current: list[str] = []
        for token in tokens:
            if token in ("&&", "||", ";", "|"):
                found.append(current)
                current = []
            else:
                current.append(token)
        found.append(current)
    return [c for c in found if c]


def check_shell(source: str) -> list[str]:
    problems = []
    for argv in commands(source):
        while argv and re.match(r"^\w+=", argv[0]):  # VAR=value command ...
            argv = argv[1:]
        if not argv:
            continue
        shown = " ".join(argv)
        if argv[0] == "attnmask":
            problems += [f"`{shown}`: {p}" for p in check_attnmask_cli(argv[1:])]
        elif argv[:3] == ["python", "-m", "attnmask"]:
            problems += [f"`{shown}`: {p}" for p in check_attnmask_cli(argv[3:])]
        else:  # python/bash/torchrun SCRIPT ..., pytest PATHS, anything naming repository files
            for token in argv[1:]:
                if token.startswith(REPO_DIRS) and not (ROOT / token.split("::")[0]).exists():
                    problems.append(f"`{shown}`: {token} does not exist in the repository")
            # the first repository script named: the options after it must be its own
            at = next((i for i, t in enumerate(argv) if t.endswith(".py") and (ROOT / t).is_file()), None)
            if at is not None and argv[0] != "pytest" and argv[1:3] != ["-m", "pytest"]:
                flags = script_flags(ROOT / argv[at])
                problems += [f"`{shown}`: {argv[at]} has no option {flag}" for flag in
                             (a.split("=")[0] for a in argv[at + 1:] if a.startswith("--")) if flag not in flags]
    return problems


def check_attnmask_cli(args: list[str]) -> list[str]:
    """Parse ``attnmask ARGS`` with attnmask's own parser (nothing runs)."""
    import contextlib
    import io

    from attnmask.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(args)
    except SystemExit as exit:
        if exit.code not in (0, None):
            return [f"attnmask's parser refuses it: {err.getvalue().strip()}"]
    return []


@lru_cache(maxsize=None)
def script_flags(script: Path) -> frozenset[str]:
    """Every ``"--flag"`` string literal in ``script`` and the repository modules it imports
    (transitively): the options its argparse parser can know, without running it."""
    flags: set[str] = set()
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("--"):
                flags.add(node.value)
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                base = ROOT / Path(*name.split("."))
                todo += [base.with_suffix(".py"), base / "__init__.py", script.parent / f"{name}.py"]
    return frozenset(flags)


def test_sandbox_refuses_network(sandbox) -> None:
    """A doc block cannot open an outbound connection (the guard fails before connecting)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock, pytest.raises(NetworkRefused):
        sock.connect(("127.0.0.1", 9))
    assert os.environ["HF_HUB_OFFLINE"] == "1" and Path.cwd() == sandbox


def test_shell_checker_catches_mistakes() -> None:
    """The shell checks are not vacuous."""
    assert check_shell("attnmask convert ./a ./b --heads 3 --window 7\n") == []
    assert check_shell("attnmask convert ./a ./b --heads 3 --windw 7\n")
    assert check_shell("python -m attnmask demo --heads 3 --window x\n")
    assert check_shell("python benchmarks/nope.py\n")
    assert check_shell("python benchmarks/run.py --only attention --no-such-flag\n")
    assert check_shell("torchrun --nproc_per_node=2 examples/replicate_small.py --no-such-flag\n")
    assert check_shell("torchrun --nproc_per_node=2 examples/replicate_small.py --quick\n") == []
    assert check_shell("python -m pytest tests/test_nope.py\n")
    assert check_shell("python -m pytest tests/test_doc_blocks.py  # ok\n") == []


# ---------------------------------------------------------------------------------------------
# Markers and navigation


def test_not_run_markers() -> None:
    """Blocks skipped with ``<!-- not-run: reason -->`` are few, and each says why."""
    skipped = [b for p in pages() for b in blocks(p) if b.not_run is not None]
    listing = "\n".join(f"{b.where}: {b.not_run}" for b in skipped)
    print(f"{len(skipped)} block(s) not run" + (f":\n{listing}" if skipped else ""))
    assert all(b.not_run.strip() for b in skipped), f"not-run markers without a reason:\n{listing}"
    assert len(skipped) <= MAX_NOT_RUN, f"too many blocks are not run ({len(skipped)} > {MAX_NOT_RUN}):\n{listing}"


def test_parser_finds_blocks() -> None:
    """The fence parser sees indented blocks, languages and markers."""
    page = ROOT / "README.md"
    assert any(b.lang == "python" for b in blocks(page))
    assert any(b.lang == "bash" for b in blocks(page))


def nav_pages() -> list[str]:
    import yaml

    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)

    def walk(node) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, list):
            return [p for item in node for p in walk(item)]
        if isinstance(node, dict):
            return [p for value in node.values() for p in walk(value)]
        return []

    return walk(config["nav"])


def test_every_docs_page_is_in_the_nav() -> None:
    nav = nav_pages()
    on_disk = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    missing = sorted(on_disk - set(nav) - set(NAV_EXCLUDED))
    assert not missing, f"pages under docs/ missing from mkdocs.yml's nav: {missing} (add them, or to NAV_EXCLUDED with a reason)"
    dangling = sorted(p for p in nav if not p.startswith("http") and p not in on_disk)
    assert not dangling, f"mkdocs.yml's nav names pages that do not exist: {dangling}"
