"""A cycle's time budget (`cycle.budget_minutes`): the stages size their work from step times
measured on the machine, and cutting it changes how long they train, never what a step does."""

from __future__ import annotations

import time

import pytest

from alignment.budget import (
    GATE_ROUNDS,
    MIN_PPO_ROUNDS,
    MIN_REWARD_STEPS,
    CycleBudget,
    steps_that_fit,
)
from alignment.config import RewardConfig, cycle_config
from alignment.reward_model import train_reward_model
from tests.test_reward_model import synthetic_preferences


def test_steps_that_fit_the_time_never_more_than_planned_nor_fewer_than_the_least():
    assert steps_that_fit(100.0, 3.0, planned=40, least=4) == 33
    assert steps_that_fit(1000.0, 3.0, planned=40, least=4) == 40
    assert steps_that_fit(-5.0, 3.0, planned=40, least=4) == 4  # already late: the least
    assert steps_that_fit(0.0, 3.0, planned=2, least=4) == 2  # never more than planned


def test_ppo_stops_when_a_round_and_the_gate_would_overrun():
    budget = CycleBudget(minutes=1.0, started=time.monotonic() - 40)  # 20 s left
    assert not budget.ppo_should_stop([9.0] * (MIN_PPO_ROUNDS - 1))  # always the minimum
    fits, overruns = 18 / (1 + GATE_ROUNDS), 22 / (1 + GATE_ROUNDS)  # seconds a round
    assert not budget.ppo_should_stop([fits, fits])  # a round and the gate fit the 20 s left
    assert budget.ppo_should_stop([overruns, overruns])  # they would not
    assert not CycleBudget(minutes=0).ppo_should_stop([1e9] * 5)  # no budget


def test_what_was_cut_is_said_in_words():
    budget = CycleBudget(minutes=15)
    budget.reward_steps, budget.reward_planned_steps = 24, 40
    budget.ppo_rounds, budget.ppo_planned_rounds = 12, 12
    note = budget.as_dict()["note"]
    assert note.startswith("trained 24 of 40 reward-model steps per model to fit the 15-minute")
    budget.reward_steps = 40
    assert budget.as_dict()["note"] is None  # nothing cut, nothing to say


def test_the_budget_is_a_setting_and_on_by_default():
    assert cycle_config("default").budget_minutes == 15.0
    assert cycle_config("default", {"budget_minutes": 40}).budget_minutes == 40.0
    with pytest.raises(ValueError, match="budget_minutes must be float"):
        cycle_config("default", {"budget_minutes": "soon"})


def test_a_reward_model_timed_for_a_budget_trains_as_without_one(tiny_model_dir, tmp_path):
    """The first member times two steps before training (gradients dropped, no optimiser
    step): with time to spare every logged loss is the one trained without a budget; with the
    time already spent each member trains the least steps, and the result says so."""
    config = RewardConfig(
        learning_rate=3e-3, epochs=3, batch_size=8, max_length=256, ensemble=2
    )  # fmt: skip
    records = synthetic_preferences(40)
    losses = {}
    for name, deadline in (("none", None), ("ample", time.monotonic() + 3600)):
        logs: list[dict] = []
        result = train_reward_model(
            str(tiny_model_dir), records, tmp_path / name, config, logs.append, deadline
        )
        losses[name] = [entry["loss"] for entry in logs if "loss" in entry]
        # 33 pairs, 5 batches: `warm_start` 0.5 gives one model on every vote half of the
        # 2 x 3 epochs (15 steps), then each member 1.5 epochs from it (8)
        assert result.steps == result.planned_steps == 8 and result.shared_steps == 15
    assert losses["ample"] == pytest.approx(losses["none"], rel=1e-5, abs=1e-6)

    late = train_reward_model(
        str(tiny_model_dir), records, tmp_path / "late", config, None, time.monotonic() - 1
    )
    assert late.steps == late.shared_steps == MIN_REWARD_STEPS and late.planned_steps == 8
