"""XLA flags for test processes (this one and the subprocesses tests start).

Test programs are tiny and most run a step or two, so compile time dominates: LLVM at -O1
compiles a tiny model's train step about 18% faster (24 s -> 20 s here) and runs it as fast.
(`--xla_cpu_use_fusion_emitters=false` would compile 2.6x faster, but its fusions round the
policy's and the reference's log-probs differently, and the exact log-2 check at the reference
fails; so it is not used.) Tests only: the library's own CPU defaults are set elsewhere.
"""

FAST_COMPILE = ("--xla_backend_optimization_level=1",)


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process with `devices` fake CPU devices."""
    return " ".join([f"--xla_force_host_platform_device_count={devices}", *FAST_COMPILE])


def with_fast_compile(flags: str) -> str:
    """`flags` plus the fast-compile flags it does not set itself."""
    return " ".join([flags, *(f for f in FAST_COMPILE if f.split("=")[0] not in flags)]).strip()
