"""What a trace says about each rule it cites, checked against the rulebook (issue 15).

A teacher can cite a real id with the wrong rule behind it ("R01 (theft and vandalism)",
though R01 is the CBRN rule), or claim a verdict that does not fit: "applies" belongs to
permit rules, "violated" to prohibit rules; a harmful prompt violates a prohibit rule, a
benign or borderline one violates none and is the case a permit rule applies to. Each
citation in step 2 reads `Title (R07): verdict ...` (what `Rule.citation` writes) or
`R07 (title): verdict ...` (the older order, still read); the title must be the rulebook's or
one of the rule's declared `aliases`. `repair_titles` replaces a wrong title from the rulebook:
the only fix that is mechanical (a wrong verdict needs a new trace).
"""

from __future__ import annotations

import dataclasses
import re

from safer_jax.data.rules import RuleBook
from safer_jax.data.traces import Trace

# title first (from the start of a line up to "(R07)"), or the id first with an optional "(title)"
CITATION = re.compile(
    r"(?:^[ \t]*(?P<title_first>[^()\n:]*?[^()\n:\s])\s*\((?P<id_last>R\d{2,3})\)"
    r"|\b(?P<id>R\d{2,3})\b(?:\s*\((?P<title>[^()]*)\))?)"
    r"\s*:?\s*(?P<verdict>not violated|violated|does not apply|applies)?",
    re.I | re.M,
)


def _parts(m: re.Match) -> tuple[str, str | None, str, str]:
    """(id, cited title or None, verdict, the title's group name) of one citation."""
    if m.group("id_last"):
        return m.group("id_last"), m.group("title_first"), (m.group("verdict") or "").lower(), "title_first"
    return m.group("id"), m.group("title"), (m.group("verdict") or "").lower(), "title"


def _norm(title: str) -> str:
    return re.sub(r"\s+", " ", title.strip().lower())


def _title_ok(rules: RuleBook, rid: str, title: str) -> bool:
    rule = rules[rid]
    return _norm(title) in {_norm(rule.title), *(_norm(a) for a in rule.aliases)}


def rule_claim_problems(trace: Trace, rules: RuleBook) -> list[str]:
    """Reasons the rule verification misstates a rule's title or verdict ([] = consistent)."""
    problems = []
    for m in CITATION.finditer(trace.steps.get("rule_verification", "")):
        rid, title, verdict, _ = _parts(m)
        if rid not in rules:
            continue  # unknown ids are `traces.validate`'s to report
        rule = rules[rid]
        if title is not None and not _title_ok(rules, rid, title):
            problems.append(f"{rid} cited as {title.strip()!r}, but the rulebook's {rid} is {rule.title!r}")
        if verdict in ("applies", "does not apply") and rule.kind != "permit":
            problems.append(f"{rid} is a prohibit rule: it is violated or not, it does not 'apply'")
        elif verdict in ("violated", "not violated") and rule.kind != "prohibit":
            problems.append(f"{rid} is a permit rule: it applies or not, it cannot be {verdict!r}")
        elif verdict == "violated" and trace.label in ("benign", "borderline"):
            problems.append(f"{rid} 'violated' on a {trace.label} prompt (only harmful prompts violate a rule)")
        elif verdict == "applies" and trace.label == "harmful":
            problems.append(f"{rid} 'applies' on a harmful prompt (permit rules cover benign requests)")
    return problems


def repair_titles(trace: Trace, rules: RuleBook) -> tuple[Trace, list[str]]:
    """`trace` with every wrong cited title replaced by the rulebook's, and what was replaced."""
    fixed: list[str] = []

    def sub(m: re.Match) -> str:
        rid, title, _, group = _parts(m)
        if title is None or rid not in rules or _title_ok(rules, rid, title):
            return m.group(0)
        new = rules[rid].title if group == "title_first" else rules[rid].title.lower()
        fixed.append(f"{rid}: {title.strip()!r} -> {new!r}")
        a, b = m.start(group) - m.start(), m.end(group) - m.start()
        return m.group(0)[:a] + new + m.group(0)[b:]

    text = CITATION.sub(sub, trace.steps.get("rule_verification", ""))
    if not fixed:
        return trace, []
    return dataclasses.replace(trace, steps={**trace.steps, "rule_verification": text}), fixed
