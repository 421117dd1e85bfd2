"""CPU runs keep freed memory in the process, so a step's buffers are not faulted in afresh."""

import subprocess
import sys
import textwrap

import pytest

from safer_jax.host_memory import cpu_backend

PROBE = textwrap.dedent(
    """
    import ctypes, ctypes.util, resource, sys
    from safer_jax.host_memory import applied, keep_freed_memory
    keep_freed_memory()
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    n = 256 << 20  # far above glibc's largest mmap threshold (32 MiB)
    faults = []
    for _ in range(3):  # as a training step: the same large buffer, allocated, written, freed
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(ctypes.c_size_t(n))
        ctypes.memset(p, 1, n)
        libc.free(ctypes.c_void_p(p))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print(applied(), *faults)
    """
)


def _probe(env_value: str) -> tuple[bool, list[int]]:
    env = {"JAX_PLATFORMS": "cpu", "SAFER_JAX_HOST_MALLOC": env_value, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    applied, *faults = out.stdout.split()
    return applied == "True", [int(f) for f in faults]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_repeated_large_buffer_is_reused_instead_of_faulted_in_again():
    pages = (256 << 20) // 4096
    kept, faults = _probe("1")
    assert kept and faults[0] > pages // 2  # the first allocation is new memory either way
    assert max(faults[1:]) < pages // 100  # then the freed memory is reused
    kept, faults = _probe("0")  # glibc's defaults: mapped afresh and faulted in every time
    assert not kept and min(faults) > pages // 2


def test_only_a_cpu_backend_changes_the_allocator():
    assert cpu_backend({"JAX_PLATFORMS": "cpu"})
    assert not cpu_backend({"JAX_PLATFORMS": "cuda"}) and not cpu_backend({"JAX_PLATFORMS": "tpu,cpu"})
