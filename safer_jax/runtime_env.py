"""Process environment that safer-jax sets before it starts: transparent huge pages for glibc's
large allocations.

XLA:CPU gives each execution of a compiled step one temporary buffer (5.6 GiB for the SmolLM2
SFT step at 4 x 512). glibc maps every block over 32 MiB afresh with `mmap` and unmaps it on
free, so every step faults the whole buffer in again, 4 KiB at a time (about 1.5 M page faults a
step). `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` makes malloc ask for transparent huge pages on
those mappings (`madvise(MADV_HUGEPAGE)`): the faults fall to a few thousand a step, and the
step ran 8 to 23% faster on the project's 2-core CPU (docs/benchmarks.md, issue #14).

glibc reads its tunables once, when the process starts, so the console entry point
(`console_entry`, which imports nothing heavy before it) re-executes itself (same PID, same
arguments) with the tunable set. It does not when `GLIBC_TUNABLES` is already set (the user's
choice stands), off Linux, on a C library other than glibc 2.35 or newer, or with
`SAFER_JAX_MALLOC_HUGETLB=0`. The kernel applies it only where transparent huge pages are
`madvise` or `always`; with `never` it is a no-op. `ADDED_MARK` records that safer-jax, not the
user, set it, so `user_environ` can give a child (the PyTorch baseline of `safer-jax bench`) the
environment the user started with.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "SAFER_JAX_MALLOC_HUGETLB"  # "0": leave glibc's defaults alone
ADDED_MARK = "SAFER_JAX_ADDED_GLIBC_TUNABLES"  # set to "1" alongside the tunable safer-jax added


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library when it is glibc, else None (musl, not Linux)."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):
        return None


def wanted(environ: Mapping[str, str], platform: str = sys.platform, glibc: tuple[int, int] | None = None) -> bool:
    """Whether safer-jax should add the tunable to a process started with `environ`: on Linux with
    glibc 2.35 or newer (the first with `glibc.malloc.hugetlb`), no `GLIBC_TUNABLES` set, no opt-out,
    and not already added (glibc drops `GLIBC_TUNABLES` for setuid or capability-carrying binaries:
    the mark then stops a second re-exec)."""
    if not platform.startswith("linux") or "GLIBC_TUNABLES" in environ or ADDED_MARK in environ:
        return False
    if environ.get(OPT_OUT, "1") == "0":
        return False
    version = glibc or glibc_version()
    return version is not None and version >= (2, 35)


def with_tunable(
    environ: Mapping[str, str], platform: str = sys.platform, glibc: tuple[int, int] | None = None
) -> dict[str, str]:
    """`environ` plus the huge-page tunable (and its mark) where `wanted`; otherwise a copy."""
    env = dict(environ)
    if wanted(env, platform, glibc):
        env["GLIBC_TUNABLES"] = TUNABLE
        env[ADDED_MARK] = "1"
    return env


def user_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` without what safer-jax added (the tunable it set and the mark)."""
    env = dict(environ)
    if env.pop(ADDED_MARK, None) == "1" and env.get("GLIBC_TUNABLES") == TUNABLE:
        del env["GLIBC_TUNABLES"]
    return env


def reexec_with_tunable() -> None:
    """Re-execute this process with the tunable set, where `wanted`; returns only when it is not.
    Call it first thing in a console entry point, before JAX or torch allocate anything."""
    if not wanted(os.environ) or not sys.executable:
        return
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, with_tunable(os.environ))
    except (OSError, TypeError, ValueError):  # cannot re-execute (an unusual interpreter): glibc's defaults
        return


def console_entry() -> None:
    """The `safer-jax` console script: the re-exec first (before JAX is imported), then the CLI."""
    reexec_with_tunable()
    from safer_jax.cli import main

    sys.exit(main())
