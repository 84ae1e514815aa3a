"""Loading a saved folder is strict: every saved weight is used, none is missing, and the
layer names the masks were saved for exist in the rebuilt model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

import attnmask  # noqa: E402


def copy_folder(saved, case_id: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved.folders[case_id], tmp_path / case_id))


def edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "architecture, fragments",
    [
        ("ViTForMaskedImageModeling", ["unused saved weights: classifier.bias", "missing", "decoder"]),
        ("ViTModel", ["layers=", "do not exist"]),  # found from config.json alone, before the weights
    ],
)
def test_tampered_architectures_field_is_refused(saved, tmp_path, architecture, fragments):
    folder = copy_folder(saved, "hf-vit", tmp_path)
    edit_config(folder, lambda config: config.__setitem__("architectures", [architecture]))
    with pytest.raises(ValueError) as info:
        attnmask.from_pretrained(folder)
    message = str(info.value)
    assert str(folder) in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    "edit, fragments",
    [
        (lambda config: config["model_args"].update(num_classes=5), ["head.weight", "another shape"]),
        (lambda config: config["model_args"].update(global_pool="avg", fc_norm=True), ["fc_norm.weight", "norm.weight"]),
        (lambda config: config["model_args"].update(reg_tokens=2), ["timm could not load"]),
    ],
)
def test_tampered_timm_config_is_refused(saved, tmp_path, edit, fragments):
    folder = copy_folder(saved, "timm-vit", tmp_path)
    edit_config(folder, edit)
    with pytest.raises(ValueError) as info:
        attnmask.from_pretrained(folder)
    message = str(info.value)
    assert str(folder) in message
    for fragment in fragments:
        assert fragment in message


def test_saved_layer_names_must_exist(saved, tmp_path):
    folder = copy_folder(saved, "hf-vit", tmp_path)

    def rename(config):
        layers = config["attnmask"]["layers"]
        layers[1] = layers[1].replace(".1.", ".7.")

    edit_config(folder, rename)
    with pytest.raises(ValueError) as info:
        attnmask.from_pretrained(folder)
    message = str(info.value)
    assert str(folder / "config.json") in message and ".7." in message and "layers" in message


def test_timm_saved_layer_names_must_exist(saved, tmp_path):
    folder = copy_folder(saved, "timm-vit", tmp_path)
    edit_config(folder, lambda config: config["attnmask"].__setitem__("layers", ["blocks.0.attn", "stages.1.attn"]))
    with pytest.raises(ValueError, match=r"stages\.1\.attn"):
        attnmask.from_pretrained(folder)


def test_untampered_folders_still_load(saved):
    for case_id in ("hf-vit", "timm-vit"):
        model = attnmask.from_pretrained(saved.folders[case_id])
        assert attnmask.get_spec(model).to_dict() == saved.specs[case_id]


@pytest.mark.parametrize("source", [None, 3, b"folder"])
def test_source_of_another_type_is_a_type_error(source):
    with pytest.raises((TypeError, ValueError)) as info:
        attnmask.from_pretrained(source)
    assert f"source={source!r}" in str(info.value)
    if source is not None and not isinstance(source, bytes):
        assert info.type is TypeError
