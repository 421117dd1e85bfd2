"""`safer-jax demo --quick`: the whole pipeline end to end on a tiny model, every artifact checked."""

import json
import os
import subprocess
import sys
import time

import pytest
from xla_flags import xla_flags

from safer_jax.demo import STAGES, plan_for


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo") / "run"
    env = dict(os.environ, XLA_FLAGS=xla_flags(1), PYTHONUNBUFFERED="1")
    t0 = time.time()
    r = subprocess.run(
        [sys.executable, "-m", "safer_jax.cli", "demo", "--quick", "--run-dir", str(d)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(f"demo --quick: {time.time() - t0:.0f}s")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return d, r.stdout + r.stderr


def test_quick_demo_writes_every_artifact(quick_run):
    d, out = quick_run
    for n, _ in enumerate(STAGES, 1):
        assert f"[{n}/{len(STAGES)}]" in out
    state = json.loads((d / "demo_state.json").read_text())
    assert set(state["stages"]) == set(STAGES)
    for stage in ("sft", "prefopt"):
        run = d / stage
        assert (run / "config.yaml").exists() and (run / "versions.json").exists()
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert rows and all("loss" in r for r in rows if r["split"] == "train")
        assert any(p.name.isdigit() for p in (run / "checkpoints").iterdir())
        assert (run / "export" / "config.json").exists()
    pref_rows = [json.loads(x) for x in (d / "prefopt" / "metrics.jsonl").read_text().splitlines()]
    assert all("rewards/margin" in r for r in pref_rows if r["split"] == "train")
    assert len((d / "pairs.jsonl").read_text().splitlines()) == state["stages"]["pairs"]["pairs"] > 0
    assert any((d / "ref_cache").iterdir())
    assert (d / "model" / "config.json").exists() and list((d / "model").glob("*.safetensors"))
    assert (d / "model" / "tokenizer_config.json").exists()
    for part in ("baseline", "final"):
        res = json.loads((d / part / "results.json").read_text())
        assert res["metrics"]["overall"]["n"] == sum(plan_for(quick=True).eval_counts)
    report = (d / "report.md").read_text()
    assert "# safer-jax demo" in report and "harmful compliance" in report.lower()
    assert "| total |" in report and "Baseline" in report
    for png in ("headline.png", "rates_by_category.png", "lengths.png"):
        data = (d / "report" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
        assert f"(report/{png})" in report


def test_rerun_resumes_without_redoing_stages(quick_run):
    d, _ = quick_run
    env = dict(os.environ, XLA_FLAGS=xla_flags(1))
    before = json.loads((d / "demo_state.json").read_text())
    r = subprocess.run(
        [sys.executable, "-m", "safer_jax.cli", "demo", "--quick", "--run-dir", str(d)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    after = json.loads((d / "demo_state.json").read_text())
    for stage in ("baseline", "sft", "pairs", "prefopt", "final"):
        assert after["stages"][stage] == before["stages"][stage]
    assert "[1/6]" not in r.stdout and "[6/6] report" in r.stdout


def test_plan_fits_the_budget():
    small, default = plan_for(15), plan_for(30)
    assert small.sft_steps < default.sft_steps and small.sft_minutes < default.sft_minutes
    assert default.sft_minutes + default.pref_minutes < 30
    full = plan_for(full=True)
    assert full.eval_counts == (0, 0, 0) and full.pref_pairs == 0
