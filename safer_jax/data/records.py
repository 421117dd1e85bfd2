"""JSONL/Parquet record reading with errors that name file, line and field.

A bad record raises `DataError`, or, with `skip_invalid=True`, is counted in a
`SkipReport` that the caller prints at the end: nothing is dropped silently.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safer_jax.paths import as_path


class DataError(ValueError):
    """A bad input record. `str()` reads `FILE:LINE: field 'F': message`."""

    def __init__(self, message: str, file: str | Path | None = None, line: int | None = None, field: str | None = None):
        self.file, self.line, self.field, self.reason = (str(file) if file else None), line, field, message
        where = ""
        if file:
            where = f"{file}:{line}: " if line is not None else f"{file}: "
        what = f"field {field!r}: " if field else ""
        super().__init__(f"{where}{what}{message}")


@dataclasses.dataclass
class SkipReport:
    """Counts of records skipped under `--skip-invalid`, by reason, with the first few errors."""

    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: list[str] = dataclasses.field(default_factory=list)

    def add(self, err: DataError) -> None:
        self.counts[err.reason.split(":")[0]] += 1
        if len(self.examples) < 5:
            self.examples.append(str(err))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "no invalid records"
        lines = [f"skipped {self.total} invalid records:"]
        lines += [f"  {n} x {reason}" for reason, n in self.counts.most_common()]
        lines += ["first errors:"] + [f"  {e}" for e in self.examples]
        return "\n".join(lines)


def read_jsonl(
    path: str | Path, skip_invalid: bool = False, report: SkipReport | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line."""
    path = as_path(path)
    if not path.exists():
        raise DataError("file not found", path)
    with path.open("r", encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
                if not isinstance(obj, dict):
                    raise DataError(f"expected a JSON object, got {type(obj).__name__}", path, lineno)
            except json.JSONDecodeError as e:
                err = DataError(f"malformed JSON: {e.msg} (column {e.colno})", path, lineno)
                if not skip_invalid:
                    raise err from None
                (report or SkipReport()).add(err)
                continue
            except DataError as err:
                if not skip_invalid:
                    raise
                (report or SkipReport()).add(err)
                continue
            yield lineno, obj


def read_records(
    path: str | Path, skip_invalid: bool = False, report: SkipReport | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """JSONL, or Parquet / a hub dataset name through `datasets` (row numbers from 1)."""
    p = as_path(path)
    if p.suffix in (".jsonl", ".json") or (p.exists() and p.suffix not in (".parquet",)):
        yield from read_jsonl(p, skip_invalid, report)
        return
    import datasets

    if p.suffix == ".parquet":
        ds = datasets.load_dataset("parquet", data_files=str(p), split="train")
    else:
        ds = datasets.load_dataset(str(path), split="train")
    for i, row in enumerate(ds, 1):
        yield i, dict(row)


def require(
    obj: dict[str, Any], key: str, kind: type | tuple[type, ...], file: Any, line: int | None, prefix: str = ""
) -> Any:
    """obj[key] of type `kind`, or a DataError naming the field."""
    if key not in obj:
        raise DataError("missing required field", file, line, prefix + key)
    v = obj[key]
    if not isinstance(v, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"expected {names}, got {type(v).__name__}", file, line, prefix + key)
    return v
