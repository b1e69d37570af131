"""Where real weights come from: a local directory or file, else the Hugging Face cache (downloaded first unless
`HF_HUB_OFFLINE=1`). Models and rewards resolve their checkpoints here, so a missing checkpoint reads the same
everywhere: one line naming the hub id and the command that downloads it — never a silent fallback."""

from __future__ import annotations

import os
from pathlib import Path

from .. import resolve_path


class MissingCheckpointError(FileNotFoundError):
    """Weights are not on disk (and the hub cannot supply them): the message names what to download."""


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")


def cache_dir() -> str | None:
    """HF_HUB_CACHE as set now (huggingface_hub reads it once, at import); None: the library's default."""
    return os.environ.get("HF_HUB_CACHE") or None


def looks_like_hub_id(path: str) -> bool:
    """`owner/name` (one slash, not a relative or absolute path)."""
    return path.count("/") == 1 and not path.startswith((".", "/", "~"))


def download_command(repo_id: str, filename: str | None = None) -> str:
    return f"huggingface-cli download {repo_id}" + (f" {filename}" if filename else "")


def resolve_dir(path: str, *, what: str, hint: str = "") -> Path:
    """A local directory for `path`: the directory itself, or a hub id's snapshot in the local HF cache.

    `what` names the thing in the error ("model 'sd15'"); `hint` is appended to it (e.g. the tiny counterpart)."""
    local = resolve_path(path)
    if local.is_dir():
        return local
    if looks_like_hub_id(path):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(path, local_files_only=offline(), cache_dir=cache_dir()))
        except Exception as e:  # noqa: BLE001 - any hub failure means the same thing here
            raise MissingCheckpointError(
                f"{what}: {path} is neither a local directory nor in the Hugging Face cache ({type(e).__name__}) — "
                f"download it with `{download_command(path)}`" + (f"; {hint}" if hint else "")) from None
    raise MissingCheckpointError(f"{what}: no checkpoint at {local}" + (f" — {hint}" if hint else ""))


def resolve_file(path: str, repo_id: str | None = None, filename: str | None = None, *, what: str,
                 hint: str = "") -> Path:
    """A local file: `path` if it is one (a file, or a directory holding `filename`), else `filename` of hub repo
    `repo_id` from the local HF cache (downloaded first unless offline)."""
    local = resolve_path(path) if path else None
    if local is not None and local.is_file():
        return local
    if local is not None and filename and (local / filename).is_file():
        return local / filename
    if repo_id and filename:
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(repo_id, filename, local_files_only=offline(), cache_dir=cache_dir()))
        except Exception as e:  # noqa: BLE001
            raise MissingCheckpointError(
                f"{what}: {filename} of {repo_id} is not on disk nor in the Hugging Face cache ({type(e).__name__}) "
                f"— download it with `{download_command(repo_id, filename)}`" + (f"; {hint}" if hint else "")
            ) from None
    raise MissingCheckpointError(f"{what}: no file at {local}" + (f" — {hint}" if hint else ""))
