"""Hugging Face transformers folders: build, load and save (imports transformers when called)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .hooks import applying_disabled, reset_implementation
from .saved import KEY, SAVED_IMPLEMENTATION, SavedMasks


def model_class(config: dict[str, Any]) -> type:
    """The class named first in ``config.json``'s ``architectures`` (``AutoModel`` if none is known)."""
    import transformers

    for name in config.get("architectures") or ():
        cls = getattr(transformers, str(name), None) if isinstance(name, str) and name.isidentifier() else None
        if isinstance(cls, type):
            return cls
    return transformers.AutoModel


def build_empty(folder: Path, config: dict[str, Any], where: str) -> nn.Module:
    """The model of ``folder``'s config on the meta device (no weights: for checks and ``inspect``).

    Raises:
        TypeError: If the installed transformers cannot build it (unknown ``model_type``,
            remote code): it is not a supported model.
    """
    import transformers

    try:
        hf_config = transformers.AutoConfig.from_pretrained(str(folder))
        cls = model_class(config)
        with torch.device("meta"), applying_disabled():
            if cls is transformers.AutoModel:
                return transformers.AutoModel.from_config(hf_config)
            return cls._from_config(hf_config)
    except (KeyError, ValueError, OSError, ImportError) as error:
        raise TypeError(
            f"{where}: transformers {transformers.__version__} cannot build model_type={config.get('model_type')!r} "
            f"({_one_line(error)}); attnmask supports the families listed by attnmask.supported()"
        ) from None


def load(folder: Path, config: dict[str, Any], **kwargs: Any) -> nn.Module:
    """Load ``folder`` with its own class's ``from_pretrained`` (safetensors only), without masks.

    Strict: every weight of the folder must be used and none of the model's missing (shapes
    must match too, unless ``ignore_mismatched_sizes=True`` asks otherwise). transformers
    itself only logs a report, so an edited ``architectures`` field would otherwise build
    another class and silently drop weights (a classifier).

    Raises:
        ValueError: Naming the folder, the class built and the keys that do not fit.
    """
    if kwargs.pop("use_safetensors", True) is not True:
        raise ValueError("use_safetensors=False is not accepted: attnmask loads safetensors weights only")
    kwargs.pop("output_loading_info", None)
    cls = model_class(config)
    with applying_disabled():
        model, info = cls.from_pretrained(str(folder), use_safetensors=True, output_loading_info=True, **kwargs)
    problems = []
    for what, keys in (("unused saved weights", info.get("unexpected_keys")), ("weights missing from the folder", info.get("missing_keys"))):
        keys = sorted(keys or ())
        if keys:
            problems.append(f"{what}: {', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''}")
    mismatched = list(info.get("mismatched_keys") or ())
    if mismatched and not kwargs.get("ignore_mismatched_sizes"):
        problems.append(f"weights of another shape: {', '.join(str(m[0] if isinstance(m, tuple) else m) for m in mismatched[:6])}")
    if problems:
        raise ValueError(
            f"{folder}: model.safetensors does not fit {cls.__name__}, the class config.json's architectures "
            f"({config.get('architectures')!r}) names: {'; '.join(problems)}. The folder was edited or its weights "
            "belong to another model"
        )
    reset_implementation(model)
    return model


def save(model: nn.Module, folder: Path, saved: SavedMasks) -> None:
    """``model.save_pretrained(folder)``, then the masks into ``config.json``."""
    model.save_pretrained(str(folder))
    if not any((folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        raise RuntimeError(f"transformers wrote no safetensors weights to {folder}: cannot save an attnmask folder")
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.pop("attn_implementation", None)
    config[KEY] = saved.to_config()
    if saved.auto_apply:
        config["attn_implementation"] = SAVED_IMPLEMENTATION
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def base_model(model: nn.Module) -> str:
    """What the model was loaded from, as transformers recorded it."""
    return str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
