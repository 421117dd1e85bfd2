"""The training loop shared by SFT and preference optimization: I/O, logging, checkpoints,
preemption and export. The step itself stays a pure jitted function that callers compile.

A run folder that already holds checkpoints resumes from the latest complete one (model,
optimizer, step and grain iterator), so steps after the resume see exactly the batches
and losses of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx
from tqdm import tqdm

from safer_jax.checkpoint import abstract_like
from safer_jax.distributed import agree_flags
from safer_jax.metrics import Throughput, device_peak_tflops
from safer_jax.sharding import shard_batch
from safer_jax.training.export import save_hf
from safer_jax.training.optimizer import schedule
from safer_jax.training.run import Preemption, Run, TrainingStopped


def say(msg: str) -> None:
    """Print on process 0 without breaking the progress bar."""
    if jax.process_index() == 0:
        tqdm.write(msg)


def peek(it: Any) -> dict[str, Any]:
    """The next batch (for ahead-of-time compilation) without moving the iterator."""
    state = it.get_state()
    batch = next(it)
    it.set_state(state)
    return batch


@dataclasses.dataclass
class LoopSpec:
    """What differs between the SFT and preference loops."""

    name: str  # progress-bar label, e.g. "sft"
    compile: Callable[[Any, dict[str, jax.Array]], Callable]  # (state, first global batch) -> step(state, batch)
    flops_per_token: float
    tokens_per_step: int  # every position computed per step (B x T), as MFU conventions count
    line: Callable[[dict[str, float]], str]  # the metrics worth a log line, besides speed
    evaluate: Callable[[Any], dict[str, float]] | None = None  # state -> eval metrics
    rename: dict[str, str] = dataclasses.field(default_factory=dict)  # metric renames before logging


def _clock_skew() -> float:
    """Seconds this process's clock jumps ahead once training has started: a test hook
    (`SAFER_JAX_TEST_CLOCK_SKEW_S`) standing in for hosts whose clocks disagree, which must
    still stop at the same step."""
    return float(os.environ.get("SAFER_JAX_TEST_CLOCK_SKEW_S", "0") or 0)


def run_loop(
    spec: LoopSpec, run: Run, *, state: Any, train_iter: Any, graphdef: Any, hooks: Sequence[Callable] = ()
) -> dict[str, Any]:
    """Resume if possible, then train to `train.steps`; returns the final metrics, `state` and `export`.
    `hooks(step, state, metrics)` run after each step; one that returns True stops training after that
    step (agreed by every process, then saved and exported as at the end). Closes `run` (its checkpoint
    manager and tracker) when done."""
    tc, opt, mesh, ckpt, tracker = run.cfg.train, run.cfg.optimizer, run.mesh, run.checkpoints, run.tracker
    start = run.start_step
    if start:
        target = abstract_like(state)
        state = None  # the caller's copy may still be alive; ours is released before restoring
        state = ckpt.restore(start, target, train_iter)
        say(f"resumed from {run.run_dir / 'checkpoints'} at step {start}")
    step_fn = spec.compile(state, shard_batch(peek(train_iter), mesh))
    lr_at = schedule(opt, tc.steps)
    thr = Throughput(spec.flops_per_token, len(jax.devices()), device_peak_tflops(jax.devices()[0]))
    pre = Preemption()
    say(
        f"training steps {start + 1}..{tc.steps} on {len(jax.devices())} devices, mesh "
        f"{dict(mesh.shape) if mesh is not None else None}"
    )
    bar = tqdm(
        total=tc.steps, initial=start, desc=spec.name, unit="step", mininterval=2.0, disable=jax.process_index() != 0
    )
    last: dict[str, float] = {}
    skipped = 0
    done = start
    deadline = time.time() + tc.max_minutes * 60 if tc.max_minutes > 0 else None
    try:
        for step in range(start + 1, tc.steps + 1):
            state, metrics = step_fn(state, shard_batch(next(train_iter), mesh))
            m = {spec.rename.get(k, k): float(v) for k, v in metrics.items()}
            # every stop is agreed: a process that stops alone would hang the others in the next collective
            (nonfinite,) = agree_flags(bool(m["nonfinite"]))
            if nonfinite:
                if tc.on_nan == "stop":
                    ckpt.wait()
                    raise TrainingStopped(
                        f"non-finite loss at step {step} (loss {m['loss']}, grad norm {m['grad_norm']}); stopped "
                        f"with the last good checkpoint (step {ckpt.latest_step()}) kept; set train.on_nan=skip "
                        "to skip such batches"
                    )
                skipped += 1
                say(f"step {step}: non-finite loss, batch skipped ({skipped} so far)")
            m.update(thr.step(spec.tokens_per_step), lr=float(lr_at(step - 1)))
            last = m
            if step % tc.log_every == 0 or step == tc.steps:
                tracker.log(step, {k: v for k, v in m.items() if k != "nonfinite"})
                mfu = f" MFU {m['mfu']:.1%}" if "mfu" in m else ""
                speed = f" {m['tokens_per_s']:.0f} tok/s {m['tflops'] * 1e3:.1f} GFLOP/s" if "tokens_per_s" in m else ""
                say(
                    f"step {step}/{tc.steps} {spec.line(m)} grad_norm {m['grad_norm']:.3f} lr {m['lr']:.2e}"
                    f"{speed}{mfu} step {m['step_time_s']:.2f}s"
                )
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.3f}", refresh=False)
            if spec.evaluate is not None and tc.eval_every and step % tc.eval_every == 0:
                ev = spec.evaluate(state)
                tracker.log(step, ev, prefix="eval")
                say(f"step {step}: eval " + " ".join(f"{k} {v:.4f}" for k, v in ev.items()))
            if step % tc.checkpoint_every == 0:
                ckpt.save(step, state, train_iter)
            # a hook that returns True asks to stop after this step (the demo's pacer: its share of a budget)
            asked = [bool(hook(step, state, m)) for hook in hooks]
            time_up = deadline is not None and time.time() + _clock_skew() > deadline and step < tc.steps
            sigterm, time_up, hook_stop = agree_flags(pre.flag, time_up, any(asked) and step < tc.steps)
            if sigterm:
                if ckpt.latest_step() != step:
                    ckpt.save(step, state, train_iter, force=True)
                ckpt.wait()
                say(f"SIGTERM: checkpoint saved at step {step}; exiting (rerun to continue)")
                return {"preempted": True, "step": step, **last}
            done = step
            if time_up:
                say(f"train.max_minutes={tc.max_minutes:g} reached after step {step}; stopping there")
                break
            if hook_stop:
                say(f"a hook asked to stop after step {step}; stopping there")
                break
        if ckpt.latest_step() != done:
            ckpt.save(done, state, train_iter, force=True)
        ckpt.wait()
    finally:
        bar.close()
        pre.close()
        run.close()
    out = {"preempted": False, "step": done, "skipped": skipped, **last}
    if tc.export_final:
        t0 = time.time()
        model = nnx.merge(graphdef, state.params)
        out["export"] = save_hf(model, run.run_dir / "export", tokenizer=run.tokenizer, overwrite=True)
        say(f"exported {out['export']} ({time.time() - t0:.1f}s)")
    out["state"] = state
    return out
