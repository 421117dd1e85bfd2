"""The SFT loop: owns I/O, logging, checkpoints, preemption and export; the step stays pure.

A run folder that already holds checkpoints resumes from the latest complete one (model,
optimizer, step and grain iterator), so steps after the resume see exactly the batches
and losses of an uninterrupted run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from tqdm import tqdm

from safer_jax.checkpoint import CheckpointManager, abstract_like
from safer_jax.config import SFTConfig
from safer_jax.data import bundled
from safer_jax.data.pipeline import PipelineConfig, load_traces, sft_dataset
from safer_jax.data.records import SkipReport
from safer_jax.data.rules import load_rules
from safer_jax.data.tokenize import ChatTokenizer, TruncationStats
from safer_jax.metrics import Throughput, Tracker, device_peak_tflops, flops_per_token
from safer_jax.models import from_pretrained, save_pretrained
from safer_jax.sharding import make_mesh
from safer_jax.training.optimizer import make_optimizer, schedule
from safer_jax.training.run import (
    Preemption,
    TrainingStopped,
    global_batch,
    load_tokenizer,
    resolve_model_path,
    write_run_files,
)
from safer_jax.training.sft import compile_step, init_state, sft_loss, sft_step

log = logging.getLogger("safer_jax.sft")


def _traces_path(name: str) -> Path:
    return bundled("train_traces.jsonl") if name in ("", "bundled") else Path(name)


def _say(msg: str) -> None:
    if jax.process_index() == 0:
        tqdm.write(msg)


def setup(cfg: SFTConfig) -> dict[str, Any]:
    """Everything a run needs before its first step (shared by `train_sft` and tests)."""
    run_dir = Path(cfg.run_dir)
    if not cfg.run_dir:
        raise ValueError("run_dir is not set (pass run_dir=PATH)")
    write_run_files(run_dir, cfg)
    rules = load_rules(cfg.data.rules)
    report = SkipReport()
    traces = load_traces(_traces_path(cfg.data.train), rules, skip_invalid=cfg.data.skip_invalid, report=report)
    if report.total:
        _say(report.summary())
    texts = [t.prompt for t in traces] + [t.response for t in traces] + [str(t.steps) for t in traces]
    path, gguf = resolve_model_path(cfg.model, run_dir, texts)
    mesh = make_mesh(cfg.mesh)
    model = from_pretrained(path, gguf_file=gguf, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                            mesh=mesh, remat=cfg.model.remat, scan_layers=cfg.model.scan_layers,
                            attention=cfg.model.attention)
    tok = load_tokenizer(cfg.data.tokenizer or path, None if cfg.data.tokenizer else gguf, run_dir)
    ct = ChatTokenizer(tok, system_prompt=cfg.data.system_prompt)
    n_proc = jax.process_count()
    if cfg.data.batch_size % (n_proc * cfg.train.grad_accum):
        raise ValueError(f"data.batch_size={cfg.data.batch_size} must be divisible by processes ({n_proc}) x "
                         f"train.grad_accum ({cfg.train.grad_accum})")
    batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.data.batch_size % batch_ways or (cfg.data.batch_size // cfg.train.grad_accum) % batch_ways:
        msg = (f"data.batch_size={cfg.data.batch_size} (and each of train.grad_accum={cfg.train.grad_accum} "
               f"microbatches) is not divisible by mesh data x fsdp = {batch_ways}")
        if n_proc > 1:  # each process feeds distinct rows: the batch must split over the batch axes
            raise ValueError(msg)
        log.warning("%s: the batch is replicated over those axes (correct, but every device computes it all)", msg)
    pcfg = PipelineConfig(seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size // n_proc, seed=cfg.data.seed,
                          packing_bins=cfg.data.packing_bins, process_index=jax.process_index(),
                          process_count=n_proc)
    stats = TruncationStats()
    train_iter = iter(sft_dataset(traces, ct, pcfg, stats=stats, pack=cfg.data.pack))
    eval_ds = None
    if cfg.data.eval:
        eval_traces = load_traces(cfg.data.eval, rules, skip_invalid=cfg.data.skip_invalid)
        # repeating and unshuffled: every process draws the same number of batches (no multi-host hang)
        eval_ds = sft_dataset(eval_traces, ct, PipelineConfig(
            seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size // n_proc, shuffle=False, num_epochs=None,
            process_index=jax.process_index(), process_count=n_proc), pack=cfg.data.pack)
    tx = make_optimizer(cfg.optimizer, cfg.train.steps)
    graphdef, params = nnx.split(model)
    state = init_state(params, tx, mesh)
    return dict(run_dir=run_dir, model=model, graphdef=graphdef, state=state, tx=tx, mesh=mesh, tok=tok,
                train_iter=train_iter, eval_ds=eval_ds, stats=stats)


def _eval_loss(eval_fn: Any, state: Any, eval_ds: Any, mesh: Any, max_batches: int) -> float:
    total, count = 0.0, 0.0
    for i, local in enumerate(eval_ds):
        if i >= max_batches:
            break
        s, c = eval_fn(state.params, global_batch(local, mesh))
        total, count = total + float(s), count + float(c)
    return total / max(count, 1.0)


def train_sft(cfg: SFTConfig, hooks: list[Any] = ()) -> dict[str, Any]:
    """Run (or resume) SFT to `train.steps`; returns the final metrics and paths."""
    t_setup = time.time()
    env = setup(cfg)
    run_dir, mesh, state, train_iter = env["run_dir"], env["mesh"], env["state"], env["train_iter"]
    tc = cfg.train
    ckpt = CheckpointManager(run_dir / "checkpoints", keep=tc.keep_checkpoints, async_save=tc.async_checkpoint)
    start = 0
    mcfg = env.pop("model").config
    if ckpt.latest_step() is not None:
        start = ckpt.latest_step()
        target = abstract_like(state)
        env["state"] = state = None  # free the freshly loaded weights before restoring
        state = ckpt.restore(start, target, train_iter)
        _say(f"resumed from {run_dir / 'checkpoints'} at step {start}")
    first = global_batch(next(iter(sft_dataset_peek(env))), mesh)
    static = dict(graphdef=env["graphdef"], tx=env["tx"], accum=tc.grad_accum, chunk=tc.loss_chunk,
                  skip_nonfinite=tc.on_nan == "skip")
    step_fn = compile_step(sft_step, state, first, mesh, log=_say, **static)
    eval_fn = None
    if env["eval_ds"] is not None and tc.eval_every:
        eval_fn = jax.jit(lambda p, b: sft_loss(p, env["graphdef"], b, tc.loss_chunk))
    lr_at = schedule(cfg.optimizer, tc.steps)
    thr = Throughput(flops_per_token(mcfg, cfg.data.seq_len), len(jax.devices()), device_peak_tflops(jax.devices()[0]))
    tracker = Tracker(run_dir, enabled=jax.process_index() == 0, tensorboard=tc.tensorboard)
    pre = Preemption()
    _say(f"setup {time.time() - t_setup:.1f}s; training steps {start + 1}..{tc.steps} on {len(jax.devices())} "
         f"devices, mesh {dict(mesh.shape)}")
    bar = tqdm(total=tc.steps, initial=start, desc="sft", unit="step", mininterval=2.0,
               disable=jax.process_index() != 0)
    last: dict[str, float] = {}
    skipped = 0
    try:
        for step in range(start + 1, tc.steps + 1):
            batch = global_batch(next(train_iter), mesh)
            state, metrics = step_fn(state, batch)
            m = {k: float(v) for k, v in metrics.items()}
            if m["nonfinite"]:
                if tc.on_nan == "stop":
                    ckpt.wait()
                    raise TrainingStopped(
                        f"non-finite loss at step {step} (loss {m['loss']}, grad norm {m['grad_norm']}); stopped "
                        f"with the last good checkpoint (step {ckpt.latest_step()}) kept; set train.on_nan=skip "
                        "to skip such batches")
                skipped += 1
                _say(f"step {step}: non-finite loss, batch skipped ({skipped} so far)")
            # throughput counts every position computed (B x T), as MFU conventions do
            m.update(thr.step(cfg.data.batch_size * cfg.data.seq_len), lr=float(lr_at(step - 1)))
            m["loss_tokens"] = m.pop("tokens")
            last = m
            if step % tc.log_every == 0 or step == tc.steps:
                tracker.log(step, {k: v for k, v in m.items() if k != "nonfinite"})
                mfu = f" MFU {m['mfu']:.1%}" if "mfu" in m else ""
                speed = f" {m['tokens_per_s']:.0f} tok/s {m['tflops'] * 1e3:.1f} GFLOP/s" if "tokens_per_s" in m else ""
                _say(f"step {step}/{tc.steps} loss {m['loss']:.4f} grad_norm {m['grad_norm']:.3f} lr {m['lr']:.2e}"
                     f"{speed}{mfu} step {m['step_time_s']:.2f}s")
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.3f}", refresh=False)
            if eval_fn is not None and step % tc.eval_every == 0:
                el = _eval_loss(eval_fn, state, env["eval_ds"], mesh, tc.eval_batches)
                tracker.log(step, {"loss": el}, prefix="eval")
                _say(f"step {step}: eval loss {el:.4f}")
            if step % tc.checkpoint_every == 0:
                ckpt.save(step, state, train_iter)
            for hook in hooks:
                hook(step, state, m)
            if pre.requested():
                if ckpt.latest_step() != step:
                    ckpt.save(step, state, train_iter, force=True)
                ckpt.wait()
                _say(f"SIGTERM: checkpoint saved at step {step}; exiting (rerun to continue)")
                return {"preempted": True, "step": step, **last}
        if ckpt.latest_step() != tc.steps:
            ckpt.save(tc.steps, state, train_iter, force=True)
        ckpt.wait()
    finally:
        bar.close()
        pre.close()
        tracker.close()
        ckpt.close()
    _say(env["stats"].summary())
    out = {"preempted": False, "step": tc.steps, "skipped": skipped, **last}
    if tc.export_final:
        model = nnx.merge(env["graphdef"], state.params)
        out["export"] = str(save_pretrained(model, run_dir / "export", tokenizer=env["tok"], overwrite=True))
        _say(f"exported {out['export']}")
    out["state"] = state
    return out


def sft_dataset_peek(env: dict[str, Any]) -> Any:
    """One batch of the right shapes for ahead-of-time compilation, without moving the iterator."""
    state = env["train_iter"].get_state()
    batch = next(env["train_iter"])
    env["train_iter"].set_state(state)
    return [batch]

