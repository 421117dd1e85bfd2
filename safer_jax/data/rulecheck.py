"""What a trace says about each rule it cites, checked against the rulebook (issue 15).

A teacher can cite a real id with the wrong rule behind it ("R01 (theft and vandalism)",
though R01 is the CBRN rule), or claim a verdict that does not fit: "applies" belongs to
permit rules, "violated" to prohibit rules; a harmful prompt violates a prohibit rule, a
benign or borderline one violates none and is the case a permit rule applies to. Each
citation in step 2 reads `R07 (title): verdict ...`; the title must be the rulebook's or one
of the rule's declared `aliases`. `repair_titles` replaces a wrong title from the rulebook:
the only fix that is mechanical (a wrong verdict needs a new trace).
"""

from __future__ import annotations

import dataclasses
import re

from safer_jax.data.rules import RuleBook
from safer_jax.data.traces import Trace

CITATION = re.compile(
    r"\b(R\d{2,3})\b(?:\s*\(([^()]*)\))?\s*:?\s*(not violated|violated|does not apply|applies)?", re.I
)


def _norm(title: str) -> str:
    return re.sub(r"\s+", " ", title.strip().lower())


def _title_ok(rules: RuleBook, rid: str, title: str) -> bool:
    rule = rules[rid]
    return _norm(title) in {_norm(rule.title), *(_norm(a) for a in rule.aliases)}


def rule_claim_problems(trace: Trace, rules: RuleBook) -> list[str]:
    """Reasons the rule verification misstates a rule's title or verdict ([] = consistent)."""
    problems = []
    for m in CITATION.finditer(trace.steps.get("rule_verification", "")):
        rid, title, verdict = m.group(1), m.group(2), (m.group(3) or "").lower()
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
        rid, title = m.group(1), m.group(2)
        if title is None or rid not in rules or _title_ok(rules, rid, title):
            return m.group(0)
        fixed.append(f"{rid}: {title.strip()!r} -> {rules[rid].title.lower()!r}")
        return m.group(0).replace(f"({title})", f"({rules[rid].title.lower()})", 1)

    text = CITATION.sub(sub, trace.steps.get("rule_verification", ""))
    if not fixed:
        return trace, []
    return dataclasses.replace(trace, steps={**trace.steps, "rule_verification": text}), fixed
