"""Stage 2 of SAFER: step-level preference optimization, set up and run.

`safer-jax prefopt --config configs/prefopt/NAME.yaml key=value ...`. The pairs come from a
pairs file (ours, TRL's or Step-DPO's format) or are built from a traces file. The
reference is either read from the on-disk log-prob cache (`preference.reference: cache`,
the default: computed on the first run, reused by every later run with the same pairs,
tokenization and reference weights) or held as a frozen copy on the mesh
(`reference: model`: no optimizer state, its forward runs every step). The shared loop in
`training/loop.py` owns logging, checkpoints, preemption and export.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from safer_jax.config import ModelConfig, PrefOptConfig
from safer_jax.data import train_file
from safer_jax.data.pipeline import PipelineConfig, drop_unfit_pairs, load_preference_data, preference_dataset
from safer_jax.data.records import SkipReport
from safer_jax.data.rules import load_rules
from safer_jax.data.tokenize import ChatTokenizer, TruncationStats
from safer_jax.losses import PREFERENCE_LOSSES, REFERENCE_FREE
from safer_jax.metrics import flops_per_token
from safer_jax.models import from_pretrained
from safer_jax.training.loop import LoopSpec, run_loop, say
from safer_jax.training.optimizer import make_optimizer
from safer_jax.training.preference import check_pair_rows, preference_step
from safer_jax.training.ref_cache import (
    RefLogpCache,
    check_resumed_reference,
    compute_settings,
    ensure_ref_logps,
    reference_fingerprints,
)
from safer_jax.training.run import Run, build_run, resolve_model_path
from safer_jax.training.sft import compile_step, init_state

REFERENCE_MODES = ("cache", "model")


def _validate(cfg: PrefOptConfig) -> None:
    pc = cfg.preference
    if not cfg.run_dir:
        raise ValueError("run_dir is not set (pass run_dir=PATH)")
    if pc.loss_type not in PREFERENCE_LOSSES:
        raise ValueError(f"preference.loss_type={pc.loss_type!r} unknown; choose from {sorted(PREFERENCE_LOSSES)}")
    if pc.reference not in REFERENCE_MODES:
        raise ValueError(f"preference.reference={pc.reference!r} unknown; choose from {REFERENCE_MODES}")
    if pc.span not in ("step", "to_end"):
        raise ValueError(f"preference.span={pc.span!r} unknown; choose from ('step', 'to_end')")


def reference_location(cfg: PrefOptConfig, run: Run) -> tuple[str, str | None]:
    """(local folder, gguf file) of the reference: `preference.reference_path`, else the policy's start."""
    pc = cfg.preference
    if pc.reference_path:
        return resolve_model_path(ModelConfig(path=pc.reference_path, gguf_file=pc.reference_gguf_file), run.run_dir)
    return run.model_location


def _compute_settings(cfg: PrefOptConfig, keys_only: bool = False) -> dict[str, Any]:
    """The reference-forward settings that enter the cache key (`ref_cache.compute_settings`);
    with `keys_only`, as keyword arguments of `ensure_ref_logps`."""
    pc = cfg.preference
    kw = dict(
        dtype=cfg.model.dtype,
        param_dtype=cfg.model.param_dtype,
        attention=cfg.model.attention,
        matmul_dtype=cfg.model.matmul_dtype,
        span=pc.span,
        ld_reference=pc.ld_reference,
    )
    return kw if keys_only else compute_settings(ld_alpha=pc.ld_alpha, **kw)


def _reference_keyed(cfg: PrefOptConfig, run: Run, pairs: list[Any], ct: ChatTokenizer) -> tuple[str, dict[str, Any]]:
    """(cache key, its parts) of this run's reference log-probs."""
    return reference_fingerprints(
        pairs,
        ct,
        seq_len=cfg.data.seq_len,
        reference=reference_location(cfg, run),
        settings=_compute_settings(cfg),
        memo_file=RefLogpCache(cfg.preference.cache_dir).memo_file,
    )


def _cached_ref_logps(
    cfg: PrefOptConfig,
    run: Run,
    pairs: list[Any],
    ct: ChatTokenizer,
    load_reference: Any,
    keyed: tuple[str, dict[str, Any]] | None = None,
) -> tuple[np.ndarray, Any, str, bool]:
    """(log-probs `[N, 2]`, cache entry folder, key, hit) from the reference log-prob cache."""
    pc = cfg.preference
    cache = RefLogpCache(pc.cache_dir)
    logps, key, hit = ensure_ref_logps(
        cache,
        pairs,
        ct,
        seq_len=cfg.data.seq_len,
        ld_alpha=pc.ld_alpha,
        reference=reference_location(cfg, run),
        load_reference=load_reference,
        batch_size=cfg.data.batch_size,
        mesh=run.mesh,
        chunk=cfg.train.loss_chunk,
        log=say,
        keyed=keyed,
        **_compute_settings(cfg, keys_only=True),
    )
    return logps, cache.path(key), key, hit


def _pairs_and_texts(cfg: PrefOptConfig, report: SkipReport | None = None) -> tuple[list[Any], list[str]]:
    """The run's pairs, and their texts (a `tiny` model's tokenizer is trained on them)."""
    pairs = load_preference_data(
        train_file(cfg.data.train),
        load_rules(cfg.data.rules),
        span=cfg.preference.span,
        skip_invalid=cfg.data.skip_invalid,
        report=report,
        seed=cfg.data.seed,
        fmt=cfg.data.trace_format,
    )
    return pairs, [p.prompt for p in pairs] + [p.chosen for p in pairs] + [p.rejected for p in pairs]


def _load_reference(cfg: PrefOptConfig, ref_loc: tuple[str, str | None], mesh: Any) -> tuple[Any, Any]:
    """(graphdef, params) of the reference, loaded like the policy onto `mesh`."""
    say(f"loading the reference from {ref_loc[0]}")
    ref = from_pretrained(
        ref_loc[0],
        gguf_file=ref_loc[1],
        dtype=cfg.model.dtype,
        param_dtype=cfg.model.param_dtype,
        mesh=mesh,
        scan_layers=cfg.model.scan_layers,
        attention=cfg.model.attention,
        matmul_dtype=cfg.model.matmul_dtype,
    )
    return nnx.split(ref)


def setup(cfg: PrefOptConfig) -> dict[str, Any]:
    """Everything before step 1: pairs, the run, the reference (cached log-probs or a frozen copy)."""
    _validate(cfg)
    pc, tc = cfg.preference, cfg.train
    report = SkipReport()
    pairs, texts = _pairs_and_texts(cfg, report)
    if report.total:
        say(report.summary())
    say(f"{len(pairs)} preference pairs from {train_file(cfg.data.train)}")
    run = build_run(cfg, texts)
    mesh = run.mesh
    ct = ChatTokenizer.from_config(run.tokenizer, cfg.data)
    pairs = drop_unfit_pairs(pairs, ct, cfg.data.seq_len, log=say)
    graphdef, params = nnx.split(run.model)
    mcfg, run.model = run.model.config, None  # the state holds the weights from here on
    same_start = not pc.reference_path  # `params` hold the starting weights until a resume restores the state

    def load_reference() -> tuple[Any, Any]:
        # the policy's starting weights are the reference unless another one is named
        return (graphdef, params) if same_start else _load_reference(cfg, reference_location(cfg, run), mesh)

    ref_logps, ref_params, cache_key = None, None, None
    if pc.loss_type in REFERENCE_FREE:
        say(f"{pc.loss_type}: reference-free, no reference log-probs")
    else:
        keyed = _reference_keyed(cfg, run, pairs, ct)
        check_resumed_reference(run.run_dir, *keyed, log=say)  # a resumed run must keep the reference it started with
        if pc.reference == "cache":
            ref_logps, _, cache_key, _ = _cached_ref_logps(cfg, run, pairs, ct, load_reference, keyed)
        else:
            _, ref_params = load_reference()
            ref_params = jax.tree.map(jnp.copy, ref_params)  # its own buffers: the policy's are donated each step
    n_proc = jax.process_count()
    check_pair_rows(mesh, cfg.data.batch_size // n_proc)  # before any step: chosen and rejected rows must pair
    pcfg = PipelineConfig(
        seq_len=cfg.data.seq_len,
        batch_size=cfg.data.batch_size // n_proc,
        seed=cfg.data.seed,
        process_index=jax.process_index(),
        process_count=n_proc,
        length_buckets=cfg.data.length_buckets,
        read_threads=cfg.data.read_threads,
        read_buffer=cfg.data.read_buffer,
    )
    stats = TruncationStats()
    train_iter = iter(preference_dataset(pairs, ct, pcfg, stats=stats, ref_logps=ref_logps))
    tx = make_optimizer(cfg.optimizer, tc.steps, cfg.model.freeze_layers)
    state = init_state(params, tx, mesh)
    return dict(
        run=run,
        mcfg=mcfg,
        graphdef=graphdef,
        state=state,
        tx=tx,
        train_iter=train_iter,
        stats=stats,
        ref_params=ref_params,
        pairs=pairs,
        cache_key=cache_key,
    )


def train_prefopt(cfg: PrefOptConfig, hooks: list[Any] = ()) -> dict[str, Any]:
    """Run (or resume) preference optimization to `train.steps`; returns the final metrics and paths."""
    t_setup = time.time()
    env = setup(cfg)
    pc, tc, mesh, mcfg = cfg.preference, cfg.train, env["run"].mesh, env["mcfg"]
    ref_params = env.pop("ref_params")
    static = dict(
        graphdef=env["graphdef"],
        tx=env["tx"],
        loss_type=pc.loss_type,
        hparams=pc.hparams(),
        chunk=tc.loss_chunk,
        ld_alpha=pc.ld_alpha,
        accum=tc.grad_accum,
        blocks=jax.process_count(),
        skip_nonfinite=tc.on_nan == "skip",
        ld_reference=pc.ld_reference,
    )
    extra = (ref_params,) if ref_params is not None else ()

    def compile_fn(state: Any, batch: dict[str, jax.Array]) -> Any:
        compiled: dict[tuple[int, ...], Any] = {}  # one per row length (data.length_buckets)

        def step(s: Any, b: dict[str, jax.Array]) -> Any:
            shape = b["input_ids"].shape
            if shape not in compiled:
                compiled[shape] = compile_step(preference_step, s, b, mesh, log=say, extra=extra, **static)
            return compiled[shape](s, b, *extra)

        compiled[batch["input_ids"].shape] = compile_step(
            preference_step, state, batch, mesh, log=say, extra=extra, **static
        )  # the first shape ahead of time; others lazily
        return step

    spec = LoopSpec(
        name="prefopt",
        compile=compile_fn,
        flops_per_token=flops_per_token(mcfg, cfg.data.seq_len, reference_forward=ref_params is not None),
        tokens_per_step=2 * cfg.data.batch_size * cfg.data.seq_len,  # chosen and rejected rows
        line=lambda m: (
            f"loss {m['loss']:.4f} margin {m['rewards/margin']:.3f} acc {m['rewards/accuracy']:.2f} "
            f"len {m['length/chosen']:.0f}/{m['length/rejected']:.0f} padding {m['padding']:.0%}"
        ),
    )
    say(f"setup {time.time() - t_setup:.1f}s")
    out = run_loop(
        spec, env["run"], state=env.pop("state"), train_iter=env["train_iter"], graphdef=env["graphdef"], hooks=hooks
    )
    out["cache_key"] = env["cache_key"]
    out["n_pairs"] = len(env["pairs"])
    if not out["preempted"]:
        say(env["stats"].summary())
    return out


def ref_logps_command(cfg: PrefOptConfig) -> tuple[np.ndarray, Any, bool]:
    """`safer-jax ref-logps`: fill the cache for a prefopt config without training."""
    _validate(cfg)
    pairs, texts = _pairs_and_texts(cfg)
    run = build_run(cfg, texts, train=False, load_model=False)  # the tokenizer a prefopt run would use
    ct = ChatTokenizer.from_config(run.tokenizer, cfg.data)
    pairs = drop_unfit_pairs(pairs, ct, cfg.data.seq_len, log=say)
    logps, where, _, hit = _cached_ref_logps(
        cfg, run, pairs, ct, lambda: _load_reference(cfg, reference_location(cfg, run), run.mesh)
    )
    return logps, where, hit
