"""Rules, Ex-Ante traces, synthesis, tokenization and grain pipelines (no JAX, no devices)."""

from pathlib import Path

from etils import epath

from safer_jax.paths import as_path

BUNDLED = Path(__file__).parent / "bundled"


def bundled(name: str) -> Path:
    """Path of a bundled data file (train_prompts.jsonl, eval_prompts.jsonl, train_traces.jsonl, ...)."""
    p = BUNDLED / name
    if not p.exists():
        raise FileNotFoundError(f"no bundled data file {name!r} in {BUNDLED}")
    return p


def train_file(name: str) -> Path | epath.Path:
    """`data.train` as a path (local or a bucket URL): "" or "bundled" is the packaged traces
    (pairs are built from them)."""
    return bundled("train_traces.jsonl") if name in ("", "bundled") else as_path(name)
