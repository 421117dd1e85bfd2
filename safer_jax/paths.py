"""One path layer for whatever a run reads or writes: `etils.epath`, so run folders,
checkpoints, reference caches, data files and evaluation outputs may be local paths or
bucket URLs (`gs://`, `s3://`, ...; epath reaches them through fsspec, e.g. gcsfs).

Why not pathlib: it collapses `gs://b/x` to `gs:/b/x`, and every writer then fills a local
folder named `gs:`. Object stores also differ from disks in two ways this module hides:
there is no append and no folder rename, so writers that need them (HF exports, the
tokenizer, TensorBoard) fill a local folder and upload it (`staged_dir`); and libraries
that only read local files (transformers, safetensors) read a remote model folder from a
local copy, downloaded once per fingerprint of its objects (`local_copy`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

from etils import epath

PathLike = str | os.PathLike
# remote folders downloaded by this process (tests check that a rerun downloads nothing)
DOWNLOADS = {"folders": 0}
# object fields that change with the content, best first (GCS, S3, generic fsspec)
_CONTENT_KEYS = ("md5Hash", "crc32c", "ETag", "etag", "checksum", "generation", "mtime", "updated", "LastModified")


class PathError(ValueError):
    """A path that cannot be used as asked (unwritable, missing bucket); the message names the URL."""


def is_remote(path: PathLike) -> bool:
    """True for URLs (`gs://...`), False for local paths."""
    return "://" in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
    """`path` as an epath Path (a bucket URL keeps its `//`)."""
    return epath.Path(os.fspath(path) if is_remote(path) else os.path.expanduser(os.fspath(path)))


def cache_root() -> pathlib.Path:
    """Local cache of safer-jax (models downloaded from buckets, reference log-probs): `$SAFER_JAX_CACHE`."""
    root = os.environ.get("SAFER_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "safer-jax")
    return pathlib.Path(root)


def _bucket_hint(path: epath.Path) -> str:
    if not is_remote(path):
        return ""
    scheme, rest = os.fspath(path).split("://", 1)
    return f" (does the bucket {scheme}://{rest.split('/', 1)[0]} exist, and may this machine write to it?)"


def check_writable(path: PathLike, what: str = "run_dir") -> epath.Path:
    """Create `path` (a folder) and write then delete a probe object in it, or raise `PathError`
    naming the URL: a missing bucket or a read-only folder fails before any work, not at the
    first checkpoint."""
    path = as_path(path)
    probe = path / f".write-probe-{uuid.uuid4().hex[:12]}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except Exception as e:  # every backend raises its own kinds (OSError, HttpError, ...)
        raise PathError(f"{what}={path}: cannot write there{_bucket_hint(path)}: {type(e).__name__}: {e}") from None
    return path


def write_atomic(path: PathLike, data: bytes) -> None:
    """Write a whole file so readers see the old or the new content, never a part: locally a
    temporary file then a rename; in a bucket one upload (an object appears whole, and a
    rename there is a slow copy)."""
    path = as_path(path)
    if is_remote(path):
        path.write_bytes(data)
        return
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.write_bytes(data)
    tmp.replace(path)


def copy_file(src: PathLike, dst: PathLike) -> None:
    """Stream one file between any two epath locations (local to bucket, bucket to local, ...)."""
    src, dst = as_path(src), as_path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with src.open("rb") as fi, dst.open("wb") as fo:
        shutil.copyfileobj(fi, fo, 16 << 20)


def upload_dir(local: PathLike, dest: PathLike, clear: bool = False) -> epath.Path:
    """Copy the files under the local folder `local` to `dest` (a folder anywhere); `clear`
    deletes what `dest` held first (an overwritten export keeps no stale shard)."""
    dest = as_path(dest)
    if clear and dest.exists():
        dest.rmtree()
    for root, _, files in os.walk(local):
        for name in files:
            src = os.path.join(root, name)
            copy_file(src, dest / os.path.relpath(src, local))
    return dest


@contextlib.contextmanager
def staged_dir(dest: PathLike, clear: bool = False) -> Iterator[pathlib.Path]:
    """A local folder whose files end up in `dest`: `dest` itself when local, else a temporary
    folder uploaded when the block ends without error (writers that need a real disk)."""
    dest = as_path(dest)
    if not is_remote(dest):
        yield pathlib.Path(dest)
        return
    with tempfile.TemporaryDirectory(prefix="safer-jax-stage-") as tmp:
        yield pathlib.Path(tmp)
        upload_dir(tmp, dest, clear=clear)


def _fs(url: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(url)


def remote_files(url: PathLike) -> dict[str, dict[str, Any]]:
    """{relative name: object info} of every file under a remote folder."""
    fs, root = _fs(os.fspath(url))
    root = root.rstrip("/")
    fs.invalidate_cache(root)  # a folder rewritten earlier in this process must be listed afresh
    found = fs.find(root, detail=True)
    return {
        name[len(root) + 1 :]: info
        for name, info in found.items()
        if info.get("type") != "directory" and name.startswith(root + "/")
    }


def remote_fingerprint(files: dict[str, dict[str, Any]]) -> str:
    """Digest of a remote folder's listing: each name, size and content hash (or version stamp)."""
    stamp = [
        (name, info.get("size"), next((str(info[k]) for k in _CONTENT_KEYS if info.get(k)), ""))
        for name, info in sorted(files.items())
    ]
    return hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:24]


def local_copy(path: PathLike, kind: str = "models") -> pathlib.Path:
    """A local folder with the files of `path`: `path` itself when local, else a copy in
    `cache_root()/kind/<name>-<fingerprint>` downloaded on first use (a changed object
    changes the fingerprint, so a stale copy is never read)."""
    if not is_remote(path):
        return pathlib.Path(os.path.expanduser(os.fspath(path)))
    url = os.fspath(path).rstrip("/")
    files = remote_files(url)
    if not files:
        raise FileNotFoundError(f"{url}: no files there (a missing folder, or a bucket this machine cannot read)")
    name = url.rsplit("/", 1)[-1] or "root"
    dest = cache_root() / kind / f"{name}-{remote_fingerprint(files)}"
    if (dest / ".complete").exists():
        return dest
    tmp = dest.parent / f".{dest.name}.tmp{os.getpid()}-{uuid.uuid4().hex[:6]}"
    for rel in files:
        copy_file(f"{url}/{rel}", tmp / rel)
    (tmp / ".complete").write_text(url)
    try:
        tmp.rename(dest)
    except OSError:  # another process on this machine finished the same copy first
        shutil.rmtree(tmp, ignore_errors=True)
    DOWNLOADS["folders"] += 1
    return dest
