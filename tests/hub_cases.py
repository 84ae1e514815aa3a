"""Tiny models for the save/load tests (``test_hub.py``) and the fresh-process loader
(``hub_fresh.py``). Building needs timm and transformers; :func:`forward` needs neither
at import time, so ``hub_fresh.py`` can import this module before deciding what to import.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

HF_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=40, patch_size=8)
HF_INIT = 0.2
"""transformers' default initializer_range (0.02) makes attention barely move a tiny model's outputs."""
TIMM_VIT = dict(img_size=(40, 56), patch_size=8, embed_dim=32, depth=2, num_heads=4)
TIMM_SWIN = dict(img_size=(32, 48), embed_dim=16, depths=(2, 2), num_heads=(4, 8), window_size=4, strict_img_size=False)
TOKENS = ("cls_token", "position_embeddings", "register_tokens", "mask_token", "reg_token", "pos_embed")


@dataclass
class HubCase:
    """One model family of the round-trip tests.

    Attributes:
        id: Test id and folder name.
        library: ``"transformers"`` or ``"timm"``.
        build: ``() -> model``, random weights, eval mode.
        masks: ``attnmask.apply`` keyword arguments.
        image: ``(height, width)`` of the test images.
        auto_class: transformers ``AutoModel*`` class that loads the folder (HF only).
        model_args: ``save_pretrained(model_args=...)`` (timm: what ``create_model`` was given).
    """

    id: str
    library: str
    build: Callable[[], torch.nn.Module]
    masks: dict[str, Any]
    image: tuple[int, int]
    auto_class: str = ""
    model_args: dict[str, Any] = field(default_factory=dict)


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Give zero-initialised tokens random values (prefix tokens matter), and classifier heads
    large ones (logits visibly move with the masks)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            parts = name.split(".")
            if parts[-1] in TOKENS:
                param.normal_(std=0.5)
            elif parts[0] in ("head", "classifier"):
                param.normal_(std=1.0)
    return model.eval()


def _hf(cls_name: str, config_name: str, **config: Any) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import transformers

        torch.manual_seed(0)
        return _randomize(getattr(transformers, cls_name)(getattr(transformers, config_name)(initializer_range=HF_INIT, **config)))

    return build


def _timm(name: str, **args: Any) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import timm

        torch.manual_seed(0)
        return _randomize(timm.create_model(name, pretrained=False, **args))

    return build


CASES = [
    HubCase(
        "hf-vit",
        "transformers",
        _hf("ViTForImageClassification", "ViTConfig", num_labels=7, **HF_SMALL),
        dict(heads={0: [0, 2], 1: "all"}, window=3),
        (40, 40),
        auto_class="AutoModelForImageClassification",
    ),
    HubCase(
        "hf-swin",
        "transformers",
        _hf("SwinModel", "SwinConfig", image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4),
        dict(heads=1, window=3),
        (32, 32),
        auto_class="AutoModel",
    ),
    HubCase(
        "hf-dinov2",
        "transformers",
        _hf("Dinov2Model", "Dinov2Config", **HF_SMALL),
        dict(heads=[1, 3], window=(3, 5), prefix="isolated"),
        (40, 40),
        auto_class="AutoModel",
    ),
    HubCase("timm-vit", "timm", _timm("vit_tiny_patch16_224", **TIMM_VIT), dict(heads=2, window=3), (40, 56), model_args=TIMM_VIT),
    HubCase(
        "timm-swin",
        "timm",
        _timm("swin_tiny_patch4_window7_224", **TIMM_SWIN),
        dict(heads={0: "all", 2: [1, 2]}, window=3),
        (32, 48),
        model_args={**TIMM_SWIN, "depths": list(TIMM_SWIN["depths"]), "num_heads": list(TIMM_SWIN["num_heads"])},
    ),
]
BY_ID = {case.id: case for case in CASES}


def images(case: HubCase) -> torch.Tensor:
    return torch.randn(2, 3, *case.image, generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def forward(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The outputs compared between processes: final features and, if any, logits."""
    if hasattr(model, "forward_features"):  # timm
        return {"features": model.forward_features(x).contiguous(), "out": model(x).contiguous()}
    out = model(pixel_values=x, output_hidden_states=True)
    result = {"hidden": out.hidden_states[-1].contiguous()}
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            result[name] = value.contiguous()
    return result


def cache_repo(cache: Path, repo_id: str, folder: Path) -> None:
    """Put ``folder`` into a huggingface_hub cache as the ``main`` revision of ``repo_id``."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
