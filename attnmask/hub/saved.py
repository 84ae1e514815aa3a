"""The ``attnmask`` key of a saved folder's ``config.json``: a MaskSpec plus how to load it.

A folder written by :func:`attnmask.save_pretrained` stores everything needed to put the
masks back under one top-level key, ``"attnmask"``, of its ``config.json`` (the config of
transformers or timm, otherwise unchanged). The value is :meth:`MaskSpec.to_dict` with a
few more fields:

- ``auto_apply``: whether ``transformers.AutoModel.from_pretrained`` (timm folders:
  ``timm.create_model("local-dir:...")``) re-applies the masks once attnmask is imported;
- ``base_model``: the model the weights came from (for the model card);
- ``attnmask_version``: the attnmask release that wrote the folder.

Files may be edited by hand, so reading validates every field and names the file, the key
and what would be accepted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from torch import nn

from ..spec import MaskSpec

KEY = "attnmask"
"""Top-level ``config.json`` key holding the saved masks."""

SAVED_IMPLEMENTATION = "attnmask (pip install attnmask, then import attnmask)"
"""``attn_implementation`` written to a Hugging Face folder's ``config.json``.

transformers validates this name when it builds the model. attnmask registers the masked
attention function under it as soon as transformers is imported after ``import attnmask``
(see :mod:`attnmask.hub.hooks`); without attnmask transformers refuses the folder with
``Specified `attn_implementation="attnmask (pip install attnmask, then import attnmask)"`
is not supported``, which is the only place its error message lets a folder say what to
install. It contains no ``/`` (transformers would take it for a Hub kernel repository).
"""

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*$")
"""What a Hugging Face Hub repo id (``org/name``) looks like."""

SPEC_KEYS = ("version", "family", "window", "prefix", "backend", "mode", "layers", "num_heads", "heads")
EXTRA_KEYS = ("auto_apply", "base_model", "attnmask_version")


@dataclass(frozen=True)
class SavedMasks:
    """What the ``attnmask`` key of a saved ``config.json`` holds.

    Attributes:
        spec: The masks (their mode included).
        auto_apply: Whether transformers' ``from_pretrained`` (timm's ``create_model``) re-applies the masks.
        base_model: The model the weights came from (repo id or path), if known.
        attnmask_version: Release that wrote the folder.
    """

    spec: MaskSpec
    auto_apply: bool = True
    base_model: Optional[str] = None
    attnmask_version: Optional[str] = None

    @property
    def mode(self) -> str:
        """``"hard"`` or ``"soft"`` (the spec's :attr:`~attnmask.MaskSpec.mode`)."""
        return self.spec.mode

    def to_config(self) -> dict[str, Any]:
        """The value to store under :data:`KEY` (plain JSON)."""
        data: dict[str, Any] = {**self.spec.to_dict(), "auto_apply": self.auto_apply}
        if self.base_model:
            data["base_model"] = self.base_model
        if self.attnmask_version:
            data["attnmask_version"] = self.attnmask_version
        return data

    @classmethod
    def from_config(cls, data: Any, where: str) -> "SavedMasks":
        """Validate the value of :data:`KEY`.

        Args:
            data: What ``config.json`` holds under :data:`KEY`.
            where: The file it came from, for error messages.

        Raises:
            ValueError: Naming ``where``, the field, its value and what is accepted.
        """
        prefix = f"{where}: the {KEY!r} key"
        if not isinstance(data, Mapping):
            raise ValueError(f"{prefix} must be a JSON object (a MaskSpec), got {type(data).__name__}: {data!r}")
        unknown = sorted(set(data) - set(SPEC_KEYS) - set(EXTRA_KEYS))
        if unknown:
            raise ValueError(f"{prefix} has unknown field(s) {unknown}; accepted fields: {', '.join(SPEC_KEYS + EXTRA_KEYS)}")
        auto_apply = data.get("auto_apply", True)
        if not isinstance(auto_apply, bool):
            raise ValueError(f"{prefix} has auto_apply={auto_apply!r}, which is not accepted: expected true or false")
        for name in ("base_model", "attnmask_version"):
            if data.get(name) is not None and not isinstance(data[name], str):
                raise ValueError(f"{prefix} has {name}={data[name]!r}, which is not accepted: expected a string")
        try:
            spec = MaskSpec.from_dict({k: v for k, v in data.items() if k in SPEC_KEYS})
        except (TypeError, ValueError, KeyError) as error:
            raise ValueError(f"{prefix} is not a valid MaskSpec: {error}") from None
        return cls(spec, auto_apply, data.get("base_model"), data.get("attnmask_version"))


def check_fits(spec: MaskSpec, model: nn.Module, where: str) -> None:
    """Raise if ``spec`` does not describe ``model``'s attention layers (family, layers, heads).

    Layer names are not compared: the same folder loads as a task model (``vit.encoder...``)
    or as the bare backbone (``encoder...``).
    """
    from ..adapters import find_adapter

    adapter = find_adapter(model)
    if adapter.name != spec.family:
        raise ValueError(
            f"{where}: the {KEY!r} key has family={spec.family!r}, but the model is handled by {adapter.name!r}: "
            "the saved masks belong to another model"
        )
    num_heads = tuple(site.num_heads for site in adapter.sites(model))
    if num_heads != spec.num_heads:
        raise ValueError(
            f"{where}: the {KEY!r} key has num_heads={list(spec.num_heads)} ({spec.num_layers} layers), but the model "
            f"has {list(num_heads)} ({len(num_heads)} attention layers): the saved masks belong to another model"
        )


def check_layer_names(spec: MaskSpec, model: nn.Module, where: str) -> None:
    """Raise unless the attention layers the masks were saved for (``spec.layers``) are the
    rebuilt model's, name for name (a folder loaded as the class it was saved from).

    Raises:
        ValueError: Naming ``where`` and the first saved layer names the model lacks.
    """
    from ..adapters import find_adapter

    names = tuple(site.name for site in find_adapter(model).sites(model))
    if names != tuple(spec.layers):
        absent = [name for name in spec.layers if name not in names]
        shown = absent[:3] or [f"{a} (in place of {b})" for a, b in zip(spec.layers, names) if a != b][:3]
        raise ValueError(
            f"{where}: the {KEY!r} key has layers={list(spec.layers)[:3]}{'...' if len(spec.layers) > 3 else ''}, but the "
            f"rebuilt model's attention layers are {list(names)[:3]}{'...' if len(names) > 3 else ''}: saved layer(s) "
            f"{', '.join(shown)} do not exist in it. The folder was edited or the masks belong to another model"
        )
