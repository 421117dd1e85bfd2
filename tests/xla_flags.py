"""XLA flags for test processes (this one and the subprocesses tests start).

Tests compile with XLA's default CPU settings, the ones users run. Two faster-compiling settings
were tried and dropped because they change numerics that tests check:
`--xla_cpu_use_fusion_emitters=false` rounds the policy's and the reference's log-probs
differently in one program (the exact log-2 check fails), and `--xla_backend_optimization_level=1`
moves sharded SmolLM2 logits 1.3e-4 away from the unsharded ones (the 8-device parity check fails).
"""


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process with `devices` fake CPU devices."""
    return f"--xla_force_host_platform_device_count={devices}"
