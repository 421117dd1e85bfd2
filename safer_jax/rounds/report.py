"""The rounds report: every round side by side (`<run_dir>/report.md` and `report.json`).

Rows: the four evaluation rates, mean reasoning and response tokens, pairs per step and per
failure reason, and each phase's wall time. Columns: the starting model (round 0) and each
round. No sample text is quoted: samples may hold harmful completions and stay in the run
folder's round files.
"""

from __future__ import annotations

import json
from typing import Any

from safer_jax.paths import as_path, write_atomic

HEADLINE = (
    "harmful_compliance",
    "over_refusal",
    "helpfulness",
    "borderline_handled",
    "mean_reasoning_tokens",
    "mean_response_tokens",
)
RATES = HEADLINE[:4]
PHASES = ("sample", "judge", "pair", "train", "eval")


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return "-"
    if key in RATES:
        return f"{100 * v:.0f}%"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def table(state: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(column names, rows) of the side-by-side table."""
    rounds = sorted(state["rounds"], key=int)
    cols = ["round " + r + (" (start)" if r == "0" else "") for r in rounds]
    rows: list[list[str]] = []
    for key in HEADLINE:
        rows.append([key] + [_fmt(key, state["rounds"][r].get("eval", {}).get(key)) for r in rounds])
    for group in ("by_step", "by_reason", "by_source"):
        keys = sorted({k for r in rounds for k in state["rounds"][r].get("pair", {}).get(group, {})})
        for k in keys:
            rows.append(
                [f"pairs {group[3:]} {k}"]
                + [str(state["rounds"][r].get("pair", {}).get(group, {}).get(k, "-")) for r in rounds]
            )
    rows.append(["pairs"] + [str(state["rounds"][r].get("pair", {}).get("pairs", "-")) for r in rounds])
    rows.append(
        ["samples correct"]
        + [_fmt("helpfulness", state["rounds"][r].get("judge", {}).get("correct_rate")) for r in rounds]
    )
    for ph in PHASES:
        rows.append([f"{ph} wall time (s)"] + [_fmt("", state["rounds"][r].get(ph, {}).get("seconds")) for r in rounds])
    return cols, rows


def write_report(run_dir: Any, state: dict[str, Any]) -> Any:
    cols, rows = table(state)
    lines = [
        "# On-policy rounds",
        "",
        "| | " + " | ".join(cols) + " |",
        "| --- | " + " | ".join("---" for _ in cols) + " |",
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        "Rates are over the evaluation prompts of each round's `eval.json`; pairs and samples are in "
        "`round_<r>/` (`pairs.jsonl`, `pair_stats.jsonl`, `samples.jsonl`: local only).",
        "",
    ]
    out = as_path(run_dir) / "report.md"
    write_atomic(out, "\n".join(lines).encode())
    write_atomic(as_path(run_dir) / "report.json", json.dumps({"columns": cols, "rows": rows}, indent=1).encode())
    return out
