"""SFT: what differs from the other stages (traces, pipelines, optimizer, loss, eval) and its
loop spec; `training/run.py` builds the run (mesh, model, tokenizer, run folder, checkpoints,
tracker) and the shared loop in `training/loop.py` owns I/O, logging, preemption and export.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
from flax import nnx

from safer_jax.config import SFTConfig
from safer_jax.data import train_file
from safer_jax.data.pipeline import PipelineConfig, load_traces, sft_dataset
from safer_jax.data.records import SkipReport
from safer_jax.data.rules import load_rules
from safer_jax.data.tokenize import ChatTokenizer, TruncationStats
from safer_jax.metrics import flops_per_token
from safer_jax.sharding import shard_batch
from safer_jax.training.loop import LoopSpec, run_loop, say
from safer_jax.training.optimizer import make_optimizer
from safer_jax.training.run import build_run
from safer_jax.training.sft import compile_step, init_state, sft_loss, sft_step


def setup(cfg: SFTConfig) -> dict[str, Any]:
    """Everything a run needs before its first step (shared by `train_sft` and tests)."""
    rules = load_rules(cfg.data.rules)
    report = SkipReport()
    fmt = cfg.data.trace_format
    traces = load_traces(train_file(cfg.data.train), rules, fmt, skip_invalid=cfg.data.skip_invalid, report=report)
    if report.total:
        say(report.summary())
    texts = [t.prompt for t in traces] + [t.response for t in traces] + [str(t.steps) for t in traces]
    run = build_run(cfg, texts)
    mesh = run.mesh
    ct = ChatTokenizer.from_config(run.tokenizer, cfg.data)
    n_proc = jax.process_count()
    pcfg = PipelineConfig(
        seq_len=cfg.data.seq_len,
        batch_size=cfg.data.batch_size // n_proc,
        seed=cfg.data.seed,
        packing_bins=cfg.data.packing_bins,
        read_threads=cfg.data.read_threads,
        read_buffer=cfg.data.read_buffer,
        process_index=jax.process_index(),
        process_count=n_proc,
    )
    stats = TruncationStats()
    train_iter = iter(sft_dataset(traces, ct, pcfg, stats=stats, pack=cfg.data.pack))
    eval_ds = None
    if cfg.data.eval:
        eval_traces = load_traces(cfg.data.eval, rules, fmt, skip_invalid=cfg.data.skip_invalid)
        # repeating and unshuffled: every process draws the same number of batches (no multi-host hang)
        eval_ds = sft_dataset(
            eval_traces,
            ct,
            PipelineConfig(
                seq_len=cfg.data.seq_len,
                batch_size=cfg.data.batch_size // n_proc,
                shuffle=False,
                num_epochs=None,
                read_threads=cfg.data.read_threads,
                read_buffer=cfg.data.read_buffer,
                process_index=jax.process_index(),
                process_count=n_proc,
            ),
            pack=cfg.data.pack,
        )
    tx = make_optimizer(cfg.optimizer, cfg.train.steps, cfg.model.freeze_layers)
    graphdef, params = nnx.split(run.model)
    mcfg, run.model = run.model.config, None  # the state holds the weights from here on
    state = init_state(params, tx, mesh)
    return dict(
        run=run, mcfg=mcfg, graphdef=graphdef, state=state, tx=tx, train_iter=train_iter, eval_ds=eval_ds, stats=stats
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def _eval_loss_sums(params: Any, batch: dict[str, jax.Array], *, graphdef: Any, chunk: int) -> Any:
    """(NLL sum, token count) of an eval batch; module-level, so later runs in one process reuse it."""
    return sft_loss(params, graphdef, batch, chunk)


def _eval_loss(eval_fn: Any, state: Any, eval_ds: Any, mesh: Any, max_batches: int) -> float:
    total, count = 0.0, 0.0
    for i, local in enumerate(eval_ds):
        if i >= max_batches:
            break
        s, c = eval_fn(state.params, shard_batch(local, mesh))
        total, count = total + float(s), count + float(c)
    return total / max(count, 1.0)


def train_sft(cfg: SFTConfig, hooks: list[Any] = ()) -> dict[str, Any]:
    """Run (or resume) SFT to `train.steps`; returns the final metrics and paths."""
    t_setup = time.time()
    env = setup(cfg)
    tc, mesh, graphdef, mcfg = cfg.train, env["run"].mesh, env["graphdef"], env["mcfg"]
    static = dict(
        graphdef=graphdef, tx=env["tx"], accum=tc.grad_accum, chunk=tc.loss_chunk, skip_nonfinite=tc.on_nan == "skip"
    )
    evaluate = None
    if env["eval_ds"] is not None and tc.eval_every:
        eval_fn = functools.partial(_eval_loss_sums, graphdef=graphdef, chunk=tc.loss_chunk)
        evaluate = lambda state: {"loss": _eval_loss(eval_fn, state, env["eval_ds"], mesh, tc.eval_batches)}  # noqa: E731
    spec = LoopSpec(
        name="sft",
        compile=lambda state, batch: compile_step(sft_step, state, batch, mesh, log=say, **static),
        flops_per_token=flops_per_token(mcfg, cfg.data.seq_len),
        tokens_per_step=cfg.data.batch_size * cfg.data.seq_len,
        line=lambda m: f"loss {m['loss']:.4f}",
        evaluate=evaluate,
        rename={"tokens": "loss_tokens"},
    )
    say(f"setup {time.time() - t_setup:.1f}s")
    out = run_loop(
        spec, env["run"], state=env.pop("state"), train_iter=env["train_iter"], graphdef=graphdef, hooks=hooks
    )
    if not out["preempted"]:
        say(env["stats"].summary())
    return out
