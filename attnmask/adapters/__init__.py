"""Adapters: one module per host family, registered in a table.

An adapter knows one host library and nothing of kernels' insides. It finds the attention
layers of a model (its *sites*), swaps in the masked attention and undoes it. Adapter
modules import their host library at import time, so they are imported only once the host
library is already loaded (a model of that library exists), never by ``import attnmask``.
Adding a family is one new module plus one row in :data:`REGISTRY`.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Protocol, Sequence

from torch import nn

from ..spec import LayerPlan


@dataclass(frozen=True)
class Site:
    """One attention layer of a model.

    Attributes:
        name: Module name inside the model (``model.get_submodule(name)``).
        layer: Layer index, in the model's order of attention layers.
        num_heads: Number of heads.
        module: The attention module itself.
    """

    name: str
    layer: int
    num_heads: int
    module: nn.Module


class Adapter(Protocol):
    """What every adapter module exposes as ``ADAPTER``."""

    name: str

    def matches(self, model: nn.Module) -> bool:
        """Whether this adapter handles ``model`` (cheap; no side effects)."""

    def sites(self, model: nn.Module) -> list[Site]:
        """The attention layers to patch, in layer order; raises if the model cannot be patched."""

    def install(self, model: nn.Module, sites: Sequence[Site], plans: Sequence[LayerPlan]) -> None:
        """Patch ``sites`` with their ``plans`` (only layers with masked heads are given)."""

    def uninstall(self, model: nn.Module, names: Sequence[str]) -> None:
        """Restore the original modules named ``names`` and drop every trace of the patch."""

    def grid(self, model: nn.Module) -> tuple[int, int] | None:
        """The patch grid of the model's latest (or default) input size, for reports."""


@dataclass(frozen=True)
class AdapterEntry:
    """One row of the registry.

    Attributes:
        name: Family name, stored in :class:`~attnmask.MaskSpec` (e.g. ``"timm.vit"``).
        host: Top-level module of the host library (checked in ``sys.modules``).
        module: Adapter module that defines ``ADAPTER``.
        models: What a user would call the supported models.
    """

    name: str
    host: str
    module: str
    models: str


REGISTRY: tuple[AdapterEntry, ...] = (
    AdapterEntry(
        name="timm.vit",
        host="timm",
        module="attnmask.adapters.timm_vit",
        models="timm VisionTransformer family on timm.layers.Attention: ViT, DeiT, DeiT-III, "
        "distilled DeiT, register-token ViTs (e.g. DINOv2-reg), SigLIP-style ViTs without class token",
    ),
)


def supported_families() -> str:
    """Human-readable list of the supported families (for error messages)."""
    return "; ".join(f"{entry.name} ({entry.models})" for entry in REGISTRY)


def load(entry: AdapterEntry) -> Adapter:
    """Import an adapter module and return its ``ADAPTER``."""
    return importlib.import_module(entry.module).ADAPTER


def adapter_named(name: str) -> Adapter:
    """The adapter registered under ``name``."""
    for entry in REGISTRY:
        if entry.name == name:
            return load(entry)
    raise ValueError(f"no adapter named {name!r}: known adapters are {[e.name for e in REGISTRY]}")


def find_adapter(model: nn.Module) -> Adapter:
    """The adapter that handles ``model``.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module`` or no adapter handles it; the message
            lists the supported families.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model={type(model).__name__} is not accepted: expected a torch.nn.Module")
    for entry in REGISTRY:
        if entry.host in sys.modules:
            adapter = load(entry)
            if adapter.matches(model):
                return adapter
    raise TypeError(
        f"attnmask does not support {type(model).__module__}.{type(model).__qualname__}: no attention "
        f"layers of a supported family were found. Supported families: {supported_families()}"
    )
