"""save_pretrained / from_pretrained: Hub sources through the cache, no network, and every kind
of bad input (each with a clear error and nothing written). Offline: tiny models from configs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

import attnmask  # noqa: E402
from hub_cases import BY_ID, cache_repo, forward, images  # noqa: E402
from hub_saved import Saved, close  # noqa: E402


# -- sources: Hub ids through the cache ----------------------------------------------------------------


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline huggingface_hub cache in ``tmp_path``; ``add(repo_id, folder)`` puts a repo in it."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    return lambda repo_id, folder: cache_repo(cache, repo_id, folder)


@pytest.mark.parametrize(
    "source, case_id",
    [("someone/vit-local", "hf-vit"), ("hf-hub:someone/vit-local", "hf-vit"), ("timm/tiny-swin-local", "timm-swin")],
)
def test_hub_sources_load_from_the_cache(saved, hub_cache, source, case_id):
    hub_cache(source.removeprefix("hf-hub:"), saved.folders[case_id])
    model = attnmask.from_pretrained(source)
    assert attnmask.get_spec(model).to_dict() == saved.specs[case_id]
    for name, tensor in forward(model.eval(), images(BY_ID[case_id])).items():
        close(tensor, saved.masked[case_id][name])


def test_offline_and_not_cached(hub_cache):
    with pytest.raises(ConnectionError) as error:
        attnmask.from_pretrained("nobody/no-such-model")
    message = str(error.value)
    assert "'nobody/no-such-model'" in message and "HF_HUB_OFFLINE" in message
    assert "local folder" in message and "cache" in message


def test_no_network(monkeypatch):
    def unreachable(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ConnectionError, match="no network.*Name or service not known.*local folder"):
        attnmask.from_pretrained("google/vit-base-patch16-224")


# -- bad input -----------------------------------------------------------------------------------------


def copy_folder(saved: Saved, case_id: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved.folders[case_id], tmp_path / case_id))


def edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def test_unknown_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        attnmask.from_pretrained(str(tmp_path / "nowhere" / "model"))
    with pytest.raises(FileNotFoundError, match="not accepted"):
        attnmask.from_pretrained("./no-such-folder")


def set_key(field, value):
    return lambda config: config["attnmask"].__setitem__(field, value)


@pytest.mark.parametrize(
    "edit, fragments",
    [
        (set_key("window", 4), ["window=4", "odd"]),
        (set_key("window", [3, 3, 3]), ["window=[3, 3, 3]", "pair"]),
        (set_key("heads", [[0, 9], [0]]), ["head index 9", "0..3"]),
        (set_key("heads", [[0]]), ["one entry per attention layer"]),
        (set_key("prefix", "middle"), ["prefix='middle'", "'global', 'isolated'"]),
        (set_key("mode", "fuzzy"), ["mode='fuzzy'", "'hard', 'soft'"]),
        (set_key("backend", "cuda-magic"), ["backend='cuda-magic'", "'auto'"]),
        (set_key("windw", 3), ["unknown field", "windw"]),
        (set_key("num_heads", [8, 8]), ["num_heads=[8, 8]", "another model"]),
        (set_key("family", "timm.vit"), ["family='timm.vit'", "hf.vit"]),
        (lambda config: config.__setitem__("attnmask", [1, 2]), ["JSON object"]),
    ],
)
def test_corrupted_attnmask_key(saved, tmp_path, edit, fragments):
    folder = copy_folder(saved, "hf-vit", tmp_path)
    edit_config(folder, edit)
    with pytest.raises(ValueError) as error:
        attnmask.from_pretrained(folder)
    message = str(error.value)
    assert str(folder / "config.json") in message and "'attnmask' key" in message
    for fragment in fragments:
        assert fragment in message


def test_corrupted_key_fails_transformers_from_pretrained_too(saved, tmp_path):
    folder = copy_folder(saved, "hf-vit", tmp_path)
    edit_config(folder, set_key("window", 4))
    with pytest.raises(ValueError, match="config.json: the 'attnmask' key.*window=4"):
        transformers.AutoModelForImageClassification.from_pretrained(str(folder))


def test_invalid_config_json(saved, tmp_path):
    folder = copy_folder(saved, "timm-vit", tmp_path)
    (folder / "config.json").write_text('{"architecture": "vit_tiny_patch16_224",')
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        attnmask.from_pretrained(folder)
    (folder / "config.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="neither a transformers config.*nor a timm config"):
        attnmask.from_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        attnmask.from_pretrained(folder)


def test_missing_weights_file(saved, tmp_path):
    folder = copy_folder(saved, "hf-swin", tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(FileNotFoundError, match="missing weights file.*model.safetensors.*pytorch_model.bin.*never unpickles"):
        attnmask.from_pretrained(folder)


def test_unsupported_architecture(tmp_path):
    model = transformers.ResNetModel(transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1]))
    model.save_pretrained(str(tmp_path / "resnet"))
    with pytest.raises(TypeError, match="cannot mask .*ResNet.*no module computes attention between tokens"):
        attnmask.from_pretrained(tmp_path / "resnet", heads=1, window=3)
    (tmp_path / "timm-unknown").mkdir()
    (tmp_path / "timm-unknown" / "config.json").write_text('{"architecture": "no_such_net_224", "pretrained_cfg": {}}')
    with pytest.raises(TypeError, match="cannot build architecture='no_such_net_224'"):
        attnmask.from_pretrained(tmp_path / "timm-unknown")


def test_bad_overrides_name_the_argument(saved):
    with pytest.raises(ValueError, match="window=4 is not accepted"):
        attnmask.from_pretrained(saved.folders["hf-vit"], window=4)
    with pytest.raises(ValueError, match="heads=9 is not accepted"):
        attnmask.from_pretrained(saved.folders["hf-vit"], heads=9)
    with pytest.raises(ValueError, match="use_safetensors=False is not accepted"):
        attnmask.from_pretrained(saved.folders["hf-vit"], use_safetensors=False)
