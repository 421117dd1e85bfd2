"""Near-duplicate prompts between training and evaluation: content-word Jaccard similarity.

Why not shared n-grams: a paraphrase ("What's the most painless way to ..." vs "What is the
most painless way to ...") shares no 8-word span yet asks the same thing, so an evaluation
prompt would measure memorisation of its training twin. Content words are lower-cased
alphanumeric words with a stop-word list removed, possessive "'s" dropped and a plural "s"
stripped ("pills" == "pill"); similarity is |A & B| / |A | B| over the two word sets.
`tests/test_bundled_data.py` fixes the threshold at 0.5 for harmful and borderline prompts.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

STOPWORDS = frozenset(
    [
        "a",
        "about",
        "above",
        "after",
        "again",
        "all",
        "also",
        "am",
        "an",
        "and",
        "any",
        "are",
        "as",
        "at",
        "be",
        "been",
        "being",
        "before",
        "below",
        "between",
        "both",
        "but",
        "by",
        "can",
        "could",
        "did",
        "do",
        "does",
        "doing",
        "down",
        "during",
        "each",
        "few",
        "for",
        "from",
        "further",
        "get",
        "got",
        "had",
        "has",
        "have",
        "having",
        "he",
        "her",
        "here",
        "hers",
        "him",
        "his",
        "how",
        "i",
        "if",
        "in",
        "into",
        "is",
        "it",
        "its",
        "itself",
        "just",
        "let",
        "me",
        "more",
        "most",
        "my",
        "myself",
        "no",
        "nor",
        "not",
        "now",
        "of",
        "off",
        "on",
        "once",
        "only",
        "or",
        "other",
        "our",
        "ours",
        "out",
        "over",
        "own",
        "same",
        "she",
        "should",
        "so",
        "some",
        "such",
        "than",
        "that",
        "the",
        "their",
        "them",
        "then",
        "there",
        "these",
        "they",
        "this",
        "those",
        "through",
        "to",
        "too",
        "under",
        "until",
        "up",
        "very",
        "was",
        "way",
        "we",
        "were",
        "what",
        "when",
        "where",
        "which",
        "while",
        "who",
        "whom",
        "why",
        "will",
        "with",
        "would",
        "you",
        "your",
        "yours",
        "yourself",
        "s",
        "t",
        "don",
        "can't",
        "won't",
        "what's",
        "it's",
        "i'm",
    ]
)
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def content_words(text: str) -> frozenset[str]:
    """The set of content words of `text` (see the module docstring)."""
    out = set()
    for w in _WORD.findall(text.lower().replace("\u2019", "'")):
        if w in STOPWORDS:
            continue
        w = re.sub(r"'s$", "", w)
        if "'" in w or w in STOPWORDS:
            continue
        if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
            w = w[:-1]
        out.add(w)
    return frozenset(out)


def jaccard(a: str, b: str) -> float:
    """Content-word Jaccard similarity of two texts (0 when both have no content words)."""
    x, y = content_words(a), content_words(b)
    return len(x & y) / len(x | y) if x | y else 0.0


@dataclasses.dataclass(frozen=True)
class NearDuplicate:
    score: float
    eval_id: str
    train_id: str
    eval_prompt: str
    train_prompt: str


def near_duplicates(
    eval_rows: Iterable[dict],
    train_rows: Iterable[dict],
    threshold: float,
    labels: tuple[str, ...] = ("harmful", "borderline"),
) -> list[NearDuplicate]:
    """Every (eval, train) prompt pair with Jaccard >= `threshold`, for eval rows whose label is in
    `labels` (rows are dicts with "id", "prompt", "label"), most similar first."""
    train = [(str(t["id"]), t["prompt"], content_words(t["prompt"])) for t in train_rows]
    hits = []
    for e in eval_rows:
        if e.get("label") not in labels:
            continue
        a = content_words(e["prompt"])
        for tid, tprompt, b in train:
            union = a | b
            score = len(a & b) / len(union) if union else 0.0
            if score >= threshold:
                hits.append(NearDuplicate(score, str(e["id"]), tid, e["prompt"], tprompt))
    return sorted(hits, key=lambda h: (-h.score, h.eval_id, h.train_id))
