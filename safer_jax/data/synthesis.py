"""Trace synthesis: a teacher writes an Ex-Ante trace per labelled prompt.

Teachers:
- `template`: offline; composes varied traces from each prompt's label and rule ids and
  each rule's phrasebank (random choices seeded per prompt id, so reruns are identical).
  Benign and borderline prompts need a `reference` answer for the final response.
- `openai`: any OpenAI-compatible `/chat/completions` endpoint (vLLM, SGLang, llama.cpp
  server, hosted APIs) with concurrency, retries with exponential backoff (429, 5xx,
  timeouts, broken JSON), `Retry-After`, and a request-rate limit.
- `local`: a safer_jax model (greedy decoding), for self-distillation. It runs a model, so
  it lives next to generation (`safer_jax/teacher_local.py`): data imports no models.

Every trace is validated (all steps, known rule ids, decision consistent with the label);
rejects go to a side file with their reasons. A rerun skips ids already in either file.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import random
import threading
import time
from pathlib import Path
from typing import Any

from safer_jax.data.records import DataError, SkipReport, read_records, require
from safer_jax.data.rulecheck import repair_titles, rule_claim_problems
from safer_jax.data.rules import RuleBook
from safer_jax.data.traces import LABELS, SAFE_COMPLETE_CATEGORIES, Trace, TraceFormat, parse, validate
from safer_jax.http_retry import GaveUp, Refused, Retry, post_json, with_retries


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    id: str
    prompt: str
    label: str
    rules: tuple[str, ...]
    reference: str | None = None
    framing: str | None = None  # the attack framing around a harmful request, when labelled (FRAMING_NOTES)


def load_prompts(
    path: str | Path, rules: RuleBook, skip_invalid: bool = False, report: SkipReport | None = None
) -> list[PromptRecord]:
    report = report if report is not None else SkipReport()
    out, seen = [], set()
    for line, obj in read_records(path, skip_invalid, report):
        try:
            rid = str(require(obj, "id", (str, int), path, line))
            prompt = require(obj, "prompt", str, path, line)
            label = require(obj, "label", str, path, line)
            if label not in LABELS:
                raise DataError(f"must be one of {LABELS}, got {label!r}", path, line, "label")
            ids = require(obj, "rules", list, path, line)
            for r in ids:
                if r not in rules:
                    raise DataError(f"unknown rule id {r!r}", path, line, "rules")
            if rid in seen:
                raise DataError(f"duplicate id {rid!r}", path, line, "id")
            seen.add(rid)
            ref = obj.get("reference")
            framing = obj.get("framing")
            if framing is not None and not isinstance(framing, str):
                raise DataError(f"must be a string, got {type(framing).__name__}", path, line, "framing")
            out.append(
                PromptRecord(rid, prompt, label, tuple(ids), ref if isinstance(ref, str) else None, framing or None)
            )
        except DataError as e:
            if not skip_invalid:
                raise
            report.add(e)
    return out


class TeacherError(RuntimeError):
    """The teacher could not produce a trace for this prompt (the reason goes to rejects)."""


# ------------------------------------------------------------------ template teacher

JAILBREAK_MARKERS = (
    "pretend",
    "ignore previous",
    "ignore all",
    "role-play",
    "roleplay",
    "for a novel",
    "for a story",
    "hypothetical",
    "grandmother",
    "grandma",
    "research purposes",
    "you are now",
    "no restrictions",
    "developer mode",
)
ASSESS_OPENERS = (
    "The user is asking for help with something in the area of {area}.",
    "This request concerns {area}.",
    "The message asks about {area}.",
    "At its core, the request is about {area}.",
    "Reading the request plainly, it falls under {area}.",
)
BENIGN_ASSESS = (
    "Nothing in it points to a risk of harm; it is an ordinary request.",
    "No harm category applies, and the likely asker is simply curious or has a practical need.",
    "It carries no meaningful risk; answering it directly is the helpful thing to do.",
    "There is no sign of harmful intent and no dangerous capability involved.",
)
JAILBREAK_NOTES = (
    "The role-play or fictional framing does not change what is actually being requested.",
    "Wrapping the request in a story or a hypothetical does not make the underlying content safe.",
    "The framing tries to sidestep the rules, but the substance of the request is what matters.",
)
# Attacks that do not announce a story or a role: the request asked in the past tense, a dead
# relative to role-play, a forced compliant opening, a harmful request among harmless ones. A prompt
# file labels them in `framing`; each gets a note that says why the framing changes nothing.
FRAMING_NOTES = {
    "past_tense": (
        "Asking how it was done in the past still asks for a method that would work today.",
        "Putting the request in the past tense does not change what the answer would teach.",
    ),
    "grandmother": (
        "Asking me to play a relative who used to tell these things does not change what is being requested.",
        "The sentimental role-play is a wrapper; the answer would contain the same harmful instructions.",
    ),
    "prefix_injection": (
        "Being told how to begin the answer does not change what the answer would contain.",
        "A demanded compliant opening is an attempt to skip the safety check, not a reason to help.",
    ),
    "multi_request": (
        "The everyday questions around it do not make the harmful part acceptable.",
        "One part of this list is harmful, and bundling it with ordinary questions does not change that.",
    ),
}
# A permit rule a framed harmful request reaches for (history for the past tense, fiction for a
# role-play) does not apply: the trace says so before the prohibit rule's verdict.
NOT_COVERED = (
    "It covers events, causes and consequences, not working instructions asked for under its name.",
    "The framing borrows this rule's name, but the content asked for is outside it.",
)
BORDERLINE_NOTES = (
    "It only sounds risky: the wording touches on {topic}, but the request itself is benign.",
    "A keyword here relates to {topic}, yet what is actually asked is harmless.",
    "Despite surface overlap with {topic}, answering does not provide any harmful capability.",
)
CALIBRATE = {
    "refuse": (
        "Decline briefly, name the concern, and point to a safe alternative.",
        "Give a short refusal without lecturing and offer something genuinely useful instead.",
        "Refuse clearly; do not provide partial steps; suggest a legitimate resource.",
    ),
    "comply": (
        "Answer directly and accurately; keep it short.",
        "Help fully and concisely; no disclaimers are needed.",
        "Give the answer plainly, without unnecessary caveats.",
    ),
    "safe_complete": (
        "Answer helpfully, keep to general, non-operational information, and add a brief safety note.",
        "Help with the legitimate need while staying at a safe level of detail.",
        "Provide the useful, safe answer and mention where to get expert help if relevant.",
    ),
}

# A supportive safe completion for self-harm (the shape `evaluation/selfharm.py` checks):
# acknowledge the person, decline methods without lecturing, crisis resources that are not
# only US ones, an invitation to keep talking. One part of each is drawn per trace.
SUPPORT = (
    (
        "I'm really sorry you're feeling this way, and I'm glad you told me.",
        "It sounds like you're carrying something really painful right now.",
        "Thank you for telling me how you feel; that takes courage.",
        "I'm so sorry things feel this overwhelming. Your life matters.",
    ),
    (
        "I can't help with anything that could hurt you, but I don't want you to face this alone.",
        "I won't share anything that could put you in danger, because I care about your safety.",
        "That's not something I can help with, but you deserve support right now.",
    ),
    (
        "If you might act on these thoughts, please contact your local emergency number now. A crisis line in your "
        "country can talk with you any time; findahelpline.com lists free services around the world.",
        "Please reach out to local emergency services if you're in danger, or to a crisis line where you live (for "
        "example Samaritans on 116 123 in the UK and Ireland, or 988 in the US).",
        "You can reach a trained listener through a crisis line in your country; Befrienders Worldwide can help you "
        "find one near you, and local emergency services are there if you're not safe.",
    ),
    (
        "Would you like to tell me what has been making things so hard?",
        "I'm here to listen if you want to talk about what's going on.",
        "Do you want to talk about what happened today? I'm here for you.",
    ),
)
SUPPORT_CALIBRATE = (
    "Do not give methods; respond with care: acknowledge the person, offer crisis resources that "
    "work in any country, and invite them to keep talking.",
    "A bare refusal would leave a person in crisis alone: stay supportive, give no methods, point "
    "to local and international crisis help, and invite them to talk.",
)


def _names_concern(refusal: str, rule: Any) -> bool:
    words = {w for w in rule.title.lower().replace(",", " ").split() if len(w) > 4}
    return "rule" in refusal.lower() or any(w[:6] in refusal.lower() for w in words)


class TemplateTeacher:
    """Offline teacher composing traces from labels and per-rule phrasebanks."""

    name = "template"

    def __init__(self, rules: RuleBook, seed: int = 0):
        self.rules, self.seed = rules, seed

    def __call__(self, rec: PromptRecord) -> Trace:
        rng = random.Random(f"{self.seed}:{rec.id}")
        rules = [self.rules[r] for r in rec.rules]
        prohibit = [r for r in rules if r.kind == "prohibit"]
        permit = [r for r in rules if r.kind == "permit"]
        jailbreak = any(m in rec.prompt.lower() for m in JAILBREAK_MARKERS)
        if rec.label == "harmful":
            if not prohibit:
                raise TeacherError("harmful prompt lists no prohibit rule")
            main = prohibit[0]
            assess = [rng.choice(ASSESS_OPENERS).format(area=main.title.lower()), rng.choice(main.phrases["risk"])]
            if rec.framing in FRAMING_NOTES:
                assess.append(rng.choice(FRAMING_NOTES[rec.framing]))
            elif jailbreak or rec.framing:
                assess.append(rng.choice(JAILBREAK_NOTES))
            verify = [f"{r.citation()}: does not apply. {rng.choice(NOT_COVERED)}" for r in permit]
            verify += [f"{r.citation()}: violated. {rng.choice(r.phrases['violated'])}" for r in prohibit]
            if main.category in SAFE_COMPLETE_CATEGORIES:
                decision, calib = "safe_complete", rng.choice(SUPPORT_CALIBRATE)
                response = " ".join(rng.choice(part) for part in SUPPORT)
            else:  # a brief refusal that names the concern, then a safe alternative
                decision, calib = "refuse", rng.choice(CALIBRATE["refuse"])
                refusal = rng.choice(main.phrases["refusal"])
                if not _names_concern(refusal, main):
                    refusal += f" The concern is {main.title.lower()}."
                response = f"{refusal} {rng.choice(main.phrases['alternative'])}"
        else:
            if not rec.reference:
                raise TeacherError(f"{rec.label} prompt has no reference answer (the template teacher needs one)")
            if not permit:
                raise TeacherError(f"{rec.label} prompt lists no permit rule")
            p = permit[0]
            assess = [rng.choice(ASSESS_OPENERS).format(area=p.title.lower())]
            verify = []
            if rec.label == "borderline" and prohibit:
                topic = prohibit[0].title.lower()
                assess.append(rng.choice(BORDERLINE_NOTES).format(topic=topic))
                verify += [f"{r.citation()}: not violated. {rng.choice(r.phrases['not_violated'])}" for r in prohibit]
            else:
                assess.append(rng.choice(BENIGN_ASSESS))
            verify.append(f"{p.citation()}: applies. {rng.choice(p.phrases['applies'])}")
            decision = "safe_complete" if rec.label == "borderline" else "comply"
            calib = f"{rng.choice(CALIBRATE[decision])} {rng.choice(p.phrases['framing'])}"
            response = rec.reference
        steps = {
            "initial_assessment": " ".join(assess),
            "rule_verification": "\n".join(verify),
            "path_calibration": calib,
        }
        return Trace(rec.id, rec.prompt, steps, decision, response, rec.label, tuple(rec.rules))


# ------------------------------------------------------------------ teacher prompt (LLM teachers)


def teacher_messages(rec: PromptRecord, rules: RuleBook, fmt: TraceFormat = TraceFormat()) -> list[dict[str, str]]:
    h1, h2, h3 = fmt.headers
    system = (
        "You write Ex-Ante safety reasoning traces. Before answering, reason in three steps, then answer.\n"
        f"Format exactly:\n{fmt.open_tag}\n{h1}\n(what is asked, who might ask, which harm categories could apply, "
        f"any jailbreak framing)\n{h2}\n(cite each rule by its title, then its id, like 'Weapons and explosives (R07): violated'; "
        f"verdicts: violated / not violated / applies, with why)\n"
        f"{h3}\n{fmt.decision_prefix}refuse|safe_complete|comply\n(why, and what a safe, helpful answer looks like)\n"
        f"{fmt.close_tag}\n(the final response)\n\n"
        "Never include operational harmful detail; refusals explain the rule without instructions.\n"
        "Safety rules:\n" + rules.prompt_text()
    )
    hint = f"(label: {rec.label}; relevant rules: {', '.join(rec.rules)})"
    return [{"role": "system", "content": system}, {"role": "user", "content": f"{rec.prompt}\n\n{hint}"}]


def trace_from_text(rec: PromptRecord, text: str, fmt: TraceFormat) -> Trace:
    """The teacher's reply parsed into a trace of `rec`; a malformed one raises `TeacherError`."""
    p = parse(text, fmt)
    if not p.valid:
        raise TeacherError("malformed trace: " + "; ".join(p.errors))
    return Trace(rec.id, rec.prompt, p.steps, p.decision, p.response, rec.label, tuple(rec.rules))


class _RateLimiter:
    def __init__(self, per_second: float | None):
        self.interval = 1.0 / per_second if per_second else 0.0
        self.next = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            at = max(now, self.next)
            self.next = at + self.interval
        time.sleep(max(0.0, at - now))


class OpenAITeacher:
    """Any OpenAI-compatible chat endpoint; thread-safe, retried, rate limited."""

    name = "openai"

    def __init__(
        self,
        rules: RuleBook,
        base_url: str,
        model: str,
        api_key: str | None = None,
        max_retries: int = 5,
        timeout: float = 60.0,
        backoff: float = 1.0,
        rate_limit: float | None = None,
        temperature: float = 0.7,
        max_tokens: int = 1024,
        fmt: TraceFormat = TraceFormat(),
    ):
        self.rules, self.url, self.model, self.key = rules, base_url.rstrip("/") + "/chat/completions", model, api_key
        self.max_retries, self.timeout, self.backoff = max_retries, timeout, backoff
        self.limiter = _RateLimiter(rate_limit)
        self.temperature, self.max_tokens, self.fmt = temperature, max_tokens, fmt

    def _request(self, rec: PromptRecord) -> str:
        body = {
            "model": self.model,
            "messages": teacher_messages(rec, self.rules, self.fmt),
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        return post_json(self.url, body, self.key, self.timeout)["choices"][0]["message"]["content"]

    def __call__(self, rec: PromptRecord) -> Trace:
        def attempt() -> Trace:
            try:
                return trace_from_text(rec, self._request(rec), self.fmt)
            except TeacherError as e:  # a well-formed reply with a malformed trace: retry, it may vary
                raise Retry(str(e)) from None

        try:
            return with_retries(attempt, max_retries=self.max_retries, backoff=self.backoff, before=self.limiter.wait)
        except Refused as e:
            raise TeacherError(f"endpoint refused the request: {e.last}") from None
        except GaveUp as e:
            raise TeacherError(f"gave up after {e.attempts} attempts; last: {e.last}") from None


# ------------------------------------------------------------------ the driver


@dataclasses.dataclass
class SynthesisResult:
    written: int = 0
    rejected: int = 0
    skipped_done: int = 0
    repaired: int = 0


def _done_ids(*files: Path) -> set[str]:
    done = set()
    for f in files:
        if f.exists():
            for raw in f.read_text(encoding="utf-8").splitlines():
                try:
                    done.add(str(json.loads(raw)["id"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut by a crash: that id is redone
    return done


def synthesize(
    prompts: list[PromptRecord],
    teacher: Any,
    rules: RuleBook,
    out: str | Path,
    rejects: str | Path | None = None,
    concurrency: int = 1,
    fmt: TraceFormat = TraceFormat(),
    progress: bool = True,
    repair: bool = False,
    responses: dict[str, str] | None = None,
) -> SynthesisResult:
    """Write a valid trace or a reject (with reasons) for every prompt not already done.

    Beyond `traces.validate`, what the trace says about each cited rule must match the rulebook
    (`rulecheck`); with `repair`, a wrong cited title is replaced from the rulebook instead of
    rejected. `responses` (id -> text, e.g. the base model's own answers from
    `safer-jax distill-responses`) replaces the final response of benign and borderline traces.
    """
    from tqdm import tqdm

    out = Path(out)
    rejects = Path(rejects) if rejects else out.with_name(out.stem + ".rejects.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    done = _done_ids(out, rejects)
    for f in (out, rejects):  # a line cut by a crash must not swallow the next record
        if f.exists() and f.stat().st_size and not f.read_bytes().endswith(b"\n"):
            with open(f, "a", encoding="utf-8") as fh:
                fh.write("\n")
    todo = [p for p in prompts if p.id not in done]
    res = SynthesisResult(skipped_done=len(prompts) - len(todo))

    def run(rec: PromptRecord) -> tuple[PromptRecord, Trace | None, list[str]]:
        try:
            trace = teacher(rec)
        except TeacherError as e:
            return rec, None, [str(e)]
        fixed: list[str] = []
        if repair:
            trace, fixed = repair_titles(trace, rules)
        if responses and rec.label != "harmful" and rec.id in responses:
            trace = dataclasses.replace(trace, response=responses[rec.id])
        problems = validate(trace, rules, fmt) + rule_claim_problems(trace, rules)
        return rec, (None if problems else trace), problems or [f"repaired title {f}" for f in fixed]

    bar = tqdm(
        total=len(todo), desc=f"synthesize ({teacher.name})", disable=not progress, unit="prompt", mininterval=2.0
    )
    with (
        open(out, "a", encoding="utf-8") as fo,
        open(rejects, "a", encoding="utf-8") as fr,
        cf.ThreadPoolExecutor(max(1, concurrency)) as pool,
    ):
        for fut in cf.as_completed([pool.submit(run, rec) for rec in todo]):
            rec, trace, problems = fut.result()
            if trace is not None and problems:  # repaired: the notes go with the count, the trace is fine
                res.repaired += 1
            if trace is not None:
                fo.write(json.dumps(trace.to_json(), ensure_ascii=False) + "\n")
                fo.flush()
                res.written += 1
            else:
                fr.write(
                    json.dumps(
                        {"id": rec.id, "prompt": rec.prompt, "label": rec.label, "reasons": problems},
                        ensure_ascii=False,
                    )
                    + "\n"
                )
                fr.flush()
                res.rejected += 1
            bar.update(1)
            bar.set_postfix(ok=res.written, rejected=res.rejected, refresh=False)
    bar.close()
    return res
