"""``save_pretrained`` and ``from_pretrained``: masked models as Hugging Face / timm folders."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any, Optional, Sequence

from torch import nn

from ..adapters import find_adapter
from ..api import get_spec, unwrap
from ..spec import Heads, check_mode, check_prefix, normalize_window
from . import hf_io, timm_io
from .apply import apply_saved
from .card import public_name, render
from .folder import check_target, staged_folder
from .saved import KEY, SavedMasks, check_layer_names
from .source import Source, open_source

BASE_MODEL = "_attnmask_base_model"
"""Model attribute: where :func:`from_pretrained` loaded the weights from (for the model card)."""


def host_of(family: str) -> str:
    """``"transformers"`` or ``"timm"`` for an adapter family; raises for the others."""
    if family.startswith("hf."):
        return "transformers"
    if family.startswith("timm."):
        return "timm"
    raise TypeError(
        f"attnmask.save_pretrained saves Hugging Face transformers and timm models, not {family} models "
        "(they have no Hub folder format): save model.state_dict() and attnmask.get_spec(model).to_dict() instead"
    )


def unwrap_trained(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile`` and data-parallel wrappers (``DistributedDataParallel``,
    ``DataParallel``), in any order: what a training loop holds is not what the host library saves."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        inner = unwrap(model)
        if isinstance(inner, (DataParallel, DistributedDataParallel)):
            inner = inner.module
        if inner is model:
            return model
        model = inner


def check_source(src: Source, **overrides: Any) -> tuple[ModuleType, nn.Module]:
    """Check ``src`` from its ``config.json`` alone, before any weights are fetched.

    ``overrides`` (``heads``, ``window``, ``prefix``, ``backend``, ``mode``) replace the saved
    masks' fields, as in :func:`from_pretrained`: saved masks that do not fit are no error when the
    override replaces them.

    Returns:
        The host module (:mod:`.hf_io` or :mod:`.timm_io`) and the model built on the meta
        device, masked as saved.

    Raises:
        TypeError: The architecture is not supported (the message lists the supported families).
        ValueError: The saved masks do not fit the model.
    """
    host = hf_io if src.library == "transformers" else timm_io
    empty = host.build_empty(src.folder, src.config, src.config_path)
    if src.saved is not None or any(value is not None for value in overrides.values()):
        apply_saved(empty, src.saved, src.config_path, **overrides)
    else:
        find_adapter(empty).sites(empty)  # an architecture without patchable attention fails here
    return host, empty


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    overwrite: bool = False,
    auto_apply: bool = True,
    base_model: Optional[str] = None,
    repo_id: Optional[str] = None,
    model_args: Optional[dict[str, Any]] = None,
    include: Sequence[str | os.PathLike] = (),
) -> Path:
    """Save a masked model as a folder its host library loads, with the masks in ``config.json``.

    - Hugging Face transformers models: ``config.json`` + ``model.safetensors`` as
      ``model.save_pretrained`` writes them. Once attnmask is imported,
      ``transformers.AutoModel.from_pretrained(folder)`` (and every task class) returns the
      model masked.
    - timm models: timm's Hub layout (``config.json`` with ``architecture``, ``model_args``,
      ``pretrained_cfg``; ``model.safetensors``). Once attnmask is imported,
      ``timm.create_model("local-dir:FOLDER", pretrained=True)`` (or ``"hf-hub:ORG/NAME"``) returns
      the model masked; without attnmask, timm loads the weights unmasked.

    Both get the :class:`~attnmask.MaskSpec` under the ``attnmask`` key of ``config.json`` and
    a model card (``README.md``). The folder is written next to ``save_directory`` and renamed
    into place when complete: a failure leaves nothing behind.

    Args:
        model: A model patched by :func:`attnmask.apply` (or that model inside ``torch.compile``,
            ``DistributedDataParallel`` or ``DataParallel``: the model inside is saved).
        save_directory: The folder to write.
        overwrite: Replace ``save_directory`` if it exists (only a model folder, one with a
            ``config.json``, or an empty folder is replaced).
        auto_apply: ``True``: transformers' own ``from_pretrained`` (and timm's
            ``create_model("local-dir:...")``) re-applies the masks once attnmask is imported,
            and without attnmask installed transformers refuses the folder (its error names the
            package) rather than loading it unmasked (timm cannot refuse: it loads it
            unmasked). ``False``: the host library loads the unmasked base model anywhere;
            only :func:`from_pretrained` applies the masks.
        base_model: Where the weights came from, for the model card (default: what
            :func:`from_pretrained` or the host library recorded; a local path of those is saved
            by its folder name only, as the folder may be published).
        repo_id: Hub repository the folder is meant for: the model card's code uses it.
        model_args: timm only: the keyword arguments ``timm.create_model`` needs to rebuild
            ``model`` (e.g. ``dict(img_size=384)``). Default: those timm recorded (timm >= 1.0.31)
            or those of the folder the model was loaded from. The saved config is checked to
            rebuild ``model``'s shapes.
        include: Extra files copied into the folder (e.g. ``preprocessor_config.json``).

    Returns:
        The written folder.

    Raises:
        ValueError: ``model`` is not patched, or (timm) the config would not rebuild it.
        TypeError: ``model`` is not a transformers or timm model.
        FileExistsError: ``save_directory`` exists and ``overwrite`` is false.
    """
    model = unwrap_trained(model)
    spec = get_spec(model)
    if spec is None:
        raise ValueError(
            f"model={type(model).__name__} is not accepted: it is not patched. Call attnmask.apply(model, heads=..., "
            "window=...) first (to save it unmasked, use the host library's own save function)"
        )
    library = host_of(spec.family)
    if not isinstance(auto_apply, bool):
        raise TypeError(f"auto_apply={auto_apply!r} is not accepted: expected True or False")
    extra = [Path(p) for p in include]
    for path in extra:
        if not path.is_file():
            raise FileNotFoundError(f"include={str(path)!r} is not accepted: no such file")
    out = Path(save_directory)
    check_target(out, overwrite)
    host = hf_io if library == "transformers" else timm_io
    derived = model.__dict__.get(BASE_MODEL) or host.base_model(model)
    # A derived local path is saved by its folder name only (the folder may be published).
    base = base_model or (public_name(derived) if derived else None)
    from .. import __version__

    saved = SavedMasks(spec, auto_apply, base, __version__)
    with staged_folder(out, overwrite) as staging:
        if library == "transformers":
            hf_io.save(model, staging, saved)
            architecture = type(model).__name__
        else:
            timm_io.save(model, staging, saved, model_args)
            architecture = str(getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__)
        for path in extra:
            shutil.copyfile(path, staging / path.name)
        card = render(saved, library, architecture, repo_id or str(save_directory), base, on_hub=repo_id is not None)
        (staging / "README.md").write_text(card, encoding="utf-8")
    return out


def from_pretrained(
    source: str | os.PathLike,
    *,
    heads: Optional[Heads] = None,
    window: Any = None,
    prefix: Optional[str] = None,
    backend: Optional[str] = None,
    mode: Optional[str] = None,
    revision: Optional[str] = None,
    **kwargs: Any,
) -> nn.Module:
    """Load a transformers or timm model and put its saved masks back.

    Args:
        source: A local folder, a Hub repo id (``org/name``), ``hf-hub:org/name``,
            ``timm/<name>`` or a timm model name (its Hub weights); ``@revision`` may follow
            a Hub id. Folders written by :func:`save_pretrained` come back masked; others
            come back unmasked unless ``heads``/``window``/``prefix``/``mode`` are given.
        heads: Replaces the saved heads (any form :func:`attnmask.apply` accepts).
        window: Replaces the saved window.
        prefix: Replaces the saved prefix policy.
        backend: Replaces the saved backend.
        mode: Replaces the saved mask mode: ``"hard"`` (``-inf`` outside the window) or
            ``"soft"`` (0 outside the window, the paper's Eq. 2).
        revision: Hub revision (branch, tag or commit).
        **kwargs: Passed to the host's loader: the ``from_pretrained`` of the class named in
            ``config.json`` (e.g. ``dtype``, ``attn_implementation``) or
            ``timm.create_model`` (e.g. ``num_classes``).

    Returns:
        The model, masked as saved (or as the overrides say).

    Raises:
        FileNotFoundError: Unknown folder or repository, or no ``model.safetensors``
            (weights are read from safetensors only, never unpickled).
        ConnectionError: The Hub cannot be reached and the repository is not cached.
        ValueError: ``config.json`` or its ``attnmask`` key is not valid, the saved layer
            names are not the rebuilt model's, ``model.safetensors`` does not fit the model
            ``config.json`` builds (weights unused, missing or of another shape: loading is
            strict), or an override is not accepted.
        TypeError: The architecture is not supported.
    """
    if window is not None:
        normalize_window(window)
    if prefix is not None:
        check_prefix(prefix)
    if mode is not None:
        check_mode(mode)
    src = open_source(source, revision)
    host, empty = check_source(src, heads=heads, window=window, prefix=prefix, backend=backend, mode=mode)
    if src.saved is not None and heads is None:
        check_layer_names(src.saved.spec, empty, src.config_path)
    folder = src.fetch_weights()
    model = host.load(folder, src.config, **kwargs)
    apply_saved(model, src.saved, src.config_path, heads=heads, window=window, prefix=prefix, backend=backend, mode=mode)
    model.__dict__[BASE_MODEL] = src.base_model
    config = getattr(model, "config", None)
    if config is not None and src.library == "transformers":
        config.__dict__.pop(KEY, None)  # get_spec(model) says what is masked; a stale copy would mislead
        if src.repo_id:
            config._name_or_path = src.repo_id
    return model
