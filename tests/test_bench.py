"""The benchmark suite's machinery on tiny shapes (timings themselves are not checked)."""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from attnmask import bench
from attnmask.bench.settings import Settings, grid_of, preset
from attnmask.bench.timing import device_slug, time_interleaved
from attnmask.kernels import KERNELS

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
THREADS_BEFORE = torch.get_num_threads()

TINY = Settings(
    tokens=(17,),
    attention_batch=1,
    num_heads=2,
    head_dim=8,
    window=3,
    backends=("sdpa", "sdpa-bool", "auto"),
    flex_variants=False,
    models=("vit_tiny_patch16_224",),
    sizes=(64,),
    modes=("inference", "train"),
    model_batch=1,
    warmup=1,
    repeats=1,
    threads=1,
)
"""Smallest settings that still mask something: a 4 x 4 grid, a 3 x 3 window (one thread:
on a shared machine two threads can be many times slower)."""


def load_plot():
    spec = importlib.util.spec_from_file_location("bench_plot", ROOT / "benchmarks" / "plot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_run():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_result():
    pytest.importorskip("timm")
    return bench.run(TINY, echo=lambda line: None)


def test_time_interleaved_medians_errors_and_budget():
    calls = []

    def slow():
        calls.append("slow")
        time.sleep(0.002)

    def fast():
        calls.append("fast")

    def broken():
        raise RuntimeError("no kernel for this\nsecond line")

    timings = time_interleaved({"slow": slow, "fast": fast, "broken": broken}, CPU, warmup=2, repeats=4)
    assert timings["broken"].error == "RuntimeError: no kernel for this" and timings["broken"].ms is None
    assert len(timings["slow"].samples_ms) == len(timings["fast"].samples_ms) == 4
    assert timings["slow"].ms >= 2.0 > timings["fast"].ms
    assert timings["slow"].first_call_ms is not None
    assert calls.count("slow") == 2 + 4 and calls[-8:].count("fast") == 4  # warm-up, then interleaved rounds
    assert calls[6:8] != calls[8:10]  # the order rotates between rounds
    capped = time_interleaved({"slow": slow}, CPU, warmup=1, repeats=50, max_seconds=0.0)
    assert len(capped["slow"].samples_ms) == 3  # the budget cuts rounds down to min_repeats
    one = time_interleaved({"slow": slow}, CPU, warmup=1, repeats=1, max_seconds=0.0)
    assert len(one["slow"].samples_ms) == 1  # ... but never above repeats


def test_settings_presets_and_validation():
    full = preset("full", "cpu")
    assert full.tokens == (197, 577, 1025, 2305, 4097) and full.skip_train_sizes == (1024,)
    assert full.batch_for_tokens(197) > full.batch_for_tokens(4097) >= 1
    assert preset("quick", "cuda").dtype == "bfloat16" and preset("quick", "cpu").dtype == "float32"
    assert preset("full", "cuda").batch_for_tokens(197) == 256
    assert preset("quick", "cpu", repeats=None, tokens=(50,)).tokens == (50,)  # None keeps the preset's value
    assert grid_of(1025) == 32
    with pytest.raises(ValueError, match="tokens=200"):
        preset("quick", "cpu", tokens=(200,))
    with pytest.raises(ValueError, match="passes entry 'backward'"):
        preset("quick", "cpu", passes=("backward",))
    assert device_slug(CPU).startswith("cpu")


def test_attention_rows(tiny_result):
    rows = tiny_result["attention"]
    assert len(rows) == 2 * 2 * 3  # heads masked x passes x backends
    assert {(r["heads_masked"], r["pass"]) for r in rows} == {
        (1, "forward"), (1, "forward+backward"), (2, "forward"), (2, "forward+backward")
    }
    for r in rows:
        assert r["tokens"] == 17 and r["grid"] == [4, 4] and r["batch"] == 1 and r["window"] == [3, 3]
        assert "error" not in r, r
        assert r["ms"] > 0 and r["baseline_ms"] > 0 and r["ratio"] == pytest.approx(r["baseline_ms"] / r["ms"])
        assert r["repeats"] == 1 == len(r["samples_ms"])


def test_model_rows(tiny_result):
    rows = tiny_result["models"]
    assert {(r["mode"], r["backend"]) for r in rows} == {(m, b) for m in ("inference", "train") for b in ("auto", "sdpa")}
    for r in rows:
        assert r["model"] == "vit_tiny_patch16_224" and r["image_size"] == 64 and r["grid"] == [4, 4]
        assert r["masked_heads"] == 12 and r["total_heads"] == 36  # vit_tiny: 3 heads, 0.5 -> 1 per layer
        assert r["images_per_s"] == pytest.approx(1e3 / r["ms"]) and r["ratio"] == pytest.approx(r["baseline_ms"] / r["ms"])


def test_threads_setting_is_for_the_run_only(tiny_result):
    assert tiny_result["env"]["threads"] == 1
    assert torch.get_num_threads() == THREADS_BEFORE


def test_results_are_json_with_env(tiny_result):
    data = json.loads(json.dumps(tiny_result))
    assert set(data) == {"env", "settings", "attention", "models"}
    env = data["env"]
    assert env["device"] and env["device_type"] == "cpu" and env["dtype"] == "float32"
    assert env["torch"] == torch.__version__ and env["threads"] >= 1 and env["date"]
    assert data["settings"]["tokens"] == [17] and "baseline_ms / ms" in data["settings"]["ratio"]
    assert "| 17 (1) | half (1/2) | forward |" in bench.tables(data)


def test_failing_backend_is_recorded_and_skips(monkeypatch):
    def broken(q, k, v, mask, **kwargs):
        raise NotImplementedError("not on this device")

    monkeypatch.setitem(KERNELS, "broken", broken)
    settings = Settings(
        tokens=(10,), attention_batch=1, num_heads=2, head_dim=4, window=3, heads_masked=("all",),
        passes=("forward",), backends=("sdpa", "broken"), flex_variants=False, models=("vit_tiny_patch16_224",),
        sizes=(64,), modes=("train",), skip_train_sizes=(64,), warmup=1, repeats=1, threads=1,
    )
    result = bench.run(settings, echo=lambda line: None)
    by_backend = {r["backend"]: r for r in result["attention"]}
    assert by_backend["broken"]["error"] == "NotImplementedError: not on this device"
    assert by_backend["sdpa"]["ms"] > 0
    assert result["models"] == [
        {"model": "vit_tiny_patch16_224", "image_size": 64, "mode": "train", "heads": 0.5, "heads_label": "half",
         "skipped": "training at 64 px skipped on cpu (too slow for the run's time budget)"}
    ]
    assert "broken on 10 tokens forward: NotImplementedError" in bench.tables(result)


def attnmask_cli(*args):
    return subprocess.run([sys.executable, "-m", "attnmask", "bench", *args], capture_output=True, text=True, timeout=300)


def test_cli_smallest_run(tmp_path):
    pytest.importorskip("timm")
    out = tmp_path / "bench.json"
    result = attnmask_cli(
        "--device", "cpu", "--tokens", "17", "--batch", "1", "--window", "3", "--heads-masked", "all",
        "--passes", "forward", "--backends", "sdpa,sdpa-bool", "--models", "vit_tiny_patch16_224", "--sizes", "64",
        "--modes", "inference", "--model-batch", "1", "--repeats", "1", "--warmup", "1", "--threads", "1",
        "--json", str(out),
    )
    assert result.returncode == 0, result.stderr
    assert "| 17 (1) | all (12/12) | forward |" in result.stdout and "`vit_tiny_patch16_224` | 64 | 12 | 1 | inference | half |" in result.stdout
    data = json.loads(out.read_text())
    assert data["settings"]["preset"] == "quick" and data["env"]["device_type"] == "cpu"
    assert all(r["repeats"] == 1 for r in data["attention"] + data["models"])
    assert [r["backend"] for r in data["attention"]] == ["sdpa-bool", "sdpa"]
    assert [r["backend"] for r in data["models"]] == ["sdpa"] and data["models"][0]["window"] == [3, 3]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--tokens", "200"], "tokens=200"),
        (["--tokens", "1x"], "--tokens '1x'"),
        (["--heads-masked", "most"], "heads_masked entry 'most'"),
        (["--quick", "--full"], "not allowed with argument"),
    ],
)
def test_cli_usage_errors_exit_2(args, fragment, capsys):
    from attnmask.__main__ import main

    try:
        code = main(["bench", *args])
    except SystemExit as exit:  # argparse's own usage errors
        code = exit.code
    assert code == 2
    assert fragment in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is missing")
def test_cli_cuda_missing_exits_1(capsys):
    from attnmask.__main__ import main

    assert main(["bench", "--device", "cuda", "--tokens", "17", "--only", "attention"]) == 1
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err


def test_plot_writes_figures_and_page(tiny_result, tmp_path):
    pytest.importorskip("matplotlib")
    results, docs = tmp_path / "results", tmp_path / "docs"
    results.mkdir()
    (results / "tiny-cpu.json").write_text(json.dumps(tiny_result))
    (results / "unrelated.json").write_text("{}")
    plot = load_plot()
    assert plot.main(["--results", str(results), "--docs", str(docs)]) == 0
    pngs = sorted(p.name for p in (docs / "performance").glob("*.png"))
    assert pngs == [
        "tiny-cpu-attention.png", "tiny-cpu-models.png", "tiny-cpu-tokens-forward-backward.png", "tiny-cpu-tokens-forward.png"
    ]
    assert all((docs / "performance" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in pngs)
    page = (docs / "performance.md").read_text()
    assert f"## {tiny_result['env']['device']} (float32, quick preset)" in page
    assert "](performance/tiny-cpu-attention.png)" in page and "](performance/tiny-cpu-models.png)" in page
    assert "](performance/tiny-cpu-tokens-forward.png)" in page and "](performance/tiny-cpu-tokens-forward-backward.png)" in page
    assert f"torch {torch.__version__}" in page and "| 17 (1) |" in page
    (results / "tiny-cpu.json").unlink()
    plot.main(["--results", str(results), "--docs", str(docs)])
    assert not list((docs / "performance").glob("*.png")), "figures of removed results are deleted"
    assert "No results of `benchmarks/run.py` are saved yet" in (docs / "performance.md").read_text()


def test_performance_page_is_current():
    plot = load_plot()
    assert (ROOT / "docs" / "performance.md").read_text() == plot.render(ROOT / "benchmarks" / "results"), (
        "docs/performance.md is stale: run `python benchmarks/plot.py`"
    )


def test_results_record_the_host_allocator(monkeypatch):
    """The blocked backend's CPU figures depend on how freed memory goes back to the system:
    a result says which allocator settings it ran with, and they must agree to merge."""
    from attnmask.bench.timing import ALLOCATOR_VARIABLES, environment

    for name in ALLOCATOR_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert environment(torch.device("cpu"), "float32")["allocator"] == "default"
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000")
    tuned = environment(torch.device("cpu"), "float32")
    assert tuned["allocator"] == "MALLOC_TRIM_THRESHOLD_=1000"
    run = load_run()
    assert run.mismatch({**tuned, "allocator": "default"}, tuned) == ["allocator 'default' != 'MALLOC_TRIM_THRESHOLD_=1000'"]


def test_merge_keeps_only_the_comparisons_a_run_did_not_redo():
    run = load_run()

    def att(tokens, backend, ms):
        return {"tokens": tokens, "heads_label": "all", "pass": "forward", "backend": backend, "ms": ms}

    def mod(size, heads, backend, ms):
        return {"model": "m", "image_size": size, "mode": "inference", "heads": heads, "backend": backend, "ms": ms}

    old = {"settings": {"preset": "full"}, "attention": [att(197, "sdpa", 1.0), att(1025, "sdpa", 2.0), att(1025, "blocked", 3.0)],
           "models": [mod(224, 0.5, "sdpa", 5.0), mod(224, 1.0, "sdpa", 6.0)]}
    new = {"settings": {"preset": "full"}, "attention": [att(1025, "blocked", 9.0)], "models": [mod(224, 1.0, "sdpa", 7.0)]}
    out = run.merged(old, new)
    assert [(r["tokens"], r["backend"], r["ms"]) for r in out["attention"]] == [(197, "sdpa", 1.0), (1025, "blocked", 9.0)]
    assert [(r["heads"], r["ms"]) for r in out["models"]] == [(0.5, 5.0), (1.0, 7.0)]
    only_models = run.merged(old, {"settings": {"preset": "full"}, "attention": [], "models": new["models"]})
    assert only_models["attention"] == old["attention"]


@pytest.mark.slow
def test_gpu_profile_script_runs_small_on_cpu(tmp_path):
    """The GPU profile of benchmarks/gpu_profile.py, at tiny sizes on the CPU (about 2
    minutes, most of it the Triton kernel in Triton's interpreter):
    every section finishes and every timing case gives each candidate a time or a reason.
    Run with `pytest -m slow tests/test_bench.py -k gpu_profile`."""
    out = tmp_path / "profile.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_profile.py"), "--small", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["finished"] and set(data["sections"]) == {"one_call", "flex_profile", "timing_forward", "timing_forward_backward"}
    assert all(section["status"] == "done" for section in data["sections"].values())
    for name in ("timing_forward", "timing_forward_backward"):
        cases = data["sections"][name]["cases"]
        assert {case["candidate"] for case in cases} >= {"dense", "sdpa", "blocked-2x2", "auto"}
        assert all(case.get("ms") or case.get("error") for case in cases)
