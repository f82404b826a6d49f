"""Learning test: a simulated user with a known preference votes; after one cycle the deployed
version satisfies that preference measurably more often than v0, with KL under the limit.

The preference is one a 2-layer random model can show and PPO can move within seconds: the user
prefers replies whose first character is not a letter. Votes are decisive only when exactly one
of the two candidates has the property (otherwise the user calls it a tie, which is not trained on).
"""

from __future__ import annotations

import asyncio

import pytest

from alignment.config import GateConfig, PPOConfig, RewardConfig
from alignment.cycle import CycleConfig, run_cycle
from alignment.rollouts import vllm_generate
from assistant.vllm_client import VLLMServerEngine

pytestmark = pytest.mark.slow
SAMPLING = {"temperature": 1.0, "max_tokens": 8}


def liked(reply: str) -> bool:
    return bool(reply) and not reply[0].isalpha()


def prompts(n: int) -> list[list[dict[str, str]]]:
    topics = ["gravity", "plants", "cheese", "the sea", "tea", "the sky", "a fox", "hiking"]
    return [
        [{"role": "user", "content": f"Tell me about {topics[i % 8]} ({i})."}] for i in range(n)
    ]


async def sample_pairs(url, version, prompt_list, seed0):
    engine = VLLMServerEngine(url, "policy", version)
    try:
        out = []
        for i, p in enumerate(prompt_list):
            final = [u async for u in engine.stream_pair(p, SAMPLING, seed0 + 2 * i)][-1]
            out.append((p, [c.text for c in final.candidates]))
        return out
    finally:
        await engine.aclose()


def satisfaction(pairs) -> float:
    replies = [r for _, rs in pairs for r in rs]
    return sum(map(liked, replies)) / len(replies)


def test_cycle_learns_a_simulated_users_preference(tiny_engine_url, tiny_model_dir, tmp_path):
    votes = asyncio.run(sample_pairs(tiny_engine_url, "v0000", prompts(160), 1))
    records = []
    for p, (a, b) in votes:
        if liked(a) != liked(b):
            win, lose = (a, b) if liked(a) else (b, a)
            records.append(
                {
                    "prompt": p,
                    "chosen": [{"role": "assistant", "content": win}],
                    "rejected": [{"role": "assistant", "content": lose}],
                }
            )
    assert len(records) >= 30, "too few decisive votes to learn from"

    config = CycleConfig(
        reward=RewardConfig(
            learning_rate=3e-3, epochs=4, batch_size=8, max_length=256, heldout_fraction=0.2
        ),
        ppo=PPOConfig(
            steps=10,
            prompts_per_step=8,
            max_new_tokens=8,
            minibatch_size=4,
            ppo_epochs=2,
            learning_rate=5e-3,
            init_kl_coef=0.05,
        ),
        gate=GateConfig(eval_prompts=8, max_new_tokens=8, min_win_rate=0.0, max_kl=20.0),
    )
    result = run_cycle(
        str(tiny_model_dir),
        "v0000",
        "v0001",
        records,
        [p for p, _ in votes],
        vllm_generate(tiny_engine_url),
        tmp_path / "versions",
        config,
    )
    assert result.gate["deploy"], result.gate
    assert result.gate["kl"] <= 20.0

    async def compare():
        engine = VLLMServerEngine(tiny_engine_url, "policy", "v0000")
        try:
            held_out = prompts(200)[160:]
            before = await sample_pairs(tiny_engine_url, "v0000", held_out, 10_000)
            await engine.reload_weights(result.path, "v0001")
            after = await sample_pairs(tiny_engine_url, "v0001", held_out, 10_000)
        finally:
            await engine.reload_weights(str(tiny_model_dir), "v0000")
            await engine.aclose()
        return satisfaction(before), satisfaction(after)

    before, after = asyncio.run(compare())
    print(
        f"preference satisfied: v0000 {before:.2f} -> v0001 {after:.2f}; "
        f"RM held-out accuracy {result.reward['heldout_accuracy']}; gate {result.gate}"
    )
    assert after >= before + 0.15, (before, after, result.reward, result.gate)
