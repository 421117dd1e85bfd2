"""Peak host memory (RSS) while loading a HF folder onto N fake CPU devices with fsdp=N.

    python scripts/measure_load_rss.py HF_DIR [--devices 8]

Prints the model's bytes, RSS before loading (after imports and mesh), peak RSS during the
load (sampled every 5 ms), and the ratio of the load's RSS growth to the model's bytes.
"""

import argparse
import os
import sys
import threading
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--devices", type=int, default=8)
    args = ap.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    import jax
    import psutil

    from safer_jax.config import MeshConfig
    from safer_jax.models import from_pretrained
    from safer_jax.sharding import make_mesh

    proc = psutil.Process()
    mesh = make_mesh(MeshConfig(data=1, fsdp=args.devices, tensor=1))
    jax.numpy.zeros(8).block_until_ready()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.time()
    model = from_pretrained(args.folder, mesh=mesh)
    jax.block_until_ready(jax.tree.leaves(jax.tree.map(lambda x: x, model)))
    done.set()
    t.join()
    nbytes = sum(x.nbytes for x in jax.tree.leaves(model) if hasattr(x, "nbytes"))
    after = proc.memory_info().rss
    mib = 2**20
    print(f"devices={len(jax.devices())} mesh={dict(mesh.shape)} load={time.time() - t0:.1f}s")
    print(f"model bytes          {nbytes / mib:8.1f} MiB")
    print(f"RSS before load      {base / mib:8.1f} MiB")
    print(
        f"RSS peak during load {peak[0] / mib:8.1f} MiB  (growth {(peak[0] - base) / mib:.1f} MiB, "
        f"{(peak[0] - base) / nbytes:.2f}x model bytes)"
    )
    print(f"RSS after load       {after / mib:8.1f} MiB  (growth {(after - base) / mib:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
