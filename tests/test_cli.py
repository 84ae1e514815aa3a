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


@pytest.mark.parametrize(
    "model, fragment",
    [
        ("no_such_model_224", "--model 'no_such_model_224' is not accepted: timm has no model of that name"),
        ("resnet18", "no attention layers found"),
    ],
)
def test_demo_model_errors_are_one_line_with_status_2(model, fragment):
    result = attnmask_cli("demo", "--model", model, "--batch", "1", "--repeats", "1")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnmask demo: ") and fragment in lines[0], result.stderr
    assert len(lines[0]) < 400


def test_demo_on_swin_checks_inside_an_attention_window(tmp_path):
    out = tmp_path / "demo.json"
    result = attnmask_cli("demo", "--model", "swin_tiny_patch4_window7_224", "--batch", "1", "--repeats", "1", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "demo checks: passed" in result.stdout
    locality = json.loads(out.read_text())["locality"]
    assert locality["applies"] and locality["grid"] == [7, 7] and locality["prefix_tokens"] == 0
    assert locality["masked_heads_change_outside"] == 0.0 and locality["masked_heads_change_inside"] > 0


def test_demo_window_covering_the_grid_says_the_check_does_not_apply(tmp_path):
    out = tmp_path / "demo.json"
    result = attnmask_cli(
        "demo", "--model", "vit_tiny_patch16_224", "--window", "27", "--batch", "1", "--repeats", "1", "--json", str(out)
    )
    assert result.returncode == 0, result.stderr
    assert "outside-window check does not apply" in result.stdout and "(-1" not in result.stdout
    assert "window covers grid: no masking" in result.stdout
    assert "window 27x27 covers the whole 14x14 grid" in result.stderr and "Traceback" not in result.stderr
    locality = json.loads(out.read_text())["locality"]
    assert not locality["applies"] and "outside_patch" not in locality


@pytest.mark.parametrize(
    "grid, window, query, outside",
    [
        ((14, 14), (7, 7), (7, 7), (11, 7)),  # centre query
        ((14, 14), (15, 15), (0, 0), (8, 0)),  # spans the grid from the centre: a corner query
        ((14, 14), (27, 27), (0, 0), None),  # covers the grid from every query
        ((7, 7), (7, 7), (0, 0), (4, 0)),  # Swin's attention window
        ((1, 9), (3, 3), (0, 4), (0, 6)),  # one row
    ],
)
def test_locality_query_has_a_patch_outside_its_window_when_one_exists(grid, window, query, outside):
    from attnmask.demo import choose_patches

    chosen, far, inside = choose_patches(grid, window)
    assert (chosen, far) == (query, outside)
    assert all(0 <= inside[i] < grid[i] and abs(inside[i] - chosen[i]) <= window[i] // 2 for i in (0, 1))
    if far is not None:
        assert all(0 <= far[i] < grid[i] for i in (0, 1))
        assert any(abs(far[i] - chosen[i]) > window[i] // 2 for i in (0, 1))


def test_cli_silences_host_chatter_but_not_other_warnings():
    code = (
        "import logging, warnings, sys; logging.basicConfig(); from attnmask.cli import quiet_host; quiet_host(); "
        "logging.getLogger('torch.utils.cpp_extension').warning(\"No CUDA runtime is found, using CUDA_HOME='/usr/local'\"); "
        "logging.getLogger('torch.utils.cpp_extension').warning('something else'); "
        "warnings.warn('CUDA initialization: Found no NVIDIA driver on your system.'); warnings.warn('a real warning'); "
        "import os; print(os.environ.get('HF_HUB_DISABLE_PROGRESS_BARS'))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "No CUDA runtime" not in result.stderr and "CUDA initialization" not in result.stderr
    assert "something else" in result.stderr and "UserWarning: a real warning" in result.stderr
    assert result.stdout.strip() == "1"
