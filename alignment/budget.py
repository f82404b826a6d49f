"""A cycle's wall-clock budget, and how the stages fit their work into it.

A preset names how many reward-model steps and PPO rounds a cycle would like; what they cost
depends on the machine (on 2-core CPUs a SmolLM2 cycle took 20 minutes with AVX-512-BF16 and
48-50 minutes on AVX2 only: bench/RESULTS.md). With a budget the stages measure their own step
times and take what fits, in this order:

- the reward models get `reward_share` of the budget: the first member times three training
  steps on real pairs before it starts (nothing is updated; the next ones use the steps as they
  ran), and every member trains for the steps that fit the time left, after reserving the
  scoring passes that follow training;
- PPO runs rounds until one more round plus the gate (about `GATE_ROUNDS` rounds' worth of
  sampling and scoring) would end past the budget; it always runs `MIN_PPO_ROUNDS`.

Training for fewer steps than planned is reported in the cycle's result (`as_dict`), so that a
user on a slow machine reads "trained 9 of 40 steps to fit 15 minutes" instead of a slow cycle
or a silent, weaker one. `minutes = 0` turns the budget off.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# The gate samples 64 replies from each version and scores both sets with every member: about
# 1.7 PPO rounds' time on SmolLM2 (93 s against rounds of 55 s on the 2-core VM, RESULTS).
GATE_ROUNDS = 2.0
MIN_PPO_ROUNDS = 2
MIN_REWARD_STEPS = 4
# A forward pass scoring one conversation costs about this share of a training step of 8 pairs
# (94 ms against 3.2 s on SmolLM2, 2-core VM): sizes the scoring after reward-model training.
SCORE_PER_STEP = 0.03


def steps_that_fit(seconds: float, step_seconds: float, planned: int, least: int) -> int:
    """How many steps of `step_seconds` fit in `seconds`, never more than planned nor fewer
    than `least` (a model trained for two steps is noise, and then the budget is overrun)."""
    if step_seconds <= 0:
        return planned
    return max(min(planned, least), min(planned, math.floor(seconds / step_seconds)))


@dataclass
class CycleBudget:
    minutes: float  # 0: no budget
    reward_share: float = 0.4
    started: float = field(default_factory=time.monotonic)
    # what the stages did to fit: filled as they run
    reward_steps: int | None = None
    reward_planned_steps: int | None = None
    ppo_rounds: int | None = None
    ppo_planned_rounds: int | None = None

    @property
    def enabled(self) -> bool:
        return self.minutes > 0

    def reward_deadline(self) -> float | None:
        """Monotonic time by which the reward-model stage should be done (None: no budget)."""
        if not self.enabled:
            return None
        return self.started + self.reward_share * self.minutes * 60

    def deadline(self) -> float | None:
        return self.started + self.minutes * 60 if self.enabled else None

    def ppo_should_stop(self, round_seconds: Sequence[float]) -> bool:
        """Before a PPO round: stop when it and the gate would not end within the budget."""
        end = self.deadline()
        if end is None or len(round_seconds) < MIN_PPO_ROUNDS:
            return False
        typical = sum(round_seconds) / len(round_seconds)
        return time.monotonic() + typical * (1 + GATE_ROUNDS) > end

    def ppo_stopper(self, planned: int) -> Callable[[Sequence[float]], bool]:
        self.ppo_planned_rounds = planned
        return self.ppo_should_stop

    def as_dict(self) -> dict:
        """What was cut to fit, in numbers and in words (None: nothing was)."""
        cut = []
        if self.reward_steps is not None and self.reward_steps < (self.reward_planned_steps or 0):
            cut.append(
                f"{self.reward_steps} of {self.reward_planned_steps} reward-model steps per model"
            )
        if self.ppo_rounds is not None and self.ppo_rounds < (self.ppo_planned_rounds or 0):
            cut.append(f"{self.ppo_rounds} of {self.ppo_planned_rounds} PPO rounds")
        return {
            "minutes": self.minutes,
            "reward_steps": self.reward_steps,
            "reward_planned_steps": self.reward_planned_steps,
            "ppo_rounds": self.ppo_rounds,
            "ppo_planned_rounds": self.ppo_planned_rounds,
            "note": (
                f"trained {' and '.join(cut)} to fit the {self.minutes:g}-minute budget "
                "(cycle.budget_minutes; a faster machine or a larger budget trains all of them)"
                if cut
                else None
            ),
        }
