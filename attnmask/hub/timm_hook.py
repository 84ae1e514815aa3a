"""Make timm's own ``create_model`` load attnmask folders masked.

``import attnmask`` registers :func:`on_timm` as a wrapt post-import hook for ``timm``: it runs
when timm is imported, or at once if it already was, so import order does not matter and
``import attnmask`` itself never imports timm. The hook wraps ``timm.models._factory.create_model``
(one ``wrapt.FunctionWrapper``, put in place of the function wherever timm re-exports it:
``timm.create_model``, ``timm.models.create_model``, ...). For a ``local-dir:FOLDER`` or
``hf-hub:ORG/NAME`` source whose ``config.json`` carries an ``attnmask`` key (a folder written
by :func:`attnmask.save_pretrained`), the wrapper applies the saved masks to the model timm
built, as :func:`attnmask.from_pretrained` does. For ``hf-hub:`` it reads the ``config.json``
timm itself just fetched from huggingface_hub's cache; it never downloads anything.

Saved masks that cannot be applied (``pretrained=False``, keyword arguments that build a
different model, a hand-edited ``attnmask`` key that is not valid) give a warning and the model
timm built, unmasked: the hook never turns a model timm loads into an error. :func:`unregister`
puts timm's function back.

Names a caller bound before the hook ran (``from timm import create_model`` executed before
``import attnmask``) keep timm's unwrapped function.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

from .hooks import _DISABLED

SOURCES = {"local-dir": "local-dir", "hf-hub": "hf-hub", "hf_hub": "hf-hub"}
"""The ``create_model`` source prefixes the hook looks at (``hf_hub`` is timm's old spelling)."""

_NOT_MODEL_ARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir", "device", "dtype")

_state: dict[str, Any] = {"enabled": False, "registered": False, "wrapper": None, "original": None, "patched": []}


def register() -> None:
    """Register :func:`on_timm` for ``timm`` (``import attnmask`` calls it); runs it at once if
    timm is already imported. Calling it again after :func:`unregister` re-installs the wrapper."""
    import wrapt

    _state["enabled"] = True
    if not _state["registered"]:
        _state["registered"] = True
        wrapt.register_post_import_hook(on_timm, "timm")  # runs now if timm is imported
    elif "timm" in sys.modules:
        on_timm(sys.modules["timm"])


def unregister() -> None:
    """Put timm's ``create_model`` back everywhere the wrapper replaced it; a later
    ``import timm`` is not hooked either (until :func:`register`)."""
    _state["enabled"] = False
    wrapper, original = _state["wrapper"], _state["original"]
    for module in _state["patched"]:
        if module.__dict__.get("create_model") is wrapper:
            module.create_model = original
    _state.update(wrapper=None, original=None, patched=[])


def is_installed() -> bool:
    """Whether timm's ``create_model`` is wrapped now."""
    return _state["wrapper"] is not None


def on_timm(timm_module: Any) -> None:
    """The post-import hook. Never raises: a failure must not break ``import timm``."""
    if not _state["enabled"]:
        return
    try:
        _install()
    except Exception as error:  # e.g. a timm release without timm.models._factory.create_model
        warnings.warn(
            f"attnmask could not hook into timm ({type(error).__name__}: {error}); folders saved by "
            "attnmask.save_pretrained load masked with attnmask.from_pretrained only",
            RuntimeWarning,
            stacklevel=2,
        )


def _install() -> None:
    import wrapt

    factory = importlib.import_module("timm.models._factory")
    if _state["wrapper"] is not None:
        wrapper, original = _state["wrapper"], _state["original"]
    else:
        original = getattr(factory, "create_model", None)
        if not callable(original):
            raise AttributeError("timm.models._factory has no create_model function")
        wrapper = wrapt.FunctionWrapper(original, _create_model)
        _state.update(wrapper=wrapper, original=original)
    # timm re-exports the function (timm.create_model, timm.models.create_model, timm.task.*):
    # replace it wherever a timm module holds timm's own function, and nowhere else.
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "timm" or name.startswith("timm.")):
            continue
        if module.__dict__.get("create_model") is original:
            module.create_model = wrapper
            _state["patched"].append(module)


def _create_model(wrapped, instance, args, kwargs):
    """Wrapper of ``timm.create_model``: apply the saved masks, if the source folder has any."""
    model = wrapped(*args, **kwargs)
    if _DISABLED.get() or not _state["enabled"]:
        return model
    try:  # by parameter name: positions and the set of parameters differ across timm releases
        signature = inspect.signature(wrapped)
        call = dict(signature.bind(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        return model
    extra = [p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    name = call.get("model_name")
    found = _saved_config(name, call.get("cache_dir")) if isinstance(name, str) else None
    if found is None:
        return model
    config, where = found
    message = _apply(model, config, where, name, bool(call.get("pretrained", False)), call.get(extra[0], {}) if extra else {})
    if message:
        warnings.warn(message, UserWarning, stacklevel=2)
    return model


def _saved_config(name: str, cache_dir: Any) -> Optional[tuple[dict[str, Any], str]]:
    """``(config, where)`` when ``name``'s source has a local ``config.json`` with an ``attnmask`` key."""
    from .saved import KEY

    prefix, sep, model_id = name.partition(":")
    source = SOURCES.get(prefix.lower()) if sep else None
    if source == "local-dir":
        path: Optional[Path] = Path(model_id) / "config.json"  # as timm reads it
        where = str(path)
    elif source == "hf-hub":
        repo_id, _, revision = model_id.partition("@")
        path = _cached_file(repo_id, revision or None, cache_dir)
        where = f"{model_id}/config.json (Hub)"
    else:
        return None
    if path is None or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # timm read it: whatever it was, it is not a folder attnmask wrote
    return (config, where) if isinstance(config, dict) and KEY in config else None


def _cached_file(repo_id: str, revision: Optional[str], cache_dir: Any) -> Optional[Path]:
    """``config.json`` of a Hub repository in huggingface_hub's cache, or ``None``; never downloads."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir, revision=revision)
    except Exception:  # an id huggingface_hub does not accept: timm's own download would have failed
        return None
    return Path(found) if isinstance(found, str) else None


def _apply(model: Any, config: dict[str, Any], where: str, name: str, pretrained: bool, kwargs: dict[str, Any]) -> str:
    """Apply the masks of ``config``'s ``attnmask`` key to ``model``; ``""``, or why they were not applied."""
    from .api import BASE_MODEL
    from .apply import apply_saved
    from .saved import KEY, SavedMasks
    from .timm_io import MODEL_ARGS

    call = f"timm.create_model({name!r}, pretrained={pretrained})"
    unmasked = "the model is returned unmasked"
    try:
        saved = SavedMasks.from_config(config[KEY], where)
    except ValueError as error:
        return f"{call}: {error}; {unmasked}. Fix the {KEY!r} key, or load with attnmask.from_pretrained for the full error"
    if not saved.auto_apply:
        return ""  # saved with auto_apply=False: the host library loads the base model
    if not pretrained:
        return (
            f"{call}: {where} holds attnmask masks, which are applied only with the saved weights "
            f"(pretrained=True); {unmasked}. Pass pretrained=True, or apply masks yourself with attnmask.apply(model, ...)"
        )
    try:
        apply_saved(model, saved, where)
    except Exception as error:  # apply leaves the model untouched when it fails; timm's model still loads
        return (
            f"{call}: the masks saved in {where} could not be applied ({error}); {unmasked}. Without keyword "
            "arguments that change the architecture, timm rebuilds the saved model; attnmask.from_pretrained "
            "replaces the saved masks with heads=/window= when they do not fit"
        )
    model.__dict__[BASE_MODEL] = saved.base_model or (name.partition(":")[2])
    args = dict(config.get("model_args") or {})
    args.update({k: v for k, v in kwargs.items() if k not in _NOT_MODEL_ARGS and v is not None})
    model.__dict__[MODEL_ARGS] = args  # as attnmask.from_pretrained records them (for save_pretrained)
    return ""
