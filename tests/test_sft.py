"""SFT step and loop: overfitting, exact accumulation, sharding, packing, bf16, resume, preemption."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from xla_flags import xla_flags

from safer_jax.config import MeshConfig, OptimizerConfig, SFTConfig, load_config
from safer_jax.data import bundled
from safer_jax.data.pipeline import PipelineConfig, sft_dataset
from safer_jax.models import from_pretrained
from safer_jax.sharding import make_mesh, shard_batch
from safer_jax.training.optimizer import make_optimizer
from safer_jax.training.sft import compile_step, init_state, sft_step

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "sft" / "tiny.yaml"


def batches(traces, ct, n, batch_size, seq_len=256, pack=True, seed=0):
    it = iter(
        sft_dataset(
            traces, ct, PipelineConfig(seq_len=seq_len, batch_size=batch_size, seed=seed, packing_bins=4), pack=pack
        )
    )
    return [{k: jnp.asarray(v) for k, v in next(it).items()} for _ in range(n)]


def params_of(model):
    return nnx.split(model)


def run_step(model_dir, batch, tx, mesh=None, accum=1, dtype="float32"):
    model = from_pretrained(model_dir, mesh=mesh, dtype=dtype, param_dtype="float32")
    graphdef, params = nnx.split(model)
    state = init_state(params, tx, mesh)
    if mesh is not None:
        batch = shard_batch({k: np.asarray(v) for k, v in batch.items()}, mesh)
    step = jax.jit(lambda s, b: sft_step(s, b, graphdef=graphdef, tx=tx, accum=accum, chunk=64))
    return step(state, batch)


def grads_of(model_dir, batch, mesh=None):
    """Loss and gradients through an identity 'optimizer' that returns the gradient as the update."""
    tx = optax.GradientTransformation(lambda p: optax.EmptyState(), lambda g, s, p=None: (g, s))
    model = from_pretrained(model_dir, mesh=mesh)
    graphdef, params = nnx.split(model)
    zero = jax.tree.map(jnp.zeros_like, params)
    state = init_state(zero, tx, mesh)
    state = state.replace(params=params)
    new, m = jax.jit(lambda s, b: sft_step(s, b, graphdef=graphdef, tx=tx, chunk=64))(
        state, shard_batch({k: np.asarray(v) for k, v in batch.items()}, mesh) if mesh is not None else batch
    )
    grads = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), new.params, params)
    return float(m["loss"]), grads


def test_overfitting_eight_traces_halves_the_loss_and_moves_every_layer(tiny, traces):
    d, ct = tiny
    short = [t for t in traces if t.label == "harmful"][:8]  # short enough that two share a 512-token row
    data = batches(short, ct, 1, 4, seq_len=512)[0]  # 8 traces packed into 4 rows
    assert data["segment_ids"].max() >= 2
    model = from_pretrained(d)
    graphdef, params = nnx.split(model)
    before = jax.tree.map(np.asarray, params)
    tx = optax.adam(3e-3)
    state = init_state(params, tx)
    step = jax.jit(lambda s, b: sft_step(s, b, graphdef=graphdef, tx=tx, chunk=128))
    losses = []
    for _ in range(30):
        state, m = step(state, data)
        losses.append(float(m["loss"]))
    print(f"overfit: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] <= 0.5 * losses[0]
    after = jax.tree.map(np.asarray, state.params)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(before)[0], jax.tree.leaves(after)):
        if a.ndim and a.shape[0] == 2 and "layers" in jax.tree_util.keystr(path):  # stacked: check each layer
            for layer in range(2):
                assert not np.array_equal(a[layer], b[layer]), (jax.tree_util.keystr(path), layer)
        else:
            assert not np.array_equal(a, b), jax.tree_util.keystr(path)


def test_gradient_accumulation_is_exact(tiny, traces):
    d, ct = tiny
    bs = batches(traces[:40], ct, 4, 2)
    big = {k: jnp.concatenate([b[k] for b in bs]) for k in bs[0]}
    # token counts differ per microbatch, so a mean of means would not match
    assert len({float(b["weights"].sum()) for b in bs}) > 1
    tx = optax.sgd(0.5)
    one, m1 = run_step(d, big, tx)
    acc, m4 = run_step(d, big, tx, accum=4)
    np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m4["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(one.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_a_second_run_in_one_process_reuses_the_compiled_step(tiny, traces):
    """A fresh load of the same model with an equal optimizer config (a second CLI run in one
    process, the next preference round) gets JAX's program back; anything else compiles its own."""
    d, ct = tiny
    batch = batches(traces[:8], ct, 1, 2)[0]

    def compiled(opt: OptimizerConfig, chunk: int = 64):
        graphdef, params = nnx.split(from_pretrained(d))
        tx = make_optimizer(opt, 10)
        state = init_state(params, tx)
        fn = compile_step(sft_step, state, batch, None, log=lambda _: None, graphdef=graphdef, tx=tx, chunk=chunk)
        return fn, state

    first, state = compiled(OptimizerConfig(lr=1e-3))
    again, state2 = compiled(OptimizerConfig(lr=1e-3))
    assert make_optimizer(OptimizerConfig(lr=1e-3), 10) is make_optimizer(OptimizerConfig(lr=1e-3), 10)
    assert again._executable is first._executable
    assert compiled(OptimizerConfig(lr=2e-3))[0]._executable is not first._executable  # another schedule
    assert compiled(OptimizerConfig(lr=1e-3), chunk=32)[0]._executable is not first._executable
    (s1, m1), (s2, m2) = first(state, batch), again(state2, batch)
    assert float(m1["loss"]) == float(m2["loss"])
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sharded_step_matches_unsharded(tiny, traces):
    d, ct = tiny
    batch = batches(traces[:40], ct, 1, 8)[0]
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    loss0, g0 = grads_of(d, batch)
    loss1, g1 = grads_of(d, batch, mesh)
    np.testing.assert_allclose(loss1, loss0, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        # Two XLA programs sum in different orders. A norm weight's gradient is a sum over all
        # N tokens, and on an AVX-512 EPYC one near-cancelling element came out 1.017e-4
        # unsharded, 1.018e-4 sharded (with the code before the masked loss head too; equal with
        # YNNPACK off). The bound of a float32 sum of N terms, N * eps * (their scale, here the
        # leaf's largest gradient), is the absolute tolerance, not a fixed 1e-7.
        n = batch["inputs"].size
        scale = float(np.abs(b).max())
        print(f"max |sharded - unsharded| {np.abs(a - b).max():.3g}, leaf scale {scale:.3g}, N {n}")
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=max(1e-7, n * np.finfo(np.float32).eps * scale))
    tx = optax.sgd(0.5)
    s0, _ = run_step(d, batch, tx)
    s1, _ = run_step(d, batch, tx, mesh=mesh)
    assert s1.params["layers"]["w_gate"][...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s0.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_packed_and_unpacked_batches_give_the_same_loss(tiny, traces):
    d, ct = tiny
    unpacked = {k: np.asarray(v) for k, v in batches(traces[:6], ct, 1, 6, seq_len=768, pack=False)[0].items()}
    lengths = unpacked["segment_ids"].sum(1)
    rows = [[0, 1, 2], [3, 4, 5]]  # the same six examples, three per row
    width = max(int(sum(lengths[r] for r in row)) for row in rows)
    packed = {k: np.zeros((2, width), v.dtype) for k, v in unpacked.items()}
    for i, row in enumerate(rows):
        at = 0
        for seg, r in enumerate(row, 1):
            n = int(lengths[r])
            for k in ("inputs", "targets", "weights"):
                packed[k][i, at : at + n] = unpacked[k][r, :n]
            packed["segment_ids"][i, at : at + n] = seg
            packed["positions"][i, at : at + n] = np.arange(n)
            at += n
    lp, _ = grads_of(d, {k: jnp.asarray(v) for k, v in packed.items()})
    lu, _ = grads_of(d, {k: jnp.asarray(v) for k, v in unpacked.items()})
    np.testing.assert_allclose(lp, lu, rtol=1e-5)


def test_bfloat16_follows_the_float32_curve(tiny, traces):
    d, ct = tiny
    data = batches(traces[:16], ct, 1, 4, seq_len=384)[0]
    curves = {}
    for dt in ("float32", "bfloat16"):
        model = from_pretrained(d, dtype=dt, param_dtype="float32")
        graphdef, params = nnx.split(model)
        tx = optax.adam(1e-3)
        state = init_state(params, tx)
        step = jax.jit(lambda s, b, g=graphdef, t=tx: sft_step(s, b, graphdef=g, tx=t, chunk=128))
        curves[dt] = []
        for _ in range(30):
            state, m = step(state, data)
            curves[dt].append(float(m["loss"]))
    f32, b16 = np.array(curves["float32"]), np.array(curves["bfloat16"])
    rel = np.abs(b16 - f32) / f32
    print(f"bf16 vs fp32 loss: max relative gap {rel.max():.3%} over 30 steps ({f32[0]:.3f} -> {f32[-1]:.3f})")
    assert rel.max() <= 0.02


def test_every_config_loads():
    for f in sorted((ROOT / "configs" / "sft").glob("*.yaml")):
        cfg = load_config(SFTConfig, str(f))
        assert cfg.train.steps > 0 and cfg.model.path, f
    assert load_config(SFTConfig, str(TINY), ["optimizer.lr=1e-3"]).optimizer.lr == 1e-3


def test_unknown_override_lists_valid_keys(capsys, tmp_path):
    from safer_jax.cli import main

    assert main(["sft", "--config", str(TINY), "train.stepz=3", f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key train.stepz" in err and "train.steps" in err and "train.grad_accum" in err


# ---------------------------------------------------------------------------- subprocess runs


def runner(run_dir, *args, timeout=300):
    env = dict(os.environ, XLA_FLAGS=xla_flags(8), PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable,
        str(ROOT / "tests" / "sft_runner.py"),
        *args,
        f"run_dir={run_dir}",
        "train.log_every=1",
        "train.checkpoint_every=5",
        "train.steps=20",
        "train.export_final=false",
        "data.seq_len=256",
        "data.batch_size=4",
        f"data.eval={bundled('train_traces.jsonl')}",
        "train.eval_every=10",
        "train.eval_batches=2",
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def losses(run_dir):
    """Step -> loss of the last run that logged that step."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["split"] == "train":
            out[row["step"]] = row["loss"]
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("full")
    r = runner(d)
    assert r.returncode == 0, r.stderr[-3000:]
    return d


def test_run_folder_holds_config_versions_logs_and_eval(uninterrupted):
    d = Path(uninterrupted)
    cfg = load_config(SFTConfig, str(d / "config.yaml"))
    assert cfg.train.steps == 20 and cfg.run_dir == str(d)
    versions = json.loads((d / "versions.json").read_text())
    assert versions["jax"] == jax.__version__ and versions["flax"]
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 21))
    assert all({"loss", "grad_norm", "lr", "step_time_s", "loss_tokens"} <= set(r) for r in train)
    assert all("tokens_per_s" in r and "tflops" in r for r in train[1:])
    assert [r["step"] for r in rows if r["split"] == "eval"] == [10, 20]
    assert list((d / "tensorboard").glob("events.out.tfevents.*"))
    assert (d / "tokenizer" / "tokenizer_config.json").exists()
    assert sorted(int(p.name) for p in (d / "checkpoints").iterdir() if p.name.isdigit()) == [15, 20]


def final_params(run_dir):
    from safer_jax.training.export import export_checkpoint

    out = Path(run_dir) / "final-export"
    export_checkpoint(run_dir, out, step=20, overwrite=True)
    from safetensors.numpy import load_file

    return load_file(out / "model.safetensors")


def test_exact_resume_after_sigkill(uninterrupted, tmp_path):
    d = tmp_path / "killed"
    r = runner(d, "--kill-at", "13", "--sleep", "3")
    assert r.returncode == -signal.SIGKILL
    r = runner(d)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr and "at step 10" in r.stdout + r.stderr
    full, resumed = losses(uninterrupted), losses(d)
    assert [resumed[s] for s in range(11, 21)] == [full[s] for s in range(11, 21)]  # bit for bit
    a, b = final_params(uninterrupted), final_params(d)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_kill_during_async_save_resumes_from_a_complete_checkpoint(uninterrupted, tmp_path):
    d = tmp_path / "killed-saving"
    r = runner(d, "--kill-at", "15")  # SIGKILL right after the step-15 save was issued
    assert r.returncode == -signal.SIGKILL
    r = runner(d)
    assert r.returncode == 0, r.stderr[-3000:]
    text = r.stdout + r.stderr
    start = 15 if "at step 15" in text else 10
    assert f"at step {start}" in text
    full, resumed = losses(uninterrupted), losses(d)
    assert [resumed[s] for s in range(start + 1, 21)] == [full[s] for s in range(start + 1, 21)]


def test_sigterm_saves_and_exits_zero_then_continues(uninterrupted, tmp_path):
    d = tmp_path / "term"
    env = dict(os.environ, XLA_FLAGS=xla_flags(8), PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable,
        "-m",
        "safer_jax.cli",
        "sft",
        "--config",
        str(TINY),
        f"run_dir={d}",
        "train.steps=400",
        "train.log_every=1",
        "train.checkpoint_every=1000",
        "train.export_final=false",
        "data.seq_len=256",
        "data.batch_size=4",
    ]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in p.stdout:
        seen.append(line)
        if "step 3/400" in line:
            p.send_signal(signal.SIGTERM)
            break
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, "".join(seen) + out
    assert "SIGTERM: checkpoint saved at step" in out
    saved = int(out.split("SIGTERM: checkpoint saved at step ")[1].split(";")[0])
    assert (d / "checkpoints" / str(saved)).exists()
    rerun = [a if not a.startswith("train.steps=") else f"train.steps={saved + 2}" for a in cmd]
    r = subprocess.run(rerun, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"at step {saved}" in r.stdout + r.stderr
    assert max(losses(d)) == saved + 2


def test_checkpoint_restores_onto_another_mesh(tmp_path):
    base = [
        f"run_dir={tmp_path / 'a'}",
        "train.steps=5",
        "train.checkpoint_every=5",
        "train.export_final=false",
        "data.seq_len=256",
        "data.batch_size=4",
        "train.log_every=1",
        "train.tensorboard=false",
    ]
    from safer_jax.training.sft_loop import train_sft

    train_sft(load_config(SFTConfig, str(TINY), base))
    import shutil

    shutil.copytree(tmp_path / "a", tmp_path / "b")
    same = train_sft(load_config(SFTConfig, str(TINY), base + ["train.steps=6"]))
    other = train_sft(
        load_config(
            SFTConfig,
            str(TINY),
            [o.replace("/a", "/b") for o in base] + ["train.steps=6", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
        )
    )
    assert other["state"].params["layers"]["wq"][...].sharding.mesh.shape["tensor"] == 2
    np.testing.assert_allclose(other["loss"], same["loss"], rtol=1e-5)


def test_sft_reports_a_malformed_training_file_without_traceback(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(bundled("train_traces.jsonl").read_text().splitlines()[0] + "\n{oops\n")
    env = dict(os.environ, XLA_FLAGS=xla_flags(8))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "safer_jax.cli",
            "sft",
            "--config",
            str(TINY),
            f"run_dir={tmp_path / 'r'}",
            f"data.train={f}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "bad.jsonl:2: malformed JSON" in r.stderr and "Traceback" not in r.stderr


def _step_with(model_dir, batch, tx, freeze_layers, scan_layers=True):
    """(compiled step, state) for a model loaded with `freeze_layers`; the state keeps its params."""
    model = from_pretrained(model_dir, param_dtype="float32", freeze_layers=freeze_layers, scan_layers=scan_layers)
    graphdef, params = nnx.split(model)
    state = init_state(params, tx)
    return compile_step(sft_step, state, batch, None, log=lambda _: None, graphdef=graphdef, tx=tx, chunk=64), state


def _named(params):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}


@pytest.mark.parametrize("scan_layers", [True, False])
def test_frozen_blocks_and_embedding_stay_put_and_the_rest_trains_as_unfrozen(tiny, traces, scan_layers):
    """`model.freeze_layers=1` of 2: the embedding and block 0 are bit-identical after steps of
    AdamW with weight decay, while block 1 and the final norm get the very gradient they get in
    the unfrozen model (the lower part's gradient does not feed theirs)."""
    d, ct = tiny
    batch = batches(traces[:16], ct, 1, 2)[0]
    ident = optax.GradientTransformation(lambda p: optax.EmptyState(), lambda g, s, p=None: (g, s))
    grads = {}
    for k in (0, 1):
        step, state = _step_with(d, batch, ident, k, scan_layers)
        before = _named(state.params)
        new, m = step(jax.tree.map(jnp.zeros_like, state).replace(params=state.params), batch)
        grads[k] = {n: _named(new.params)[n] - before[n] for n in before}
        assert np.isfinite(float(m["loss"]))
    layer_names = [n for n in grads[0] if "layers" in n]
    assert layer_names and any("embed" in n for n in grads[0])
    for n, g in grads[1].items():
        if "embed" in n:
            assert not g.any(), n
        elif "layers" in n:
            assert not g[0].any(), n  # block 0: no gradient
            np.testing.assert_allclose(g[1], grads[0][n][1], rtol=1e-5, atol=1e-7)
            assert grads[0][n][0].any(), n  # unfrozen, block 0 moves: the check above can fail
        else:
            np.testing.assert_allclose(g, grads[0][n], rtol=1e-5, atol=1e-7)
    tx = make_optimizer(OptimizerConfig(lr=1e-2, weight_decay=0.1, schedule="constant"), 10, 1)
    step, state = _step_with(d, batch, tx, 1, scan_layers)
    before = _named(state.params)
    for _ in range(2):
        state, _ = step(state, batch)
    after = _named(state.params)
    for n in before:
        if "embed" in n:
            np.testing.assert_array_equal(after[n], before[n])
        elif "layers" in n:
            np.testing.assert_array_equal(after[n][0], before[n][0])
            assert not np.array_equal(after[n][1], before[n][1]), n


def test_frozen_blocks_cost_no_backward(tiny, traces):
    """XLA's own count: a step with the embedding and block 0 of 2 frozen does fewer flops than
    the full step, by at least the backward of one block (a stop_gradient that still ran the
    backward through the frozen part, producing zeros, would cost the same). Unrolled blocks:
    XLA's count of a scan's loop does not multiply its body by the trip count."""
    d, ct = tiny
    batch = batches(traces[:16], ct, 1, 2)[0]
    flops = {}
    for k in (0, 1, 2):
        tx = make_optimizer(OptimizerConfig(lr=1e-3, schedule="constant"), 10, k)
        step, _ = _step_with(d, batch, tx, k, scan_layers=False)
        cost = step.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops[k] = float(cost["flops"])
    block_bwd = (flops[0] - flops[2]) / 2  # per block, when the head's backward is left in both
    assert flops[1] < flops[0] and flops[2] < flops[1], flops
    assert flops[0] - flops[1] > 0.8 * block_bwd, flops
