"""Multi-process start-up: one process per host, one global JAX job.

`SAFER_JAX_DISTRIBUTED=1` makes the CLI join the job before anything touches a device. How
the process learns its peers, in this order:

1. explicit: `JAX_COORDINATOR_ADDRESS` (host:port of process 0), `JAX_NUM_PROCESSES` and
   `JAX_PROCESS_ID`, passed to `jax.distributed.initialize` as arguments (JAX itself reads
   only the address from the environment, so the other two would be ignored);
2. a cluster JAX detects by itself: Cloud TPU (from the VM's metadata), SLURM (`srun`, one
   task per host), Open MPI (`mpirun`);
3. otherwise start-up fails with the variables to set.

`SAFER_JAX_INIT_TIMEOUT` (seconds, default 300) bounds the wait for the coordinator, so an
unreachable one fails with a message instead of hanging. CPU collectives use gloo, which is
what lets several CPU processes (tests, CPU clusters) run one sharded step.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import jax  # importing touches no device: initialize() must still run before any device is used
import numpy as np

ENABLE = "SAFER_JAX_DISTRIBUTED"
TIMEOUT = "SAFER_JAX_INIT_TIMEOUT"
EXPLICIT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
DEFAULT_TIMEOUT_S = 300


class DistributedError(RuntimeError):
    """Start-up could not form the job; the message names the variables to check."""


@dataclasses.dataclass(frozen=True)
class StartSpec:
    """How this process joins the job: the detected method and `jax.distributed.initialize` kwargs."""

    method: str  # explicit | tpu | slurm | ompi
    kwargs: dict[str, Any]

    def describe(self) -> str:
        if self.method == "explicit":
            k = self.kwargs
            return f"process {k['process_id']} of {k['num_processes']}, coordinator {k['coordinator_address']}"
        return f"cluster auto-detected ({self.method})"


def _int(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name}={value!r} is not an integer") from None


def start_spec(env: Mapping[str, str] | None = None) -> StartSpec:
    """The start-up method for this environment (pure: reads only `env`)."""
    env = os.environ if env is None else env
    timeout = _int(env, TIMEOUT) if env.get(TIMEOUT) else DEFAULT_TIMEOUT_S
    if timeout <= 0:
        raise DistributedError(f"{TIMEOUT}={timeout} must be a positive number of seconds")
    base = {"initialization_timeout": timeout}
    given = [k for k in EXPLICIT if env.get(k)]
    if given:
        missing = [k for k in EXPLICIT if not env.get(k)]
        if missing:
            raise DistributedError(
                f"{ENABLE}=1 with {', '.join(given)} set but {', '.join(missing)} missing: "
                f"set all of {', '.join(EXPLICIT)}"
            )
        n, i = _int(env, "JAX_NUM_PROCESSES"), _int(env, "JAX_PROCESS_ID")
        if n < 1 or not 0 <= i < n:
            raise DistributedError(f"JAX_PROCESS_ID={i} must lie in [0, JAX_NUM_PROCESSES={n})")
        address = env["JAX_COORDINATOR_ADDRESS"]
        if ":" not in address:
            raise DistributedError(f"JAX_COORDINATOR_ADDRESS={address!r} must be host:port")
        return StartSpec("explicit", {**base, "coordinator_address": address, "num_processes": n, "process_id": i})
    if env.get("SLURM_JOB_ID") and env.get("SLURM_NTASKS"):
        return StartSpec("slurm", base)
    if env.get("OMPI_COMM_WORLD_SIZE") or env.get("OMPI_MCA_orte_hnp_uri"):
        return StartSpec("ompi", base)
    if (
        env.get("TPU_WORKER_HOSTNAMES")
        or env.get("TPU_ACCELERATOR_TYPE")
        or env.get("CLOUD_TPU_TASK_ID")
        or os.path.exists("/dev/accel0")
        or os.path.exists("/dev/vfio/0")
    ):
        return StartSpec("tpu", base)
    raise DistributedError(
        f"{ENABLE}=1 but no cluster was detected (not a Cloud TPU VM, SLURM or Open MPI job): "
        f"set {', '.join(EXPLICIT)} on every process"
    )


def wait_for_coordinator(address: str, timeout_s: float) -> float:
    """Block until `host:port` accepts a TCP connection; the seconds it took.

    JAX aborts the whole process (a C++ fatal error, no exception) when the coordinator stays
    unreachable, so processes other than 0 check it first and fail with a message instead.
    """
    host, port = address.rsplit(":", 1)
    host = host.strip("[]")
    t0 = time.monotonic()
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(2.0, timeout_s)):
                return time.monotonic() - t0
        except OSError as e:
            if time.monotonic() - t0 >= timeout_s:
                raise DistributedError(
                    f"the JAX coordinator at {address} (JAX_COORDINATOR_ADDRESS) was unreachable "
                    f"for {timeout_s:.0f} s ({e.strerror or e}): start process 0 there, or fix the "
                    f"address; {TIMEOUT} sets this wait"
                ) from None
            time.sleep(0.5)


def initialize(env: Mapping[str, str] | None = None, log: Any = print) -> StartSpec | None:
    """Join the multi-process job when `SAFER_JAX_DISTRIBUTED=1`; a no-op otherwise.

    Call before any device is used. Errors are `DistributedError`s that say what to fix.
    """
    env = os.environ if env is None else env
    if env.get(ENABLE) != "1":
        return None
    spec = start_spec(env)
    if spec.method == "explicit" and spec.kwargs["process_id"] != 0:
        waited = wait_for_coordinator(spec.kwargs["coordinator_address"], spec.kwargs["initialization_timeout"])
        spec.kwargs["initialization_timeout"] = max(1, int(spec.kwargs["initialization_timeout"] - waited))
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes; ignored on GPU/TPU
    try:
        jax.distributed.initialize(**spec.kwargs)
    except Exception as e:  # XLA raises plain RuntimeErrors / XlaRuntimeErrors
        where = spec.describe()
        raise DistributedError(
            f"distributed start-up failed ({where}, timeout "
            f"{spec.kwargs['initialization_timeout']} s): {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}. Check that process 0 is running and "
            f"that the coordinator address is reachable from every host"
        ) from e
    log(
        f"distributed: {spec.describe()}: process {jax.process_index()}/{jax.process_count()}, "
        f"{jax.local_device_count()} local of {jax.device_count()} devices"
    )
    return spec


# ------------------------------------------------------------------ agreement between processes
# Every decision that ends or branches a multi-process run is made once and agreed, so no
# process enters a collective (a save, a step, a reference forward) that the others skip.


def agree_flags(*flags: bool) -> tuple[bool, ...]:
    """Each flag is true on every process when it is true on any (one small all-gather)."""
    if jax.process_count() == 1:
        return tuple(bool(f) for f in flags)
    from jax.experimental import multihost_utils

    gathered = np.asarray(multihost_utils.process_allgather(np.asarray(flags, np.int32)))  # [P, n]
    return tuple(bool(v) for v in gathered.reshape(-1, len(flags)).max(axis=0))


def from_process_0(value: Any) -> Any:
    """Process 0's value of a small pytree of numbers, on every process."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return jax.tree.map(
        lambda x: np.asarray(x).item() if np.ndim(x) == 0 else np.asarray(x),
        multihost_utils.broadcast_one_to_all(value),
    )


def check_same(value: str, what: str) -> None:
    """Fail on every process, naming `what`, if the processes hold different `value`s."""
    if jax.process_count() == 1:
        return
    import hashlib

    from jax.experimental import multihost_utils

    digest = np.frombuffer(hashlib.sha256(value.encode()).digest()[:8], np.int64)
    gathered = np.asarray(multihost_utils.process_allgather(digest)).reshape(-1)
    if len(set(gathered.tolist())) > 1:
        raise DistributedError(
            f"processes disagree on {what} (this process: {value!r}); every host must see the same files and settings"
        )
