"""Answer-versus-reference overlap and token counts.

Why two overlap scores: token F1 (bag of words, as in SQuAD) rewards a short answer that
states the fact; ROUGE-L recall (longest common subsequence over the reference's length)
rewards an answer that covers the reference in order. Both come from Google's
`rouge-score` package with its defaults (lower-cased alphanumeric tokens, punctuation as
separators, no stemming, no stop-word removal), so the numbers are comparable with other
papers' `rouge-score` numbers: ROUGE-L recall is its `rougeL` recall, and token F1 is its
`rouge1` F-measure (clipped unigram overlap: 2PR / (P + R)). They are reported, not used to
judge helpfulness, unless a threshold is set (`ScoreOptions.helpful_min_overlap`): many good
answers (a poem, advice) share few words with any one reference.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def _scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)


def _scores(response: str, reference: str) -> dict[str, Any]:
    return _scorer().score(target=reference or "", prediction=response or "")


def token_f1(response: str, reference: str) -> float:
    """Unigram F1 between a response and a reference (`rouge-score` rouge1 F; 0 when either is empty)."""
    return float(_scores(response, reference)["rouge1"].fmeasure)


def rouge_l_recall(response: str, reference: str) -> float:
    """ROUGE-L recall (`rouge-score` rougeL): LCS over the reference's length, i.e. how much of the
    reference the answer covers, in order (0 when either is empty)."""
    return float(_scores(response, reference)["rougeL"].recall)


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
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
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
