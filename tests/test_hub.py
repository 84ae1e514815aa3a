"""save_pretrained / from_pretrained: round trips in a fresh process, transformers' own loaders,
loading without attnmask, the folder and the Python API (sources and bad input:
``test_hub_errors.py``). Offline: tiny models from configs.

The fresh-process checks share two subprocesses (``hub_fresh.py``): one loads every saved folder
with attnmask imported first, one loads them with attnmask blocked (as if not installed) and then
imports attnmask after transformers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import attnmask  # noqa: E402
from hub_cases import BY_ID, CASES, forward, images  # noqa: E402
from hub_saved import NOAUTO, Saved, close  # noqa: E402

HERE = Path(__file__).parent
ROOT = HERE.parent
HF_IDS = [case.id for case in CASES if case.library == "transformers"]


def run_fresh(saved: Saved, mode: str, cases: list[str], late_import: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """Run ``hub_fresh.py`` in a new interpreter; return its outputs and results."""
    library = {case.id: case.library for case in CASES}
    auto = {case.id: case.auto_class for case in CASES}
    manifest = {
        "mode": mode,
        "late_import": list(late_import),
        "cases": {
            case_id: {
                "folder": str(saved.folders[case_id]),
                "inputs": str(saved.inputs[case_id]),
                "library": library.get(case_id, "transformers"),
                "auto_class": auto.get(case_id, "AutoModel"),
            }
            for case_id in cases
        },
    }
    manifest_path = saved.root / f"manifest-{mode}.json"
    manifest_path.write_text(json.dumps(manifest))
    out = saved.root / f"results-{mode}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(HERE / "hub_fresh.py"), str(manifest_path), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(out / "outputs.safetensors")), json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def fresh(saved):
    """A fresh process that imports attnmask, then loads every folder (attnmask and transformers loaders)."""
    return run_fresh(saved, "attnmask", [c.id for c in CASES] + [NOAUTO])


@pytest.fixture(scope="module")
def without(saved):
    """A fresh process without attnmask: plain transformers / timm loads; then a late ``import attnmask``."""
    return run_fresh(saved, "without-attnmask", ["hf-vit", "hf-swin", "timm-vit", "timm-swin", NOAUTO], late_import=("hf-vit",))


def assert_outputs(outputs: dict, prefix: str, expected: dict[str, torch.Tensor]) -> None:
    names = sorted(k.split("/")[-1] for k in outputs if k.startswith(prefix + "/"))
    assert names == sorted(expected), f"{prefix}: outputs {names}, expected {sorted(expected)}"
    for name, tensor in expected.items():
        close(outputs[f"{prefix}/{name}"], tensor)


# -- round trips in a fresh process ------------------------------------------------------------------


def test_masks_change_the_outputs(saved):
    """The round trips below could not pass with the masks dropped: every output moves by far more
    than the tolerance (1e-6), and the features by a lot."""
    for case_id in saved.masked:
        changes = {name: (t - saved.plain[case_id][name]).abs().max().item() for name, t in saved.masked[case_id].items()}
        assert min(changes.values()) > 1e-4 and max(changes.values()) > 1e-2, (case_id, changes)


@pytest.mark.parametrize("case_id", [c.id for c in CASES])
def test_round_trip_in_fresh_process(saved, fresh, case_id):
    outputs, results = fresh
    assert_outputs(outputs, f"{case_id}/attnmask", saved.masked[case_id])
    assert results[f"{case_id}/attnmask"]["spec"] == saved.specs[case_id]


@pytest.mark.parametrize("case_id", HF_IDS)
def test_transformers_auto_class_loads_masked_after_import_attnmask(saved, fresh, case_id):
    outputs, results = fresh
    loaded = results[f"{case_id}/auto"]
    assert loaded["spec"] == saved.specs[case_id]
    assert loaded["report"]["patched"] and loaded["report"]["family"] == saved.specs[case_id]["family"]
    assert [row["masked_heads"] for row in loaded["report"]["layers"]] == saved.specs[case_id]["heads"]
    assert_outputs(outputs, f"{case_id}/auto", saved.masked[case_id])


def test_import_attnmask_does_not_import_transformers(fresh):
    assert fresh[1]["transformers_imported_by_attnmask"] is False


def test_auto_apply_false_loads_unmasked_with_transformers(saved, fresh):
    outputs, results = fresh
    assert results[f"{NOAUTO}/auto"]["spec"] is None
    assert_outputs(outputs, f"{NOAUTO}/auto", saved.plain[NOAUTO])
    assert results[f"{NOAUTO}/attnmask"]["spec"] == saved.specs[NOAUTO]
    assert_outputs(outputs, f"{NOAUTO}/attnmask", saved.masked[NOAUTO])


# -- without attnmask --------------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", ["hf-vit", "hf-swin"])
def test_without_attnmask_transformers_refuses_and_names_the_package(without, case_id):
    outputs, results = without
    assert results["attnmask_blocked"] is True
    loaded = results[f"{case_id}/plain"]
    assert loaded.get("error") == "ValueError", loaded
    assert "pip install attnmask" in loaded["message"] and "import attnmask" in loaded["message"]
    assert not any(k.startswith(f"{case_id}/plain/") for k in outputs)


def test_without_attnmask_auto_apply_false_loads_the_base_model(saved, without):
    outputs, results = without
    assert "error" not in results[f"{NOAUTO}/plain"]
    assert_outputs(outputs, f"{NOAUTO}/plain", saved.plain[NOAUTO])


@pytest.mark.parametrize("case_id", ["timm-vit", "timm-swin"])
def test_timm_local_dir_loads_the_weights_unmasked(saved, without, case_id):
    outputs, results = without
    assert "error" not in results[f"{case_id}/plain"], results[f"{case_id}/plain"]
    assert_outputs(outputs, f"{case_id}/plain", saved.plain[case_id])


def test_import_attnmask_after_transformers_still_masks(saved, without):
    outputs, results = without
    assert results["hf-vit/late"]["spec"] == saved.specs["hf-vit"]
    assert_outputs(outputs, "hf-vit/late", saved.masked["hf-vit"])


# -- the folder ----------------------------------------------------------------------------------------


def test_hf_folder_layout(saved):
    folder = saved.folders["hf-vit"]
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "vit" and config["architectures"] == ["ViTForImageClassification"]
    assert config["attnmask"] == {**saved.specs["hf-vit"], "mode": "hard", "auto_apply": True, "attnmask_version": attnmask.__version__}
    assert "pip install attnmask" in config["attn_implementation"]
    noauto = json.loads((saved.folders[NOAUTO] / "config.json").read_text())
    assert noauto["attnmask"]["auto_apply"] is False and "attn_implementation" not in noauto
    leftovers = [p.name for p in saved.root.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_timm_folder_is_timms_hub_layout(saved):
    folder = saved.folders["timm-vit"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert config["model_args"]["embed_dim"] == 32 and list(config["model_args"]["img_size"]) == [40, 56]
    assert config["pretrained_cfg"]["mean"] and config["num_classes"] == 1000
    assert config["attnmask"]["heads"] == [[0, 1], [0, 1]] and "attn_implementation" not in config
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        keys = set(weights.keys())
    assert keys == set(BY_ID["timm-vit"].build().state_dict())


def test_model_card_states_the_masks_and_how_to_load(saved, tmp_path):
    card = (saved.folders["hf-vit"] / "README.md").read_text()
    for fragment in [
        "library_name: transformers",
        "layer 0: heads 0, 2 of 4 local",
        "layer 1: all 4 heads local",
        "window: 3 x 3 patches",
        "prefix: global",
        "mode: hard",
        f'attnmask.from_pretrained("{saved.folders["hf-vit"].name}")',
        "ViTForImageClassification.from_pretrained(",
        "pip install attnmask",
    ]:
        assert fragment in card, fragment
    assert str(saved.folders["hf-vit"].parent) not in card  # a shared card names no local path
    timm_card = (saved.folders["timm-swin"] / "README.md").read_text()
    assert "layer 0: all 4 heads local" in timm_card and "layer 1: all 4 heads global" in timm_card
    assert "layer 2: heads 1, 2 of 8 local" in timm_card and 'timm.create_model("local-dir:' in timm_card
    dino_card = (saved.folders["hf-dinov2"] / "README.md").read_text()
    assert "prefix: isolated" in dino_card and "window: 3 x 5 patches" in dino_card
    model = attnmask.from_pretrained(saved.folders["hf-vit"])
    out = attnmask.save_pretrained(model, tmp_path / "carded", base_model="google/vit-base-patch16-224", repo_id="me/vit-local")
    card = (out / "README.md").read_text()
    assert "base_model: google/vit-base-patch16-224" in card and 'from_pretrained("me/vit-local")' in card


# -- the Python API ------------------------------------------------------------------------------------


def test_from_pretrained_overrides_the_saved_masks(saved):
    model = attnmask.from_pretrained(saved.folders["hf-vit"], heads=1, window=5)
    spec = attnmask.get_spec(model)
    assert spec.heads == ((0,), (0,)) and spec.window == (5, 5)
    model = attnmask.from_pretrained(saved.folders["timm-vit"], window=(1, 3), prefix="isolated")
    spec = attnmask.get_spec(model)
    assert spec.heads == ((0, 1), (0, 1)) and spec.window == (1, 3) and spec.prefix == "isolated"


def test_from_pretrained_of_an_unmasked_folder(saved, tmp_path):
    model = BY_ID["hf-vit"].build()
    model.save_pretrained(str(tmp_path / "plain"))
    assert not attnmask.is_patched(attnmask.from_pretrained(tmp_path / "plain"))
    masked = attnmask.from_pretrained(tmp_path / "plain", heads="all", window=3)
    assert attnmask.get_spec(masked).heads == ((0, 1, 2, 3), (0, 1, 2, 3))


def test_resave_keeps_the_masks(saved, tmp_path):
    model = attnmask.from_pretrained(saved.folders["timm-swin"])
    out = attnmask.save_pretrained(model, tmp_path / "again", repo_id="me/swin-local")
    assert 'timm.create_model("hf-hub:me/swin-local", pretrained=True)' in (out / "README.md").read_text()
    x = images(BY_ID["timm-swin"])
    for name, tensor in forward(attnmask.from_pretrained(out).eval(), x).items():
        close(tensor, saved.masked["timm-swin"][name])


@pytest.mark.parametrize("case_id", ["timm-vit", "timm-swin"])
def test_timm_without_local_dir_support(saved, tmp_path, monkeypatch, case_id):
    """Older timm releases lack ``local-dir:``: the folder is then built and loaded by hand."""
    from attnmask.hub import timm_io

    monkeypatch.setattr(timm_io, "has_local_dir", lambda: False)
    model = attnmask.from_pretrained(saved.folders[case_id]).eval()
    x = images(BY_ID[case_id])
    for name, tensor in forward(model, x).items():
        close(tensor, saved.masked[case_id][name])
    out = attnmask.save_pretrained(model, tmp_path / "again")
    again = json.loads((out / "config.json").read_text())["attnmask"]
    assert again.pop("base_model") == saved.folders[case_id].name  # by folder name, not absolute path
    assert again == json.loads((saved.folders[case_id] / "config.json").read_text())["attnmask"]


def test_save_pretrained_needs_a_patched_model(tmp_path):
    with pytest.raises(ValueError, match="not patched.*attnmask.apply"):
        attnmask.save_pretrained(BY_ID["hf-vit"].build(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_save_pretrained_refuses_other_hosts(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32)
    attnmask.apply(model, heads=1, window=3)
    with pytest.raises(TypeError, match="transformers and timm models, not torchvision.vit"):
        attnmask.save_pretrained(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_output_folder_exists(saved, tmp_path):
    model = attnmask.from_pretrained(saved.folders["hf-vit"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="already exists.*overwrite"):
        attnmask.save_pretrained(model, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    attnmask.save_pretrained(model, out, overwrite=True)
    assert "attnmask" in json.loads((out / "config.json").read_text())
    other = tmp_path / "not-a-model"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a model folder"):
        attnmask.save_pretrained(model, other, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-model", "out"]


def test_timm_config_must_rebuild_the_model(tmp_path):
    case = BY_ID["timm-vit"]
    model = attnmask.apply(case.build(), **case.masks)
    with pytest.raises(ValueError, match="model_args"):
        attnmask.save_pretrained(model, tmp_path / "out", model_args={**case.model_args, "embed_dim": 64})
    assert list(tmp_path.iterdir()) == [], "nothing partial is left behind"
