"""timm folders in timm's Hub layout: build, load and save (imports timm when called).

The layout is the one ``timm.models.push_to_hf_hub`` writes: ``config.json`` with
``architecture``, ``num_classes``, ``model_args`` and ``pretrained_cfg``, and the weights as
``model.safetensors``. ``timm.create_model("local-dir:FOLDER", pretrained=True)`` loads it; once
attnmask is imported, masked (:mod:`.timm_hook`). Here timm's loading runs with that hook off:
:func:`attnmask.from_pretrained` applies the masks itself, with the user's overrides.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .hooks import applying_disabled
from .saved import KEY, SavedMasks

MODEL_ARGS = "_attnmask_timm_model_args"
"""Model attribute: the ``model_args`` of the folder a model was loaded from (timm < 1.0.31
does not record them itself)."""

_NOT_MODEL_ARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir", "device", "dtype")


def build_empty(folder: Path, config: dict[str, Any], where: str) -> nn.Module:
    """The model of ``folder``'s config on the meta device (no weights: for checks and ``inspect``).

    Raises:
        TypeError: If the installed timm does not know the architecture.
    """
    import timm

    try:
        with torch.device("meta"):
            return create(folder, config, pretrained=False)
    except (RuntimeError, ValueError, TypeError, KeyError, AssertionError) as error:
        raise TypeError(
            f"{where}: timm {timm.__version__} cannot build architecture={config.get('architecture')!r} "
            f"({' '.join(str(error).split())})"
        ) from None


def load(folder: Path, config: dict[str, Any], **kwargs: Any) -> nn.Module:
    """``timm.create_model("local-dir:FOLDER", pretrained=True, **kwargs)``, without masks."""
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"missing weights file: {folder} has no model.safetensors (timm folders keep one file)")
    kwargs.setdefault("pretrained", True)
    try:
        model = create(folder, config, **kwargs)
    except (RuntimeError, ValueError, KeyError, AssertionError) as error:
        raise ValueError(
            f"{folder}: timm could not load model.safetensors into the model config.json's architecture and model_args "
            f"build ({' '.join(str(error).split())[:500]}). The folder was edited or its weights belong to another model"
        ) from error
    if kwargs["pretrained"]:
        check_weights(folder, model, shapes="num_classes" not in kwargs)
    args = dict(config.get("model_args") or {})
    args.update({k: v for k, v in kwargs.items() if k not in _NOT_MODEL_ARGS})
    model.__dict__[MODEL_ARGS] = args
    return model


def check_weights(folder: Path, model: nn.Module, shapes: bool = True) -> None:
    """Raise unless ``model`` has exactly the weights of ``folder/model.safetensors`` (names,
    and shapes if ``shapes``): timm's loading filters checkpoints (and drops a classifier whose
    class count differs), so a model built from an edited ``config.json`` could load part of
    them without an error.

    Raises:
        ValueError: Naming the folder and the weights that do not fit.
    """
    import safetensors

    with safetensors.safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
        saved = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}
    built = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    problems = []
    for what, keys in (("unused saved weights", set(saved) - set(built)), ("weights missing from the folder", set(built) - set(saved))):
        keys = sorted(keys)
        if keys:
            problems.append(f"{what}: {', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''}")
    if shapes:
        other = sorted(k for k in set(saved) & set(built) if saved[k] != built[k])
        if other:
            problems.append("weights of another shape: " + ", ".join(f"{k} {saved[k]} saved, {built[k]} built" for k in other[:4]))
    if problems:
        raise ValueError(
            f"{folder}: model.safetensors does not fit the {type(model).__name__} that config.json's architecture "
            f"and model_args build: {'; '.join(problems)}. The folder was edited or its weights belong to another model"
        )


def has_local_dir() -> bool:
    """Whether the installed timm loads ``local-dir:`` folders (timm 1.0.29 and 1.0.31 do)."""
    import timm.models._hub

    return hasattr(timm.models._hub, "load_model_config_from_path")


def create(folder: Path, config: dict[str, Any], pretrained: bool = True, **kwargs: Any) -> nn.Module:
    """``timm.create_model("local-dir:FOLDER", ...)``; the same by hand where timm lacks ``local-dir:``."""
    import timm

    if has_local_dir():
        with applying_disabled():  # the caller applies the masks (or, for checks, none)
            return timm.create_model(f"local-dir:{folder}", pretrained=pretrained, **kwargs)
    pretrained_cfg = dict(config.get("pretrained_cfg") or {})
    pretrained_cfg.update(architecture=config["architecture"], num_classes=config.get("num_classes", 1000))
    arguments = {**(config.get("model_args") or {}), **kwargs}
    arguments.setdefault("num_classes", pretrained_cfg["num_classes"])
    model = timm.create_model(config["architecture"], pretrained=False, pretrained_cfg=pretrained_cfg, **arguments)
    if pretrained:
        import safetensors.torch

        model.load_state_dict(safetensors.torch.load_file(str(folder / "model.safetensors")))
    return model


def save(model: nn.Module, folder: Path, saved: SavedMasks, model_args: Optional[dict[str, Any]]) -> None:
    """Weights to ``model.safetensors``, timm's ``config.json`` plus the masks; check it rebuilds ``model``.

    Args:
        model: A timm model.
        folder: Where to write (exists, empty).
        saved: The masks.
        model_args: The keyword arguments ``timm.create_model`` needs to rebuild ``model``
            (e.g. ``img_size``, ``embed_dim``), or ``None`` for those timm recorded itself
            (timm >= 1.0.31) or those of the folder ``model`` was loaded from.

    Raises:
        ValueError: If the written ``config.json`` would rebuild a model of other shapes.
    """
    import safetensors.torch
    from timm.models._hub import save_config_for_hf

    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    safetensors.torch.save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if model_args is None:
        model_args = model.__dict__.get(MODEL_ARGS)
    save_config_for_hf(model, folder / "config.json", model_config={KEY: saved.to_config()}, model_args=model_args or None)
    _check_rebuilds(folder, state)


def _check_rebuilds(folder: Path, state: dict[str, torch.Tensor]) -> None:
    """Raise unless ``timm.create_model("local-dir:FOLDER")`` builds the shapes of ``state``."""
    rebuilt = build_empty(folder, json.loads((folder / "config.json").read_text()), str(folder / "config.json"))
    shapes = {name: tuple(t.shape) for name, t in rebuilt.state_dict().items()}
    for name, tensor in state.items():
        if shapes.get(name) != tuple(tensor.shape):
            got = shapes.get(name, "no such parameter")
            raise ValueError(
                f"the saved config.json would rebuild a different model ({name}: {got} instead of "
                f"{tuple(tensor.shape)}): pass model_args=dict(...) with the keyword arguments the model was "
                "created with (timm.create_model(name, **model_args)); timm before 1.0.31 does not record them"
            )
    extra = sorted(set(shapes) - set(state))
    if extra:
        raise ValueError(
            f"the saved config.json would rebuild a model with other parameters ({extra[0]}, ...): pass "
            "model_args=dict(...) with the keyword arguments the model was created with"
        )


def base_model(model: nn.Module) -> str:
    """The Hub id of the weights when timm loaded them from the Hub (``hf-hub:``), else ``""``.

    A model created by name records its default Hub id whether or not its weights were
    loaded (``pretrained=False``), so that id alone does not say where the weights came from.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("hf_hub_id") or "") if cfg.get("source") == "hf-hub" else ""
