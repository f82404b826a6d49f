"""A whole retrain cycle on the tiny model: votes -> reward model -> PPO -> gate -> merge ->
hot-swap into the real vLLM engine, with chats in flight; and the gate refusing a KL blow-up."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import httpx
import pytest

from alignment.budget import MIN_PPO_ROUNDS
from alignment.config import GateConfig, RewardConfig, preset
from alignment.cycle import CycleConfig, CycleInputs, run_cycle
from alignment.gate import Comparisons, count_comparisons, gate_decision, reward_refusal
from alignment.rollouts import vllm_generate
from engine.vllm_client import VLLMServerEngine
from tests.test_reward_model import synthetic_preferences


def fast_config(**gate) -> CycleConfig:
    """The `fast` preset (what `--retrain-preset fast` runs), with a second epoch and PPO round
    so the adapter moves measurably, the default ensemble, and a gate each test sets."""
    fast = preset("fast")
    return replace(
        fast,
        reward=replace(fast.reward, epochs=2, ensemble=RewardConfig().ensemble),
        ppo=replace(fast.ppo, steps=2, learning_rate=1e-2),
        gate=GateConfig(
            eval_prompts=4, max_new_tokens=8, **{"max_kl_per_token": gate.get("max_kl", 0.5)} | gate
        ),
    )


def test_gate_counts_only_comparisons_every_member_agrees_on():
    import torch

    new = torch.tensor([[1.0, 0.0, 2.0, 5.0, 1.0], [1.0, -1.0, 3.0, 0.0, 1.0]])  # (K=2, N=5)
    old = torch.tensor([[0.0, 1.0, 1.0, 4.0, 1.0], [0.5, 0.0, 4.0, 1.0, 1.0]])
    counts = count_comparisons(new, old)
    # 0: both members say new wins; 1: both say old wins; 2, 3: they disagree; 4: identical
    assert (counts.wins, counts.losses, counts.undecided, counts.ties) == (1, 1, 2, 1)
    assert counts.decisive == 2 and counts.win_rate == 0.5


def test_gate_decides_on_the_interval_not_the_point_estimate():
    config = GateConfig(min_win_rate=0.5, max_kl=2.0)
    # 7 of 10 is a 0.70 win rate, but its Wilson lower bound (0.40) is under the floor
    deploy, reason, (lo, hi) = gate_decision(Comparisons(wins=7, losses=3), 1.0, config)
    assert not deploy and lo == pytest.approx(0.3968, abs=1e-3) and hi > 0.85
    assert "0.70 [0.40, 0.89] on 10 decided comparisons" in reason
    # 28 of 40 is the same rate on four times the sample: lower bound 0.55, deployed
    deploy, reason, (lo, _) = gate_decision(Comparisons(wins=28, losses=12), 1.0, config)
    assert deploy and lo == pytest.approx(0.5457, abs=1e-3)
    deploy, reason, _ = gate_decision(Comparisons(wins=40), 2.5, config)
    assert not deploy and "KL 2.50" in reason
    deploy, reason, _ = gate_decision(Comparisons(undecided=9), 0.1, config)
    assert not deploy and "no comparison the reward models agreed on" in reason


def test_gate_refuses_a_collapse_into_short_replies_by_its_kl_per_token():
    """The probe that made SmolLM2 answer "Honey." had 9.6 nats per reply, under the per-reply
    limit of 10, over replies of about four tokens: 2.4 nats per token, against 0.1-0.2 for
    healthy 64-token replies."""
    config = GateConfig(min_win_rate=0.5, max_kl=10.0, max_kl_per_token=0.5)
    won = Comparisons(wins=40)
    deploy, reason, _ = gate_decision(won, 9.6, config, kl_per_token=2.4)
    assert not deploy and "2.40 nats per token" in reason
    deploy, _, _ = gate_decision(won, 7.6, config, kl_per_token=0.15)
    assert deploy


def test_the_voted_replies_bound_the_replies_the_gate_trusts():
    """opening 2 on SmolLM2: the reward models liked a version whose replies had shrunk below
    anything voted on, and the user did not. Such comparisons are not counted, and a version
    writing many more such replies than the serving one is refused whatever its win rate."""
    import torch

    from alignment.gate import ShortReplies
    from alignment.support import reply_support

    def record(chosen: str, rejected: str) -> dict:
        return {
            "prompt": [{"role": "user", "content": "q"}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }

    words = lambda text: len(text.split())  # noqa: E731
    records = [record("w " * (10 + i), "w " * (30 + i)) for i in range(20)]
    support = reply_support(records, words, quantile=0.05)
    assert support is not None and support.replies == 40 and support.shortest == 11
    assert support.outside([3, 11, 40], limit=64) == [True, False, False]
    assert support.outside([8, 9], limit=9) == [True, False]  # 9: all a sampler allows
    assert reply_support(records, words, quantile=0.05, fraction=0.5).shortest == 5
    assert reply_support(records, words, quantile=0.0) is None  # disabled
    assert reply_support(records[:5], words, quantile=0.05) is None  # too few to place it

    new = torch.tensor([[2.0, 2.0, 0.0, 2.0]])  # (K=1, N=4): the new reply wins 0, 1, 3
    old = torch.ones(1, 4)
    counts = count_comparisons(new, old, supported=torch.tensor([True, False, True, False]))
    assert (counts.wins, counts.losses, counts.unsupported, counts.undecided) == (1, 1, 2, 0)

    config = GateConfig(min_win_rate=0.5, max_kl=10.0, max_short_share=0.15)
    won = Comparisons(wins=40)
    deploy, reason, _ = gate_decision(won, 3.0, config, 0.1, ShortReplies(18, 3, 64, 21))
    assert not deploy
    assert "18 of 64 are under 21 tokens, against 3 from the serving version" in reason
    deploy, _, _ = gate_decision(won, 3.0, config, 0.1, ShortReplies(10, 3, 64, 21))
    assert deploy  # 7 of 64 more (0.11) is within the margin


@pytest.mark.parametrize("engine_loads_adapters", [True, False])
def test_the_gate_samples_the_new_policy_where_the_engine_can(
    engine_loads_adapters, tiny_model_dir
):
    """With LoRA at the engine the new policy's replies come from the engine with the adapter
    loaded (same prompts, same seeds as the serving replies), and the engine is back on the
    serving weights afterwards; without, transformers samples it."""
    import torch
    from transformers import AutoTokenizer

    from alignment.config import PPOConfig
    from alignment.gate import evaluate
    from alignment.ppo import PolicyWithValueHead

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = PolicyWithValueHead.from_base(str(tiny_model_dir), PPOConfig(precision="fp32"))

    class Engine:
        on_policy = False

        def __init__(self) -> None:
            self.adapter, self.calls = None, []

        def __call__(self, prompts, max_new_tokens, temperature, seed):
            self.calls.append((self.adapter, seed))
            reply = [41, 42] if self.adapter else [40, 40]
            return [([1, 2, 3], reply) for _ in prompts]

        def publish(self, peft_model) -> bool:
            self.adapter = "policy adapter" if engine_loads_adapters else None
            return engine_loads_adapters

        def reset(self) -> None:
            self.adapter = None

        def stay_off_policy(self) -> None:
            pass

    engine = Engine()
    scored: list[list] = []

    def member_scores(conversations):
        scored.append([c[-1]["content"] for c in conversations])
        return torch.zeros(2, len(conversations))

    config = GateConfig(eval_prompts=3, samples_per_prompt=1, max_new_tokens=4)
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(3)]
    evaluate(policy, tokenizer, member_scores, engine, prompts, config, seed=7)
    new_replies, old_replies = scored
    assert old_replies == [tokenizer.decode([40, 40], skip_special_tokens=True)] * 3
    if engine_loads_adapters:
        assert engine.calls == [(None, 7), ("policy adapter", 7)]
        assert new_replies == [tokenizer.decode([41, 42], skip_special_tokens=True)] * 3
    else:
        assert engine.calls == [(None, 7)]  # the new replies were sampled by transformers
    assert engine.adapter is None  # users' turns are served by the serving weights again


def test_a_reward_model_near_chance_on_held_out_votes_refuses_the_cycle():
    from alignment.reward_model import RewardResult

    config = GateConfig(min_rm_accuracy=0.6, min_rm_heldout=5)

    def result(n_heldout: int, accuracy: float) -> RewardResult:
        return RewardResult(
            path="rm", n_train=20, n_heldout=n_heldout, train_loss=0.6, heldout_loss=0.7,
            heldout_accuracy=accuracy, steps=4,
        )  # fmt: skip

    refusal = reward_refusal(result(8, 0.5), config)
    assert refusal is not None and not refusal.deploy
    assert "agree with only 0.50 of 8 held-out votes" in refusal.reason
    assert reward_refusal(result(8, 0.75), config) is None
    assert reward_refusal(result(3, 0.0), config) is None  # too few


def test_full_cycle_merges_version_and_hot_swaps_without_failures(
    tiny_model_dir, tiny_engine_url, tmp_path, restores_tiny_engine
):
    records = synthetic_preferences(24)
    prompts = [r["prompt"] for r in records]
    stages = []
    inputs = CycleInputs(
        serving_model=str(tiny_model_dir),
        parent_version="v0000",
        new_version="v0001",
        records=records,
        prompts=prompts,
        serving_generate=vllm_generate(tiny_engine_url, adapters_dir=tmp_path / "adapters"),
        out_root=tmp_path / "versions",
        config=fast_config(min_win_rate=0.0, max_kl=1e9),
    )
    result = run_cycle(inputs, progress=lambda stage, d: stages.append((stage, d)))
    assert result.gate["deploy"] and result.path
    names = list(dict.fromkeys(stage for stage, _ in stages))
    assert names == ["reward_model", "ppo", "ppo_rollouts", "gate", "merge"]
    # The tiny engine has LoRA: step 2's rollouts came from the PPO adapter, not the base.
    assert dict(stages)["ppo_rollouts"] == {"on_policy": True}
    assert len(result.ppo_steps) == 2 and result.reward["n_train"] > 0
    manifest = json.loads((tmp_path / "versions" / "v0001" / "manifest.json").read_text())
    assert manifest["parent"] == "v0000" and manifest["version"] == "v0001"
    assert manifest["gate"]["deploy"] is True

    async def next_token_logprobs(client: httpx.AsyncClient) -> list[float]:
        """The served weights' log-probabilities of the top next tokens of a fixed prompt: any
        change of the weights changes them (a sampled reply may not change: a tiny model's
        near-uniform distribution keeps the same seeded draw after a small update)."""
        r = await client.post(
            tiny_engine_url + "/v1/completions",
            json={"model": "policy", "prompt": "Why do things fall?", "max_tokens": 1,
                  "temperature": 0.0, "logprobs": 5},
        )  # fmt: skip
        r.raise_for_status()
        return sorted(r.json()["choices"][0]["logprobs"]["top_logprobs"][0].values())

    async def swap_under_load():
        engine = VLLMServerEngine(tiny_engine_url, "policy", "v0000")
        sampling = {"temperature": 1.0, "max_tokens": 12}

        async def finals(seed):
            return [
                u
                async for u in engine.stream_pair(
                    [{"role": "user", "content": "Why do things fall?"}], sampling, seed
                )
            ][-1]

        try:
            async with httpx.AsyncClient(timeout=60) as client:
                before = await next_token_logprobs(client)
                chats = [asyncio.create_task(finals(100 + i)) for i in range(6)]
                await asyncio.sleep(0.05)
                await engine.reload_weights(result.path, "v0001")
                in_flight = await asyncio.gather(*chats)
                after = await finals(7)
                served = await next_token_logprobs(client)
        finally:
            await engine.aclose()
        return before, in_flight, after, served

    before, in_flight, after, served = asyncio.run(swap_under_load())
    assert all(f.final and all(c.done for c in f.candidates) for f in in_flight)
    assert after.model_version == "v0001"
    assert served != pytest.approx(before, abs=1e-4), "the engine still serves the old weights"


def test_gate_rejects_policy_pushed_past_kl_limit(tiny_model_dir, tiny_engine_url, tmp_path):
    records = synthetic_preferences(16)
    config = fast_config(min_win_rate=0.0, max_kl=1e-6)
    config.ppo.learning_rate = 5e-2  # push the policy away from the reference
    config.report_to = ["tensorboard"]
    config.ppo.steps, config.budget_minutes = 3, 1e-6  # a budget spent before PPO starts
    inputs = CycleInputs(
        serving_model=str(tiny_model_dir),
        parent_version="v0000",
        new_version="v0002",
        records=records,
        prompts=[r["prompt"] for r in records],
        serving_generate=vllm_generate(tiny_engine_url, adapters_dir=tmp_path / "adapters"),
        out_root=tmp_path / "versions",
        config=config,
    )
    result = run_cycle(inputs)
    assert not result.gate["deploy"] and "KL" in result.gate["reason"]
    assert result.path is None and not (tmp_path / "versions" / "v0002").exists()
    assert result.gate["kl"] > 1e-6
    # out of time, PPO ran its least rounds, and the result says what was cut
    assert len(result.ppo_steps) == MIN_PPO_ROUNDS < 3
    assert f"{MIN_PPO_ROUNDS} of 3 PPO rounds" in result.budget["note"]
    # every stage's metrics also went to TensorBoard, under the cycle's folder
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "versions" / "runs" / "v0002" / "tensorboard"))
    tags = set(events.Reload().Tags()["scalars"])
    assert {"reward_model/member-0/loss", "ppo/kl", "ppo/reward_mean", "gate/kl"} <= tags, tags
    kl = events.Scalars("ppo/kl")
    assert [e.step for e in kl] == [s["step"] for s in result.ppo_steps]
    assert [e.value for e in kl] == pytest.approx([s["kl"] for s in result.ppo_steps])


def test_an_unknown_or_missing_tracker_is_refused_before_a_cycle():
    from alignment.config import cycle_config

    with pytest.raises(ValueError, match="unknown tracker 'tensorbored'"):
        cycle_config("fast", {"report_to": ["tensorbored"]})
    assert cycle_config("fast", {"report_to": ["tensorboard"]}).report_to == ["tensorboard"]


def test_cycle_with_sft_stage_uses_the_sft_model_as_base(tiny_model_dir, tiny_engine_url, tmp_path):
    records = synthetic_preferences(16)
    revisions = [
        {"prompt": r["prompt"], "revision": "Plants convert sunlight into energy."} for r in records
    ]
    config = fast_config(min_win_rate=0.0, max_kl=1e9)
    config.sft.enabled = True
    config.sft.learning_rate = 5e-3
    inputs = CycleInputs(
        serving_model=str(tiny_model_dir),
        parent_version="v0000",
        new_version="v0003",
        records=records,
        prompts=[r["prompt"] for r in records],
        serving_generate=vllm_generate(tiny_engine_url, adapters_dir=tmp_path / "adapters"),
        out_root=tmp_path / "versions",
        config=config,
        revisions=revisions,
    )
    result = run_cycle(inputs)
    assert result.sft is not None and result.sft["loss_after"] < result.sft["loss_before"]
    assert (result.sft["revisions"], result.sft["demonstrations"]) == (16, 0)
    manifest = json.loads((tmp_path / "versions" / "v0003" / "manifest.json").read_text())
    assert manifest["sft"]["examples"] == 16 and "sft" in result.seconds
