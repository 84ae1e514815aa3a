"""The command line, through subprocess as a user runs it."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("timm")


def attnmask_cli(*args):
    return subprocess.run([sys.executable, "-m", "attnmask", *args], capture_output=True, text=True, timeout=300)


def test_demo_runs_and_checks_itself(tmp_path):
    out = tmp_path / "demo.json"
    result = attnmask_cli("demo", "--model", "vit_tiny_patch16_224", "--batch", "2", "--repeats", "2", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "demo checks: passed" in result.stdout and "blocks.11.attn" in result.stdout
    data = json.loads(out.read_text())
    assert data["ok"] and data["remove_bit_identical"]
    assert data["locality"]["masked_heads_change_outside"] == 0.0
    assert data["locality"]["masked_heads_change_inside"] > 0 and data["locality"]["global_heads_change_outside"] > 0
    assert data["max_abs_difference"] > 0 and data["time_ratio"] > 0
    assert data["spec"]["heads"] == [[0]] * 12  # vit_tiny has 3 heads: 0.5 -> 1


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["demo", "--window", "4"], "window=4"),
        (["demo", "--window", "big"], "--window 'big'"),
        (["demo", "--heads", "half"], "--heads 'half'"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
    ],
)
def test_usage_errors_exit_2(args, fragment):
    result = attnmask_cli(*args)
    assert result.returncode == 2
    assert fragment in result.stderr


def test_help():
    result = attnmask_cli("demo", "--help")
    assert result.returncode == 0 and "random weights" in result.stdout
