"""The examples run end to end: ``examples/replicate_small.py --quick`` in a subprocess."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "replicate_small.py"

pytest.importorskip("sklearn", reason="the replication example needs scikit-learn (the dev/examples extra)")
pytest.importorskip("matplotlib", reason="the replication example draws figures (the plot extra)")


def test_replicate_small_quick(tmp_path):
    out = tmp_path / "results.json"
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--figures", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["quick"] is True
    assert results["conditions"] == ["unmasked", "mait", "random"]
    depth, heads = results["config"]["depth"], results["config"]["num_heads"]
    for condition in results["conditions"]:
        (run,) = results["runs"][condition]
        assert 0.0 <= run["test_accuracy"] <= 1.0
        assert len(run["test_accuracy_per_epoch"]) == results["config"]["epochs"]
        assert results["summary"][condition]["mean"] == run["test_accuracy"]
    # the random control masks exactly the heads the paper's schedule masks
    assert results["masked_heads"]["random"]["heads"] == results["masked_heads"]["mait"]["heads"]
    assert results["masked_heads"]["mait"]["heads"][0] == list(range(heads))
    assert results["masked_heads"]["mait"]["heads"][-1] == []
    locality = results["locality"]
    for key in ("unmasked_trained_mean", "unmasked_init_mean", "mait_trained_mean", "random_trained_mean"):
        table = locality[key]
        assert len(table) == depth and all(len(row) == heads for row in table)
        assert all(0.0 <= value <= 1.0 for row in table for value in row)
    # 8 x 8 grid, 3 x 3 window, a class token: uniform attention scores mean |W(n)| / 65
    assert locality["uniform"]["all_tokens"] == pytest.approx(484 / 64 / 65)
    # masked heads of the MaiT model are local (what is left goes to the class token) ...
    assert min(locality["mait_trained_mean"][0]) > 0.5
    # ... the random control's are not
    assert max(locality["random_trained_mean"][0]) < 0.5
    # the paper's probe: head 0 of every layer soft-masked
    probe = results["probe"]
    assert probe["masked_heads"] == [[0]] * depth
    assert len(probe["masked_head_per_layer"]) == depth
    assert results["machine"]["cpu"] and results["machine"]["cores"]
    assert results["versions"]["torch"] and results["versions"]["timm"]
    for name in ("replicate_accuracy.png", "replicate_als.png"):
        assert (tmp_path / name).stat().st_size > 0
