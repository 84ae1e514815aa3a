"""Make transformers' own ``from_pretrained`` load attnmask folders masked (and, through
:mod:`.timm_hook`, timm's ``create_model``).

``import attnmask`` registers :func:`on_transformers` as a wrapt post-import hook for
``transformers.modeling_utils``: it runs when transformers' modeling code is imported, or at
once if it already was, so import order does not matter and ``import attnmask`` itself never
imports transformers. The hook

1. registers attnmask's attention function (importing :mod:`attnmask.adapters.hf`, which
   registers it) under
   ``"attnmask"`` and under :data:`~attnmask.hub.saved.SAVED_IMPLEMENTATION`, the name a saved
   folder's ``config.json`` selects, so transformers accepts that folder's config;
2. wraps ``PreTrainedModel.from_pretrained`` (every model class and ``AutoModel*`` go through
   it): when the loaded config carries an ``attnmask`` key with ``auto_apply``, the saved
   masks are applied to the model before it is returned.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from typing import Any, Iterator

from torch import nn

_DISABLED = contextvars.ContextVar("attnmask_hub_applying_disabled", default=False)
_HOOKED = "_attnmask_from_pretrained_hooked"


@contextlib.contextmanager
def applying_disabled() -> Iterator[None]:
    """Inside, ``from_pretrained`` and ``timm.create_model`` do not apply saved masks (attnmask's
    own loader applies them)."""
    token = _DISABLED.set(True)
    try:
        yield
    finally:
        _DISABLED.reset(token)


def register() -> None:
    """Register :func:`on_transformers` for ``transformers.modeling_utils`` and
    :func:`.timm_hook.on_timm` for ``timm`` (``import attnmask`` calls it)."""
    import wrapt

    from . import timm_hook

    wrapt.register_post_import_hook(on_transformers, "transformers.modeling_utils")
    timm_hook.register()


def on_transformers(modeling_utils: Any) -> None:
    """The post-import hook. Never raises: a failure must not break ``import transformers``."""
    try:
        _install(modeling_utils)
    except Exception as error:  # e.g. an untested transformers release
        warnings.warn(
            f"attnmask could not hook into transformers ({type(error).__name__}: {error}); folders saved by "
            "attnmask.save_pretrained load masked with attnmask.from_pretrained only",
            RuntimeWarning,
            stacklevel=2,
        )


def _install(modeling_utils: Any) -> None:
    import wrapt

    import importlib

    # Importing the adapter registers attnmask's attention function under "attnmask" and under
    # SAVED_IMPLEMENTATION. When transformers is first imported *from* that module, this hook
    # runs while it is half-imported: the import returns it as is and it registers both names
    # itself once its function is defined.
    importlib.import_module("attnmask.adapters.hf")
    if not getattr(modeling_utils, _HOOKED, False):
        wrapt.wrap_function_wrapper(modeling_utils, "PreTrainedModel.from_pretrained", _from_pretrained)
        setattr(modeling_utils, _HOOKED, True)


def _from_pretrained(wrapped, cls, args, kwargs):
    """Wrapper of ``PreTrainedModel.from_pretrained``: apply the saved masks, if the folder has any."""
    result = wrapped(*args, **kwargs)
    if _DISABLED.get():
        return result
    model = result[0] if isinstance(result, tuple) else result
    data = getattr(getattr(model, "config", None), "attnmask", None)
    if data is None:
        return result
    from .saved import SavedMasks
    from .apply import apply_saved

    source = args[0] if args else kwargs.get("pretrained_model_name_or_path", "the folder")
    saved = SavedMasks.from_config(data, f"{source}/config.json")
    if saved.auto_apply:
        reset_implementation(model)
        apply_saved(model, saved, f"{source}/config.json")
        model.config.__dict__.pop("attnmask", None)  # get_spec(model) says what is masked
    return result


def reset_implementation(model: nn.Module) -> None:
    """Replace the saved folder's attention implementation by transformers' default.

    The config of a saved folder selects :data:`~attnmask.hub.saved.SAVED_IMPLEMENTATION`; once
    loaded, the model should run its usual implementation (``sdpa``, else ``eager``) in its
    unmasked layers, which :func:`attnmask.apply` then records as the one to fall back to.
    """
    from .saved import SAVED_IMPLEMENTATION

    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) in (SAVED_IMPLEMENTATION, "attnmask"):
        model.set_attn_implementation("sdpa" if getattr(model, "_supports_sdpa", False) else "eager")
