"""Where a model comes from: a local folder or a Hugging Face Hub repository.

:func:`open_source` turns what a user typed (``./folder``, ``org/name``, ``hf-hub:org/name``,
``timm/<name>``, a timm model name, optionally ``@revision``) into a local folder holding
``config.json``, downloading through huggingface_hub's cache when needed, and says which
library the folder is for. Weights are fetched separately (:meth:`Source.fetch_weights`),
so a source can be inspected and checked before any large download.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .card import public_name
from .saved import KEY, REPO_ID, SavedMasks

ACCEPTED = "a local folder, a Hub repo id (org/name), 'hf-hub:org/name', 'timm/<name>' or a timm model name"

WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
"""Weight files attnmask reads (safetensors only: it never unpickles)."""
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pth", "pytorch_model.pth", "model.ckpt")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
"""Files a converted folder carries over from its source (image preprocessing)."""
_WEIGHT_PATTERNS = ["model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors", *PROCESSOR_FILES]


@dataclass
class Source:
    """A resolved model source.

    Attributes:
        name: What the user gave.
        folder: Local folder holding ``config.json`` (a Hub cache snapshot for Hub sources).
        repo_id: Hub repository, or ``None`` for a local folder.
        revision: Hub revision asked for, if any.
        config: ``config.json``, parsed.
        library: ``"transformers"`` or ``"timm"``.
        saved: The masks saved in ``config.json`` (validated), or ``None``.
    """

    name: str
    folder: Path
    repo_id: Optional[str]
    revision: Optional[str]
    config: dict[str, Any] = field(repr=False)
    library: str
    saved: Optional[SavedMasks]

    @property
    def config_path(self) -> str:
        """How error messages name this source's ``config.json``."""
        return f"{self.repo_id}/config.json (Hub)" if self.repo_id else str(self.folder / "config.json")

    @property
    def base_model(self) -> str:
        """What the model card and a saved config call the origin: the saved base model, else
        the repo id, else the folder by its name (not an absolute local path: folders are
        published)."""
        if self.saved is not None and self.saved.base_model:
            return self.saved.base_model  # as saved (a local path was saved by its folder name)
        return self.repo_id or public_name(str(self.folder))

    def fetch_weights(self) -> Path:
        """Download (Hub) or find (folder) the safetensors weights; return the folder holding them.

        Raises:
            FileNotFoundError: If there is no ``model.safetensors`` (naming pickle files found
                instead: attnmask never unpickles).
        """
        if self.repo_id is not None:
            self.folder = _download(self.repo_id, self.revision, _WEIGHT_PATTERNS + ["config.json"])
        present = [name for name in WEIGHTS if (self.folder / name).is_file()]
        if not present:
            where = f"Hub repository {self.repo_id!r}" if self.repo_id else f"folder {self.folder}"
            pickles = [name for name in PICKLES if (self.folder / name).is_file()]
            found = f"; it has {', '.join(pickles)}, which attnmask does not load: it never unpickles" if pickles else ""
            raise FileNotFoundError(
                f"missing weights file: {where} has no model.safetensors (or model.safetensors.index.json){found}. "
                "attnmask reads safetensors weights only"
            )
        return self.folder

    def processor_files(self) -> list[Path]:
        """Preprocessing configs of the source, copied into a converted folder."""
        return [self.folder / name for name in PROCESSOR_FILES if (self.folder / name).is_file()]


def open_source(source: str | os.PathLike, revision: Optional[str] = None) -> Source:
    """Resolve ``source`` to a local folder with ``config.json`` (weights not fetched yet).

    Args:
        source: A local folder (also as ``local-dir:PATH``), a Hub repo id ``org/name``,
            ``hf-hub:org/name``, ``timm/<name>``, or a timm model name (its Hub weights);
            Hub ids may end in ``@revision``.
        revision: Hub revision (branch, tag or commit); overrides an ``@revision`` suffix.

    Raises:
        FileNotFoundError: Unknown folder, unknown repository, or no ``config.json``.
        ConnectionError: The Hub cannot be reached (offline) and the repository is not cached.
        ValueError: ``config.json`` is not valid JSON, is neither a transformers nor a timm
            config, or its ``attnmask`` key is not valid.
    """
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source={source!r} is not accepted: expected {ACCEPTED} (a str or os.PathLike)")
    name = os.fspath(source)
    if not isinstance(name, str) or not name:
        raise ValueError(f"source={source!r} is not accepted: expected {ACCEPTED}")
    folder, repo_id, revision = _locate(name, revision)
    if repo_id is not None:
        try:
            folder = _download(repo_id, revision, ["config.json"])
        except (FileNotFoundError, ConnectionError) as error:
            if REPO_ID.match(name):  # "org/name" may also have been meant as a relative path
                raise type(error)(f"{error}; there is no local folder {name!r} either") from None
            raise
    config_file = folder / "config.json"
    where = f"{repo_id}/config.json (Hub)" if repo_id else str(config_file)
    if not config_file.is_file():
        what = f"Hub repository {repo_id!r}" if repo_id else f"folder {folder}"
        raise FileNotFoundError(f"{what} has no config.json: it is not a transformers or timm model ({name!r})")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{where} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{where} is not valid: expected a JSON object, got {type(config).__name__}")
    library = library_of(config, where)
    saved = SavedMasks.from_config(config[KEY], where) if KEY in config else None
    return Source(name, folder, repo_id, revision, config, library, saved)


def library_of(config: dict[str, Any], where: str) -> str:
    """``"transformers"`` for a config with ``model_type``, ``"timm"`` for one with ``architecture``."""
    if isinstance(config.get("model_type"), str):
        return "transformers"
    if isinstance(config.get("architecture"), str):
        return "timm"
    raise ValueError(
        f"{where} is neither a transformers config (no 'model_type') nor a timm config (no 'architecture'): "
        "attnmask converts Hugging Face transformers and timm models"
    )


def _locate(name: str, revision: Optional[str]) -> tuple[Path, Optional[str], Optional[str]]:
    """``(folder, repo_id, revision)`` for what the user typed; exactly one of folder/repo is meaningful."""
    if name.startswith("local-dir:"):
        path = Path(name[len("local-dir:"):]).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"source={name!r} is not accepted: no such folder {path}")
        return path, None, None
    path = Path(name).expanduser()
    if path.is_dir():
        return path, None, None
    hub = name[len("hf-hub:"):] if name.startswith("hf-hub:") else name
    hub, _, suffix = hub.partition("@")
    revision = revision or suffix or None
    if REPO_ID.match(hub):
        return Path(), hub, revision
    if path.exists():
        raise FileNotFoundError(f"source={name!r} is not accepted: it is a file, expected a model folder")
    if "/" not in hub and os.sep not in hub and not name.startswith("hf-hub:"):
        repo = _timm_hub_id(hub)
        if repo is not None:
            return Path(), repo, revision
    raise FileNotFoundError(
        f"source={name!r} is not accepted: there is no such folder, and it is not a Hub repo id (org/name), "
        "'hf-hub:org/name', 'timm/<name>' or a timm model name"
    )


def _timm_hub_id(name: str) -> Optional[str]:
    """The Hub repository of a timm model name (``vit_tiny_patch16_224.augreg_in21k``), if timm knows one."""
    try:
        import timm.models
    except ImportError:
        return None
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # unknown names raise different errors across timm releases
        return None
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    return hub_id if isinstance(hub_id, str) and REPO_ID.match(hub_id.split("@")[0]) else None


def _download(repo_id: str, revision: Optional[str], patterns: list[str]) -> Path:
    """``snapshot_download`` of ``patterns`` (progress bars are huggingface_hub's), errors in words."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub import errors as hub_errors
    except ImportError:
        raise ImportError(
            f"loading {repo_id!r} from the Hugging Face Hub needs huggingface_hub: pip install huggingface_hub "
            "(it comes with transformers and timm), or pass a local folder"
        ) from None
    where = repo_id + (f"@{revision}" if revision else "")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except hub_errors.RepositoryNotFoundError:
        raise FileNotFoundError(
            f"unknown repository: {where!r} is not a model on the Hugging Face Hub (or it is private and you are "
            "not logged in: run `hf auth login` or set HF_TOKEN)"
        ) from None
    except hub_errors.RevisionNotFoundError:
        raise FileNotFoundError(f"unknown revision: {repo_id!r} has no revision {revision!r} on the Hugging Face Hub") from None
    except hub_errors.GatedRepoError:
        raise PermissionError(f"{where!r} is gated on the Hugging Face Hub: accept its terms on the Hub and log in") from None
    except hub_errors.LocalEntryNotFoundError as error:
        offline = _offline()
        why = "HF_HUB_OFFLINE is set" if offline else f"no network: {_first_line(error).removeprefix('Got: ')}"
        raise ConnectionError(
            f"cannot reach the Hugging Face Hub for {where!r} ({why}) and it is not in the local cache "
            f"({_cache_dir()}): connect and retry, download it where you have a network (`hf download {repo_id}`) "
            "and copy the cache, or pass a local folder"
        ) from None
    except hub_errors.HFValidationError as error:
        raise ValueError(f"source={repo_id!r} is not accepted: {_first_line(error)}") from None


def _offline() -> bool:
    """Whether huggingface_hub is in offline mode (``HF_HUB_OFFLINE=1``)."""
    try:
        from huggingface_hub import constants

        return bool(constants.is_offline_mode())
    except (ImportError, AttributeError):
        return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except (ImportError, AttributeError):
        return "the huggingface_hub cache"


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
