"""Reference log-probs, computed once and reused across runs.

The frozen reference only ever contributes two numbers per pair (the span log-prob sums of
chosen and rejected), so a preference run can read them from disk instead of holding a
second model and running its forward every step (2N FLOPs per token saved). The cache key
is a digest of three fingerprints; any change to one of them selects another entry:

- the pairs: every field of every pair, in order (the JSON of the loaded records);
- tokenization: the tokenizer's full serialization and chat template, the template's
  arguments (`data.chat_template_kwargs`), the trace format, the system prompt, the
  sequence length, and the span weighting (`ld_alpha`);
- the reference weights: the bytes of every weight and config file of the reference
  (digests memoized by path, size and mtime, so a second run does not re-read them).

An entry is a folder `<cache_dir>/<key>/` with `ref_logps.npy` (`[N, 2]` float32: chosen,
rejected, in pair order) and `meta.json` (the fingerprints, for inspection); it is written
to a temporary folder and renamed, so a killed run never leaves a half entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from safer_jax.data.pairs import StepPair
from safer_jax.data.pipeline import PipelineConfig, preference_dataset
from safer_jax.data.tokenize import ChatTokenizer
from safer_jax.sharding import shard_batch
from safer_jax.training.preference import pair_span_logps

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".json")

# reference forward passes run by this process (batches), for tests and logs
REFERENCE_FORWARDS = {"batches": 0}


def default_cache_dir() -> Path:
    root = os.environ.get("SAFER_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "safer-jax")
    return Path(root) / "ref_logps"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path: Path, memo_file: Path | None = None) -> str:
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
        tmp = memo_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(memo))
        tmp.replace(memo_file)
    return digest


def reference_fingerprint(folder: str | Path, gguf_file: str | None = None, memo_file: Path | None = None) -> str:
    """Digest of the reference's weight and config files (one GGUF file, or the folder's)."""
    from safer_jax.hub import resolve_path

    folder = resolve_path(folder, gguf_file)  # a hub id: its local snapshot
    if gguf_file:
        files = [folder / gguf_file]
    else:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES
                       and not p.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab")))
    if not files:
        raise FileNotFoundError(f"{folder}: no weight files to fingerprint the reference")
    return _sha("\n".join(f"{p.name}:{file_digest(p, memo_file)}" for p in files).encode())


def pairs_fingerprint(pairs: Sequence[StepPair]) -> str:
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps(p.to_json(), sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def tokenization_fingerprint(ct: ChatTokenizer, seq_len: int, ld_alpha: float) -> str:
    tok = ct.tok
    backend = getattr(tok, "backend_tokenizer", None)
    serial = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    settings = {"chat_template": tok.chat_template, "system_prompt": ct.system_prompt, "seq_len": seq_len,
                "ld_alpha": ld_alpha, "special": tok.all_special_tokens, "template_kwargs": ct.template_kwargs,
                "trace_format": dataclasses.asdict(ct.fmt)}
    return _sha(serial.encode() + json.dumps(settings, sort_keys=True, default=str).encode())


def cache_key(pairs_fp: str, tok_fp: str, ref_fp: str) -> str:
    return _sha(f"pairs:{pairs_fp}|tokenization:{tok_fp}|reference:{ref_fp}".encode())[:24]


class RefLogpCache:
    """A folder of entries keyed by `cache_key`."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else default_cache_dir()

    @property
    def memo_file(self) -> Path:
        return self.root / "file_digests.json"

    def path(self, key: str) -> Path:
        return self.root / key

    def load(self, key: str, n_pairs: int) -> np.ndarray | None:
        f = self.path(key) / "ref_logps.npy"
        if not f.exists():
            return None
        arr = np.load(f)
        if arr.shape != (n_pairs, 2) or not np.isfinite(arr).all():
            return None  # not ours, or damaged: recompute
        return arr

    def save(self, key: str, logps: np.ndarray, meta: dict[str, Any]) -> Path:
        final = self.path(key)
        tmp = self.root / f".{key}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        np.save(tmp / "ref_logps.npy", logps.astype(np.float32))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return final


def compute_ref_logps(ref_params: Any, graphdef: Any, pairs: Sequence[StepPair], ct: ChatTokenizer, *,
                      seq_len: int, batch_size: int, mesh: Any = None, chunk: int = 512, ld_alpha: float = 1.0,
                      log: Any = print) -> np.ndarray:
    """`[N, 2]` span log-prob sums of (chosen, rejected) under `ref_params`, in pair order.

    Every process feeds its share of the pairs; the last batch is padded with repeats of the
    last pair (their results are dropped), so every pair is computed exactly once.
    """
    n_proc, global_bs = jax.process_count(), batch_size
    padded = list(pairs) + [pairs[-1]] * ((-len(pairs)) % global_bs)
    cfg = PipelineConfig(seq_len=seq_len, batch_size=global_bs // n_proc, shuffle=False, num_epochs=1,
                         process_index=jax.process_index(), process_count=n_proc)
    fn = jax.jit(lambda p, b: pair_span_logps(p, graphdef, b, chunk, ld_alpha)[0])
    out = np.full((len(padded), 2), np.nan, np.float32)
    n_batches = len(padded) // global_bs
    t0 = time.time()
    for i, local in enumerate(preference_dataset(padded, ct, cfg, with_index=True)):
        index = local.pop("pair_index")
        lp = fn(ref_params, shard_batch(local, mesh))  # [2b] chosen block, rejected block
        REFERENCE_FORWARDS["batches"] += 1
        if n_proc > 1:  # every process learns every pair's values
            from jax.experimental import multihost_utils

            index = np.asarray(multihost_utils.process_allgather(index, tiled=True))
            lp = multihost_utils.process_allgather(lp, tiled=True)
        lp = np.asarray(lp).reshape(n_proc, 2, -1)  # per-process blocks of chosen, then rejected rows
        out[index, 0], out[index, 1] = lp[:, 0].reshape(-1), lp[:, 1].reshape(-1)
        if (i + 1) % 10 == 0 or i + 1 == n_batches:
            el = time.time() - t0
            log(f"reference log-probs: batch {i + 1}/{n_batches} ({el:.0f}s, ETA {el / (i + 1) * (n_batches - i - 1):.0f}s)")
    out = out[: len(pairs)]
    if not np.isfinite(out).all():
        raise RuntimeError("reference log-probs missing for some pairs (pipeline and pair count disagree)")
    return out


def ensure_ref_logps(cache: RefLogpCache, pairs: Sequence[StepPair], ct: ChatTokenizer, *, seq_len: int,
                     ld_alpha: float, reference: tuple[str, str | None], load_reference: Any, batch_size: int,
                     mesh: Any = None, chunk: int = 512, log: Any = print) -> tuple[np.ndarray, str, bool]:
    """(ref log-probs `[N, 2]`, cache key, whether it was a cache hit). On a miss,
    `load_reference()` gives (graphdef, params) of the reference, then the forward runs once."""
    t0 = time.time()
    fps = {"pairs": pairs_fingerprint(pairs), "tokenization": tokenization_fingerprint(ct, seq_len, ld_alpha),
           "reference": reference_fingerprint(reference[0], reference[1], cache.memo_file)}
    key = cache_key(fps["pairs"], fps["tokenization"], fps["reference"])
    hit = cache.load(key, len(pairs))
    if hit is not None:
        log(f"reference log-probs: cache hit {cache.path(key)} ({len(pairs)} pairs, {time.time() - t0:.1f}s)")
        return hit, key, True
    log(f"reference log-probs: computing {len(pairs)} pairs into {cache.path(key)}")
    graphdef, params = load_reference()
    logps = compute_ref_logps(params, graphdef, pairs, ct, seq_len=seq_len, batch_size=batch_size, mesh=mesh,
                              chunk=chunk, ld_alpha=ld_alpha, log=log)
    if jax.process_index() == 0:
        cache.save(key, logps, {**fps, "n_pairs": len(pairs), "reference_path": str(reference[0]),
                                "reference_gguf_file": reference[1], "seq_len": seq_len, "ld_alpha": ld_alpha,
                                "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("ref-logps-saved")
    return logps, key, False
