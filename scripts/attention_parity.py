"""cuDNN (and splash, on a TPU) attention against the `xla` reference on packed rows.

`python scripts/attention_parity.py --json OUT.json [--dtype bfloat16] [--seq 2048]`: the
outputs and q/k/v gradients of each fused backend against `xla` on the same packed batch
(segments of random length, trailing padding), on real-token rows, as max abs and max
relative differences; one JSON record. Run by scripts/gpu_bench.sh.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from safer_jax.models.attention import attention


def packed_segments(b: int, t: int, rng: np.random.Generator) -> np.ndarray:
    seg = np.zeros((b, t), np.int32)
    for r in range(b):
        start, s = 0, 1
        end = t - (t // 8 if r == b - 1 else 0)
        while start < end:
            n = int(min(end - start, rng.integers(t // 8, t // 2)))
            seg[r, start : start + n] = s
            start, s = start + n, s + 1
    return seg


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--window", type=int, default=0)
    a = ap.parse_args()
    platform = jax.default_backend()
    backends = {"gpu": ["cudnn", "cudnn_rows"], "tpu": ["splash"]}.get(platform, [])
    rng = np.random.default_rng(0)
    dt = jnp.dtype(a.dtype)
    q = jnp.asarray(rng.standard_normal((a.batch, a.seq, a.heads, a.head_dim)), dt)
    k = jnp.asarray(rng.standard_normal((a.batch, a.seq, a.kv_heads, a.head_dim)), dt)
    v = jnp.asarray(rng.standard_normal((a.batch, a.seq, a.kv_heads, a.head_dim)), dt)
    seg = jnp.asarray(packed_segments(a.batch, a.seq, rng))
    idx = jnp.broadcast_to(jnp.arange(a.seq, dtype=jnp.int32), seg.shape)
    real = np.asarray(seg) > 0
    record = {
        "device": f"{platform}: {jax.devices()[0].device_kind}",
        "jax": jax.__version__,
        "args": vars(a),
        "results": {},
    }

    def run(backend: str, segs: jax.Array):
        def loss(q, k, v):
            o = attention(q, k, v, segs, segs, idx, idx, a.window, backend)
            return (o.astype(jnp.float32) * real[:, :, None, None]).sum(), o

        f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
        (_, o), g = f(q, k, v)
        jax.block_until_ready(g)
        t0 = time.perf_counter()
        jax.block_until_ready(f(q, k, v))
        return o, g, time.perf_counter() - t0

    for backend in backends:
        # cudnn_rows assumes one segment a row: compare it on rows made of one segment plus padding
        segs = jnp.where(seg > 0, 1, 0) if backend == "cudnn_rows" else seg
        ref_o, ref_g, ref_t = run("xla", segs)
        o, g, t = run(backend, segs)
        diff = {"out": (o, ref_o), "dq": (g[0], ref_g[0]), "dk": (g[1], ref_g[1]), "dv": (g[2], ref_g[2])}
        res = {}
        for name, (x, y) in diff.items():
            x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
            if name == "out" or name == "dq":
                x, y = x[real], y[real]
            err = np.abs(x - y)
            res[name] = {"max_abs": float(err.max()), "max_rel": float((err / (np.abs(y) + 1e-3)).max())}
        res["fwd_bwd_s"] = t
        res["xla_fwd_bwd_s"] = ref_t
        record["results"][backend] = res
        print(backend, json.dumps(res))
    if not backends:
        record["note"] = f"no fused backend on {platform}"
    with open(a.json, "w") as f:
        json.dump(record, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
