"""Throughput harness: the project's JAX steps against transformers + TRL in PyTorch, on the
same weights, batches and FLOP count (`safer-jax bench`)."""

from safer_jax.bench.harness import run_bench, table
from safer_jax.bench.shapes import SHAPES
from safer_jax.bench.work import BenchSpec

__all__ = ["SHAPES", "BenchSpec", "run_bench", "table"]
