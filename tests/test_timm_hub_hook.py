"""timm's own ``create_model("local-dir:...")`` / ``("hf-hub:...")`` loads folders saved by
``attnmask.save_pretrained`` masked once attnmask is imported (attnmask.hub.timm_hook), warns
when saved masks cannot be applied, and leaves every other folder alone. Offline: a tiny ViT
with random weights; the Hub source is a huggingface_hub cache built in ``tmp_path``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")
huggingface_hub = pytest.importorskip("huggingface_hub")

import attnmask  # noqa: E402
from attnmask.hub import timm_hook  # noqa: E402
from hub_cases import cache_repo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARGS = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=4, num_classes=5)

pytestmark = pytest.mark.skipif(
    not hasattr(timm.models._hub, "load_model_config_from_path"), reason="this timm has no local-dir: source"
)


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **ARGS).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    model = attnmask.apply(tiny_vit(), heads=2, window=3)
    return attnmask.save_pretrained(model, tmp_path_factory.mktemp("timm-hook") / "vit-local")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_local_dir_loads_masked_like_attnmask_from_pretrained(folder, images):
    reference = attnmask.from_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert attnmask.get_spec(model) == attnmask.get_spec(reference)
    assert torch.equal(outputs(model, images), outputs(reference, images))
    assert not torch.equal(outputs(attnmask.remove(model), images), outputs(reference, images))


def test_saved_spec_is_the_models(folder):
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    saved = json.loads((folder / "config.json").read_text())["attnmask"]
    spec = attnmask.get_spec(model).to_dict()
    assert {k: v for k, v in saved.items() if k in spec} == json.loads(json.dumps(spec))


def test_every_timm_name_of_create_model_is_wrapped():
    assert timm_hook.is_installed()
    for module in (timm, timm.models, timm.models._factory):
        assert type(module.create_model).__name__ == "FunctionWrapper", module.__name__


def test_from_pretrained_overrides_are_not_applied_twice(folder):
    model = attnmask.from_pretrained(folder, window=5, heads=1)
    spec = attnmask.get_spec(model)
    assert spec.window == (5, 5) and all(len(h) == 1 for h in spec.heads)


def test_hf_hub_source_from_the_local_cache(folder, images, tmp_path, monkeypatch):
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    cache_repo(cache, "someone/vit-local", folder)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = timm.create_model("hf-hub:someone/vit-local", pretrained=True)
    assert attnmask.get_spec(model) == attnmask.get_spec(attnmask.from_pretrained(folder))
    assert torch.equal(outputs(model, images), outputs(attnmask.from_pretrained(folder), images))
    # cache_dir= is where timm and the hook look
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert attnmask.is_patched(timm.create_model("hf-hub:someone/vit-local", pretrained=True, cache_dir=cache))


def test_pretrained_false_warns_and_builds_unmasked(folder):
    with pytest.warns(UserWarning, match=r"pretrained=False.*holds attnmask masks.*pretrained=True.*unmasked") as record:
        model = timm.create_model(f"local-dir:{folder}", pretrained=False)
    assert not attnmask.is_patched(model)
    assert record[0].filename == __file__  # the warning points at the caller's create_model line


def test_masks_that_do_not_fit_warn(folder):
    # num_heads=2 loads the same weights (qkv does not depend on the head count) but the saved
    # masks are for 4 heads per layer
    with pytest.warns(UserWarning, match=r"could not be applied.*num_heads=\[4, 4\].*unmasked"):
        model = timm.create_model(f"local-dir:{folder}", pretrained=True, num_heads=2)
    assert not attnmask.is_patched(model)


def test_an_invalid_saved_key_warns(folder, tmp_path):
    edited = tmp_path / "edited"
    edited.mkdir()
    for name in ("model.safetensors", "config.json"):
        (edited / name).write_bytes((folder / name).read_bytes())
    config = json.loads((edited / "config.json").read_text())
    config["attnmask"]["window"] = [4, 4]
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match=r"window.*unmasked"):
        model = timm.create_model(f"local-dir:{edited}", pretrained=True)
    assert not attnmask.is_patched(model)


def test_auto_apply_false_loads_the_base_model(tmp_path, images):
    model = attnmask.apply(tiny_vit(), heads=2, window=3)
    out = attnmask.save_pretrained(model, tmp_path / "no-auto", auto_apply=False)
    assert "# no masks" in (out / "README.md").read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert not attnmask.is_patched(loaded)
    assert attnmask.is_patched(attnmask.from_pretrained(out))


def test_plain_timm_folders_load_as_before(tmp_path, images):
    base = tiny_vit()
    timm.models.save_for_hf(base, tmp_path / "plain", model_args=ARGS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hooked = timm.create_model(f"local-dir:{tmp_path / 'plain'}", pretrained=True)
        by_name = timm.create_model("vit_tiny_patch16_224", **ARGS)
    assert not attnmask.is_patched(hooked) and not attnmask.is_patched(by_name)
    timm_hook.unregister()
    try:
        original = timm.create_model(f"local-dir:{tmp_path / 'plain'}", pretrained=True)
    finally:
        timm_hook.register()
    assert torch.equal(outputs(hooked, images), outputs(original, images))
    assert torch.equal(outputs(hooked, images), outputs(base, images))


def test_unregister_puts_timms_function_back(folder):
    wrapped = timm.create_model
    timm_hook.unregister()
    try:
        assert not timm_hook.is_installed()
        for module in (timm, timm.models, timm.models._factory):
            assert type(module.create_model).__name__ == "function"
            assert module.create_model is wrapped.__wrapped__
        assert not attnmask.is_patched(timm.create_model(f"local-dir:{folder}", pretrained=True))
        # a wrapper bound before unregister does nothing either
        assert not attnmask.is_patched(wrapped(f"local-dir:{folder}", pretrained=True))
    finally:
        timm_hook.register()
    assert timm_hook.is_installed() and attnmask.is_patched(timm.create_model(f"local-dir:{folder}", pretrained=True))


@pytest.mark.parametrize("first", ["attnmask", "timm"])
def test_either_import_order(folder, first):
    """A fresh process: ``import attnmask`` before timm (the hook runs when timm is imported)
    or after it (the hook runs at once); attnmask alone imports no timm."""
    second = "timm" if first == "attnmask" else "attnmask"
    script = textwrap.dedent(
        f"""
        import sys
        import {first}
        if "{first}" == "attnmask":
            assert "timm" not in sys.modules, "import attnmask imported timm"
        import {second}
        import attnmask, timm
        model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True)
        print(attnmask.get_spec(model) == attnmask.get_spec(attnmask.from_pretrained(sys.argv[1])))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "True"
