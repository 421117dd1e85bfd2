"""The JAX side of the benchmark: the project's own jitted SFT and preference steps.

Run as `python -m safer_jax.bench.jax_side SPEC.json OUT.json` (the harness does this, in
its own process so the two frameworks never share a device or a thread pool). It builds
the model (random weights of a named shape, or a folder's), exports it to
`spec.model_dir` for the PyTorch side, then runs `spec.steps` steps of the exact
`sft_step` / `preference_step` that `safer-jax sft` / `prefopt` run, compiled ahead of
time with donation. Step 1 is the warm-up; steps 2..S are timed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from safer_jax.bench.shapes import resolve_shape
from safer_jax.bench.work import BenchSpec, batch, minor_faults, side_main, summarize


def build_model(spec: BenchSpec) -> Any:
    """The decoder of `spec.model` in the spec's compute dtype (float32 parameters)."""
    from flax import nnx

    from safer_jax.models import Decoder, from_hf_config, from_pretrained

    kind, what = resolve_shape(spec.model)
    if kind == "dir":
        return from_pretrained(
            what, dtype=spec.dtype, param_dtype="float32", attention=spec.attention, matmul_dtype=spec.matmul_dtype
        )
    cfg = from_hf_config(
        what,
        where=f"shape {spec.model}",
        dtype=spec.dtype,
        param_dtype="float32",
        attention=spec.attention,
        matmul_dtype=spec.matmul_dtype,
    )
    with nnx.use_eager_sharding(False):
        return Decoder(cfg, rngs=nnx.Rngs(spec.seed))


def make_tx(spec: BenchSpec) -> Any:
    """AdamW exactly as the PyTorch side's: constant lr, torch's default betas and eps, no
    clipping, no decay on norms and biases (the project's `decay_mask`)."""
    import optax

    from safer_jax.training.optimizer import decay_mask

    return optax.adamw(spec.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=spec.weight_decay, mask=decay_mask)


def device_name() -> str:
    import jax

    d = jax.devices()[0]
    return f"{d.platform}: {d.device_kind}"


def peak_memory() -> tuple[int, str]:
    """(bytes, source): the device's peak bytes in use where the backend reports them (GPU,
    TPU), else this process's RSS high-water mark (CPU), as the torch side counts."""
    import resource

    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process_rss"


def span_sums(spec: BenchSpec, graphdef: Any, params: Any, b: dict[str, Any]) -> dict[str, list[float]]:
    """Chosen and rejected span log-prob sums of one pair batch (checked against the torch side)."""
    import jax
    import numpy as np

    from safer_jax.training.preference import pair_span_logps

    lp, _ = jax.jit(pair_span_logps, static_argnums=(1, 3))(params, graphdef, b, spec.chunk)
    lp = np.asarray(lp, np.float64)
    return {"chosen": lp[: spec.batch].tolist(), "rejected": lp[spec.batch :].tolist()}


def run(spec: BenchSpec) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from safer_jax.models import save_pretrained
    from safer_jax.models.attention import require_hardware
    from safer_jax.training.preference import preference_step
    from safer_jax.training.sft import compile_step, init_state, sft_step

    require_hardware(spec.attention)
    model = build_model(spec)
    cfg = model.config
    save_pretrained(model, spec.model_dir, overwrite=True, dtype="float32")
    graphdef, params = nnx.split(model)
    del model
    tx = make_tx(spec)
    state = init_state(params, tx)
    batches = [{k: jnp.asarray(v) for k, v in batch(spec, cfg.vocab_size, s).items()} for s in range(1, spec.steps + 1)]
    log = lambda msg: print(f"[jax] {msg}", file=sys.stderr)  # noqa: E731
    extra: dict[str, Any] = {}
    if spec.task == "sft":
        compiled = compile_step(sft_step, state, batches[0], None, log=log, graphdef=graphdef, tx=tx, chunk=spec.chunk)
        call = compiled
        real = [int((b["segment_ids"] > 0).sum()) for b in batches]
        loss_toks = [int(b["weights"].sum()) for b in batches]
    else:
        ref = jax.tree.map(jnp.copy, params)  # a frozen copy: the policy's buffers are donated each step
        extra["span_logps"] = span_sums(spec, graphdef, ref, batches[0])
        compiled = compile_step(
            preference_step,
            state,
            batches[0],
            None,
            log=log,
            extra=(ref,),
            graphdef=graphdef,
            tx=tx,
            loss_type="sigmoid",
            hparams={"beta": spec.beta},
            chunk=spec.chunk,
        )
        call = lambda s, b: compiled(s, b, ref)  # noqa: E731
        real = [int((b["segment_ids"] > 0).sum()) for b in batches]
        loss_toks = [int(b["span_mask"][:, 1:].sum()) for b in batches]
    if spec.profile:
        prof = Path(spec.profile)
        prof.mkdir(parents=True, exist_ok=True)
        (prof / f"jax_{spec.task}_step.hlo.txt").write_text(compiled.as_text())
    times, losses, faults = [], [], []
    for i, b in enumerate(batches):
        if i == 1 and spec.profile:
            jax.profiler.start_trace(str(Path(spec.profile) / "jax_trace"), create_perfetto_trace=True)
        f0, t0 = minor_faults(), time.perf_counter()
        state, m = call(state, b)
        loss = float(m["loss"])  # waits for the step
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
        faults.append(minor_faults() - f0)
        losses.append(loss)
        log(f"step {i + 1}/{spec.steps} loss {loss:.6f} {times[-1]:.3f}s {faults[-1]} page faults")
    if spec.profile:
        from safer_jax.bench.profile import format_top_ops, top_ops

        jax.profiler.stop_trace()
        table = format_top_ops(top_ops(Path(spec.profile) / "jax_trace"), compiled.as_text())
        (Path(spec.profile) / f"jax_{spec.task}_top_ops.md").write_text(table + "\n")
        log(f"top ops of the timed steps (also in {spec.profile}):\n{table}")
    peak, source = peak_memory()
    return summarize(
        spec,
        cfg,
        times,
        losses,
        real_tokens=sum(real[1:]),
        loss_tokens=sum(loss_toks[1:]),
        peak_memory=peak,
        device_name=device_name(),
        peak_memory_source=source,
        threads=_threads(),
        framework="jax",
        page_faults_per_step=faults,
        **extra,
    )


def _threads() -> int | None:
    """Host threads XLA:CPU may use (its intra-op pool follows the CPUs it may run on)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def main(argv: list[str]) -> int:
    return side_main(run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
