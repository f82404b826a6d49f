"""Where does a cycle go wrong? Stage-by-stage ground truth on the two-style model.

For each seed: sample voting pairs from v0 through the engine, train the reward model, then check
every stage against the simulated user's known preference:
  - the reward model on canonical pairs (cheerful vs plain text for unseen prompts), both orders;
  - each PPO step's rollouts: share the user likes, and the reward model's mean score;
  - the gate's own samples of the new policy (transformers, fp32 LoRA);
  - the merged checkpoint as deployed (vLLM, bf16), on held-out prompts.

Run: `.venv/bin/python -m bench.diagnose_learning --seeds 1 2 3 4 5 6`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from alignment.config import cycle_config
from alignment.gate import evaluate
from alignment.merge import merge_to_checkpoint
from alignment.ppo import PolicyWithValueHead, PPOTrainer
from alignment.reward_model import RewardScorer, split_heldout, train_reward_model
from alignment.rollouts import vllm_generate
from bench.learning import compare, preference_records, sample_pairs


def main() -> None:
    from transformers import AutoTokenizer

    from assistant.config import EngineConfig
    from engine.vllm_client import VLLMServerEngine
    from engine.vllm_server import EmbeddedVLLMServer
    from harness.tiny_model import (
        CHEERFUL,
        PLAIN,
        TOPICS,
        TWO_STYLE_RETRAIN_CONFIG,
        build_two_style_checkpoint,
        likes_cheerful,
        topic_prompt,
    )

    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--override", type=json.loads, default={})
    args = parser.parse_args()
    overrides = {
        s: {**TWO_STYLE_RETRAIN_CONFIG.get(s, {}), **v}
        for s, v in {**TWO_STYLE_RETRAIN_CONFIG, **args.override}.items()
    }
    likes = likes_cheerful
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_two_style_checkpoint(work / "two-style")
        tok = AutoTokenizer.from_pretrained(model)
        engine = EmbeddedVLLMServer(
            str(model), EngineConfig(max_model_len=512, compile="no"), work / "engine.log"
        )
        engine.start()
        try:
            engine.wait_ready()
            url = engine.url
            vote_prompts = [topic_prompt(t, i) for i in range(4) for t in TOPICS]
            test_prompts = [topic_prompt(t, i) for i in (100, 101) for t in TOPICS]
            canon = [
                (
                    topic_prompt(t, 300 + i),
                    CHEERFUL.format(topic=t.capitalize()),
                    PLAIN.format(topic=t.capitalize()),
                )
                for i in range(2)
                for t in TOPICS
            ]
            for seed in args.seeds:
                config = cycle_config("default", overrides)
                config.reward.seed = config.ppo.seed = seed
                t0 = time.perf_counter()
                pairs = asyncio.run(sample_pairs(url, "v0000", vote_prompts, 1000 * seed, 16))
                records = preference_records(pairs, likes)
                out = work / f"s{seed}"
                reward = train_reward_model(str(model), records, out / "rm", config.reward)
                scorer = RewardScorer.load(str(model), reward.path, config.reward.ensemble_penalty)
                conv = lambda p, r: p + [{"role": "assistant", "content": r}]  # noqa: E731
                good = scorer.score([conv(p, c) for p, c, _ in canon])
                bad = scorer.score([conv(p, b) for p, _, b in canon])
                # the same on the votes' own texts, truncated at 16 tokens as sampled
                rm_canon = (good > bad).float().mean().item()
                gen = vllm_generate(url, adapters_dir=out / "adapters")
                steps_log = []

                def traced(prompts, n, temp, s, gen=gen, steps_log=steps_log):
                    res = gen(prompts, n, temp, s)
                    texts = [tok.decode(r, skip_special_tokens=True) for _, r in res]
                    steps_log.append(sum(map(likes, texts)) / len(texts))
                    return res

                traced.publish = gen.publish  # type: ignore[attr-defined]
                train_prompts, held = split_heldout(
                    [p for p, _ in pairs], config.heldout_prompt_fraction
                )
                policy = PolicyWithValueHead.from_base(str(model), config.ppo)
                trainer = PPOTrainer(policy, tok, traced, scorer.score, config.ppo)
                stats = trainer.train(train_prompts)
                gen.reset()
                gate = evaluate(
                    policy, tok, scorer.member_scores, gen, held or train_prompts, config.gate
                )
                path = merge_to_checkpoint(policy, tok, out / "v1", {})

                async def deployed(path=path):
                    eng = VLLMServerEngine(url, "policy", "v0000")
                    try:
                        before = await sample_pairs(url, "v0000", test_prompts, 77_000, 16)
                        await eng.reload_weights(str(path), "v0001")
                        after = await sample_pairs(url, "v0001", test_prompts, 77_000, 16)
                    finally:
                        await eng.reload_weights(str(model), "v0000")
                        await eng.aclose()
                    return before, after

                before, after = asyncio.run(deployed())
                row = {
                    "seed": seed,
                    "votes": len(records),
                    "rm_heldout": reward.heldout_accuracy,
                    "rm_members": reward.member_heldout_accuracy,
                    "rm_canon_acc": round(rm_canon, 2),
                    "rm_margin": round((good - bad).mean().item(), 2),
                    "ppo_liked": [round(x, 2) for x in steps_log],
                    "ppo_reward": [round(s.reward_mean, 2) for s in stats],
                    "ppo_kl": [round(s.kl, 2) for s in stats],
                    "updates": [s.updates for s in stats],
                    "gate": {
                        "deploy": gate.deploy,
                        "win": gate.win_rate,
                        "interval": [round(x, 2) for x in gate.interval],
                        "n": gate.comparisons,
                        "kl": round(gate.kl, 2),
                    },
                    **compare(before, after, likes),
                    "s": round(time.perf_counter() - t0),
                }
                print(json.dumps(row), flush=True)
        finally:
            engine.stop()


if __name__ == "__main__":
    main()
