"""attnmask: locality-masked attention heads (MaiT) for existing PyTorch vision transformers.

``attnmask.apply(model, heads=..., window=7)`` makes chosen attention heads local: each
patch token attends only to its ``k x k`` neighbourhood while prefix tokens stay global.
``attnmask.remove(model)`` undoes it. Host libraries (timm, ...) are imported lazily, only
by the adapter of a model that comes from them.
"""

from .adapters import supported
from .api import apply, describe, get_spec, is_patched, remove
from .masks import LocalMask, local_window
from .report import MaskReport
from .spec import MaskSpec

__version__ = "0.1.0"

__all__ = [
    "LocalMask",
    "MaskReport",
    "MaskSpec",
    "__version__",
    "apply",
    "describe",
    "get_spec",
    "is_patched",
    "local_window",
    "remove",
    "supported",
]
