"""Upload a saved folder to the Hugging Face Hub with huggingface_hub's usual authentication."""

from __future__ import annotations

import os
from pathlib import Path

from .source import REPO_ID


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool = False, commit_message: str = "") -> str:
    """Create ``repo_id`` if needed and upload ``folder`` to it; return the repository's URL.

    Authentication is huggingface_hub's: ``hf auth login`` or the ``HF_TOKEN`` variable.

    Raises:
        ValueError: ``repo_id`` is not ``org/name``.
        PermissionError: Not logged in, or no write access to ``repo_id``.
        ConnectionError: The Hub cannot be reached.
        RuntimeError: Any other failure of the upload.
    """
    if not isinstance(repo_id, str) or not REPO_ID.match(repo_id):
        raise ValueError(f"push_to_hub={repo_id!r} is not accepted: expected a Hub repo id such as 'your-name/model-name'")
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hub_errors

    message = commit_message or "Upload attnmask-converted model"
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(Path(folder)), repo_type="model", commit_message=message)
    except (hub_errors.LocalTokenNotFoundError,) as error:
        raise PermissionError(f"push to {repo_id!r} failed: not logged in ({_line(error)}): run `hf auth login` or set HF_TOKEN") from None
    except hub_errors.OfflineModeIsEnabled:
        raise ConnectionError(f"push to {repo_id!r} failed: HF_HUB_OFFLINE is set; unset it to upload") from None
    except hub_errors.HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status in (401, 403):
            raise PermissionError(
                f"push to {repo_id!r} failed: HTTP {status}, not logged in or no write access: run `hf auth login` "
                "with a write token or set HF_TOKEN"
            ) from None
        raise RuntimeError(f"push to {repo_id!r} failed: {_line(error)}") from None
    except OSError as error:  # connection errors
        raise ConnectionError(f"push to {repo_id!r} failed: cannot reach the Hugging Face Hub ({_line(error)})") from None
    return f"https://huggingface.co/{repo_id}"


def _line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
