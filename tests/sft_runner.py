"""Run SFT in a subprocess for resume tests: `python sft_runner.py [--kill-at N] [--sleep S] key=value ...`.

--kill-at N sends SIGKILL to itself after step N (after that step's checkpoint save was
issued), as a preempted machine would die; --sleep waits first (lets an async save finish).
"""

import os
import signal
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


def main(argv):
    kill_at, sleep, overrides = None, 0.0, []
    it = iter(argv)
    for a in it:
        if a == "--kill-at":
            kill_at = int(next(it))
        elif a == "--sleep":
            sleep = float(next(it))
        else:
            overrides.append(a)
    from safer_jax.config import SFTConfig, load_config
    from safer_jax.training.sft_loop import train_sft

    def hook(step, state, metrics):
        if step == kill_at:
            time.sleep(sleep)
            os.kill(os.getpid(), signal.SIGKILL)

    cfg = load_config(
        SFTConfig, os.path.join(os.path.dirname(__file__), "..", "configs", "sft", "tiny.yaml"), overrides
    )
    res = train_sft(cfg, hooks=[hook])
    print("RESULT", res.get("preempted"), res.get("step"), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
