"""Masked models as Hugging Face Hub folders: save, load, inspect, push.

- :func:`save_pretrained` writes a masked transformers or timm model in its host's Hub
  layout with the :class:`~attnmask.MaskSpec` under the ``attnmask`` key of ``config.json``
  and a model card; :func:`from_pretrained` loads such a folder (or any supported model,
  from a folder or the Hub) and puts the masks back.
- :mod:`.hooks` makes transformers' own ``from_pretrained`` do the same once attnmask is
  imported (a wrapt post-import hook, so ``import attnmask`` never imports transformers).
- :func:`inspect_source` and :func:`push_to_hub` serve ``attnmask inspect`` and
  ``attnmask convert --push-to-hub``.

Nothing here imports a host library or huggingface_hub at import time.
"""

from .api import from_pretrained, save_pretrained
from .push import push_to_hub
from .saved import KEY, SAVED_IMPLEMENTATION, SavedMasks
from .summary import inspect_source

__all__ = ["KEY", "SAVED_IMPLEMENTATION", "SavedMasks", "from_pretrained", "inspect_source", "push_to_hub", "save_pretrained"]
