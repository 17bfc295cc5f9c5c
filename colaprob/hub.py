"""Checkpoints named as on the Hugging Face Hub (``ORG/NAME``, e.g. ``ByteDance-Seed/Cola-DLM``).

A name is looked up in the local Hugging Face cache (``huggingface_hub.snapshot_download``
with ``local_files_only=True``; ``HF_HUB_CACHE`` / ``HF_HOME`` say where the cache is), so
nothing is downloaded unless asked: ``download=True`` (the CLI's ``--download``) fetches the
snapshot first -- only its JSON, safetensors and text files, never a pickle -- and then loads
it the same way. ``revision`` is a branch, tag or commit (default: ``main``).

Needs the optional extra ``colaprob[hf]`` (``huggingface_hub``).
"""

from __future__ import annotations

import re
from pathlib import Path

from colaprob.errors import ColaprobError

REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
SNAPSHOT_FILES = ["*.json", "*.safetensors", "*.md", "*.txt"]
"""What ``download`` fetches: the official layout needs only configs, weights and the tokenizer."""


def is_repo_id(name: str) -> bool:
    """Whether ``name`` has the shape ``ORG/NAME`` (a path that exists is a path, not a name)."""
    return bool(REPO_ID.fullmatch(str(name))) and not Path(name).expanduser().exists()


def resolve(repo_id: str, revision: str | None = None, *, download: bool = False) -> Path:
    """The local snapshot folder of ``repo_id`` at ``revision``, from the Hugging Face cache
    (fetched first when ``download``). A name missing from the cache is a ``ColaprobError``
    that names the command which fetches it."""
    if not REPO_ID.fullmatch(str(repo_id)):
        raise ColaprobError(f"{repo_id!r} is not a Hugging Face model name; give ORG/NAME or a checkpoint folder.")
    try:
        import huggingface_hub
        from huggingface_hub import constants
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise ColaprobError(
            f"loading {repo_id} from the Hugging Face cache needs huggingface_hub; install it with pip install 'colaprob[hf]'."
        ) from None
    at = f" at revision {revision}" if revision else ""
    if download:
        try:
            return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=SNAPSHOT_FILES))
        except (HfHubHTTPError, OSError, ValueError) as err:
            raise ColaprobError(f"could not download {repo_id}{at} from the Hugging Face Hub ({_first_line(err)}).") from None
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError):
        fetch = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
        raise ColaprobError(
            f"{repo_id}{at} is neither a folder nor in the local Hugging Face cache ({constants.HF_HUB_CACHE}); "
            f"fetch it with `{fetch}` or add --download to this command."
        ) from None


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]
