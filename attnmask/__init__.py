"""attnmask: locality-masked attention heads (MaiT) for existing PyTorch vision transformers.

``attnmask.apply(model, heads=..., window=7)`` makes chosen attention heads local: each
patch token attends only to its ``k x k`` neighbourhood while prefix tokens stay global.
``attnmask.remove(model)`` undoes it. Host libraries (timm, ...) are imported lazily, only
by the adapter of a model that comes from them. ``attnmask.save_pretrained`` and
``attnmask.from_pretrained`` save and load masked models as Hub folders; once attnmask is
imported, transformers' own ``from_pretrained`` and timm's ``create_model("local-dir:...")``
load such folders masked too (post-import hooks, see :mod:`attnmask.hub.hooks`). The paper's tools: head schedules
(``heads="mait"``, :mod:`attnmask.schedules`), ``mode="soft"`` (its Eq. 2),
``attnmask.locality_scores`` / ``attnmask.suggest_heads`` (the Attention Locality Score and
its search rule), ``import attnmask.models`` (MaiT models in timm's registry) and
:mod:`attnmask.plot` (pictures; needs matplotlib).
"""

from . import schedules
from .adapters import supported
from .api import apply, describe, get_spec, inspect, is_patched, mask_cache, remove
from .hub import from_pretrained, save_pretrained
from .hub.hooks import register as _register_hub_hooks
from .locality import locality_scores, suggest_heads
from .masks import LocalMask, MaskCache, local_window
from .report import InspectReport, MaskReport
from .spec import MaskSpec

__version__ = "0.1.0"

_register_hub_hooks()

__all__ = [
    "InspectReport",
    "LocalMask",
    "MaskCache",
    "MaskReport",
    "MaskSpec",
    "__version__",
    "apply",
    "describe",
    "from_pretrained",
    "get_spec",
    "inspect",
    "is_patched",
    "local_window",
    "locality_scores",
    "mask_cache",
    "remove",
    "save_pretrained",
    "schedules",
    "suggest_heads",
    "supported",
]
