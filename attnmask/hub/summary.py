"""What ``attnmask inspect`` reports about a source, without loading its weights."""

from __future__ import annotations

import os
from typing import Any, Optional

from torch import nn

from ..api import get_spec
from ..adapters import find_adapter
from . import hf_io, timm_io
from .apply import apply_saved
from .card import spec_in_words
from .source import PICKLES, WEIGHTS, open_source


def inspect_source(source: str | os.PathLike, revision: Optional[str] = None) -> dict[str, Any]:
    """Whether attnmask supports ``source``'s model, its attention layers and its saved masks.

    Only ``config.json`` is read (downloaded for a Hub source); the model is built on the
    meta device, so no weights are loaded.

    Returns:
        Plain data: ``source``, ``library``, ``architecture``, ``supported`` and, if
        supported, ``family``, ``grid``, ``prefix_tokens``, ``layers`` (name, heads, masked
        heads); ``reason`` if not; ``saved`` (the ``attnmask`` key) and ``saved_in_words``
        when the folder has saved masks; ``weights`` for a local folder.

    Raises:
        The errors of :func:`attnmask.from_pretrained` for a source that cannot be read.
    """
    src = open_source(source, revision)
    host = hf_io if src.library == "transformers" else timm_io
    info: dict[str, Any] = {
        "source": src.name,
        "repo_id": src.repo_id,
        "folder": str(src.folder),
        "library": src.library,
        "architecture": _architecture(src.config, src.library),
        "weights": _weights(src.folder) if src.repo_id is None else None,
        "saved": src.saved.to_config() if src.saved else None,
        "saved_in_words": spec_in_words(src.saved) if src.saved else None,
    }
    try:
        model = host.build_empty(src.folder, src.config, src.config_path)
        adapter = find_adapter(model)
        sites = adapter.sites(model)
    except TypeError as error:
        return {**info, "supported": False, "reason": " ".join(str(error).split())}
    masked: tuple[tuple[int, ...], ...] = tuple(() for _ in sites)
    if src.saved is not None:
        apply_saved(model, src.saved, src.config_path)
        masked = get_spec(model).heads
    grid = adapter.grid(model)
    return {
        **info,
        "supported": True,
        "family": adapter.name,
        "grid": list(grid) if grid else None,
        "prefix_tokens": _prefix_tokens(model, adapter, sites),
        "layers": [
            {"layer": site.layer, "name": site.name, "num_heads": site.num_heads, "masked_heads": list(heads)}
            for site, heads in zip(sites, masked)
        ],
        "notes": list(adapter.notes(model)) if hasattr(adapter, "notes") else [],
    }


def _architecture(config: dict[str, Any], library: str) -> str:
    if library == "timm":
        return str(config.get("architecture"))
    names = config.get("architectures") or []
    model_type = config.get("model_type")
    return f"{names[0]} (model_type {model_type})" if names else f"model_type {model_type}"


def _weights(folder) -> str:
    found = [name for name in WEIGHTS if (folder / name).is_file()]
    if found:
        return found[0]
    pickles = [name for name in PICKLES if (folder / name).is_file()]
    return "missing" + (f" ({', '.join(pickles)} only: attnmask does not unpickle)" if pickles else "")


def _prefix_tokens(model: nn.Module, adapter: Any, sites: list) -> Optional[int]:
    """Tokens before the patch grid (class, distillation, registers): 0 for window attention."""
    count = getattr(model, "num_prefix_tokens", None)
    if isinstance(count, int):
        return count
    family = getattr(adapter, "family", None)  # transformers families describe it per config
    if family is not None and sites:
        return 0 if family.layout == "windows" else int(family.prefix_tokens(sites[0].module.config))
    if adapter.name.endswith("swin"):
        return 0
    return None
