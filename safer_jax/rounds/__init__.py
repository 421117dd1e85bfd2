"""On-policy, length-controlled iterative step-level preference rounds (SAFER stage 2, v1's
efficiency rounds): sample K traces per prompt from the current policy, judge every step,
pair at the first faulty step (the shorter correct continuation is chosen), train, evaluate.

    safer-jax rounds --config configs/rounds/smollm2-cpu.yaml run_dir=runs/rounds

Modules: `steps` (segmentation and the rule-based step judge), `sampler` (local KV-cache or
OpenAI-compatible endpoint), `pairing`, `loop` (the resumable round loop), `report`.
"""

from safer_jax.rounds.loop import RoundsError, run_rounds
from safer_jax.rounds.steps import Expectation, Verdict, judge_steps, split_steps

__all__ = ["Expectation", "RoundsError", "Verdict", "judge_steps", "run_rounds", "split_steps"]
