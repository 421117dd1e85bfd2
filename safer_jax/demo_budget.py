"""The time budget of `safer-jax demo`: a clock, each stage's share, and the pacer that stops
training on time.

The stages spend the budget in order (baseline evaluation, SFT, pairs, preference
optimization, final evaluation, report). A stage's share is decided when it starts, from
the time left and the cost of the stages after it: the final evaluation is priced by the decode
calls that compaction makes of the answer lengths the model is trained to write
(`compacted_schedule`), each at the step time the baseline evaluation measured for its batch
rows on this machine (`StepCost`), and a deadline stops its decoding should it run longer; the
pairs and the report cost seconds, and the training time left over pays each training stage's set-up and
tail, then goes 3:1 to the steps of SFT and preference optimization. A training stage
measures its own seconds per step in its first steps (`Pacer`, a training-loop hook) and
stops when one more step plus its tail (final checkpoint, export) would pass its share. A faster machine so trains more steps; a slower
one fewer, and the budget still holds.

Time comes from a `Clock`. The real one is `time.monotonic`. `ScriptedClock` is the test
hook (`SAFER_JAX_DEMO_CLOCK`, a JSON object of virtual costs): time then moves only by
the scripted cost of each piece of work the demo reports (`spend`), so a test can check
the sizing exactly without waiting for it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

CLOCK_ENV = "SAFER_JAX_DEMO_CLOCK"
SFT_SHARE = 0.75  # of the training time (SFT + preference optimization), as the demo measured it best


class Clock:
    """Real time. `spend` does nothing: the work itself took the time."""

    scripted = False

    def now(self) -> float:
        return time.monotonic()

    def spend(self, what: str, n: float = 1.0) -> None:
        """Report `n` units of work `what` just done (a training step, a decode step, a model load)."""


class ScriptedClock(Clock):
    """Virtual seconds for tests: only `spend` moves time, by `costs[what] * n` (0 for unnamed work).
    Keys the demo reports: `sft_step`, `prefopt_step`, `decode` (one decode step of the plan's
    `gen_batch` rows; a call of fewer rows costs its share), `prefill` (the same for a batch's
    prefill), `load` (a model load), `setup` (a training stage's set-up, once per stage)."""

    scripted = True

    def __init__(self, costs: dict[str, float]):
        bad = {k: v for k, v in costs.items() if not isinstance(v, (int, float)) or v < 0}
        if bad:
            raise ValueError(f"{CLOCK_ENV}: costs must be non-negative seconds, got {bad}")
        self.costs = {k: float(v) for k, v in costs.items()}
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def spend(self, what: str, n: float = 1.0) -> None:
        self.t += self.costs.get(what, 0.0) * n


def clock_from_env() -> Clock:
    """`ScriptedClock` from `$SAFER_JAX_DEMO_CLOCK` (JSON costs) when set, else the real clock."""
    spec = os.environ.get(CLOCK_ENV, "").strip()
    if not spec:
        return Clock()
    try:
        costs = json.loads(spec)
    except json.JSONDecodeError as e:
        raise ValueError(f"{CLOCK_ENV}={spec!r}: not a JSON object of costs ({e})") from None
    if not isinstance(costs, dict):
        raise ValueError(f"{CLOCK_ENV}={spec!r}: not a JSON object of costs")
    return ScriptedClock(costs)


@dataclasses.dataclass
class Budget:
    """Seconds left of the demo's budget on `clock`; `spent` counts stages finished by an earlier run."""

    seconds: float
    clock: Clock
    spent: float = 0.0

    def __post_init__(self) -> None:
        self.start = self.clock.now() - self.spent

    def elapsed(self) -> float:
        return self.clock.now() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


def counted_seconds(stages: dict[str, dict[str, Any]]) -> float:
    """Seconds of the finished stages that the budget counts: all but a baseline evaluation that had
    to be computed (once per machine and model; later runs read it from the cache in seconds)."""
    return sum(v["seconds"] for k, v in stages.items() if not (k == "baseline" and v.get("cached") is False))


def training_share(left_s: float, later_s: float, fraction: float, fixed_s: float = 0.0, stages: int = 1) -> float:
    """Seconds a training stage may use: its own fixed cost (`fixed_s`: set-up and tail) plus
    `fraction` of the step time left after the later stages' cost and the fixed cost of all
    `stages` training stages still to run (so the 3:1 split is of training steps, not of set-ups)."""
    free = max(0.0, left_s - later_s)
    return min(free, fixed_s + fraction * max(0.0, free - stages * fixed_s))


def steps_that_fit(seconds: float, step_s: float, per_step_items: int = 1) -> int:
    """How many steps of `step_s` seconds fit in `seconds` (at least 1), times `per_step_items`."""
    return max(1, int(seconds // max(step_s, 1e-9))) * per_step_items


class Pacer:
    """Training-loop hook (`hook(step, state, metrics) -> stop?`): measures seconds per step on the
    clock from the end of the first step it sees, and asks the loop to stop after the last step
    that, with the stage's `tail_s` (final checkpoint and export), still ends by `deadline`.

    `planned` is the step count the measured speed allows (re-estimated every step, so a machine
    that slows down mid-stage still stops on time); `min_steps` steps always run.
    """

    def __init__(
        self,
        name: str,
        clock: Clock,
        deadline: float,
        tail_s: float,
        *,
        min_steps: int = 1,
        log: Callable[[str], None] = print,
    ):
        self.name, self.clock, self.deadline, self.tail_s = name, clock, deadline, tail_s
        self.min_steps, self.log = min_steps, log
        self.first: tuple[int, float] | None = None  # (step, clock) at the end of the first step seen
        self.first_step_s: float | None = None
        self.step_s: float | None = None
        self.planned: int | None = None
        self.steps = 0  # steps seen by this pacer (a resumed run counts only its own)
        self.last_step = 0
        self.announced = False

    def __call__(self, step: int, state: Any = None, metrics: Any = None) -> bool:
        self.clock.spend(f"{self.name}_step")
        now = self.clock.now()
        self.steps += 1
        self.last_step = step
        if self.first is None:
            self.first = (step, now)
            # the loop's own timing of that step: the estimate when no second step fits
            self.first_step_s = (metrics or {}).get("step_time_s")
            # the first step may carry one-time costs; stop now only if it already ran past the share
            return self.steps >= self.min_steps and now + self.tail_s > self.deadline
        self.step_s = (now - self.first[1]) / (step - self.first[0])
        self.planned = step + max(0, int((self.deadline - self.tail_s - now) // max(self.step_s, 1e-9)))
        if not self.announced:
            self.announced = True
            self.log(
                f"{self.name}: {self.step_s:.2f} s a step measured; about {self.planned} steps fit in this "
                f"stage's share ({max(0.0, self.deadline - now) / 60:.1f} min left of it)"
            )
        return self.steps >= self.min_steps and step >= self.planned

    def record(self) -> dict[str, Any]:
        """What the demo's state records about this stage's pacing: `step_s` measured on the clock
        between steps, else the loop's timing of the only step (`step_s_from`)."""
        step_s, source = (self.step_s, "clock") if self.step_s is not None else (self.first_step_s, "first step")
        return {
            "step_s": None if step_s is None else round(step_s, 3),
            "step_s_from": source if step_s is not None else None,
            "planned_steps": self.planned if self.planned is not None else self.steps,
        }


def compacted_schedule(
    lengths: list[int], max_new_tokens: int, check_every: int | None = None, min_rows: int | None = None
) -> list[tuple[int, int]]:
    """The decode calls greedy generation of one batch makes, as (batch rows, steps) pairs, when
    row i's answer ends after `lengths[i]` tokens: `generate.sample_batch`'s compaction (every
    `check_every` steps, default generate's, the unfinished rows move to a batch of the next power of
    two, at least `min_rows` (default generate's), when that halves it), simulated so the demo can price an evaluation by rows."""
    from safer_jax.generate import COMPACT_MIN_ROWS, STOP_STRING_CHECK_EVERY, _pow2

    check_every = check_every or STOP_STRING_CHECK_EVERY
    min_rows = min_rows or COMPACT_MIN_ROWS
    ends = [min(max(int(n), 1), max_new_tokens) for n in lengths]
    rows = _pow2(len(ends))
    shrink = rows >= 2 * min_rows
    out: list[tuple[int, int]] = []
    step = 1  # the prefill made token 0
    while step < max_new_tokens:
        live = [n for n in ends if n > step]
        if not live:
            break
        size = _pow2(len(live), min_rows)
        if shrink and size <= rows // 2:
            rows = size
        limit = min(max_new_tokens, step + check_every)
        ran = min(limit, max(live)) - step
        out.append((rows, ran))
        step += ran
    return out


@dataclasses.dataclass(frozen=True)
class StepCost:
    """Seconds of one decode step by batch rows: a measured size as measured; another size from the
    measured one nearest to it, taking a step to cost as much as `fixed_rows` more rows would (the
    per-step cost whatever the rows: reading the weights, the host's return every few steps), so
    `c(n) = c(m) * (fixed_rows + n) / (fixed_rows + m)`."""

    measured: dict[int, float]  # batch rows -> seconds per decode step
    fixed_rows: float

    def __call__(self, rows: int) -> float:
        if rows in self.measured:
            return self.measured[rows]
        if not self.measured:
            raise ValueError("no measured decode step to price an evaluation by")
        m = min(self.measured, key=lambda r: (abs(math.log(rows / r)), -r))
        return self.measured[m] * (self.fixed_rows + rows) / (self.fixed_rows + m)

    def seconds(self, schedule: list[tuple[int, int]]) -> float:
        return sum(steps * self(rows) for rows, steps in schedule)


def decode_calls(lengths: list[int], batch: int, max_new_tokens: int) -> list[tuple[int, int]]:
    """`compacted_schedule` of each batch of `batch` rows of `lengths`, in order (as `generate_chat`
    batches its rows), one list of (batch rows, steps) decode calls."""
    return [
        call
        for i in range(0, len(lengths), max(batch, 1))
        for call in compacted_schedule(lengths[i : i + batch], max_new_tokens)
    ]
