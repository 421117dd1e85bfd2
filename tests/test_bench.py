"""The benchmark harness: both sides do the same work, and bad input gets a clear error."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from safer_jax.bench import BenchSpec
from safer_jax.bench.work import batch, pair_batch, sft_batch
from safer_jax.cli import main


@pytest.fixture(scope="module", params=["sft", "prefopt"])
def both_sides(request, tmp_path_factory):
    """(spec, JAX record, torch record) of 2 fp32 steps on the tiny shape, each side run in this process."""
    from safer_jax.bench import jax_side, torch_side

    spec = BenchSpec(
        model="tiny",
        task=request.param,
        seq=64,
        batch=2,
        steps=2,
        lr=1e-3,
        model_dir=str(tmp_path_factory.mktemp("bench") / "model"),
    )
    return spec, jax_side.run(spec), torch_side.run(spec)


def test_same_work(both_sides):
    spec, j, t = both_sides
    assert j["tokens"] == t["tokens"] == spec.batch * spec.seq * (1 if spec.task == "sft" else 2)
    assert j["real_tokens"] == t["real_tokens"] > 0
    assert j["loss_tokens"] == t["loss_tokens"] > 0
    assert j["flops_per_step"] == t["flops_per_step"]
    np.testing.assert_allclose(j["first_loss"], t["first_loss"], rtol=1e-4)
    # the loss of step 2 follows one AdamW step on both sides: equal only if the updates are
    assert abs(j["losses"][1] - j["losses"][0]) > 1e-4  # the step moved the loss
    np.testing.assert_allclose(j["losses"][1], t["losses"][1], rtol=1e-4)
    if spec.task == "prefopt":
        np.testing.assert_allclose(j["first_loss"], np.log(2), rtol=1e-6)  # policy == reference at step 1
        for side in ("chosen", "rejected"):
            np.testing.assert_allclose(j["span_logps"][side], t["span_logps"][side], rtol=1e-4)
            assert all(v < 0 for v in j["span_logps"][side])
    for rec in (j, t):
        assert rec["tokens_per_s"] > 0 and rec["step_s"] > 0 and rec["peak_memory_bytes"] > 0
        assert rec["mfu"] is None  # CPU, float32: no MFU


def test_batches_are_packed_and_deterministic():
    spec = BenchSpec(seq=64, batch=3)
    a, b = sft_batch(spec, 100, 1), sft_batch(spec, 100, 1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["inputs"], sft_batch(spec, 100, 2)["inputs"])
    assert a["segment_ids"].max() >= 2  # packed: several segments a row
    starts = np.diff(a["segment_ids"], axis=1) != 0
    assert np.all(a["positions"][:, 1:][starts & (a["segment_ids"][:, 1:] > 0)] == 0)  # positions restart
    assert (a["segment_ids"][-1] == 0).any() and (a["weights"][a["segment_ids"] == 0] == 0).all()
    p = pair_batch(dataclasses.replace(spec, task="prefopt"), 100, 1)
    assert p["input_ids"].shape == (6, 64)
    ctx = np.argmax(p["span_mask"], axis=1)
    for i in range(3):  # a pair shares its context, chosen row i and rejected row 3 + i
        n = min(ctx[i], ctx[3 + i])
        assert np.array_equal(p["input_ids"][i, :n], p["input_ids"][3 + i, :n])
    assert batch(dataclasses.replace(spec, task="prefopt"), 100, 1).keys() == p.keys()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "gpt5"], "not a named shape"),
        (["--attention", "flash"], "unknown"),
        (["--task", "rl"], "--task 'rl' unknown"),
        (["--steps", "1"], "at least 2"),
    ],
)
def test_bad_input(args, message, capsys):
    assert main(["bench", *args]) == 2
    assert message in capsys.readouterr().err


def test_torch_missing(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    assert main(["bench", "--torch"]) == 2
    assert "--torch needs PyTorch" in capsys.readouterr().err


def test_backend_without_hardware(capsys):
    # the JAX side's own process refuses cudnn on a CPU before building anything
    assert main(["bench", "--attention", "cudnn", "--steps", "2", "--seq", "16", "--batch", "1"]) == 2
    err = capsys.readouterr().err
    assert "'cudnn' needs a GPU" in err and "'cpu'" in err


def test_record_and_table(monkeypatch, tmp_path):
    """The harness's record: both sides, device, versions, command, ratios; written as each side lands."""
    import json

    from safer_jax.bench import harness

    written = []

    def fake_side(module, spec_path, out_path, env):
        spec = json.loads(spec_path.read_text())
        if Path(tmp_path / "rec.json").exists():
            written.append(json.loads((tmp_path / "rec.json").read_text()))
        tps = {"jax_side": 200.0}.get(module, 100.0 if not spec["torch_compile"] else 400.0)
        return {
            "tokens": 10,
            "tokens_per_s": tps,
            "step_s": 0.1,
            "first_loss": 1.0,
            "peak_memory_bytes": 5,
            "flops_per_step": 1e9,
            "achieved_tflops": 0.01,
            "mfu": None,
            "threads": 2,
            "device": "cpu: cpu",
        }

    monkeypatch.setattr(harness, "_side", fake_side)
    spec = BenchSpec(torch_compile=True)
    rec = harness.run_bench(spec, with_torch=True, json_path=str(tmp_path / "rec.json"), command="safer-jax bench")
    assert {"jax", "torch", "torch_compile", "device", "versions", "command"} <= rec.keys()
    assert rec["jax_over_torch"] == 2.0 and rec["jax_over_torch_compile"] == 0.5
    assert rec["versions"]["jax"] and rec["command"] == "safer-jax bench" and rec["device"] == "cpu: cpu"
    assert written[0]["jax"] is not None and written[0]["torch"] is None  # JAX's figures were on disk first
    assert json.loads((tmp_path / "rec.json").read_text())["torch_compile"]["tokens_per_s"] == 400.0
    text = harness.table(rec)
    assert "tokens_per_s" in text and "JAX / torch tokens/s: 2.00x" in text


def test_mfu_only_where_the_peak_is_known():
    from safer_jax.bench.shapes import SHAPES
    from safer_jax.bench.work import flops_per_step, hf_shape, summarize

    cfg = hf_shape(SHAPES["llama3.2-1b"])
    spec = BenchSpec(model="llama3.2-1b", seq=2048, batch=4, dtype="bfloat16", steps=3)
    rec = summarize(spec, cfg, [9.0, 1.0, 1.0], [2.0, 1.9, 1.8], 1, 1, None, "cuda: NVIDIA H100 80GB HBM3")
    assert rec["tokens"] == 2 * 4 * 2048 and rec["step_s"] == 1.0
    assert abs(rec["mfu"] - flops_per_step(spec, cfg) / 989e12) < 1e-12
    assert summarize(spec, cfg, [9.0, 1.0], [2.0, 1.9], 1, 1, None, "cpu")["mfu"] is None
    # 6N + 6LTHDh per token with N = matmul parameters: the 1B shape's N is 1.24e9 (tied lm_head counted once)
    assert abs(flops_per_step(spec, cfg) / (4 * 2048) - (6 * 1.2358e9 + 6 * 16 * 2048 * 32 * 64)) < 1e8


def test_top_ops_of_a_trace(tmp_path):
    import gzip
    import json

    from safer_jax.bench.profile import format_top_ops, top_ops

    events = [
        {"ph": "X", "name": "ynn_fusion.3", "dur": 3000},
        {"ph": "X", "name": "ynn_fusion.3", "dur": 1000},
        {"ph": "X", "name": "copy_fusion", "dur": 2000},
        {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 9e6},
    ]
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.trace.json.gz").write_bytes(gzip.compress(json.dumps({"traceEvents": events}).encode()))
    rows = top_ops(tmp_path)
    assert rows == [("ynn_fusion.3", 4.0, 2), ("copy_fusion", 2.0, 1)]  # wrappers left out
    hlo = '  %ynn_fusion.3 = f32[8,4]{1,0} fusion(%a), metadata={op_name="jit(f)/BTD,DF->BTF/dot_general"}'
    assert "f32[8,4]{1,0}" in format_top_ops(rows, hlo) and "BTD,DF->BTF" in format_top_ops(rows, hlo)
