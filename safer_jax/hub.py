"""Model locations: a local folder, or a hub id resolved once to its local snapshot.

No JAX here, so the tokenizer loader (`data/tokenize.py`) and the model loader share it.
Offline (`HF_HUB_OFFLINE=1`) a hub id resolves from the local HF cache (`HF_HUB_CACHE`).
"""

from __future__ import annotations

import os
from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint file or tensor that cannot be loaded; names the file and tensor."""


def resolve_path(path: str | os.PathLike, gguf_file: str | None = None) -> Path:
    """A local folder as is; a bucket URL from its local copy (downloaded once per fingerprint);
    otherwise a hub id, fetched (or read from the cache offline)."""
    from safer_jax.paths import is_remote, local_copy

    if is_remote(path):
        return local_copy(path)
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{p}: expected a model folder, got a file (pass the folder, and gguf_file=)")
    if str(path).count("/") != 1 or str(path).startswith((".", "/", "~")):
        raise CheckpointError(f"{path}: no such folder, and not a hub id of the form owner/name")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    if gguf_file:
        patterns = ["*.json", "tokenizer*", gguf_file]
    try:
        return Path(snapshot_download(str(path), allow_patterns=patterns))
    except Exception as e:  # offline without a cache, unknown repo, ...
        raise CheckpointError(f"{path}: not a local folder and the hub download failed: {e}") from e
