"""Safety rules as data (`configs/rules/*.yaml`), schema-checked on load.

Each rule has a stable id (`R07`), a title, a category, a kind (`prohibit`, or `permit`
to stop over-refusal of benign requests), a statement, examples, and a phrasebank the
offline template teacher composes traces from.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml

from safer_jax.data.records import DataError
from safer_jax.paths import as_path

# libyaml's loader where PyYAML was built with it: the rule files are ~100 KB, and the pure-Python
# loader takes a quarter of a second for them on every command that reads the rules
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

RULE_ID = re.compile(r"^R\d{2,3}$")
PHRASE_KEYS = {
    "prohibit": ("risk", "violated", "not_violated", "refusal", "alternative"),
    "permit": ("applies", "framing"),
}


@dataclasses.dataclass(frozen=True)
class Rule:
    id: str
    title: str
    category: str
    kind: str
    statement: str
    examples: dict[str, tuple[str, ...]]
    phrases: dict[str, tuple[str, ...]]
    aliases: tuple[str, ...] = ()  # other titles a trace may cite the rule by (optional `aliases:` list)

    def citation(self) -> str:
        """How a trace cites the rule in step 2: title first, then the id (`Weapons and explosives
        (R07)`). A model writes the area in words before it has to pick the id, so the id follows the
        words it belongs to; id first ("R07 (weapons ...)"), the 135M demo model named the area right
        and the id wrong (11.7% of expected rules cited, docs/results.md). Both orders parse."""
        return f"{self.title} ({self.id})"


@dataclasses.dataclass(frozen=True)
class RuleBook:
    rules: dict[str, Rule]
    source: str

    def __getitem__(self, rid: str) -> Rule:
        return self.rules[rid]

    def __contains__(self, rid: str) -> bool:
        return rid in self.rules

    def of_kind(self, kind: str) -> list[Rule]:
        return [r for r in self.rules.values() if r.kind == kind]

    def prompt_text(self) -> str:
        """The rules as embedded in a teacher prompt."""
        return "\n".join(f"- {r.id} [{r.kind}] {r.title}: {r.statement.strip()}" for r in self.rules.values())


def default_rules_dir() -> Path:
    """`configs/rules` of a source checkout, or the copy packaged with safer_jax."""
    here = Path(__file__).resolve()
    for cand in (here.parents[2] / "configs" / "rules", here.parent / "bundled" / "rules"):
        if cand.is_dir():
            return cand
    raise FileNotFoundError("no rules folder found (configs/rules)")


def _strs(v, file, field) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(s, str) and s.strip() for s in v):
        raise DataError("expected a list of non-empty strings", file, None, field)
    return tuple(s.strip() for s in v)


def load_rules(folder: str | Path | None = None) -> RuleBook:
    """Load every `*.yaml` in `folder`; ids must be unique across files."""
    folder = as_path(folder) if folder else default_rules_dir()
    files = sorted(folder.glob("*.yaml"))
    if not files:
        raise DataError("no *.yaml rule files", folder)
    rules: dict[str, Rule] = {}
    for f in files:
        try:
            doc = yaml.load(f.read_text(), Loader=_Loader)
        except yaml.YAMLError as e:
            raise DataError(f"invalid YAML: {e}", f) from None
        if not isinstance(doc, dict) or not isinstance(doc.get("rules"), list):
            raise DataError("expected a mapping with a 'rules' list", f)
        for i, r in enumerate(doc["rules"]):
            at = f"rules[{i}]"
            if not isinstance(r, dict):
                raise DataError("expected a mapping", f, None, at)
            for key in ("id", "title", "category", "kind", "statement", "examples", "phrases"):
                if key not in r:
                    raise DataError("missing required key", f, None, f"{at}.{key}")
            rid = str(r["id"])
            if not RULE_ID.match(rid):
                raise DataError(f"rule id {rid!r} must look like R07", f, None, f"{at}.id")
            if rid in rules:
                raise DataError(f"duplicate rule id {rid}", f, None, f"{at}.id")
            kind = r["kind"]
            if kind not in PHRASE_KEYS:
                raise DataError(f"kind must be prohibit or permit, got {kind!r}", f, None, f"{at}.kind")
            ex = r["examples"]
            if not isinstance(ex, dict):
                raise DataError("expected a mapping", f, None, f"{at}.examples")
            examples = {k: _strs(v, f, f"{at}.examples.{k}") if v else () for k, v in ex.items()}
            ph = r["phrases"]
            if not isinstance(ph, dict):
                raise DataError("expected a mapping", f, None, f"{at}.phrases")
            phrases = {}
            for key in PHRASE_KEYS[kind]:
                if key not in ph:
                    raise DataError("missing phrase list", f, None, f"{at}.phrases.{key}")
                phrases[key] = _strs(ph[key], f, f"{at}.phrases.{key}")
            aliases = _strs(r["aliases"], f, f"{at}.aliases") if r.get("aliases") else ()
            rules[rid] = Rule(
                rid, str(r["title"]), str(r["category"]), kind, str(r["statement"]), examples, phrases, aliases
            )
    return RuleBook(dict(sorted(rules.items())), str(folder))
