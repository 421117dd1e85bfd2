"""Host allocator settings for runs whose JAX backend is the CPU.

XLA:CPU gives each execution of a compiled step one temporary buffer (5.7 GiB for the SmolLM2
SFT step at 4 x 512). glibc's malloc maps every block over 32 MiB afresh with `mmap` and unmaps
it on free, and a thread's arena cannot hold it, so every step faults the whole buffer in again,
4 KiB at a time, each page zeroed by the kernel: 1.5 to 1.8 million page faults a step, about 5 us
each on this machine's CPUs (docs/benchmarks.md). Keeping freed memory in the process makes the
second and later steps reuse it: one arena for all threads, no `mmap` for large blocks, no
trimming. Training repeats the same allocations every step, so the resident size stays at the
first step's high-water mark.

Only for a CPU backend on glibc, and only from an entry point (the CLI, the bench's JAX side)
before JAX starts its threads: a GPU or TPU host, whose big buffers live on the device, keeps
glibc's defaults. `SAFER_JAX_HOST_MALLOC=0` keeps them on CPU too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import pkgutil
import platform
from collections.abc import Mapping

ENV = "SAFER_JAX_HOST_MALLOC"
# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
_ACCELERATOR_PLUGINS = ("xla_cuda", "xla_rocm", "cuda", "rocm", "tpu")
_applied: bool | None = None


def cpu_backend(env: Mapping[str, str] | None = None) -> bool:
    """Whether JAX will run on the CPU: `JAX_PLATFORMS` names only `cpu`, or no accelerator
    plugin (`jax_plugins.xla_cuda*`, ROCm, `libtpu`) is installed. Decided without starting JAX."""
    env = os.environ if env is None else env
    wanted = {p.strip() for p in env.get("JAX_PLATFORMS", "").lower().split(",") if p.strip()}
    if wanted:
        return wanted == {"cpu"}
    if importlib.util.find_spec("libtpu") is not None:
        return False
    spec = importlib.util.find_spec("jax_plugins")
    if spec is None or not spec.submodule_search_locations:
        return True
    names = [m.name for m in pkgutil.iter_modules(list(spec.submodule_search_locations))]
    return not any(n.startswith(_ACCELERATOR_PLUGINS) for n in names)


def keep_freed_memory(env: Mapping[str, str] | None = None) -> bool:
    """On glibc with a CPU backend: one arena, large blocks from the heap, no trimming, so each
    step reuses the memory the last one freed. Call before JAX starts; once per process (later
    calls return the first answer). True when applied."""
    global _applied
    if _applied is not None:
        return _applied
    env = os.environ if env is None else env
    _applied = False
    if env.get(ENV, "1") == "0" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if not cpu_backend(env):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    ok = (
        libc.mallopt(M_ARENA_MAX, 1) and libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, -1)
    )  # -1: never trim
    _applied = bool(ok)
    return _applied


def applied() -> bool:
    """Whether `keep_freed_memory` changed the allocator in this process."""
    return bool(_applied)
