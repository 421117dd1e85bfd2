"""Answer-versus-reference overlap and token counts.

Why two overlap scores: token F1 (bag of words, as in SQuAD) rewards a short answer that
states the fact; ROUGE-L recall (longest common subsequence over the reference's length)
rewards an answer that covers the reference in order. Both run on *content tokens*:
lower-cased words and numbers, thousands separators removed ("1,000" == "1000"), a short
stop-word list dropped. They are reported, not used to judge helpfulness, unless a
threshold is set (`ScoreOptions.helpful_min_overlap`): many good answers (a poem, advice)
share few words with any one reference.
"""

from __future__ import annotations

import collections
import re
from typing import Any

STOPWORDS = frozenset(
    "a an the and or but of to in on at for with by from as is are was were be been being it its this that these "
    "those there here what which who whom how why when where do does did has have had i you he she we they me him "
    "her us them my your our their so if then than too very can could would should will just not no yes".split())
_WORD = re.compile(r"[a-z0-9]+(?:\.[0-9]+)?")


def content_tokens(text: str) -> list[str]:
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text.lower())
    return [w for w in _WORD.findall(text) if w not in STOPWORDS]


def token_f1(response: str, reference: str) -> float:
    """Bag-of-content-token F1 between a response and a reference (0 when either is empty)."""
    r, g = content_tokens(response), content_tokens(reference)
    common = sum((collections.Counter(r) & collections.Counter(g)).values())
    if not r or not g or not common:
        return 0.0
    p, rec = common / len(r), common / len(g)
    return 2 * p * rec / (p + rec)


def rouge_l_recall(response: str, reference: str) -> float:
    """LCS of content tokens / reference length: how much of the reference the answer covers, in order."""
    r, g = content_tokens(response), content_tokens(reference)
    if not r or not g:
        return 0.0
    prev = [0] * (len(r) + 1)
    for gt in g:
        cur = [0] * (len(r) + 1)
        for j, rt in enumerate(r, 1):
            cur[j] = prev[j - 1] + 1 if gt == rt else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1] / len(g)


def is_repetitive(text: str | None, n: int = 8, min_words: int = 40, max_distinct: float = 0.5) -> bool | None:
    """Degenerate looping ("I'm so sorry. I'm so sorry. ..."): under half of the word n-grams are distinct.

    Small models at greedy decoding often loop until max_new_tokens; such an answer neither
    refuses nor helps, and the rates above would otherwise count it as an answer.
    """
    if text is None:
        return None
    words = text.lower().split()
    if len(words) < min_words:
        return False
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) < max_distinct


def count_tokens(text: str | None, tokenizer: Any = None) -> int:
    """Tokens of `text` under `tokenizer` (HF or a wrapper with `.tok`), else whitespace words."""
    if not text:
        return 0
    tok = getattr(tokenizer, "tok", tokenizer)
    if tok is not None and hasattr(tok, "encode"):
        try:
            return len(tok.encode(text, add_special_tokens=False))
        except TypeError:
            return len(tok.encode(text))
    return len(text.split())
