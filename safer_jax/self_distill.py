"""Self-distilled final responses: the base model answers the benign and borderline prompts itself.

Why: SFT on short template answers taught the model to answer everything in one sentence
(issue 15). Training on the base model's own answers keeps its helpfulness and length; the
Ex-Ante steps before them still come from the trace synthesis.

The generation is long on a CPU, so it is resumable: each answer is appended to a raw JSONL
file as soon as its row ends (EOS or the token limit), and a rerun skips the ids already
there. `filter_responses` then drops refusals, loops and unfinished answers with the
evaluation's own definitions (`evaluation.refusal.classify_refusal`,
`evaluation.overlap.is_repetitive`, `finish_reason == "length"`).

Two backends: `jax` (the project's KV-cache sampler, `generate.generate_chat`) and `torch`
(transformers, greedy, finished rows dropped from the batch as they end; faster on a busy
CPU). Run as `safer-jax distill-responses --prompts P --out RAW` (see `cli.py`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

DISTILL_LABELS = ("benign", "borderline")


def _key(row: dict) -> str:
    """A raw row's identity: its id, and its sample index when sampled (`answer_prompts(num_samples=...)`)."""
    return f"{row['id']}#{row['sample']}" if row.get("sample") is not None else str(row["id"])


def _previous(path: Path) -> dict[str, dict]:
    """key -> the last answer row for it in `path` (a line cut by a kill is skipped: answered again)."""
    rows: dict[str, dict] = {}
    if path.exists():
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                    rows[_key(row)] = row
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
    return rows


def _pick(logits: Any, temperature: float, top_p: float, gen: Any) -> Any:
    """Next token per row: argmax at temperature 0, else a draw from the nucleus (top-p) of
    softmax(logits / temperature)."""
    import torch

    if temperature <= 0:
        return logits.argmax(-1)  # [B]
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [B, V]
    sp, si = probs.sort(-1, descending=True)  # [B, V]
    sp = torch.where(sp.cumsum(-1) - sp < top_p, sp, 0.0)  # the top token always stays
    draw = torch.multinomial(sp / sp.sum(-1, keepdim=True), 1, generator=gen)  # [B, 1]
    return si.gather(-1, draw).squeeze(-1)  # [B]


def _torch_decode(
    model: Any,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> Iterator[tuple[int, list[int], str]]:
    """Greedy (or, at temperature > 0, nucleus-sampled) decoding of left-padded prompts; yields
    (row, new token ids, finish_reason) as each row ends, and drops ended rows from the batch and
    the cache."""
    import torch

    gen = torch.Generator().manual_seed(seed)

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])  # [B, T]
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])  # [B, T]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]
    alive = torch.arange(len(prompts))
    outs: list[list[int]] = [[] for _ in prompts]
    eos = torch.tensor(list(eos_ids))
    with torch.inference_mode():
        res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        cache, last_pos = res.past_key_values, pos[:, -1]
        nxt = _pick(res.logits[:, -1], temperature, top_p, gen)  # [B]
        for step in range(max_new_tokens):
            ended = torch.isin(nxt, eos)
            for j, row in enumerate(alive.tolist()):
                if not bool(ended[j]):
                    outs[row].append(int(nxt[j]))
            at_limit = step + 1 == max_new_tokens
            for j, row in enumerate(alive.tolist()):
                if bool(ended[j]) or at_limit:
                    yield row, outs[row], "stop" if bool(ended[j]) else "length"
            if at_limit:
                return
            keep = (~ended).nonzero().squeeze(-1)
            if keep.numel() == 0:
                return
            if keep.numel() < alive.numel():
                cache.batch_select_indices(keep)
                alive, nxt, mask, last_pos = alive[keep], nxt[keep], mask[keep], last_pos[keep]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            last_pos = last_pos + 1
            res = model(
                input_ids=nxt[:, None],
                attention_mask=mask,
                position_ids=last_pos[:, None],
                past_key_values=cache,
                use_cache=True,
            )
            cache, nxt = res.past_key_values, _pick(res.logits[:, -1], temperature, top_p, gen)


def answer_prompts(
    rows: Sequence[dict],
    out: str | Path,
    *,
    model: str = "smollm2",
    backend: str = "torch",
    batch_size: int = 32,
    max_new_tokens: int = 320,
    threads: int | None = None,
    redo_cut: bool = False,
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_samples: int = 1,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> int:
    """Answer every row ({"id", "prompt", "label"}) not yet in `out`, with the plain chat template
    (no system prompt of ours: the template's default, as the evaluation runs it): greedily at
    temperature 0, else `num_samples` nucleus samples per prompt (rows get "sample": k, a rejection
    sample for prompts whose greedy answer is unfit; `filter_file` keeps the first fit one).
    Appends {"id", "prompt", "label", "response", "completion_tokens", "finish_reason", "model"}
    per row as it ends (a later line for the same id and sample replaces an earlier one).
    `redo_cut` continues the answers cut at a smaller token limit (finish_reason "length") up to
    `max_new_tokens` in all, from their text (greedy decoding makes this the same answer, up to
    re-tokenization). Returns how many rows were answered now."""
    from safer_jax.generate import chat_prompt_ids

    if num_samples < 1 or (num_samples > 1 and temperature <= 0):
        raise ValueError(f"num_samples={num_samples} needs temperature > 0 (greedy answers are all the same)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prev = _previous(out)
    cut = {
        k: r
        for k, r in prev.items()
        if redo_cut and r.get("finish_reason") == "length" and r.get("completion_tokens", 0) < max_new_tokens
    }
    wanted = [{**r, "sample": k} if temperature > 0 else dict(r) for r in rows for k in range(num_samples)]
    todo = [r for r in wanted if _key(r) not in prev or _key(r) in cut]
    done = set(prev) - set(cut)
    log(
        f"{len(done)} already answered in {out}, {len(todo)} to go ({backend}, batch {batch_size}, "
        f"max_new_tokens {max_new_tokens}"
        + (f", temperature {temperature}, top_p {top_p})" if temperature > 0 else ")")
    )
    if not todo:
        return 0
    tok, encode_model = _load(model, backend, threads)
    encoded = [chat_prompt_ids(tok, r) for r in todo]
    started = [tok.encode(cut[_key(r)]["response"], add_special_tokens=False) if _key(r) in cut else [] for r in todo]
    order = sorted(range(len(todo)), key=lambda i: (len(started[i]), len(encoded[i])))
    written, t0 = 0, time.perf_counter()
    if out.exists() and out.stat().st_size and not out.read_bytes().endswith(b"\n"):
        with open(out, "a", encoding="utf-8") as f:  # a line cut by a kill must not swallow the next one
            f.write("\n")
    with open(out, "a", encoding="utf-8") as f:
        for n_batch, b in enumerate(range(0, len(order), batch_size)):
            idx = order[b : b + batch_size]
            budget = max_new_tokens - max(len(started[i]) for i in idx)
            prompts = [encoded[i] + started[i] for i in idx]
            sampling = {"temperature": temperature, "top_p": top_p, "seed": seed + n_batch} if temperature > 0 else {}
            for j, new, reason in encode_model(prompts, budget, **sampling):
                r = todo[idx[j]]
                new = started[idx[j]] + new
                row = {
                    "id": r["id"],
                    "prompt": r["prompt"],
                    "label": r.get("label"),
                    "response": tok.decode(new, skip_special_tokens=True).strip(),
                    "completion_tokens": len(new),
                    "finish_reason": reason,
                    "model": model,
                }
                if temperature > 0:
                    row.update(sample=r["sample"], temperature=temperature, top_p=top_p)
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                written += 1
            log(f"{written}/{len(todo)} answered, {time.perf_counter() - t0:.0f} s")
    return written


def _load(model: str, backend: str, threads: int | None) -> tuple[Any, Callable[..., Iterator]]:
    """(tokenizer, fn(prompts, max_new_tokens, [temperature, top_p, seed]) -> iterator of
    (row, ids, finish_reason)); greedy without the sampling arguments."""
    from transformers import AutoTokenizer

    folder, gguf = (model, None)
    if model == "smollm2":
        from safer_jax.models.embedded import smollm2_location

        loc, gguf = smollm2_location()
        folder = str(loc)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if backend == "torch":
        import torch
        from transformers import AutoModelForCausalLM

        if threads:
            torch.set_num_threads(threads)
        m = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
        eos = sorted({i for i in (tok.eos_token_id, m.config.eos_token_id) if isinstance(i, int)})
        return tok, lambda prompts, n, **kw: _torch_decode(m, prompts, n, eos, pad, **kw)
    if backend != "jax":
        raise ValueError(f"backend must be 'torch' or 'jax', got {backend!r}")
    from safer_jax.generate import SamplingConfig, model_eos_ids, sample_batch
    from safer_jax.models import from_pretrained

    jm = from_pretrained(folder, gguf_file=gguf)
    eos_j = model_eos_ids(jm.config, (tok.eos_token_id,))

    def run(prompts: list[list[int]], n: int, **kw: Any) -> Iterator[tuple[int, list[int], str]]:
        cfg = SamplingConfig(greedy=not kw, max_new_tokens=n, **kw)
        res = sample_batch(jm, prompts, cfg, eos_ids=eos_j, pad_id=pad)
        yield from ((j, list(ids), reason) for j, (ids, reason) in enumerate(zip(res.tokens, res.finish_reasons)))

    return tok, run


def drop_reason(row: dict) -> str | None:
    """Why an answer is unfit as a training response (None: fit), by the evaluation's definitions."""
    from safer_jax.evaluation.overlap import is_repetitive
    from safer_jax.evaluation.refusal import classify_refusal

    response = (row.get("response") or "").strip()
    if not response:
        return "empty"
    if row.get("finish_reason") == "length":
        return "unfinished (cut at max_new_tokens)"
    verdict = classify_refusal(response)
    if verdict.refused:
        return f"refusal ({verdict.reason})"
    if is_repetitive(response):
        return "looping"
    return None


def filter_file(raw: str | Path | Sequence[str | Path], out: str | Path) -> tuple[int, int]:
    """Write one fit answer per prompt of `raw` to `out` (in id order) and the prompts without one,
    with the reasons, to `out.dropped.jsonl`; returns (kept, dropped). Several raw files are
    candidates in the order given (e.g. the greedy answers, then rejection samples); within a file
    the greedy answer comes before samples 0, 1, ...; the first fit candidate is kept."""
    raws = [raw] if isinstance(raw, (str, Path)) else list(raw)
    cands: dict[str, list[tuple[tuple[int, int], dict]]] = {}
    for rank, path in enumerate(raws):
        for r in _previous(Path(path)).values():  # a later line for a key replaces an earlier one
            order = (rank, -1 if r.get("sample") is None else int(r["sample"]))
            cands.setdefault(str(r["id"]), []).append((order, r))
    kept, dropped = [], []
    for key in sorted(cands):
        rows = [r for _, r in sorted(cands[key], key=lambda c: c[0])]
        whys = [drop_reason(r) for r in rows]
        fit = next((r for r, why in zip(rows, whys) if why is None), None)
        if fit is not None:
            kept.append(fit)
        else:
            dropped.append({**rows[0], "dropped": "; ".join(dict.fromkeys(w for w in whys if w))})
    for path, part in ((Path(out), kept), (Path(f"{out}.dropped.jsonl"), dropped)):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
    return len(kept), len(dropped)


def load_responses(path: str | Path) -> dict[str, str]:
    """id -> response of a filtered answers file (`filter_file`'s output)."""
    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    out[str(row["id"])] = str(row["response"])
                except (json.JSONDecodeError, KeyError) as e:
                    raise ValueError(f"{path}:{n}: expected {{id, response}} ({e})") from None
    return out
