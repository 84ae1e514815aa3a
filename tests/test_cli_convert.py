"""``attnmask convert`` and ``attnmask inspect``: through subprocess as a user runs them, and
in-process (``attnmask.__main__.main``, the same code) for the matrix of bad inputs. Offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

import attnmask  # noqa: E402
from attnmask.__main__ import main  # noqa: E402
from hub_cases import BY_ID, cache_repo, forward, images  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def attnmask_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "attnmask", *map(str, args)], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Unmasked source folders: a transformers ViT (with its image processor), a timm ViT in timm's
    Hub layout, an unsupported transformers ResNet, and a folder saved by attnmask."""
    root = tmp_path_factory.mktemp("sources")
    hf = BY_ID["hf-vit"].build()
    hf.save_pretrained(str(root / "hf-vit"))
    transformers.ViTImageProcessor(size={"height": 40, "width": 40}).save_pretrained(str(root / "hf-vit"))
    case = BY_ID["timm-vit"]
    from timm.models._hub import save_for_hf

    save_for_hf(case.build(), root / "timm-vit", model_args=case.model_args, safe_serialization=True)
    resnet = transformers.ResNetModel(transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1]))
    resnet.save_pretrained(str(root / "resnet"))
    attnmask.save_pretrained(attnmask.apply(BY_ID["hf-swin"].build(), heads=1, window=3), root / "saved-swin")
    return {p.name: p for p in root.iterdir()}


def assert_nothing_written(parent: Path, out: Path) -> None:
    assert not out.exists(), f"{out} was written"
    assert [p.name for p in parent.iterdir() if p.name.startswith(".")] == [], "a partial folder was left behind"


def one_line_error(stderr: str, command: str = "convert") -> str:
    lines = [line for line in stderr.splitlines() if line.startswith(f"attnmask {command}:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


# -- through subprocess ------------------------------------------------------------------------------------


def test_convert_hf_folder_then_inspect(sources, tmp_path):
    out = tmp_path / "vit-local"
    result = attnmask_cli("convert", sources["hf-vit"], out, "--heads", "2", "--window", "3", "--prefix", "isolated")
    assert result.returncode == 0, result.stderr
    for step in ("Reading", "Checking transformers vit", "Loading weights from", "Writing"):
        assert step in result.stderr
    assert "it/s]" not in result.stderr and "No CUDA runtime" not in result.stderr  # no host progress bars or notices
    card = (out / "README.md").read_text()
    assert str(tmp_path) not in card and str(sources["hf-vit"].parent) not in card  # folder names only
    assert 'attnmask.from_pretrained("vit-local")' in card
    assert "vit.layers.1.attention" in result.stdout and "4/8 heads masked" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
    saved = json.loads((out / "config.json").read_text())["attnmask"]
    assert (saved["heads"], saved["window"], saved["prefix"], saved["mode"]) == ([[0, 1], [0, 1]], [3, 3], "isolated", "hard")
    assert saved["base_model"] == sources["hf-vit"].name  # the source folder by name, not its absolute path

    model = attnmask.apply(BY_ID["hf-vit"].build(), heads=2, window=3, prefix="isolated")
    x = images(BY_ID["hf-vit"])
    loaded = transformers.AutoModelForImageClassification.from_pretrained(str(out))
    for name, tensor in forward(model, x).items():
        torch.testing.assert_close(forward(loaded, x)[name], tensor, rtol=0, atol=1e-6)

    result = attnmask_cli("inspect", out)
    assert result.returncode == 0, result.stderr
    for fragment in ("supported:     yes, family hf.vit", "prefix tokens: 1", "grid:          5 x 5", "saved masks:   yes"):
        assert fragment in result.stdout
    assert "layers 0-1: heads 0, 1 of 4 local" in result.stdout and "prefix: isolated" in result.stdout


def test_convert_timm_folder(sources, tmp_path, capsys):
    out = tmp_path / "timm-local"
    assert main(["convert", str(sources["timm-vit"]), str(out), "--heads", "0,3", "--window", "3x5"]) == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["model_args"]["embed_dim"] == 32
    assert config["attnmask"]["heads"] == [[0, 3], [0, 3]] and config["attnmask"]["window"] == [3, 5]
    case = BY_ID["timm-vit"]
    model = attnmask.apply(case.build(), heads=[0, 3], window=(3, 5))
    loaded = attnmask.from_pretrained(out).eval()
    x = images(case)
    for name, tensor in forward(model, x).items():
        torch.testing.assert_close(forward(loaded, x)[name], tensor, rtol=0, atol=1e-6)


def test_failure_is_one_line_with_status_1(tmp_path):
    result = attnmask_cli("convert", tmp_path / "no-such-folder", tmp_path / "out", "--heads", "1", "--window", "3")
    assert result.returncode == 1
    assert "no such folder" in one_line_error(result.stderr)
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_usage_error_status_2(sources, tmp_path):
    result = attnmask_cli("convert", sources["hf-vit"], tmp_path / "out", "--heads", "1", "--window", "3", "--mode", "fuzzy")
    assert result.returncode == 2 and "--mode: invalid choice: 'fuzzy'" in result.stderr
    assert "'hard'" in result.stderr and "'soft'" in result.stderr


def test_help_reads_like_the_docs():
    result = attnmask_cli("convert", "--help")
    assert result.returncode == 0
    for fragment in ("model.safetensors", "never unpickles", "--push-to-hub REPO", "--overwrite", "exit status", "examples:"):
        assert fragment in result.stdout


def test_inspect_help(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["inspect", "--help"])
    text = capsys.readouterr().out
    assert exit.value.code == 0 and "prefix tokens" in text and "--json" in text and "exit status" in text


# -- in-process: bad input ---------------------------------------------------------------------------------


def convert(capsys, *args) -> tuple[int, str, str]:
    code = main(["convert", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def corrupted(sources: dict[str, Path], tmp_path: Path, field: str, value) -> Path:
    folder = Path(shutil.copytree(sources["saved-swin"], tmp_path / "src"))
    config = json.loads((folder / "config.json").read_text())
    config["attnmask"][field] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("window", 4, "window=4 is not accepted"),
        ("heads", [[0, 5], [0], [0], [0]], "head index 5 is outside 0..1"),
        ("prefix", "everywhere", "prefix='everywhere' is not accepted"),
        ("mode", "fuzzy", "mode='fuzzy' is not accepted"),
    ],
)
def test_corrupted_config_status_1(sources, tmp_path, capsys, field, value, fragment):
    source = corrupted(sources, tmp_path, field, value)
    out = tmp_path / "out"
    code, _, err = convert(capsys, source, out)
    assert code == 1
    line = one_line_error(err)
    assert fragment in line and "'attnmask' key" in line and "config.json" in line
    assert_nothing_written(tmp_path, out)


def test_missing_weights_status_1(sources, tmp_path, capsys):
    source = Path(shutil.copytree(sources["timm-vit"], tmp_path / "src"))
    (source / "model.safetensors").unlink()
    code, _, err = convert(capsys, source, tmp_path / "out", "--heads", "1", "--window", "3")
    assert code == 1 and "missing weights file" in one_line_error(err)
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_unsupported_architecture_status_1(sources, tmp_path, capsys):
    code, _, err = convert(capsys, sources["resnet"], tmp_path / "out", "--heads", "1", "--window", "3")
    line = one_line_error(err)
    assert code == 1 and "cannot mask" in line and "ResNet" in line and "no module computes attention" in line
    assert_nothing_written(tmp_path, tmp_path / "out")
    assert main(["inspect", str(sources["resnet"])]) == 1
    captured = capsys.readouterr()
    assert "supported:     no" in captured.out and "not supported" in one_line_error(captured.err, "inspect")
    reason = one_line_error(captured.err, "inspect")
    assert (captured.out + captured.err).count("no attention layers found") == 1  # the reason once, not twice
    assert len(reason) < 400 and "attnmask.supported()" in reason and "docs/supported-models.md" in reason


def test_inspect_pickle_only_folder_says_it_cannot_be_converted(sources, tmp_path, capsys):
    source = Path(shutil.copytree(sources["timm-vit"], tmp_path / "src"))
    (source / "model.safetensors").unlink()
    (source / "pytorch_model.bin").write_bytes(b"not unpickled")  # loading it would fail: inspect must not
    assert main(["inspect", str(source)]) == 0
    text = capsys.readouterr().out
    assert "supported:     yes" in text
    line = next(line for line in text.splitlines() if line.startswith("convert:"))
    assert "not possible" in line and "pytorch_model.bin" in line and "never unpickles" in line
    assert "timm.models.save_for_hf(" in line and "safe_serialization=True" in line
    assert main(["inspect", str(source), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["convertible"] is False and "safe_serialization=True" in info["convert_advice"]
    assert main(["inspect", str(sources["timm-vit"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["convertible"] is True


def test_convert_a_hub_repo_from_the_cache(sources, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache_repo(tmp_path / "cache", "someone/tiny-vit", sources["hf-vit"])
    out = tmp_path / "out"
    code, _, err = convert(capsys, "hf-hub:someone/tiny-vit", out, "--heads", "all", "--window", "3")
    assert code == 0, err
    assert "Downloading weights" in err and (out / "preprocessor_config.json").is_file()
    assert json.loads((out / "config.json").read_text())["attnmask"]["base_model"] == "someone/tiny-vit"
    assert "base_model: someone/tiny-vit" in (out / "README.md").read_text()


def test_offline_unknown_repo_status_1(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code, _, err = convert(capsys, "nobody/no-such-vit", tmp_path / "out", "--heads", "1", "--window", "3")
    line = one_line_error(err)
    assert code == 1 and "cannot reach the Hugging Face Hub" in line and "HF_HUB_OFFLINE" in line and "local folder" in line
    assert_nothing_written(tmp_path, tmp_path / "out")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--heads", "9", "--window", "3"], "--heads 9 is not accepted for layer 0, which has 4 heads"),
        (["--heads", "1", "--window", "4"], "--window 4 is not accepted"),
        (["--window", "3"], "--heads is required"),
        ([], "--heads and --window are required"),
        (["--heads", "1", "--window", "3", "--push-to-hub", "not a repo"], "--push-to-hub 'not a repo' is not accepted"),
    ],
)
def test_bad_arguments_status_2(sources, tmp_path, capsys, args, fragment):
    code, _, err = convert(capsys, sources["hf-vit"], tmp_path / "out", *args)
    assert code == 2 and fragment in one_line_error(err)
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_output_exists_status_2_unless_overwrite(sources, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    code, _, err = convert(capsys, sources["hf-vit"], out, "--heads", "1", "--window", "3")
    assert code == 2 and "already exists: pass --overwrite" in one_line_error(err)
    assert (out / "config.json").read_text() == "{}"
    code, _, err = convert(capsys, sources["hf-vit"], out, "--heads", "1", "--window", "3", "--overwrite")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["attnmask"]["heads"] == [[0], [0]]
    code, _, err = convert(capsys, sources["hf-vit"], sources["hf-vit"], "--heads", "1", "--window", "3", "--overwrite")
    assert code == 2 and "is or contains SOURCE" in one_line_error(err)


def test_saved_masks_are_kept_or_replaced(sources, tmp_path, capsys):
    code, _, err = convert(capsys, sources["saved-swin"], tmp_path / "same")
    assert code == 0, err
    same = json.loads((tmp_path / "same" / "config.json").read_text())["attnmask"]
    assert same["heads"] == [[0], [0], [0], [0]] and same["window"] == [3, 3]
    code, _, err = convert(capsys, sources["saved-swin"], tmp_path / "wider", "--window", "5", "--no-auto-apply")
    assert code == 0, err
    config = json.loads((tmp_path / "wider" / "config.json").read_text())
    assert config["attnmask"]["window"] == [5, 5] and config["attnmask"]["auto_apply"] is False
    assert "attn_implementation" not in config


def test_soft_mode_is_saved_kept_and_replaced(sources, tmp_path, capsys):
    """``--mode soft`` converts and round-trips; re-converting keeps the saved mode unless
    ``--mode`` replaces it."""
    code, _, err = convert(capsys, sources["timm-vit"], tmp_path / "soft", "--heads", "2", "--window", "3", "--mode", "soft")
    assert code == 0, err
    assert json.loads((tmp_path / "soft" / "config.json").read_text())["attnmask"]["mode"] == "soft"
    case = BY_ID["timm-vit"]
    expected = forward(attnmask.apply(case.build(), heads=2, window=3, mode="soft"), images(case))
    loaded = attnmask.from_pretrained(tmp_path / "soft").eval()
    assert attnmask.get_spec(loaded).mode == "soft"
    for name, tensor in forward(loaded, images(case)).items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6)
    code, _, err = convert(capsys, tmp_path / "soft", tmp_path / "kept")
    assert code == 0, err
    assert json.loads((tmp_path / "kept" / "config.json").read_text())["attnmask"]["mode"] == "soft"
    code, _, err = convert(capsys, tmp_path / "soft", tmp_path / "hard", "--mode", "hard")
    assert code == 0, err
    assert json.loads((tmp_path / "hard" / "config.json").read_text())["attnmask"]["mode"] == "hard"


# -- in-process: push and inspect ------------------------------------------------------------------------------


class FakeHfApi:
    """Records what ``--push-to-hub`` asks of huggingface_hub (no network here)."""

    calls: list = []
    fail: Exception | None = None

    def create_repo(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_repo", repo_id, kwargs))
        if FakeHfApi.fail is not None:
            raise FakeHfApi.fail

    def upload_folder(self, **kwargs):
        FakeHfApi.calls.append(("upload_folder", sorted(p.name for p in Path(kwargs["folder_path"]).iterdir()), kwargs))


def test_push_to_hub_uses_huggingface_hub(sources, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.calls, FakeHfApi.fail = [], None
    out = tmp_path / "out"
    code, stdout, err = convert(capsys, sources["hf-vit"], out, "--heads", "1", "--window", "3", "--push-to-hub", "me/vit-local", "--private")
    assert code == 0, err
    (create, repo, create_kwargs), (upload, files, upload_kwargs) = FakeHfApi.calls
    assert (create, repo, create_kwargs["private"], create_kwargs["exist_ok"]) == ("create_repo", "me/vit-local", True, True)
    assert upload == "upload_folder" and upload_kwargs["repo_id"] == "me/vit-local" and Path(upload_kwargs["folder_path"]) == out
    assert files == ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
    assert 'from_pretrained("me/vit-local")' in (out / "README.md").read_text()
    assert "pushed to https://huggingface.co/me/vit-local" in stdout


def test_push_failure_status_1_keeps_the_folder(sources, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.calls, FakeHfApi.fail = [], ConnectionRefusedError("connection refused")
    out = tmp_path / "out"
    code, _, err = convert(capsys, sources["hf-vit"], out, "--heads", "1", "--window", "3", "--push-to-hub", "me/vit-local")
    line = one_line_error(err)
    assert code == 1 and "push to 'me/vit-local' failed" in line and f"kept at {out}" in line
    assert (out / "model.safetensors").is_file()


def test_inspect_unmasked_sources(sources, capsys):
    assert main(["inspect", str(sources["hf-vit"])]) == 0
    text = capsys.readouterr().out
    for fragment in ("transformers, ViTForImageClassification (model_type vit)", "2 layers, 4 heads each", "grid:          5 x 5"):
        assert fragment in text
    assert "prefix tokens: 1" in text and "saved masks:   none" in text and "weights:       model.safetensors" in text
    assert main(["inspect", str(sources["timm-vit"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["supported"], info["family"], info["grid"], info["prefix_tokens"]) == (True, "timm.vit", [5, 7], 1)
    assert [row["num_heads"] for row in info["layers"]] == [4, 4] and info["saved"] is None
    assert main(["inspect", str(sources["saved-swin"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "hf.swin" and info["prefix_tokens"] == 0 and info["grid"] == [4, 4]
    assert [row["masked_heads"] for row in info["layers"]] == [[0], [0], [0], [0]] and info["saved"]["window"] == [3, 3]
