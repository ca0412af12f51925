"""Model ids of the Hugging Face hub ("Qwen/Qwen3-0.6B"), resolved to a local snapshot
through huggingface_hub's cache ($HF_HOME, $HF_HUB_CACHE), as vLLM and transformers do."""

from __future__ import annotations

import os
from pathlib import Path

_OFFLINE = ("1", "true", "yes", "on")


def looks_like_hub_id(name: str) -> bool:
    """"org/name" (or a bare "name"): no path separators beyond the one slash, no suffix of
    a file, nothing that exists on disk."""
    if not name or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return False
    return not name.endswith((".bin", ".gguf", ".safetensors", ".json"))


def hub_cache_dir() -> Path:
    """The hub cache as huggingface_hub would pick it now (read at call time, so a test or
    a user who sets HF_HOME after start-up is obeyed)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface")
    return Path(home) / "hub"


def resolve_hub_id(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot folder of `repo_id` at `revision` (a branch, tag or commit;
    default main). Cached snapshots are used as they are; otherwise the files are downloaded
    unless the hub is offline (HF_HUB_OFFLINE), and a missing model is a FileNotFoundError
    that says how to get it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                      local_files_only=True))
    except HFValidationError as e:
        raise ValueError(f"{repo_id!r} is not a valid Hugging Face model id: {e}") from None
    except Exception as cached_error:  # not in the cache (LocalEntryNotFoundError, ...)
        if os.environ.get("HF_HUB_OFFLINE", "").lower() not in _OFFLINE:
            try:
                return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache))
            except Exception:  # no network, no such repo, gated: say what to do instead
                pass
        at = f" at revision {revision!r}" if revision else ""
        raise FileNotFoundError(
            f"model {repo_id!r}{at} is not in the Hugging Face cache ({cache}) and could not "
            f"be downloaded: download it with `huggingface-cli download {repo_id}` on a "
            "machine with access, or pass a local path") from cached_error
