"""Learning benchmark: does one cycle teach the policy a simulated user's known preference?

A simulated user prefers replies with any of the characters ! ? . in them; votes are decisive only
when exactly one candidate has the property. After one cycle (reward model -> PPO -> gate ->
merge), the deployed version and v0 answer held-out prompts with the same seeds and we report how
often each satisfies the preference, with the reward model's held-out accuracy and the KL.

It runs on the tiny random test model (seconds per cycle), so it measures the pipeline's ability
to move a policy along a learned reward, not language quality. Reported as figures, not asserted:
see bench/RESULTS.md for what it showed.

Run: `.venv/bin/python -m bench.learning` (tiny model, ~2 minutes), or
`.venv/bin/python -m bench.learning --smol` (SmolLM2, preference: replies of at most 30 words;
~10 minutes).
"""

from __future__ import annotations

import asyncio

from alignment.config import GateConfig, PPOConfig, RewardConfig
from alignment.cycle import CycleConfig, run_cycle
from alignment.rollouts import vllm_generate
from assistant.vllm_client import VLLMServerEngine

SAMPLING = {"temperature": 1.0, "max_tokens": 8}
SHORT = False  # --smol: the simulated user likes replies of at most 30 words
N_VOTES, N_HELD_OUT = 240, 120


def liked(reply: str) -> bool:
    if SHORT:
        return len(reply.split()) <= 30
    return any(c in reply for c in "!?.")


def prompts(n: int) -> list[list[dict[str, str]]]:
    topics = ["gravity", "plants", "cheese", "the sea", "tea", "the sky", "a fox", "hiking"]
    return [
        [{"role": "user", "content": f"Tell me about {topics[i % 8]} ({i})."}] for i in range(n)
    ]


async def sample_pairs(url, version, prompt_list, seed0):
    engine = VLLMServerEngine(url, "policy", version)

    async def one(i, p):
        final = [u async for u in engine.stream_pair(p, SAMPLING, seed0 + 2 * i)][-1]
        return p, [c.text for c in final.candidates]

    try:
        out = []
        for start in range(0, len(prompt_list), 16):  # 16 at a time: the engine batches them
            chunk = list(enumerate(prompt_list))[start : start + 16]
            out += await asyncio.gather(*(one(i, p) for i, p in chunk))
        return out
    finally:
        await engine.aclose()


def satisfaction(pairs) -> float:
    replies = [r for _, rs in pairs for r in rs]
    return sum(map(liked, replies)) / len(replies)


def tiny_config() -> CycleConfig:
    return CycleConfig(
        reward=RewardConfig(
            learning_rate=3e-3,
            epochs=8,
            batch_size=8,
            max_length=256,
            heldout_fraction=0.2,
            lora_rank=16,
            lora_alpha=32,
        ),
        ppo=PPOConfig(
            steps=32,
            prompts_per_step=16,
            max_new_tokens=8,
            minibatch_size=4,
            ppo_epochs=4,
            learning_rate=1e-2,
            init_kl_coef=0.02,
        ),
        gate=GateConfig(eval_prompts=8, max_new_tokens=8, min_win_rate=0.0, max_kl=20.0),
    )


def smol_config() -> CycleConfig:
    return CycleConfig(
        reward=RewardConfig(epochs=2, batch_size=8, max_length=512),
        ppo=PPOConfig(
            steps=8,
            prompts_per_step=8,
            max_new_tokens=48,
            minibatch_size=4,
            ppo_epochs=2,
            learning_rate=1e-4,
        ),
        gate=GateConfig(eval_prompts=8, max_new_tokens=48, min_win_rate=0.0, max_kl=20.0),
    )


CONFIG = tiny_config


def measure(tiny_engine_url, tiny_model_dir, tmp_path):
    votes = asyncio.run(sample_pairs(tiny_engine_url, "v0000", prompts(N_VOTES), 1))
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
    if len(records) < 30:
        raise SystemExit(f"only {len(records)} decisive votes: too few to learn from")

    config = CONFIG()
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
    if not result.gate["deploy"]:
        return {"decisive_votes": len(records), "gate": result.gate}

    async def compare():
        engine = VLLMServerEngine(tiny_engine_url, "policy", "v0000")
        try:
            held_out = prompts(N_VOTES + N_HELD_OUT)[N_VOTES:]
            before = await sample_pairs(tiny_engine_url, "v0000", held_out, 10_000)
            await engine.reload_weights(result.path, "v0001")
            after = await sample_pairs(tiny_engine_url, "v0001", held_out, 10_000)
        finally:
            await engine.reload_weights(str(tiny_model_dir), "v0000")
            await engine.aclose()
        return satisfaction(before), satisfaction(after)

    before, after = asyncio.run(compare())
    return {
        "decisive_votes": len(records),
        "satisfied_v0": before,
        "satisfied_v1": after,
        "reward": result.reward,
        "gate": result.gate,
        "ppo_final": result.ppo_steps[-1] if result.ppo_steps else None,
    }


def main() -> None:
    import json
    import sys
    import tempfile
    from pathlib import Path

    from assistant.config import EngineConfig
    from assistant.vllm_server import EmbeddedVLLMServer
    from tests.tiny_model import build_tiny_checkpoint

    global SHORT, CONFIG, N_VOTES, N_HELD_OUT
    smol = "--smol" in sys.argv
    with tempfile.TemporaryDirectory() as tmp:
        if smol:
            SHORT, CONFIG, N_VOTES, N_HELD_OUT = True, smol_config, 160, 60
            SAMPLING["max_tokens"] = 48
            model = Path(__file__).resolve().parents[1] / "data/models/SmolLM2-135M-Instruct"
        else:
            model = build_tiny_checkpoint(Path(tmp) / "tiny")
        engine = EmbeddedVLLMServer(
            str(model),
            EngineConfig(max_model_len=512 if not smol else 2048, compile="no"),
            Path(tmp) / "engine.log",
        )
        engine.start()
        try:
            engine.wait_ready()
            print(json.dumps(measure(engine.url, model, Path(tmp)), indent=2, default=str))
        finally:
            engine.stop()


if __name__ == "__main__":
    main()
