"""Put saved masks (and a user's overrides of them) on a freshly loaded model."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from ..api import apply
from ..spec import Heads
from .saved import SavedMasks, check_fits


def apply_saved(
    model: nn.Module,
    saved: Optional[SavedMasks],
    where: str,
    *,
    heads: Optional[Heads] = None,
    window: Any = None,
    prefix: Optional[str] = None,
    backend: Optional[str] = None,
    mode: Optional[str] = None,
) -> nn.Module:
    """Apply ``saved``'s masks to ``model``, each field replaced by an override that is not ``None``.

    Without saved masks, the overrides are :func:`attnmask.apply`'s arguments (its defaults
    for those not given); without either, ``model`` is returned unmasked.

    Args:
        model: The loaded model.
        saved: Masks from the folder's ``config.json``, or ``None``.
        where: The ``config.json`` they came from, for error messages.
        heads: Replaces the saved heads (any form :func:`attnmask.apply` accepts).
        window: Replaces the saved window.
        prefix: Replaces the saved prefix policy.
        backend: Replaces the saved backend.
        mode: Replaces the saved mask mode (``"hard"`` or ``"soft"``).

    Raises:
        ValueError: If the saved masks do not fit ``model`` (naming ``where``), or an override
            is not accepted (naming the argument).
    """
    overrides = dict(heads=heads, window=window, prefix=prefix, backend=backend, mode=mode)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if saved is None:
        return apply(model, **overrides) if overrides else model
    spec = saved.spec
    if heads is None:
        check_fits(spec, model, where)
    arguments = dict(heads=spec.heads_mapping(), window=spec.window, prefix=spec.prefix, backend=spec.backend, mode=spec.mode)
    arguments.update(overrides)
    return apply(model, **arguments)
