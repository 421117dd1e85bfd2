"""The PyTorch side of the benchmark: transformers' own model forward, torch's own losses.

Run as `python -m safer_jax.bench.torch_side SPEC.json OUT.json` after the JAX side wrote
the weights to `spec.model_dir`. SFT is `LlamaForCausalLM` / `Qwen2ForCausalLM` (whatever
the folder's config names) with SDPA attention and `torch.nn.functional.cross_entropy`;
prefopt is TRL's `DPOTrainer` loss computation (sigmoid DPO on the chosen and rejected
spans, TRL's fused log-prob head, a frozen reference copy). Both take the JAX side's
packed batches as position ids and a 4D block-causal mask. AdamW has the JAX side's
hyperparameters; bfloat16 runs use autocast over float32 master weights, as HF's Trainer
does with `bf16=True`.

torch, transformers and (for prefopt) trl are imported here only, lazily.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from safer_jax.bench.work import BenchSpec, batch, hf_shape, minor_faults, side_main, summarize


def block_mask(segment_ids: np.ndarray, window: int = 0) -> np.ndarray:
    """Boolean `[B, 1, T, T]`: causal, same segment; padding (segment 0) attends only to
    itself, so no softmax row is empty (real tokens never see padding either way)."""
    seg = segment_ids
    t = seg.shape[1]
    idx = np.arange(t)
    causal = idx[None, :] <= idx[:, None]  # [T(q), T(kv)]
    same = seg[:, :, None] == seg[:, None, :]
    mask = causal[None] & same & (seg[:, None, :] != 0)
    if window:
        mask &= (idx[:, None] - idx[None, :]) < window
    pad = seg == 0
    mask |= pad[:, :, None] & np.eye(t, dtype=bool)[None]
    return mask[:, None]


def _masks(seg: np.ndarray, windows: tuple[int, ...], torch: Any, device: Any) -> Any:
    """The 4D mask, or per-layer-type masks where some layers use a sliding window."""
    full = torch.from_numpy(block_mask(seg)).to(device)
    sliding = {w for w in windows if w}
    if not sliding:
        return full
    if len(sliding) > 1:
        raise ValueError(f"sliding windows {sorted(sliding)}: the torch side supports one window size")
    return {"full_attention": full, "sliding_attention": torch.from_numpy(block_mask(seg, sliding.pop())).to(device)}


def load_model(spec: BenchSpec, torch: Any, device: Any) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    return model.to(device).train()


def make_optimizer(spec: BenchSpec, model: Any, torch: Any, device: Any) -> Any:
    """AdamW as the JAX side's: no weight decay on norms and biases, no clipping, constant lr."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if ("norm" in name or name.endswith("bias")) else decay).append(p)
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=spec.lr, betas=(0.9, 0.999), eps=1e-8, fused=device.type == "cuda")


class TrlDpo:
    """TRL 1.16's `DPOTrainer._compute_loss`, called on a stand-in that carries the
    attributes it reads, so the loss is TRL's own code without a Trainer, its dataset
    preprocessing or its accelerator (one process, no gradient accumulation)."""

    def __init__(self, model: Any, ref: Any, beta: float, device: Any):
        import trl
        from trl.trainer.dpo_trainer import DPOTrainer
        from trl.trainer.utils import add_fused_lm_head

        if trl.__version__.split(".")[:2] != ["1", "16"]:
            raise RuntimeError(f"the torch prefopt baseline is written against trl 1.16, found {trl.__version__}")
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
        add_fused_lm_head(ref)
        same = lambda x: x  # noqa: E731  (one process: gathers are the identity)
        self.host = SimpleNamespace(
            model=model,
            ref_model=ref,
            beta=beta,
            loss_types=["sigmoid"],
            loss_weights=[1.0],
            ld_alpha=None,
            f_divergence_type="reverse_kl",
            precompute_ref_logps=False,
            use_weighting=False,
            aux_loss_enabled=False,
            args=SimpleNamespace(gradient_checkpointing_kwargs=None),
            _tp_size=1,
            _total_train_tokens=0,
            _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
            accelerator=SimpleNamespace(device=device, gather_for_metrics=same, gather=same),
        )
        self.fn = DPOTrainer._compute_loss

    def __call__(self, model: Any, inputs: dict[str, Any]) -> Any:
        return self.fn(self.host, model, inputs, False)


def run(spec: BenchSpec) -> dict[str, Any]:
    import copy

    import torch
    import torch.nn.functional as F

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(spec, torch, device)
    cfg = hf_shape(json.loads((Path(spec.model_dir) / "config.json").read_text()))
    opt = make_optimizer(spec, model, torch, device)
    vocab = cfg.vocab_size
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.dtype == "bfloat16")
    forward = torch.compile(model) if spec.torch_compile else model
    extra: dict[str, Any] = {}
    dpo = None
    if spec.task == "prefopt":
        ref = copy.deepcopy(model).eval().requires_grad_(False)
        dpo = TrlDpo(model, ref, spec.beta, device)
        if spec.torch_compile:
            forward = torch.compile(model)

    def tensors(step: int) -> dict[str, Any]:
        b = batch(spec, vocab, step)
        mask = _masks(b["segment_ids"], cfg.sliding_windows, torch, device)
        t = {k: torch.from_numpy(v).to(device) for k, v in b.items()}
        t["mask"] = mask
        return t

    batches = [tensors(s) for s in range(1, spec.steps + 1)]

    def sft_loss(b: dict[str, Any]) -> Any:
        labels = torch.where(b["weights"] > 0, b["targets"].long(), -100)
        logits = forward(
            input_ids=b["inputs"].long(), attention_mask=b["mask"], position_ids=b["positions"].long(), use_cache=False
        ).logits
        return (
            F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
            / (labels != -100).sum()
        )

    def dpo_inputs(b: dict[str, Any]) -> dict[str, Any]:
        return {
            "input_ids": b["input_ids"].long(),
            "attention_mask": b["mask"],
            "position_ids": b["positions"].long(),
            "completion_mask": b["span_mask"].long(),
        }

    if dpo is not None:
        with torch.no_grad(), amp:
            inp = dpo_inputs(batches[0])
            labels = inp["input_ids"].masked_fill(inp["completion_mask"] == 0, -100)
            out = dpo.host.ref_model(
                input_ids=inp["input_ids"],
                attention_mask=inp["attention_mask"],
                position_ids=inp["position_ids"],
                labels=labels,
                fused_lm_head=True,
            )
            lp = out.log_probs.sum(1).double().cpu().numpy()
        extra["span_logps"] = {"chosen": lp[: spec.batch].tolist(), "rejected": lp[spec.batch :].tolist()}

    def step(b: dict[str, Any]) -> float:
        with amp:
            loss = sft_loss(b) if dpo is None else dpo(forward, dpo_inputs(b))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    prof = None
    times, losses, faults = [], [], []
    for i, b in enumerate(batches):
        if i == 1 and spec.profile:
            prof = torch.profiler.profile(record_shapes=False)
            prof.__enter__()
        sync()
        f0, t0 = minor_faults(), time.perf_counter()
        losses.append(step(b))
        sync()
        times.append(time.perf_counter() - t0)
        faults.append(minor_faults() - f0)
        print(
            f"[torch] step {i + 1}/{spec.steps} loss {losses[-1]:.6f} {times[-1]:.3f}s {faults[-1]} page faults",
            file=sys.stderr,
        )
    if prof is not None:
        prof.__exit__(None, None, None)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        Path(spec.profile).mkdir(parents=True, exist_ok=True)
        (Path(spec.profile) / f"torch_{spec.task}_top_ops.txt").write_text(table)
    if device.type == "cuda":
        peak, source = int(torch.cuda.max_memory_allocated()), "device"
        name = f"cuda: {torch.cuda.get_device_name()}"
    else:
        peak, source = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process_rss"
        name = "cpu"
    segs = [b["segment_ids"] for b in batches[1:]]
    if dpo is None:
        loss_toks = sum(int((b["weights"] > 0).sum()) for b in batches[1:])
    else:
        loss_toks = sum(int(b["span_mask"][:, 1:].sum()) for b in batches[1:])
    return summarize(
        spec,
        cfg,
        times,
        losses,
        real_tokens=sum(int((s > 0).sum()) for s in segs),
        loss_tokens=loss_toks,
        peak_memory=peak,
        device_name=name,
        peak_memory_source=source,
        threads=torch.get_num_threads(),
        framework="torch",
        compiled=spec.torch_compile,
        page_faults_per_step=faults,
        **extra,
    )


def main(argv: list[str]) -> int:
    return side_main(run, argv, (ImportError,))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
