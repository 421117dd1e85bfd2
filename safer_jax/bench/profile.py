"""Top ops of a `jax.profiler` trace: the perfetto JSON that `--profile` writes, summed by op name.

On XLA:CPU each thunk (a fusion, a dot, a copy, a while loop) is one trace event named after
its HLO instruction, so the sums point straight at the compiled HLO written beside the trace.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
from pathlib import Path

# host-side wrappers, not ops: they contain everything else
_WRAPPERS = (
    "ThunkExecutor::Execute",
    "$",
    "np.asarray",
    "SlinkyThreadPool",
    "PjitFunction",
    "TfrtCpu",
    "ExecuteReplicated",
    "CommonPjRtLoadedExecutable",
    "PjRt",
)


def top_ops(trace_dir: str | Path, n: int = 25) -> list[tuple[str, float, int]]:
    """[(op name, total ms, count)] of the largest ops in the newest perfetto trace under `trace_dir`."""
    files = sorted(Path(trace_dir).rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"{trace_dir}: no *.trace.json.gz (was the trace written with create_perfetto_trace?)")
    data = json.loads(gzip.decompress(files[-1].read_bytes()))
    events = data["traceEvents"] if isinstance(data, dict) else data
    total: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and not name.startswith(_WRAPPERS):
            total[name] += e.get("dur", 0) / 1e3
            count[name] += 1
    return [(name, ms, count[name]) for name, ms in total.most_common(n)]


def hlo_sources(hlo: str) -> dict[str, str]:
    """Instruction name -> (shape, the JAX op it came from), from compiled HLO text."""
    out = {}
    for m in re.finditer(r'^\s*(?:ROOT )?%?([\w.-]+) = (\S+) [^\n]*?op_name="([^"]*)"', hlo, re.M):
        name, shape, op = m.groups()
        out[name] = f"{shape} {op.split('/', 1)[-1][-70:]}"
    return out


def format_top_ops(rows: list[tuple[str, float, int]], hlo: str = "") -> str:
    """A markdown table; with the compiled HLO, each op's shape and source op."""
    src = hlo_sources(hlo) if hlo else {}
    lines = ["| op | ms | calls | shape, from |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {ms:.1f} | {calls} | {src.get(name, '')} |" for name, ms, calls in rows]
    return "\n".join(lines)
