"""Several processes that agree: 2 processes x 4 CPU devices on 127.0.0.1, through the same CLI
and environment variables a cluster uses, against 1 process with 8 devices."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from xla_flags import xla_flags

ROOT = Path(__file__).resolve().parents[1]
SFT = ROOT / "configs" / "sft" / "tiny.yaml"
PREF = ROOT / "configs" / "prefopt" / "tiny.yaml"
COMMON = [
    "mesh.fsdp=8",
    "data.seq_len=128",
    "data.batch_size=8",
    "train.log_every=1",
    "train.async_checkpoint=false",
    "train.tensorboard=false",
    "train.export_final=false",
    "optimizer.schedule=constant",  # the schedule's length is compiled in: runs of any length share programs
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    # no JAX_ settings of this process leak in, except the session's compilation cache (conftest.py)
    keep = (
        "JAX_COMPILATION_CACHE_DIR",
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES",
    )
    env = {k: v for k, v in os.environ.items() if k in keep or not k.startswith(("JAX_", "SAFER_JAX_TEST"))}
    env.update(SAFER_JAX_CACHE=str(tmp / "cache"), PYTHONUNBUFFERED="1", **extra)
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "safer_jax.cli", *args]


def run_one(tmp: Path, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    env = _env(tmp, XLA_FLAGS=xla_flags(8))
    r = subprocess.run(_cli(*args), env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def start_two(tmp: Path, *args: str, per_process: dict[int, dict[str, str]] | None = None) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for i in range(2):
        env = _env(
            tmp,
            XLA_FLAGS=xla_flags(4),
            SAFER_JAX_DISTRIBUTED="1",
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(i),
            SAFER_JAX_INIT_TIMEOUT="60",
            **(per_process or {}).get(i, {}),
        )
        procs.append(
            subprocess.Popen(_cli(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    return procs


def finish(procs: list[subprocess.Popen], timeout: int = 400) -> list[tuple[int, str]]:
    out = []
    try:
        for p in procs:
            text, _ = p.communicate(timeout=timeout)
            out.append((p.returncode, text))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


def run_two(tmp: Path, *args: str, ok: bool = True, **kw) -> list[tuple[int, str]]:
    res = finish(start_two(tmp, *args, **kw))
    if ok:
        for rc, text in res:
            assert rc == 0, text[-4000:]
    return res


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module", autouse=True)
def _small_data(traces, tmp_path_factory):
    """48 bundled traces (harmful and not) for every run here: prefopt's reference pass then covers
    a few hundred pairs, not the whole bundled set's thousands, and agreement needs no more."""
    f = tmp_path_factory.mktemp("mp_data") / "traces.jsonl"
    picked = [t for t in traces if t.label == "harmful"][:24] + [t for t in traces if t.label != "harmful"][:24]
    f.write_text("".join(json.dumps(t.to_json()) + "\n" for t in picked))
    COMMON.append(f"data.train={f}")
    yield
    COMMON.remove(f"data.train={f}")


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    """The same 3 SFT steps on 1 process x 8 devices and on 2 processes x 4 devices."""
    tmp = tmp_path_factory.mktemp("mp_sft")
    one, two = tmp / "one", tmp / "two"
    run_one(tmp, "sft", "--config", str(SFT), f"run_dir={one}", "train.steps=3", "train.checkpoint_every=3", *COMMON)
    res = run_two(
        tmp, "sft", "--config", str(SFT), f"run_dir={two}", "train.steps=3", "train.checkpoint_every=3", *COMMON
    )
    return tmp, one, two, res


def test_two_processes_equal_one(sft_runs):
    _, one, two, res = sft_runs
    assert "distributed: process 0 of 2" in res[0][1] and "distributed: process 1 of 2" in res[1][1]
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 3
    assert a == pytest.approx(b, rel=1e-5, abs=1e-5)
    assert (two / "checkpoints" / "3").is_dir()


def test_two_process_checkpoint_continues_in_one_process(sft_runs):
    tmp, _, two, _ = sft_runs
    r = run_one(
        tmp, "sft", "--config", str(SFT), f"run_dir={two}", "train.steps=5", "train.checkpoint_every=5", *COMMON
    )
    assert "resumed from" in r.stdout + r.stderr and "at step 3" in r.stdout + r.stderr
    assert len(losses(two)) == 5 and (two / "checkpoints" / "5").is_dir()


def test_prefopt_cache_and_ld_alpha_agree(tmp_path):
    """1 process fills its cache; 2 processes compute the reference together into a fresh cache
    (LD-DPO weighting pairs the rows as the step does), then a rerun hits it in both processes."""
    pref = ["--config", str(PREF), *COMMON, "train.steps=2", "train.checkpoint_every=2", "preference.ld_alpha=0.5"]
    run_one(tmp_path, "prefopt", *pref, f"run_dir={tmp_path / 'one'}", f"preference.cache_dir={tmp_path / 'c1'}")
    pref += [f"model.path={tmp_path / 'one' / 'tiny-model'}", f"preference.cache_dir={tmp_path / 'c2'}"]
    fresh = run_two(tmp_path, "prefopt", *pref, f"run_dir={tmp_path / 'two'}")
    assert all(f"[process {i}] reference log-probs: cache miss" in text for i, (_, text) in enumerate(fresh))
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5, abs=1e-5)
    again = run_two(tmp_path, "prefopt", *pref, f"run_dir={tmp_path / 'two-b'}")
    for i, (_, text) in enumerate(again):
        assert f"[process {i}] reference log-probs: cache hit" in text and "computing" not in text
    assert losses(tmp_path / "two-b") == pytest.approx(losses(tmp_path / "one"), rel=1e-5, abs=1e-5)


def test_deadline_with_a_skewed_clock_stops_both_at_one_step(tmp_path):
    d = tmp_path / "r"
    res = run_two(
        tmp_path,
        "sft",
        "--config",
        str(SFT),
        f"run_dir={d}",
        "train.steps=50",
        "train.checkpoint_every=50",
        "train.max_minutes=30",
        *COMMON,
        per_process={1: {"SAFER_JAX_TEST_CLOCK_SKEW_S": "100000"}},
    )
    assert "train.max_minutes=30 reached after step 1" in res[0][1]  # process 1's clock decided, process 0 followed
    assert sorted(p.name for p in (d / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]
    assert len(losses(d)) == 1


def test_sigterm_to_one_process_stops_both(tmp_path):
    d = tmp_path / "r"
    procs = start_two(
        tmp_path, "sft", "--config", str(SFT), f"run_dir={d}", "train.steps=500", "train.checkpoint_every=500", *COMMON
    )
    t0 = time.time()
    try:
        while not (d / "metrics.jsonl").exists() or len(losses(d)) < 2:
            assert time.time() - t0 < 300 and all(p.poll() is None for p in procs), "training did not start"
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGTERM)
    finally:
        res = finish(procs)
    for rc, text in res:
        assert rc == 0, text[-3000:]
    saved = [line for line in res[0][1].splitlines() if line.startswith("SIGTERM: checkpoint saved at step")]
    assert saved, res[0][1][-3000:]
    step = int(saved[0].split("step ")[1].split(";")[0])
    assert (d / "checkpoints" / str(step)).is_dir() and step < 500


def test_a_wrong_row_order_is_caught(tmp_path):
    """Devices interleaved between processes: chosen and rejected rows would not pair, so both stop."""
    res = run_two(
        tmp_path,
        "prefopt",
        "--config",
        str(PREF),
        *COMMON,
        "train.steps=1",
        f"run_dir={tmp_path / 'r'}",
        f"preference.cache_dir={tmp_path / 'c'}",
        ok=False,
        per_process={
            0: {"SAFER_JAX_TEST_DEVICE_ORDER": "interleaved"},
            1: {"SAFER_JAX_TEST_DEVICE_ORDER": "interleaved"},
        },
    )
    for rc, text in res:
        assert rc == 2 and "would not pair up" in text, text[-3000:]


@pytest.mark.parametrize(
    "override,msg",
    [
        ("data.batch_size=3", "must be divisible by processes (2)"),
        ("mesh.fsdp=4", "needs 4 devices, but jax.devices() has 8 (2 processes)"),
    ],
)
def test_bad_multi_process_setups_fail_before_work(tmp_path, override, msg):
    res = run_two(
        tmp_path, "sft", "--config", str(SFT), f"run_dir={tmp_path / 'r'}", "train.steps=1", *COMMON, override, ok=False
    )
    for rc, text in res:
        assert rc == 2 and msg in text, text[-3000:]
