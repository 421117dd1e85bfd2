"""Distributed start-up: how a process finds its peers, and fast clear failures."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from xla_flags import xla_flags

from safer_jax.distributed import DistributedError, start_spec

ROOT = Path(__file__).resolve().parents[1]


def test_explicit_variables_become_arguments():
    env = {
        "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
        "JAX_NUM_PROCESSES": "4",
        "JAX_PROCESS_ID": "3",
        "SAFER_JAX_INIT_TIMEOUT": "10",
        "SLURM_JOB_ID": "7",
        "SLURM_NTASKS": "4",
    }
    spec = start_spec(env)  # explicit variables win over a detected cluster
    assert spec.method == "explicit"
    assert spec.kwargs == {
        "coordinator_address": "10.0.0.1:1234",
        "num_processes": 4,
        "process_id": 3,
        "initialization_timeout": 10,
    }


@pytest.mark.parametrize(
    "env,method",
    [
        ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"}, "slurm"),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, "ompi"),
        ({"TPU_WORKER_HOSTNAMES": "a,b"}, "tpu"),
    ],
)
def test_clusters_are_detected(env, method):
    spec = start_spec(env)
    assert spec.method == method and spec.kwargs == {"initialization_timeout": 300}


@pytest.mark.parametrize(
    "env,msg",
    [
        ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_NUM_PROCESSES, JAX_PROCESS_ID missing"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "must lie in [0"),
        ({"JAX_COORDINATOR_ADDRESS": "h", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}, "host:port"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "1"}, "not an integer"),
        ({"SAFER_JAX_INIT_TIMEOUT": "0", "SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"}, "positive"),
    ],
)
def test_bad_variables_are_named(env, msg):
    with pytest.raises(DistributedError, match=msg.replace("[", r"\[")):
        start_spec(env)


def test_nothing_detected_says_what_to_set(monkeypatch):
    monkeypatch.setattr(os.path, "exists", lambda p: False)  # not on a TPU VM
    with pytest.raises(DistributedError, match="JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID"):
        start_spec({})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_coordinator_fails_within_the_timeout(tmp_path):
    """Process 1 of 2 with nobody at the address: a clear error within 10 s (JAX's own default is 300 s)."""
    env = dict(
        os.environ,
        SAFER_JAX_DISTRIBUTED="1",
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}",
        JAX_NUM_PROCESSES="2",
        JAX_PROCESS_ID="1",
        SAFER_JAX_INIT_TIMEOUT="10",
        XLA_FLAGS=xla_flags(4),
    )
    t0 = time.time()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "safer_jax.cli",
            "sft",
            "--config",
            str(ROOT / "configs/sft/tiny.yaml"),
            f"run_dir={tmp_path / 'r'}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "coordinator at 127.0.0.1:" in r.stderr and "unreachable for 10 s" in r.stderr
    assert time.time() - t0 < 60
    assert not (tmp_path / "r").exists()  # failed before any work
