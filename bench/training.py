"""Training-step timings: reward-model step and PPO step on the embedded model's shape.

- Reward model: one Bradley-Terry step (forward both sides, backward, AdamW) of LoRA on a
  sequence-classification model, 8 pairs x `--seq` tokens.
- PPO: one `PPOTrainer.step` (policy + value head + adapter-disabled reference forward, reward,
  GAE, `ppo_epochs` x minibatch updates) on 8 rollouts of `--prompt` + `--response` tokens. The
  rollouts here are fixed random token ids so that only training is timed (rollout generation is
  vLLM's, measured in bench/generation.py); the reward is a stand-in function.

`--random-init` builds SmolLM2-135M's architecture with random weights (timing depends on shapes,
not values): this is how it runs on a lent GPU machine, where the checkpoint cannot be carried.

Run: `.venv/bin/python -m bench.training [--random-init] [--compare precision|attention]`;
`... --memory` (a fresh process) for the PPO stage's peak memory against the model's size and
against a separate reference copy.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from alignment.config import PPOConfig
from alignment.losses import bradley_terry_loss
from alignment.ppo import PolicyWithValueHead, PPOTrainer
from alignment.precision import autocast, use_bf16

REPO = Path(__file__).resolve().parents[1]
SMOL = REPO / "data/models/SmolLM2-135M-Instruct"


def random_smollm2(out: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        pad_token_id=2,
        eos_token_id=2,
        bos_token_id=1,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def time_reward_steps(
    model_dir: str,
    device: str,
    seq: int,
    repeats: int,
    precision: str = "fp32",
    attention: str = "sdpa",
) -> list[float]:
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=1, dtype=torch.float32, attn_implementation=attention
    )
    model.config.pad_token_id = 2
    model = get_peft_model(
        model,
        LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, target_modules="all-linear"),
    ).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(3, 49000, (16, seq), device=device)  # 8 chosen + 8 rejected
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        with autocast(precision, device):
            r = model(input_ids=ids).logits.squeeze(-1).float()
        loss = bradley_terry_loss(r[:8], r[8:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times[1:]  # first step warms up


def time_ppo_steps(
    model_dir: str,
    device: str,
    prompt: int,
    response: int,
    repeats: int,
    precision: str = "fp32",
    attention: str = "sdpa",
) -> list[float]:
    from transformers import AutoTokenizer

    # 8 rollouts (4 prompts x 2 replies), every update taken (no trust-region stop): fixed work
    config = PPOConfig(
        prompts_per_step=4, samples_per_prompt=2, max_new_tokens=response, minibatch_size=4,
        ppo_epochs=2, max_step_kl=0.0, precision=precision, attention=attention,
    )  # fmt: skip
    policy = PolicyWithValueHead.from_base(model_dir, config).to(device)
    tokenizer = AutoTokenizer.from_pretrained(SMOL) if SMOL.exists() else None

    def generate(prompts, max_new_tokens, temperature, seed):
        rng = random.Random(seed)
        return [
            (
                [rng.randrange(3, 49000) for _ in range(prompt)],
                [rng.randrange(3, 49000) for _ in range(max_new_tokens)],
            )
            for _ in prompts
        ]

    def score(conversations):
        return torch.tensor([len(set(c[-1]["content"])) / 10 for c in conversations])

    trainer = PPOTrainer(policy, tokenizer or _NullTokenizer(), generate, score, config)
    prompts = [[{"role": "user", "content": "hi"}]] * 4
    times = []
    for step in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        trainer.step(prompts, step)
        _sync(device)
        times.append(time.perf_counter() - start)
    return times[1:]


def memory_profile(model_dir: str, device: str, prompt: int, response: int) -> dict:
    """Peak memory of PPO steps against the model's size, and what a separate reference model
    would add. Run in a fresh process (`--memory`): peak RSS is per process."""
    import resource

    import psutil

    def rss_mb() -> float:
        if device == "cuda":
            return torch.cuda.memory_allocated() / 2**20
        return psutil.Process().memory_info().rss / 2**20

    def peak_mb() -> float:
        if device == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

    from transformers import AutoModelForCausalLM

    before = rss_mb()
    # What a separate reference model costs: one more fp32 copy (measured first, on a fresh heap).
    copy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    copy_mb = rss_mb() - before
    model_mb = sum(p.numel() * 4 for p in copy.parameters()) / 2**20
    del copy
    times = time_ppo_steps(model_dir, device, prompt, response, repeats=2)
    peak = peak_mb()
    return {
        "model_fp32_mb": round(model_mb),
        "process_before_mb": round(before),
        "ppo_peak_mb": round(peak),
        "ppo_peak_over_start_mb": round(peak - before),
        "separate_reference_copy_would_add_mb": round(copy_mb),
        "ppo_step_s": round(statistics.median(times), 2),
    }


class _NullTokenizer:
    pad_token_id = 2

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids[:20]))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--seq", type=int, default=192)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--response", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--memory", action="store_true", help="only the PPO memory profile (fresh process)"
    )
    parser.add_argument(
        "--compare",
        choices=("precision", "attention"),
        default="precision",
        help="what the same steps are timed under, in one run: fp32 vs 'auto' precision (bf16 "
        "autocast where native), or, under 'auto' precision, sdpa vs eager attention",
    )
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.memory:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = str(random_smollm2(Path(tmp) / "m") if args.random_init else SMOL)
            print(memory_profile(model_dir, device, args.prompt, args.response))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(random_smollm2(Path(tmp) / "m") if args.random_init else SMOL)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rows = {}
        settings = (
            [("fp32", "sdpa"), ("auto", "sdpa")]
            if args.compare == "precision"
            else [("auto", "sdpa"), ("auto", "eager")]
        )
        for precision, attention in settings:  # the same steps, in one run: compare as a ratio
            rm = time_reward_steps(model_dir, device, args.seq, args.repeats, precision, attention)
            ppo = time_ppo_steps(
                model_dir, device, args.prompt, args.response, args.repeats, precision, attention
            )
            rows[f"{precision}, {attention}"] = (rm, ppo)
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU x{torch.get_num_threads()}"
    auto = "bf16 autocast" if use_bf16("auto", device) else "fp32 (no native bf16 here)"
    print(f"device: {name}; 'auto' precision = {auto}")
    print("| step | shape | precision, attention | median s | min s |\n|---|---|---|---|---|")
    for setting, (rm, ppo) in rows.items():
        print(
            f"| reward model (LoRA, BT) | 8 pairs x {args.seq} tok | {setting} | "
            f"{statistics.median(rm):.3f} | {min(rm):.3f} |"
        )
        print(
            f"| PPO (LoRA + ref, RLOO) | 8 x ({args.prompt}+{args.response}) tok, "
            f"2 epochs x 2 minibatches | {setting} | {statistics.median(ppo):.3f} | "
            f"{min(ppo):.3f} |"
        )
    (before, first), (after, second) = rows.items()
    for i, stage in enumerate(("reward model", "PPO")):
        ratio = statistics.median(first[i]) / statistics.median(second[i])
        print(f"{stage}: {after} is {ratio:.2f}x the speed of {before}")
    if device == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
