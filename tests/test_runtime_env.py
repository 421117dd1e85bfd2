"""The console entry point's allocator setting (`safer_jax.runtime_env`): glibc's huge-page tunable is
added by a re-exec, takes effect in the new process, respects the user's own tunables and the opt-out,
and stays off the PyTorch side of `safer-jax bench`."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from safer_jax.bench.harness import side_environs
from safer_jax.runtime_env import ADDED_MARK, OPT_OUT, TUNABLE, glibc_version, user_environ, wanted, with_tunable

REPO = Path(__file__).resolve().parents[1]

# The child reports its environment, its PID before and after the re-exec, and the minor page faults
# of writing a fresh 256 MiB malloc block (glibc maps it with mmap: 65,536 faults in 4 KiB pages).
CHILD = r"""
import ctypes, json, os, resource, sys
first = os.environ.get("T_PID")
os.environ["T_PID"] = str(os.getpid())
from safer_jax.runtime_env import reexec_with_tunable
if first is None:
    reexec_with_tunable()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
n = 256 << 20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
p = libc.malloc(ctypes.c_size_t(n))
ctypes.memset(p, 1, n)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES"), "mark": os.environ.get("SAFER_JAX_ADDED_GLIBC_TUNABLES"),
                  "pid": os.getpid(), "first_pid": first, "faults": faults}))
"""


def _child(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", ADDED_MARK, OPT_OUT, "T_PID")}
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "absent"
    return text[text.index("[") + 1 : text.index("]")]


def test_rules_for_adding_the_tunable():
    assert wanted({}, "linux", (2, 36)) and not wanted({}, "darwin") and not wanted({}, "win32")
    assert not wanted({}, "linux", (2, 31))  # glibc before 2.35 has no glibc.malloc.hugetlb
    assert not wanted({ADDED_MARK: "1"}, "linux", (2, 36))  # glibc dropped it (setuid, capabilities): no loop
    assert not wanted({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "linux", (2, 36))  # the user's choice stands
    assert not wanted({OPT_OUT: "0"}, "linux", (2, 36)) and wanted({OPT_OUT: "1"}, "linux", (2, 36))
    env = with_tunable({"A": "1"}, "linux", (2, 36))
    assert env == {"A": "1", "GLIBC_TUNABLES": TUNABLE, ADDED_MARK: "1"}
    assert user_environ(env) == {"A": "1"}
    assert with_tunable({"A": "1"}, "darwin") == {"A": "1"}
    mine = {"GLIBC_TUNABLES": TUNABLE}  # set by the user, not by safer-jax: kept
    assert user_environ(mine) == mine and with_tunable(mine, "linux", (2, 36)) == mine


@pytest.mark.skipif((glibc_version() or (0, 0)) < (2, 35), reason="needs Linux with glibc 2.35 or newer")
def test_reexec_sets_the_tunable_and_glibc_applies_it():
    got = _child()
    assert got["tunables"] == TUNABLE and got["mark"] == "1"
    assert got["first_pid"] is not None  # the re-executed image: its first image left its PID behind
    assert got["pid"] == int(got["first_pid"])  # execve: the same process, so launchers keep tracking it
    plain = _child(**{OPT_OUT: "0"})
    assert plain["tunables"] is None and plain["mark"] is None and plain["first_pid"] is None  # no re-exec
    if _thp_mode() == "madvise":  # huge pages only where asked for ("always" gives them to both)
        assert plain["faults"] >= 60_000, plain  # 4 KiB pages: the cost the tunable removes
        assert got["faults"] < plain["faults"] / 10, (got, plain)  # 2 MiB pages: 128 for the block
    own = _child(GLIBC_TUNABLES="glibc.malloc.arena_max=2")
    assert own["tunables"] == "glibc.malloc.arena_max=2" and own["mark"] is None


def test_bench_sides_get_their_environments():
    jax_env, torch_env = side_environs(with_tunable({"PATH": "/bin"}, "linux", (2, 36)))
    if wanted({}):
        assert jax_env["GLIBC_TUNABLES"] == TUNABLE
    assert "GLIBC_TUNABLES" not in torch_env and ADDED_MARK not in torch_env  # PyTorch eager as the user runs it
    assert str(REPO) in jax_env["PYTHONPATH"] and str(REPO) in torch_env["PYTHONPATH"]
    jax_env, torch_env = side_environs({"GLIBC_TUNABLES": TUNABLE})  # the user's own setting: both sides
    assert jax_env["GLIBC_TUNABLES"] == torch_env["GLIBC_TUNABLES"] == TUNABLE


def test_console_script_goes_through_the_reexec():
    (ep,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "safer-jax"]
    assert ep.value == "safer_jax.runtime_env:console_entry"


def test_entry_points_reexec_before_jax_is_imported():
    """`console_entry` and `python -m safer_jax.cli` re-execute before anything imports JAX: the
    module loads that precede the re-exec import neither jax nor flax."""
    code = (
        "import sys, safer_jax.runtime_env, safer_jax.cli; print(sorted({'jax', 'flax', 'torch'} & set(sys.modules)))"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
