"""Reference log-probs, computed once and reused across runs.

The frozen reference only ever contributes two numbers per pair (the span log-prob sums of
chosen and rejected), so a preference run can read them from disk instead of holding a
second model and running its forward every step (2N FLOPs per token saved). The cache key
is a digest of everything that changes the numbers; any change selects another entry:

- the pairs: every field of every pair, in order (the JSON of the loaded records);
- tokenization: the tokenizer's full serialization and chat template, the template's
  arguments (`data.chat_template_kwargs`), the trace format, the system prompt and every
  other plain setting of the `ChatTokenizer`, the sequence length;
- the reference weights: the bytes of every weight and config file of the reference
  (digests memoized by path, size and mtime, so a second run does not re-read them);
- the computation: the compute and parameter dtypes (a float32 cache is not a bfloat16
  reference: step 0 would no longer be log 2), the attention backend, the span mode, the
  LD-DPO weight `ld_alpha` only when it weights the reference (`ld_reference`; unweighted
  reference log-probs serve every `ld_alpha`), and `CACHE_SALT`, the code version of the
  log-prob computation (bump it when that code changes what it returns).

A run records the key and its parts in `<run_dir>/reference.json` at its start; a resumed
run (its folder holds a checkpoint) whose key differs stops with an error naming the parts
that changed (`check_resumed_reference`), for the frozen-copy reference as for the cache.

An entry is a folder `<cache_dir>/<key>/` with `ref_logps.npy` (`[N, 2]` float32: chosen,
rejected, in pair order) and `meta.json` (the fingerprints, for inspection). The cache
folder may be a bucket URL (`etils.epath`); the reference's own files are local (a bucket
reference is read from its local copy). `ref_logps.npy` is written last and whole (a
temporary file renamed on a disk, one upload in a bucket), so a killed run never leaves a
half entry.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from etils import epath

from safer_jax.data.pairs import StepPair
from safer_jax.data.pipeline import PipelineConfig, preference_dataset
from safer_jax.data.tokenize import ChatTokenizer
from safer_jax.distributed import check_same, from_process_0
from safer_jax.paths import as_path, write_atomic
from safer_jax.sharding import shard_batch
from safer_jax.training.preference import check_pair_rows, pair_layout, pair_span_logps

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".json")
CACHE_SALT = "ref-logps-2"  # bump when the reference log-prob computation changes its numbers
RUN_RECORD = "reference.json"

# reference forward passes run by this process (batches), for tests and logs
REFERENCE_FORWARDS = {"batches": 0}


def default_cache_dir() -> epath.Path:
    root = os.environ.get("SAFER_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "safer-jax")
    return as_path(root) / "ref_logps"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path: Path, memo_file: epath.Path | None = None) -> str:
    """sha256 of a file's bytes, memoized by (path, size, mtime) in `memo_file`."""
    st = path.stat()
    stamp = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo: dict[str, str] = {}
    if memo_file is not None and memo_file.exists():
        try:
            memo = json.loads(memo_file.read_text())
        except json.JSONDecodeError:
            memo = {}
    if stamp in memo:
        return memo[stamp]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    digest = h.hexdigest()
    if memo_file is not None:
        memo[stamp] = digest
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(memo_file, json.dumps(memo).encode())
    return digest


def reference_fingerprint(folder: str | Path, gguf_file: str | None = None, memo_file: epath.Path | None = None) -> str:
    """Digest of the reference's weight and config files (one GGUF file, or the folder's)."""
    from safer_jax.hub import resolve_path

    folder = resolve_path(folder, gguf_file)  # a hub id: its local snapshot
    if gguf_file:
        files = [folder / gguf_file]
    else:
        files = sorted(
            p
            for p in folder.iterdir()
            if p.is_file()
            and p.suffix in WEIGHT_SUFFIXES
            and not p.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab"))
        )
    if not files:
        raise FileNotFoundError(f"{folder}: no weight files to fingerprint the reference")
    return _sha("\n".join(f"{p.name}:{file_digest(p, memo_file)}" for p in files).encode())


def pairs_fingerprint(pairs: Sequence[StepPair]) -> str:
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps(p.to_json(), sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def template_settings(ct: ChatTokenizer) -> dict[str, Any]:
    """The chat template's arguments: every plain-data attribute of `ct` (system prompt and the like)
    except the tokenizer object and its display name (a path that differs between run folders)."""
    out: dict[str, Any] = {}
    for k, v in sorted(vars(ct).items()):
        if k in ("tok", "name") or k.startswith("__"):
            continue
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            v = dataclasses.asdict(v)
        if isinstance(v, (str, int, float, bool, type(None), list, tuple, dict)):
            out[k] = v
    return out


def tokenization_fingerprint(ct: ChatTokenizer, seq_len: int) -> str:
    """Digest of the tokenizer, its chat template and arguments, and the sequence length."""
    tok = ct.tok
    backend = getattr(tok, "backend_tokenizer", None)
    serial = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    settings = {
        "chat_template": tok.chat_template,
        "template": template_settings(ct),
        "seq_len": seq_len,
        "special": tok.all_special_tokens,
    }
    return _sha(serial.encode() + json.dumps(settings, sort_keys=True, default=str).encode())


def compute_settings(
    *,
    dtype: str,
    param_dtype: str | None,
    attention: str,
    span: str,
    ld_alpha: float,
    ld_reference: bool,
    salt: str = CACHE_SALT,
    matmul_dtype: str | None = None,
) -> dict[str, Any]:
    """The settings of the reference forward that change its numbers (see the module docstring)."""
    out: dict[str, Any] = {
        "dtype": dtype,
        "param_dtype": param_dtype or dtype,
        "attention": attention,
        "span": span,
        "salt": salt,
    }
    if ld_reference and ld_alpha != 1.0:
        out["ld_alpha"] = float(ld_alpha)
    if matmul_dtype is not None:  # absent by default: keys of float32 products stay as they were
        out["matmul_dtype"] = matmul_dtype
    return out


def compute_fingerprint(settings: dict[str, Any]) -> str:
    return _sha(json.dumps(settings, sort_keys=True).encode())


def cache_key(pairs_fp: str, tok_fp: str, ref_fp: str, compute_fp: str = "") -> str:
    return _sha(f"pairs:{pairs_fp}|tokenization:{tok_fp}|reference:{ref_fp}|compute:{compute_fp}".encode())[:24]


def reference_fingerprints(
    pairs: Sequence[StepPair],
    ct: ChatTokenizer,
    *,
    seq_len: int,
    reference: tuple[str, str | None],
    settings: dict[str, Any],
    memo_file: Path | None = None,
) -> tuple[str, dict[str, Any]]:
    """(cache key, its parts) for these pairs, tokenization, reference weights and compute settings."""
    fps: dict[str, Any] = {
        "pairs": pairs_fingerprint(pairs),
        "tokenization": tokenization_fingerprint(ct, seq_len),
        "reference": reference_fingerprint(reference[0], reference[1], memo_file),
        "compute": compute_fingerprint(settings),
    }
    key = cache_key(fps["pairs"], fps["tokenization"], fps["reference"], fps["compute"])
    return key, {**fps, "settings": settings}


class ReferenceChanged(RuntimeError):
    """A resumed preference run would train against another reference than the one it started with."""


def has_checkpoint(run_dir: str | os.PathLike) -> bool:
    """Whether `run_dir/checkpoints` holds a complete step (orbax renames a step's folder to its
    number only once it is complete)."""
    d = as_path(run_dir) / "checkpoints"
    return d.is_dir() and any(p.is_dir() and p.name.isdigit() for p in d.iterdir())


def check_resumed_reference(run_dir: str | os.PathLike, key: str, parts: dict[str, Any], log: Any = print) -> None:
    """Record the reference key in `run_dir/reference.json`; on a resumed run, first check it is
    unchanged, and raise `ReferenceChanged` naming what differs if not."""
    f = as_path(run_dir) / RUN_RECORD
    record = {"key": key, **parts}
    if has_checkpoint(run_dir) and f.exists():
        try:
            old = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ReferenceChanged(
                f"{f}: unreadable reference record ({e}); cannot check the resumed run's reference"
            ) from None
        if old.get("key") != key:
            changed = sorted(k for k in ("pairs", "tokenization", "reference", "compute") if old.get(k) != parts.get(k))
            was, now = old.get("settings", {}), parts.get("settings", {})
            diffs = [
                f"{k}: {was.get(k)!r} -> {now.get(k)!r}"
                for k in sorted(set(was) | set(now))
                if was.get(k) != now.get(k)
            ]
            raise ReferenceChanged(
                f"{run_dir} resumes a preference run whose reference changed: {', '.join(changed) or 'key'} "
                f"differ from {f}"
                + (f" ({'; '.join(diffs)})" if diffs else "")
                + ". Resume with the original reference, pairs, tokenizer and settings, or start a new run folder."
            )
        return
    if jax.process_index() == 0:
        write_atomic(f, json.dumps(record, indent=2).encode())
    log(f"reference fingerprint {key} recorded in {f}")


class RefLogpCache:
    """A folder of entries keyed by `cache_key`."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = as_path(root) if root else default_cache_dir()

    @property
    def memo_file(self) -> epath.Path:
        return self.root / "file_digests.json"

    def path(self, key: str) -> epath.Path:
        return self.root / key

    def load(self, key: str, n_pairs: int) -> np.ndarray | None:
        f = self.path(key) / "ref_logps.npy"
        if not f.exists():
            return None
        arr = np.load(io.BytesIO(f.read_bytes()))
        if arr.shape != (n_pairs, 2) or not np.isfinite(arr).all():
            return None  # not ours, or damaged: recompute
        return arr

    def save(self, key: str, logps: np.ndarray, meta: dict[str, Any]) -> epath.Path:
        final = self.path(key)
        final.mkdir(parents=True, exist_ok=True)
        (final / "meta.json").write_text(json.dumps(meta, indent=2))
        buf = io.BytesIO()
        np.save(buf, logps.astype(np.float32))
        write_atomic(final / "ref_logps.npy", buf.getvalue())  # the entry exists once this file does
        return final


@functools.partial(jax.jit, static_argnames=("graphdef", "n_proc", "chunk", "ld_alpha"))
def _span_logps(params: Any, batch: dict[str, jax.Array], *, graphdef: Any, n_proc: int, chunk: int, ld_alpha: float):
    """`[2B]` span log-prob sums of a batch; module-level, so a second run in one process reuses its program."""
    return pair_span_logps(params, graphdef, pair_layout(batch, 1, n_proc), chunk, ld_alpha)[0]


def compute_ref_logps(
    ref_params: Any,
    graphdef: Any,
    pairs: Sequence[StepPair],
    ct: ChatTokenizer,
    *,
    seq_len: int,
    batch_size: int,
    mesh: Any = None,
    chunk: int = 512,
    ld_alpha: float = 1.0,
    log: Any = print,
) -> np.ndarray:
    """`[N, 2]` span log-prob sums of (chosen, rejected) under `ref_params`, in pair order.

    Every process feeds its share of the pairs; the last batch is padded with repeats of the
    last pair (their results are dropped), so every pair is computed exactly once.
    """
    n_proc, global_bs = jax.process_count(), batch_size
    padded = list(pairs) + [pairs[-1]] * ((-len(pairs)) % global_bs)
    cfg = PipelineConfig(
        seq_len=seq_len,
        batch_size=global_bs // n_proc,
        shuffle=False,
        num_epochs=1,
        process_index=jax.process_index(),
        process_count=n_proc,
    )
    # rows arrive as per-process blocks (chosen, rejected); pair_layout makes them one chosen block
    # and one rejected block, as the training step sees them (LD-DPO weighting pairs row i with B + i)
    fn = functools.partial(_span_logps, graphdef=graphdef, n_proc=n_proc, chunk=chunk, ld_alpha=ld_alpha)
    out = np.full((len(padded), 2), np.nan, np.float32)
    n_batches = len(padded) // global_bs
    check_pair_rows(mesh, global_bs // n_proc)  # the values below are read as per-process blocks
    t0 = time.time()
    for i, local in enumerate(preference_dataset(padded, ct, cfg, with_index=True)):
        index = local.pop("pair_index")
        lp = fn(ref_params, shard_batch(local, mesh))  # [2B]: every chosen row, then every rejected row
        REFERENCE_FORWARDS["batches"] += 1
        if n_proc > 1:  # every process learns every pair's values
            from jax.experimental import multihost_utils

            index = np.asarray(multihost_utils.process_allgather(index, tiled=True))
            lp = multihost_utils.process_allgather(lp, tiled=True)
        lp = np.asarray(lp).reshape(2, -1)  # [chosen, rejected] x pairs in process order, like `index`
        out[index, 0], out[index, 1] = lp[0], lp[1]
        if (i + 1) % 10 == 0 or i + 1 == n_batches:
            el = time.time() - t0
            log(
                f"reference log-probs: batch {i + 1}/{n_batches} ({el:.0f}s, ETA {el / (i + 1) * (n_batches - i - 1):.0f}s)"
            )
    out = out[: len(pairs)]
    if not np.isfinite(out).all():
        raise RuntimeError("reference log-probs missing for some pairs (pipeline and pair count disagree)")
    return out


def ensure_ref_logps(
    cache: RefLogpCache,
    pairs: Sequence[StepPair],
    ct: ChatTokenizer,
    *,
    seq_len: int,
    ld_alpha: float,
    reference: tuple[str, str | None],
    load_reference: Any,
    batch_size: int,
    mesh: Any = None,
    chunk: int = 512,
    log: Any = print,
    dtype: str = "float32",
    param_dtype: str | None = None,
    attention: str = "xla",
    span: str = "step",
    ld_reference: bool = True,
    salt: str = CACHE_SALT,
    matmul_dtype: str | None = None,
    keyed: tuple[str, dict] | None = None,
) -> tuple[np.ndarray, str, bool]:
    """(ref log-probs `[N, 2]`, cache key, whether it was a cache hit). On a miss,
    `load_reference()` gives (graphdef, params) of the reference, then the forward runs once.
    `keyed`: the (key, parts) of `reference_fingerprints`, when the caller already has them."""
    t0 = time.time()
    settings = compute_settings(
        dtype=dtype,
        param_dtype=param_dtype,
        attention=attention,
        span=span,
        ld_alpha=ld_alpha,
        ld_reference=ld_reference,
        salt=salt,
        matmul_dtype=matmul_dtype,
    )
    key, fps = keyed or reference_fingerprints(
        pairs, ct, seq_len=seq_len, reference=reference, settings=settings, memo_file=cache.memo_file
    )
    # hit or miss is decided once: process 0 reads the cache and every process follows it (a
    # process that recomputed alone would wait forever in the reference forward's collectives)
    check_same(key, "the reference log-prob cache key (pairs, tokenizer, reference weights, settings)")
    hit = cache.load(key, len(pairs)) if jax.process_index() == 0 else None
    hit_agreed = bool(from_process_0(hit is not None))
    if jax.process_count() > 1:  # in every worker's own log: all of them follow process 0
        print(
            f"[process {jax.process_index()}] reference log-probs: cache {'hit' if hit_agreed else 'miss'}", flush=True
        )
    if hit_agreed:
        if jax.process_count() > 1:  # the values travel from process 0: other hosts' caches may lack them
            from jax.experimental import multihost_utils

            local = hit if hit is not None else np.zeros((len(pairs), 2), np.float32)
            hit = np.asarray(multihost_utils.broadcast_one_to_all(local))
        log(f"reference log-probs: cache hit {cache.path(key)} ({len(pairs)} pairs, {time.time() - t0:.1f}s)")
        return hit, key, True
    log(f"reference log-probs: computing {len(pairs)} pairs into {cache.path(key)}")
    graphdef, params = load_reference()
    logps = compute_ref_logps(
        params,
        graphdef,
        pairs,
        ct,
        seq_len=seq_len,
        batch_size=batch_size,
        mesh=mesh,
        chunk=chunk,
        ld_alpha=ld_alpha if ld_reference else 1.0,
        log=log,
    )
    if jax.process_index() == 0:
        cache.save(
            key,
            logps,
            {
                **fps,
                "n_pairs": len(pairs),
                "reference_path": str(reference[0]),
                "reference_gguf_file": reference[1],
                "seq_len": seq_len,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
        )
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("ref-logps-saved")
    return logps, key, False
