"""Models named by a Hugging Face Hub id: downloaded once into the hub cache, then used as a directory.

Before any download lowbit checks, within a few seconds, that the hub can be reached at all: a
mistyped local path that happens to look like ``org/name`` then fails at once with "no such
directory" instead of after the hub client's retries.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger(__name__)

#: what lowbit reads from a model repository (weights in safetensors, configs, tokenizer files)
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached (offline mode, no network), or ``None`` when it may be."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # behind a proxy a direct connection says nothing; let the hub client try
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"{host} cannot be reached ({exc.strerror or exc})"
    return None


def download_model(repo_id: str) -> Path:
    """The local directory of hub model ``repo_id`` (downloaded into the hub cache if needed)."""
    from huggingface_hub import snapshot_download

    from .loading import ModelLoadError

    try:
        path = snapshot_download(repo_id, allow_patterns=MODEL_FILES)
    except Exception as exc:  # the hub client raises many types (not found, gated, network)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"could not download {repo_id!r} from the Hugging Face Hub: {first}") from None
    log.info("hub model %s is in %s", repo_id, path)
    return Path(path)
