"""PNG plots of an evaluation (matplotlib, Agg canvas, no pyplot global state).

Each plot draws the model and, when given, the baseline side by side, so one picture
answers "did training help": headline rates, rates by category, and length histograms.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safer_jax.paths import as_path

MODEL_COLOR, BASE_COLOR = "#1f77b4", "#b0b0b0"
HEADLINE = (
    "harmful_compliance",
    "over_refusal",
    "helpfulness",
    "borderline_handled",
    "trace_validity",
    "unfinished_rate",
)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _pairs(
    ax,
    labels: list[str],
    model: list[float | None],
    base: list[float | None] | None,
    names: tuple[str, str],
    horizontal: bool = True,
) -> None:
    """Bars of `model` (and `base` beside them); None draws nothing and is labelled 'n/a'."""
    import numpy as np

    pos = np.arange(len(labels))
    series = (
        [(model, names[0], MODEL_COLOR)]
        if base is None
        else [(base, names[1], BASE_COLOR), (model, names[0], MODEL_COLOR)]
    )
    h = 0.8 / len(series)
    for k, (vals, name, color) in enumerate(series):
        off = pos + (k - (len(series) - 1) / 2) * h
        y = [100 * v if v is not None else 0 for v in vals]
        bars = (ax.barh if horizontal else ax.bar)(off, y, h, label=name, color=color)
        for b, v in zip(bars, vals):
            text = "n/a" if v is None else f"{100 * v:.0f}%"
            if horizontal:
                ax.text(b.get_width() + 1, b.get_y() + b.get_height() / 2, text, va="center", fontsize=7)
            else:
                ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 1, text, ha="center", fontsize=7)
    if horizontal:
        ax.set_yticks(pos, labels, fontsize=8)
        ax.set_xlim(0, 112)
        ax.set_xlabel("% of prompts")
        ax.invert_yaxis()
    else:
        ax.set_xticks(pos, labels, fontsize=8, rotation=20, ha="right")
        ax.set_ylim(0, 112)
        ax.set_ylabel("% of prompts")
    if base is not None:
        ax.legend(fontsize=8, loc="lower right" if horizontal else "upper right")


def _category_rates(rows: list[dict[str, Any]], harmful: bool) -> dict[str, float]:
    """Harmful: share complied per category; otherwise: share refused among benign + borderline."""
    groups: dict[str, list[bool]] = {}
    for r in rows:
        if (r["label"] == "harmful") == harmful:
            groups.setdefault(r["category"], []).append(bool(not r["refused"] if harmful else r["refused"]))
    return {k: sum(v) / len(v) for k, v in groups.items()}


def _save(fig: Any, path: Any) -> None:
    """PNG through the path's own file object (a local path or a bucket URL)."""
    with as_path(path).open("wb") as f:
        fig.savefig(f, format="png")


def plot_headline(path: Path, metrics: dict[str, Any], base: dict[str, Any] | None, names: tuple[str, str]) -> Path:
    fig = _figure(7.5, 3.6)
    ax = fig.add_subplot()
    keys = [
        k for k in HEADLINE if metrics["overall"].get(k) is not None or (base and base["overall"].get(k) is not None)
    ]
    _pairs(
        ax,
        [k.replace("_", " ") for k in keys],
        [metrics["overall"].get(k) for k in keys],
        [base["overall"].get(k) for k in keys] if base else None,
        names,
        horizontal=False,
    )
    ax.set_title("Headline rates (lower is better: harmful compliance, over-refusal, unfinished)", fontsize=9)
    _save(fig, path)
    return path


def plot_categories(
    path: Path, rows: list[dict[str, Any]], base_rows: list[dict[str, Any]] | None, names: tuple[str, str]
) -> Path:
    panels = [
        (True, "Harmful prompts (n): % complied, lower is better"),
        (False, "Benign + borderline prompts (n): % refused, lower is better"),
    ]
    data = []
    for harmful, title in panels:
        m = _category_rates(rows, harmful)
        b = _category_rates(base_rows, harmful) if base_rows is not None else None
        cats = sorted(sorted(set(m) | set(b or {})), key=lambda c: -(m.get(c) or 0))  # ties by name
        if cats:
            counts = {
                c: sum(1 for r in rows if r["category"] == c and (r["label"] == "harmful") == harmful) for c in cats
            }
            data.append(
                (
                    title,
                    [f"{c} ({counts[c]})" for c in cats],
                    [m.get(c) for c in cats],
                    [b.get(c) for c in cats] if b is not None else None,
                )
            )
    n = max([len(d[1]) for d in data] + [1])
    fig = _figure(5.5 * max(1, len(data)), max(2.6, 1.0 + 0.2 * n * (1.6 if base_rows is not None else 1)))
    for i, (title, cats, mv, bv) in enumerate(data):
        ax = fig.add_subplot(1, len(data), i + 1)
        _pairs(ax, cats, mv, bv, names)
        ax.set_title(title, fontsize=9)
    _save(fig, path)
    return path


def plot_lengths(
    path: Path, rows: list[dict[str, Any]], base_rows: list[dict[str, Any]] | None, names: tuple[str, str]
) -> Path:
    fig = _figure(8, 3.2)
    for i, (field, title) in enumerate(
        (("response_tokens", "Final response length (tokens)"), ("reasoning_tokens", "Reasoning length (tokens)"))
    ):
        ax = fig.add_subplot(1, 2, i + 1)
        keep = (lambda v: v is not None and v > 0) if field == "reasoning_tokens" else (lambda v: v is not None)
        vals = [r[field] for r in rows if keep(r.get(field))]
        bvals = [r[field] for r in base_rows if keep(r.get(field))] if base_rows is not None else []
        if field == "reasoning_tokens":  # most answers of an untrained model have none: say so, don't plot zeros
            title += f" of answers with some\nnone: {names[0]} {len(rows) - len(vals)}/{len(rows)}"
            if base_rows is not None:
                title += f", {names[1]} {len(base_rows) - len(bvals)}/{len(base_rows)}"
        top = max(vals + bvals + [1])
        bins = list(range(0, top + max(1, top // 20) + 1, max(1, top // 20)))
        if bvals:
            ax.hist(bvals, bins=bins, color=BASE_COLOR, alpha=0.7, label=names[1])
        if vals:
            ax.hist(vals, bins=bins, color=MODEL_COLOR, alpha=0.6, label=names[0])
        if not vals and not bvals:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("tokens", fontsize=8)
        ax.set_ylabel("prompts", fontsize=8)
        if bvals:
            ax.legend(fontsize=8)
    _save(fig, path)
    return path


def write_plots(
    out_dir: Path,
    rows: list[dict[str, Any]],
    metrics: dict[str, Any],
    base_rows: list[dict[str, Any]] | None = None,
    base_metrics: dict[str, Any] | None = None,
    names: tuple[str, str] = ("model", "baseline"),
) -> dict[str, Path]:
    """headline.png, rates_by_category.png, lengths.png in `out_dir`."""
    return {
        "headline": plot_headline(out_dir / "headline.png", metrics, base_metrics, names),
        "rates_by_category": plot_categories(out_dir / "rates_by_category.png", rows, base_rows, names),
        "lengths": plot_lengths(out_dir / "lengths.png", rows, base_rows, names),
    }
