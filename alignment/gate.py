"""The deployment gate: compare the new policy with the serving one before anything is served.

Win rate: on held-out prompts, the reward model scores the new policy's reply against the serving
policy's reply (ties count half). KL: mean over replies of sum_t log pi_new - log pi_ref on the new
policy's own samples. Deploy only above the win-rate floor and under the KL ceiling.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from alignment.config import GateConfig


@dataclass
class GateResult:
    win_rate: float
    kl: float
    deploy: bool
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def gate_decision(win_rate: float, kl: float, config: GateConfig) -> tuple[bool, str]:
    if kl > config.max_kl:
        return False, f"KL {kl:.3f} nats is over the limit {config.max_kl}"
    if win_rate < config.min_win_rate:
        return False, f"win rate {win_rate:.2f} is under the floor {config.min_win_rate}"
    return True, f"win rate {win_rate:.2f} >= {config.min_win_rate}, KL {kl:.3f} <= {config.max_kl}"


def win_rate(new_scores: torch.Tensor, old_scores: torch.Tensor) -> float:
    wins = (new_scores > old_scores).float() + 0.5 * (new_scores == old_scores).float()
    return wins.mean().item()


@torch.no_grad()
def evaluate(
    policy, tokenizer, score, serving_generate, prompts, config: GateConfig, seed: int = 1234
) -> GateResult:
    """Sample the new policy (transformers) and the serving one (vLLM) on the same prompts."""
    from alignment.ppo import token_logprobs

    device = next(policy.parameters()).device
    torch.manual_seed(seed)
    prompts = prompts[: config.eval_prompts]
    old = serving_generate(prompts, config.max_new_tokens, 1.0, seed)
    new_texts, kls = [], []
    for messages in prompts:
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        ids = ids.to(device)
        out = policy.lm.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=1.0,
            max_new_tokens=config.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
        attn = torch.ones_like(out)
        mask = torch.zeros_like(out, dtype=torch.float)
        mask[:, ids.shape[1] :] = 1
        logits, _ = policy(out, attn)
        lp = token_logprobs(logits, out)
        ref = token_logprobs(policy.reference_logits(out, attn), out)
        kls.append(((lp - ref) * mask).sum().item())
        new_texts.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    old_texts = [tokenizer.decode(r, skip_special_tokens=True) for _, r in old]
    new_scores = score(_conversations(prompts, new_texts)).cpu()
    old_scores = score(_conversations(prompts, old_texts)).cpu()
    rate, kl = win_rate(new_scores, old_scores), sum(kls) / len(kls)
    deploy, reason = gate_decision(rate, kl, config)
    return GateResult(rate, kl, deploy, reason)


def _conversations(prompts, replies):
    return [
        p + [{"role": "assistant", "content": r}] for p, r in zip(prompts, replies, strict=True)
    ]
