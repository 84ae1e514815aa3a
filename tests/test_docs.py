"""The docs page of supported models is the registry, rendered."""

import importlib.util
from pathlib import Path

import attnmask

ROOT = Path(__file__).resolve().parents[1]


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_supported_models", ROOT / "docs" / "gen_supported_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_supported_models_page_is_current():
    generator = load_generator()
    assert (ROOT / "docs" / "supported-models.md").read_text() == generator.render(), (
        "docs/supported-models.md is stale: run `python docs/gen_supported_models.py`"
    )


def test_page_lists_every_family():
    page = (ROOT / "docs" / "supported-models.md").read_text()
    for family in attnmask.supported():
        assert f"`{family['family']}`" in page
        assert family["tested"], f"{family['family']} names no tested host version"
