"""Rules, Ex-Ante traces, synthesis, tokenization and grain pipelines (no JAX, no devices)."""

from pathlib import Path

BUNDLED = Path(__file__).parent / "bundled"


def bundled(name: str) -> Path:
    """Path of a bundled data file (train_prompts.jsonl, eval_prompts.jsonl, train_traces.jsonl, ...)."""
    p = BUNDLED / name
    if not p.exists():
        raise FileNotFoundError(f"no bundled data file {name!r} in {BUNDLED}")
    return p


def train_file(name: str) -> Path:
    """`data.train` as a path: "" or "bundled" is the packaged traces (pairs are built from them)."""
    return bundled("train_traces.jsonl") if name in ("", "bundled") else Path(name)
