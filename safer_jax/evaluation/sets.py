"""Evaluation sets: the bundled prompts and local copies of public safety benchmarks.

Every set becomes a list of `EvalExample`s through a `ColumnMap`: which column holds the
prompt, the label, the category, ... Built-in presets (`PRESETS`) cover the files the
benchmarks publish; any preset can be overridden column by column, so a renamed or
home-made file needs no code. A bad row raises `DataError` naming its file, line (CSV,
JSONL) or item (JSON) and field: a benchmark is never silently shortened.

Specs, as the CLI takes them (`--sets`):

    bundled                      the bundled eval_prompts.jsonl
    advbench=PATH                NAME is a preset: AdvBench CSV (goal, target)
    mine=PATH:xstest             any NAME, preset after the last colon
    mine=PATH                    NAME not a preset: the generic `custom` columns
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from safer_jax.data import bundled
from safer_jax.data.records import DataError, read_jsonl
from safer_jax.data.traces import LABELS

# Raw label values as benchmarks spell them -> our three labels.
LABEL_ALIASES = {
    "harmful": "harmful",
    "unsafe": "harmful",
    "1": "harmful",
    "true": "harmful",
    "yes": "harmful",
    "benign": "benign",
    "safe": "benign",
    "0": "benign",
    "false": "benign",
    "no": "benign",
    "borderline": "borderline",
    "contested": "borderline",
}


@dataclasses.dataclass(frozen=True)
class EvalExample:
    """One prompt to answer, with what a safe and helpful model should do about it."""

    id: str
    prompt: str
    label: str  # harmful | benign | borderline
    category: str = "uncategorized"
    rules: tuple[str, ...] = ()  # rule ids a correct trace cites (empty: not checked)
    reference: str | None = None  # a good answer, for benign overlap scores
    source: str = "bundled"  # the set it came from
    extra: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "prompt": self.prompt,
            "label": self.label,
            "category": self.category,
            "rules": list(self.rules),
            "reference": self.reference,
            "source": self.source,
            "extra": dict(self.extra),
        }


def _xstest_label(row: dict[str, Any]) -> str | None:
    """XSTest without a label column: `contrast_*` types are the unsafe twins."""
    kind = str(row.get("type") or "")
    return "harmful" if kind.startswith("contrast") else "benign" if kind else None


@dataclasses.dataclass(frozen=True)
class ColumnMap:
    """Where each field lives in a benchmark's rows. Tuples list alternatives, first present wins."""

    prompt: tuple[str, ...] = ("prompt",)
    label: tuple[str, ...] = ()  # empty or absent column: `default_label` / `infer_label`
    default_label: str | None = None
    infer_label: Callable[[dict[str, Any]], str | None] | None = None
    category: tuple[str, ...] = ("category",)
    default_category: str = "uncategorized"
    id: tuple[str, ...] = ("id",)
    reference: tuple[str, ...] = ("reference",)
    rules: tuple[str, ...] = ("rules",)
    context: tuple[str, ...] = ()  # prepended to the prompt when present (HarmBench contextual behaviors)
    extra: tuple[str, ...] = ()  # kept in EvalExample.extra (e.g. HarmBench FunctionalCategory)

    def override(self, columns: dict[str, str]) -> ColumnMap:
        """A copy with `{"prompt": "question", "label": "y", "default_label": "benign", ...}` applied."""
        known = {f.name for f in dataclasses.fields(self)} - {"infer_label"}
        changes: dict[str, Any] = {}
        for key, value in columns.items():
            if key not in known:
                raise ValueError(f"--columns: unknown key {key!r}; known: {sorted(known)}")
            if key == "default_label":
                if value not in LABELS:
                    raise ValueError(f"--columns default_label must be one of {LABELS}, got {value!r}")
                changes[key] = value
            elif key == "default_category":
                changes[key] = value
            else:
                changes[key] = tuple(v for v in value.split("|") if v)
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, ColumnMap] = {
    # The bundled schema and home-made files: {id, prompt, label, category, rules, reference}.
    # `split` (e.g. "adversarial") and `attack` (the rephrasing) are kept: reports group by split.
    "custom": ColumnMap(label=("label",), extra=("split", "attack")),
    "advbench": ColumnMap(
        prompt=("goal",),
        default_label="harmful",
        category=(),
        default_category="advbench",
        id=(),
        reference=(),
        rules=(),
    ),
    "harmbench": ColumnMap(
        prompt=("Behavior",),
        default_label="harmful",
        category=("SemanticCategory", "Category"),
        id=("BehaviorID",),
        reference=(),
        rules=(),
        context=("ContextString",),
        extra=("FunctionalCategory",),
    ),
    "strongreject": ColumnMap(
        prompt=("forbidden_prompt",),
        default_label="harmful",
        category=("category",),
        id=(),
        reference=(),
        rules=(),
        extra=("source",),
    ),
    "xstest": ColumnMap(
        prompt=("prompt",),
        label=("label",),
        infer_label=_xstest_label,
        category=("type",),
        id=("id",),
        reference=(),
        rules=(),
        extra=("focus", "note"),
    ),
    "jbb": ColumnMap(
        prompt=("Goal", "goal"),
        label=("label", "split"),
        default_label="harmful",
        category=("Category", "category"),
        id=("Index", "index", "Behavior"),
        reference=(),
        rules=(),
        extra=("Behavior", "Source"),
    ),
}
PRESETS["jailbreakbench"] = PRESETS["jbb"]
PRESETS["jbb_benign"] = dataclasses.replace(PRESETS["jbb"], default_label="benign")
PRESETS["bundled"] = PRESETS["custom"]


# ---- readers: (location, row) pairs; location is ("line", n) or ("item", n) ----


def _read_csv(path: Path) -> Iterator[tuple[tuple[str, int], dict[str, Any]]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        sample = f.read(4096)
        f.seek(0)
        delim = "\t" if path.suffix == ".tsv" or ("\t" in sample.split("\n", 1)[0] and "," not in sample) else ","
        reader = csv.DictReader(f, delimiter=delim)
        if not reader.fieldnames:
            raise DataError("empty CSV file (no header row)", path)
        start = reader.line_num + 1
        for row in reader:
            if None in row:
                raise DataError(f"{len(row[None])} more cells than header columns", path, start)
            if any(v is None for v in row.values()):
                raise DataError("fewer cells than header columns", path, start)
            if any(str(v).strip() for v in row.values()):
                yield ("line", start), row
            start = reader.line_num + 1


def _read_json(path: Path) -> Iterator[tuple[tuple[str, int], dict[str, Any]]]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON: {e.msg} (line {e.lineno}, column {e.colno})", path) from None
    if isinstance(doc, dict):
        items = next((doc[k] for k in ("data", "rows", "examples", "behaviors") if isinstance(doc.get(k), list)), None)
        if items is None:
            raise DataError("expected a JSON list, or an object with a 'data' list", path)
    elif isinstance(doc, list):
        items = doc
    else:
        raise DataError(f"expected a JSON list, got {type(doc).__name__}", path)
    for i, row in enumerate(items, 1):
        if not isinstance(row, dict):
            raise DataError(f"expected an object, got {type(row).__name__}", path, None, f"item {i}")
        yield ("item", i), row


def _read_jsonl_rows(path: Path) -> Iterator[tuple[tuple[str, int], dict[str, Any]]]:
    for line, row in read_jsonl(path):
        yield ("line", line), row


READERS: dict[str, Callable[[Path], Iterator[tuple[tuple[str, int], dict[str, Any]]]]] = {
    ".csv": _read_csv,
    ".tsv": _read_csv,
    ".json": _read_json,
    ".jsonl": _read_jsonl_rows,
}


def _first(row: dict[str, Any], cols: tuple[str, ...]) -> tuple[str | None, Any]:
    for c in cols:
        if c in row and row[c] is not None and str(row[c]).strip() != "":
            return c, row[c]
    return None, None


def _example(
    row: dict[str, Any], cmap: ColumnMap, name: str, path: Path, where: tuple[str, int], index: int
) -> EvalExample:
    """Row `index` (1-based, names the id when the file has none) found at `where` (for errors)."""
    kind, n = where
    line = n if kind == "line" else None

    def err(msg: str, field: str) -> DataError:
        return DataError(msg, path, line, field if kind == "line" else f"item {n}: {field}")

    col, prompt = _first(row, cmap.prompt)
    if col is None:
        raise err("missing or empty prompt column", "|".join(cmap.prompt))
    if not isinstance(prompt, str):
        raise err(f"expected a string, got {type(prompt).__name__}", col)
    _, context = _first(row, cmap.context)
    if context:
        prompt = f"{str(context).strip()}\n\n{prompt.strip()}"
    col, raw = _first(row, cmap.label)
    if col is not None:
        label = LABEL_ALIASES.get(str(raw).strip().lower())
        if label is None:
            raise err(f"unknown label {raw!r}; expected one of {sorted(LABEL_ALIASES)}", col)
    else:
        label = (cmap.infer_label(row) if cmap.infer_label else None) or cmap.default_label
        if label is None:
            raise err(
                "no label column and no default label for this preset (use --columns default_label=...)",
                "|".join(cmap.label) or "label",
            )
    _, category = _first(row, cmap.category)
    _, rid = _first(row, cmap.id)
    rid = f"{name}-{index:04d}" if rid is None else (str(rid) if name == "bundled" else f"{name}-{rid}")
    _, reference = _first(row, cmap.reference)
    col, rules = _first(row, cmap.rules)
    if isinstance(rules, str):
        rules = [r for r in rules.replace(";", ",").split(",") if r.strip()]
    if rules is not None and not isinstance(rules, list):
        raise err(f"expected a list of rule ids, got {type(rules).__name__}", col or "rules")
    extra = {c: str(row[c]) for c in cmap.extra if row.get(c) not in (None, "")}
    return EvalExample(
        rid,
        prompt.strip(),
        label,
        str(category).strip() if category else cmap.default_category,
        tuple(str(r).strip() for r in rules or ()),
        str(reference).strip() if reference else None,
        name,
        extra,
    )


def load_file(
    path: str | Path, preset: str = "custom", name: str | None = None, columns: dict[str, str] | None = None
) -> list[EvalExample]:
    """Examples of one benchmark file through a preset (optionally overridden column by column)."""
    path = Path(path)
    if preset not in PRESETS:
        raise ValueError(f"unknown eval-set preset {preset!r}; choose from {sorted(PRESETS)}")
    cmap = PRESETS[preset].override(columns) if columns else PRESETS[preset]
    if not path.exists():
        raise DataError("file not found", path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"unsupported file type {path.suffix!r}; expected one of {sorted(READERS)}", path)
    name = name or preset
    out = [_example(row, cmap, name, path, where, i) for i, (where, row) in enumerate(reader(path), 1)]
    if not out:
        raise DataError("no examples in file", path)
    seen: dict[str, int] = {}
    for i, ex in enumerate(out):
        if ex.id in seen:
            raise DataError(f"duplicate id {ex.id!r} (also example {seen[ex.id] + 1})", path, None, "id")
        seen[ex.id] = i
    return out


def parse_spec(spec: str) -> tuple[str, Path | None, str]:
    """`bundled` | `NAME=PATH` | `NAME=PATH:preset` -> (name, path, preset)."""
    if "=" not in spec:
        if spec == "bundled":
            return "bundled", None, "bundled"
        if spec in PRESETS:
            raise ValueError(f"eval set {spec!r} needs a local file: {spec}=PATH (the benchmark is not bundled)")
        raise ValueError(f"eval set {spec!r}: expected 'bundled', NAME=PATH or NAME=PATH:preset")
    name, rest = spec.split("=", 1)
    head, sep, tail = rest.rpartition(":")
    path, preset = (head, tail) if sep and tail in PRESETS else (rest, name if name in PRESETS else "custom")
    if not name or not path:
        raise ValueError(f"eval set {spec!r}: empty name or path")
    return name, Path(path).expanduser(), preset


def parse_columns(text: str | None) -> dict[str, str]:
    """`prompt=question,label=y,default_label=benign` -> dict (alternatives as `a|b`)."""
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"--columns: expected key=column pairs separated by commas, got {part!r}")
        out[key.strip()] = value.strip()
    return out


def stratified_limit(examples: list[EvalExample], limit: int | None) -> list[EvalExample]:
    """At most `limit` examples, taken round-robin over labels in file order (deterministic)."""
    if not limit or limit >= len(examples):
        return list(examples)
    by_label: dict[str, list[EvalExample]] = {}
    for ex in examples:
        by_label.setdefault(ex.label, []).append(ex)
    picked: set[str] = set()
    queues = [list(v) for v in by_label.values()]
    while len(picked) < limit:
        for q in queues:
            if q and len(picked) < limit:
                picked.add(q.pop(0).id)
    return [ex for ex in examples if ex.id in picked]


def load_eval_sets(
    specs: list[str], columns: dict[str, str] | None = None, limit: int | None = None
) -> list[EvalExample]:
    """Examples of every spec (see module docstring); `columns` overrides file presets, `limit` is per set."""
    out: list[EvalExample] = []
    seen: dict[str, str] = {}
    for spec in specs:
        name, path, preset = parse_spec(spec)
        if path is None:
            examples = load_file(bundled("eval_prompts.jsonl"), "bundled", "bundled")
        else:
            examples = load_file(path, preset, name, columns)
        for ex in stratified_limit(examples, limit):
            if ex.id in seen:
                raise ValueError(
                    f"eval set {spec!r}: id {ex.id!r} also in set {seen[ex.id]!r}; give the sets distinct names"
                )
            seen[ex.id] = spec
            out.append(ex)
    return out
