"""Round files and state: appended JSONL rows, `rounds_state.json`, the test kill point.

Rows are appended as soon as they exist (a whole file rewritten atomically, so a kill
never leaves a half line that matters: a cut last line is ignored on reading), and only
process 0 writes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
from tqdm.auto import tqdm

from safer_jax.paths import as_path, write_atomic

PHASES = ("sample", "judge", "pair", "train", "eval")
KILL_ENV = "SAFER_JAX_TEST_KILL_AT"
STATE_FILE = "rounds_state.json"


class RoundsError(RuntimeError):
    """A round cannot go on (an endpoint failed after its retries, a judge gave no verdict)."""


class KillPoint(BaseException):
    """Raised at the test kill point (`SAFER_JAX_TEST_KILL_AT`); a BaseException so nothing catches it."""


def kill_check(r: int, phase: str, n: int | None = None) -> None:
    spec = os.environ.get(KILL_ENV, "")
    if not spec:
        return
    parts = spec.split(":")
    if int(parts[0]) == r and parts[1] == phase and (parts[2:] == [str(n)] if n is not None else len(parts) == 2):
        raise KillPoint(f"test kill point {spec}")


def say(msg: str) -> None:
    if jax.process_index() == 0:
        tqdm.write(msg)


def sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def read_rows(path: Any) -> list[dict[str, Any]]:
    """Rows of a JSONL the loop appended to; a last line cut by a kill is ignored."""
    path = as_path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def append_rows(path: Any, rows: Sequence[dict[str, Any]]) -> None:
    if jax.process_index() != 0 or not rows:
        return
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else ""
    if old and not old.endswith("\n"):
        old = old[: old.rfind("\n") + 1]  # drop a line a kill cut short
    write_atomic(path, (old + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)).encode())


def write_rows(path: Any, rows: Sequence[dict[str, Any]]) -> None:
    if jax.process_index() == 0:
        as_path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(as_path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())


class State:
    """`rounds_state.json`: finished phases with their wall times and headline numbers."""

    def __init__(self, run_dir: Any):
        self.path = as_path(run_dir) / STATE_FILE
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {"rounds": {}}

    def done(self, r: int, phase: str) -> bool:
        return phase in self.data["rounds"].get(str(r), {})

    def finish(self, r: int, phase: str, seconds: float, **info: Any) -> None:
        self.data["rounds"].setdefault(str(r), {})[phase] = {"seconds": round(seconds, 2), **info}
        if jax.process_index() == 0:
            write_atomic(self.path, json.dumps(self.data, indent=1).encode())
