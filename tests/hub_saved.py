"""The saved folders the hub tests share (built once per test session by the ``saved``
fixture of ``conftest.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from hub_cases import BY_ID, CASES, forward, images
from safetensors.torch import save_file

import attnmask

NOAUTO = "hf-dinov2-noauto"
"""The DINOv2 case saved with ``auto_apply=False``."""


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


@dataclass
class Saved:
    root: Path
    folders: dict[str, Path]
    inputs: dict[str, Path]
    masked: dict[str, dict[str, torch.Tensor]]
    plain: dict[str, dict[str, torch.Tensor]]
    specs: dict[str, dict]


def build_saved(tmp_path_factory) -> Saved:
    """Every case built, masked, run and saved; plus the DINOv2 case with ``auto_apply=False``."""
    root = tmp_path_factory.mktemp("hub")
    result = Saved(root, {}, {}, {}, {}, {})
    for case_id, case, auto_apply in [(c.id, c, True) for c in CASES] + [(NOAUTO, BY_ID["hf-dinov2"], False)]:
        model = case.build()
        x = images(case)
        attnmask.apply(model, **case.masks)
        result.masked[case_id] = forward(model, x)
        result.specs[case_id] = attnmask.get_spec(model).to_dict()
        kwargs = dict(model_args=case.model_args) if case.library == "timm" else dict(auto_apply=auto_apply)
        result.folders[case_id] = attnmask.save_pretrained(model, root / case_id, **kwargs)
        attnmask.remove(model)
        result.plain[case_id] = forward(model, x)
        result.inputs[case_id] = root / f"{case_id}-inputs.safetensors"
        save_file({"x": x}, str(result.inputs[case_id]))
    return result
