"""`safer-jax prefopt` and the reference log-prob cache: learning, reuse, invalidation, export."""

import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from safer_jax.config import PrefOptConfig, load_config
from safer_jax.data.pairs import make_pairs
from safer_jax.data.pipeline import PipelineConfig, preference_dataset
from safer_jax.models import from_pretrained
from safer_jax.training import ref_cache
from safer_jax.training.preference import pair_layout, preference_step
from safer_jax.training.prefopt_loop import train_prefopt
from safer_jax.training.sft import init_state

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "prefopt" / "tiny.yaml"


@pytest.fixture(scope="module")
def pairs_file(traces, rules, tmp_path_factory):
    f = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    pairs = make_pairs(traces[:24], rules, seed=0)
    f.write_text("".join(json.dumps(p.to_json()) + "\n" for p in pairs))
    return f


@pytest.fixture(scope="module")
def model_dir(tiny, tmp_path_factory):
    """A private copy of the tiny model (tests below rewrite its weights)."""
    d = tmp_path_factory.mktemp("tiny-ref") / "model"
    shutil.copytree(tiny[0], d)
    return d


def config(run_dir, model_dir, pairs_file, cache_dir, *extra):
    return load_config(
        PrefOptConfig,
        str(TINY),
        [
            f"run_dir={run_dir}",
            f"model.path={model_dir}",
            f"data.train={pairs_file}",
            f"preference.cache_dir={cache_dir}",
            "train.steps=8",
            "train.log_every=1",
            "train.checkpoint_every=4",
            "data.batch_size=4",
            "data.seq_len=320",
            "train.tensorboard=false",
            *extra,
        ],
    )


def train_rows(run_dir):
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["split"] == "train"}


@pytest.fixture(scope="module")
def first_run(model_dir, pairs_file, tmp_path_factory):
    base = tmp_path_factory.mktemp("prefopt")
    before = ref_cache.REFERENCE_FORWARDS["batches"]
    res = train_prefopt(config(base / "run1", model_dir, pairs_file, base / "cache"))
    return base, res, ref_cache.REFERENCE_FORWARDS["batches"] - before


def test_first_run_computes_the_cache_learns_and_exports(first_run):
    base, res, forwards = first_run
    assert forwards > 0 and res["cache_key"]
    entry = base / "cache" / res["cache_key"]
    logps = np.load(entry / "ref_logps.npy")
    assert logps.shape == (res["n_pairs"], 2) and np.all(logps < 0)
    rows = train_rows(base / "run1")
    assert sorted(rows) == list(range(1, 9))
    assert math.isclose(rows[1]["loss"], math.log(2.0), rel_tol=1e-5)  # policy == reference at step 1
    keys = {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracy",
        "rewards/margin",
        "length/chosen",
        "length/rejected",
        "grad_norm",
        "lr",
    }
    assert all(keys <= set(r) for r in rows.values())
    assert all("tokens_per_s" in r and "tflops" in r for s, r in rows.items() if s > 1)
    print("margin", [round(rows[s]["rewards/margin"], 3) for s in sorted(rows)])
    assert rows[8]["rewards/margin"] > rows[1]["rewards/margin"] + 0.05
    assert (Path(res["export"]) / "model.safetensors").exists()


def test_second_run_reuses_the_cache_with_no_reference_forward(first_run, model_dir, pairs_file):
    base, res, _ = first_run
    before = ref_cache.REFERENCE_FORWARDS["batches"]
    res2 = train_prefopt(
        config(base / "run2", model_dir, pairs_file, base / "cache", "train.steps=2", "train.export_final=false")
    )
    assert ref_cache.REFERENCE_FORWARDS["batches"] == before
    assert res2["cache_key"] == res["cache_key"]
    a, b = train_rows(base / "run1"), train_rows(base / "run2")
    assert a[1]["loss"] == b[1]["loss"] and a[2]["loss"] == b[2]["loss"]


def test_cached_reference_equals_a_frozen_reference_model(first_run, model_dir, pairs_file):
    base, _, _ = first_run
    train_prefopt(
        config(
            base / "run-live",
            model_dir,
            pairs_file,
            base / "cache",
            "train.steps=3",
            "preference.reference=model",
            "train.export_final=false",
        )
    )
    cached, live = train_rows(base / "run1"), train_rows(base / "run-live")
    for s in (1, 2, 3):
        np.testing.assert_allclose(live[s]["loss"], cached[s]["loss"], rtol=1e-5)
        np.testing.assert_allclose(live[s]["rewards/margin"], cached[s]["rewards/margin"], rtol=1e-4, atol=1e-6)


def test_changed_pairs_or_reference_invalidate_the_cache(first_run, model_dir, pairs_file, tmp_path):
    base, res, _ = first_run
    lines = pairs_file.read_text().splitlines()
    changed = tmp_path / "pairs.jsonl"
    row = json.loads(lines[0])
    row["rejected"] = row["rejected"] + " Extra."
    changed.write_text("\n".join([json.dumps(row)] + lines[1:]) + "\n")
    before = ref_cache.REFERENCE_FORWARDS["batches"]
    r = train_prefopt(
        config(tmp_path / "a", model_dir, changed, base / "cache", "train.steps=1", "train.export_final=false")
    )
    assert r["cache_key"] != res["cache_key"] and ref_cache.REFERENCE_FORWARDS["batches"] > before

    ref = tmp_path / "ref"  # the same architecture with other weights
    shutil.copytree(model_dir, ref)
    from safetensors.numpy import load_file, save_file

    w = load_file(ref / "model.safetensors")
    w = {k: v * np.float32(1.01) for k, v in w.items()}
    save_file(w, str(ref / "model.safetensors"), metadata={"format": "pt"})
    before = ref_cache.REFERENCE_FORWARDS["batches"]
    r = train_prefopt(
        config(
            tmp_path / "b",
            model_dir,
            pairs_file,
            base / "cache",
            "train.steps=1",
            "train.export_final=false",
            f"preference.reference_path={ref}",
        )
    )
    assert r["cache_key"] != res["cache_key"] and ref_cache.REFERENCE_FORWARDS["batches"] > before
    assert len([p for p in (base / "cache").iterdir() if p.is_dir() and not p.name.startswith(".")]) == 3


def test_cache_key_covers_compute_settings_and_salt():
    base = dict(dtype="float32", param_dtype=None, attention="xla", span="step", ld_alpha=1.0, ld_reference=True)
    key = lambda **kw: ref_cache.compute_fingerprint(ref_cache.compute_settings(**{**base, **kw}))  # noqa: E731
    k0 = key()
    assert key(dtype="bfloat16") != k0 and key(param_dtype="bfloat16") != k0
    assert key(attention="cudnn") != k0 and key(salt="other-code-version") != k0 and key(span="to_end") != k0
    assert key(ld_alpha=0.5) != k0  # LD-DPO weights the reference: its numbers change
    assert key(ld_alpha=0.5, ld_reference=False) == key(ld_reference=False)  # unweighted reference: one entry
    assert ref_cache.cache_key("p", "t", "r", key(attention="cudnn")) != ref_cache.cache_key("p", "t", "r", k0)


def test_float32_cache_is_not_used_by_bfloat16_and_a_changed_reference_stops_a_resume(
    first_run, model_dir, pairs_file, tmp_path
):
    from safer_jax.training.prefopt_loop import ref_logps_command

    base, res, _ = first_run
    recorded = json.loads((base / "run1" / "reference.json").read_text())  # written when run1 started
    assert recorded["key"] == res["cache_key"] and recorded["settings"]["dtype"] == "float32"
    run = tmp_path / "resumed"
    shutil.copytree(base / "run1", run)  # a run folder with checkpoints, resumed in bfloat16
    rows = (run / "metrics.jsonl").read_text()
    with pytest.raises(ref_cache.ReferenceChanged, match=r"compute differ.*dtype: 'float32' -> 'bfloat16'"):
        train_prefopt(config(run, model_dir, pairs_file, base / "cache", "train.steps=12", "model.dtype=bfloat16"))
    assert (run / "metrics.jsonl").read_text() == rows  # nothing trained against the other reference
    before = ref_cache.REFERENCE_FORWARDS["batches"]
    _, entry, hit = ref_logps_command(
        config(tmp_path / "bf16", model_dir, pairs_file, base / "cache", "model.dtype=bfloat16")
    )
    assert not hit and entry.name != res["cache_key"] and ref_cache.REFERENCE_FORWARDS["batches"] > before


def test_prefopt_run_exports_as_a_hf_folder_and_resumes(first_run, model_dir, pairs_file):
    from safer_jax.cli import main

    base, _, _ = first_run
    out = base / "exported-step4"
    assert main(["export", str(base / "run1"), "--step", "8", "--to", str(out)]) == 0
    m = from_pretrained(out)
    ref = from_pretrained(base / "run1" / "export")
    for a, b in zip(jax.tree.leaves(nnx.state(m, nnx.Param)), jax.tree.leaves(nnx.state(ref, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    res = train_prefopt(
        config(base / "run1", model_dir, pairs_file, base / "cache", "train.steps=10", "train.export_final=false")
    )
    assert res["step"] == 10 and sorted(train_rows(base / "run1"))[-2:] == [9, 10]


def test_ref_logps_command_writes_then_reuses(model_dir, pairs_file, tmp_path, capsys):
    from safer_jax.cli import main

    args = [
        "ref-logps",
        "--config",
        str(TINY),
        f"run_dir={tmp_path / 'r'}",
        f"model.path={model_dir}",
        f"data.train={pairs_file}",
        f"preference.cache_dir={tmp_path / 'cache'}",
        "data.seq_len=320",
        "data.batch_size=4",
    ]
    assert main(args) == 0
    assert "wrote reference log-probs of" in capsys.readouterr().out
    assert main(args) == 0
    assert "reused reference log-probs of" in capsys.readouterr().out


def test_pair_layout_splits_process_blocks_and_microbatches():
    # two processes, each with 2 pairs: rows [c0 c1 r0 r1 | c2 c3 r2 r3]
    rows = np.array(["c0", "c1", "r0", "r1", "c2", "c3", "r2", "r3"])
    idx = {"x": jnp.arange(8)}
    out = np.asarray(pair_layout(idx, accum=2, blocks=2)["x"])
    assert list(rows[out]) == ["c0", "c1", "r0", "r1", "c2", "c3", "r2", "r3"]
    out = np.asarray(pair_layout(idx, accum=4, blocks=2)["x"])
    assert list(rows[out]) == ["c0", "r0", "c1", "r1", "c2", "r2", "c3", "r3"]
    out = np.asarray(pair_layout(idx, accum=1, blocks=2)["x"])
    assert list(rows[out]) == ["c0", "c1", "c2", "c3", "r0", "r1", "r2", "r3"]


def test_gradient_accumulation_equals_one_batch(tiny, traces, rules):
    d, ct = tiny
    pairs = make_pairs(traces[:12], rules, seed=0)
    batch = {
        k: jnp.asarray(v)
        for k, v in next(iter(preference_dataset(pairs, ct, PipelineConfig(seq_len=320, batch_size=4)))).items()
    }
    model = from_pretrained(d)
    graphdef, params = nnx.split(model)
    ref = jax.tree.map(lambda x: x * 1.02, params)  # a reference unlike the policy: non-trivial loss
    tx = optax.sgd(1.0)
    outs = []
    for accum in (1, 2, 4):
        state = init_state(jax.tree.map(jnp.copy, params), tx)
        new, m = jax.jit(lambda s, b, r, a=accum: preference_step(s, b, r, graphdef=graphdef, tx=tx, accum=a))(
            state, batch, ref
        )
        outs.append((float(m["loss"]), float(m["rewards/margin"]), jax.tree.map(np.asarray, new.params)))
    for loss, margin, p in outs[1:]:
        np.testing.assert_allclose(loss, outs[0][0], rtol=1e-5)
        np.testing.assert_allclose(margin, outs[0][1], rtol=1e-4, atol=1e-6)
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(outs[0][2])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_every_prefopt_config_loads():
    from safer_jax.losses import PREFERENCE_LOSSES

    files = sorted((ROOT / "configs" / "prefopt").glob("*.yaml"))
    assert len(files) >= 3
    for f in files:
        cfg = load_config(PrefOptConfig, str(f))
        assert cfg.train.steps > 0 and cfg.model.path and cfg.preference.loss_type in PREFERENCE_LOSSES, f
