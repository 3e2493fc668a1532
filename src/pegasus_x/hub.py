"""Folders named by a Hugging Face Hub id: which names are ids, and downloading one.

``huggingface_hub`` is imported only when a download starts, so reading local folders never loads it (nor torch:
this module imports nothing heavy).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .errors import PegasusXError

# "owner/name" as the Hub spells repositories: letters, digits, "_", "-" and "." (not leading the owner, so a
# relative path such as ./run or ../run is never taken for an id).
_HUB_ID = re.compile(r"[\w-][\w.-]*/[\w.-]+")
# The keyword arguments from_pretrained passes on to snapshot_download.
HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token", "force_download")


def is_hub_id(name: str) -> bool:
    """Whether ``name`` (a path that does not exist here) reads as a Hub repository id such as
    ``google/pegasus-x-base``."""
    return _HUB_ID.fullmatch(name) is not None and ".." not in name


def download(repo_id: str, patterns: list[str], *, what: str, how: str, error: type[PegasusXError],
             **hub_kwargs: Any) -> Path:
    """The local snapshot folder of the files of ``repo_id`` that match ``patterns``, downloaded when not cached.

    Args:
        repo_id: a Hub id (see :func:`is_hub_id`).
        patterns: file name patterns to fetch (``allow_patterns``).
        what: what is downloaded, for messages (``"the checkpoint"``).
        how: how to get the files without the Hub, for messages.
        error: the error class to raise.
        **hub_kwargs: ``revision``, ``cache_dir``, ``local_files_only``, ``token``, … of ``snapshot_download``.
    Raises:
        error: ``huggingface_hub`` is not installed, or the download failed (network, authentication, no such
            repository), with the reason and ``how``.
    """
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise error(f"{repo_id!r} is not a local folder and huggingface_hub is not installed "
                    f"(pip install huggingface_hub); or {how}") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, **hub_kwargs))
    except Exception as exc:  # network, auth and missing-repo errors share no base class
        raise error(f"could not download {repo_id!r} ({what}) from the Hugging Face Hub ({type(exc).__name__}: "
                    f"{exc}); check the id and your network, or {how}") from None
