"""PPO pieces for language models, over padded (B, T) tensors of response tokens.

`mask` is 1 on response tokens and 0 on padding. Everything here is a small pure function so it can
be checked against hand-computed numbers; the trainer composes them. Conventions follow TRL 1.12's
`trl/experimental/ppo` (the last TRL release with a PPO trainer), which we cross-checked.
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask)
    return var * n / (n - 1).clamp(min=1)  # unbiased, like TRL's masked_var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise to unit variance over real tokens (and zero mean unless shift_mean=False)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_penalised_rewards(
    score: torch.Tensor,  # (B,) reward-model score of each whole response
    logprobs: torch.Tensor,  # (B, T) log pi(a_t | s_t) under the rollout policy
    ref_logprobs: torch.Tensor,  # (B, T) log pi_ref(a_t | s_t)
    mask: torch.Tensor,  # (B, T)
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -beta * (log pi - log pi_ref) everywhere, plus the score on the last
    real token. Returns (rewards (B, T), kl (B, T)); summing a row gives the seed's J."""
    kl = (logprobs - ref_logprobs) * mask  # (B, T) per-token KL estimate k1
    rewards = -beta * kl
    # (B,) position of each row's final response token (responses follow their prompt)
    last = mask.shape[1] - 1 - mask.flip(dims=[1]).argmax(dim=1)
    rewards[torch.arange(rewards.shape[0]), last] += score
    return rewards, kl


def gae(
    rewards: torch.Tensor,  # (B, T)
    values: torch.Tensor,  # (B, T) V(s_t) from the value head at rollout time
    mask: torch.Tensor,  # (B, T)
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation. Returns (advantages (B, T), returns (B, T)).

    Padding is zeroed first, so the value after the last real token is 0 (the episode ends).
    """
    rewards, values = rewards * mask, values * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages[:, t] = last_gae
    advantages = advantages * mask
    returns = advantages + values
    return advantages, returns


def clipped_policy_loss(
    logprobs: torch.Tensor,  # (B, T) log pi_theta now
    old_logprobs: torch.Tensor,  # (B, T) log pi at rollout time
    advantages: torch.Tensor,  # (B, T), whitened
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's pessimistic clipped surrogate. Returns (loss, clip fraction)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_frac


def clipped_value_loss(
    values: torch.Tensor,  # (B, T) V now
    old_values: torch.Tensor,  # (B, T) V at rollout time
    returns: torch.Tensor,  # (B, T)
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> torch.Tensor:
    """0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped kept within clip_range of old V."""
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy (nats) of the policy's distribution over real tokens (a 0/1
    `mask`). Only the masked rows are softmaxed: a statistic should not cost two more
    vocabulary-sized tensors over padding."""
    rows = logits[mask.bool()]  # (N, V)
    if rows.shape[0] == 0:
        return torch.zeros((), device=logits.device)
    logp = torch.log_softmax(rows.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def leave_one_out_advantages(returns: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's baseline (Ahmadian et al. 2024): each reply's return minus the mean return of the
    other replies to the same prompt. `returns` (B,) holds `group_size` consecutive replies per
    prompt. The baseline is unbiased and needs no value head, which on a few dozen rollouts is
    mostly noise. Returns (B,)."""
    if group_size < 2:
        raise ValueError("a leave-one-out baseline needs at least 2 replies per prompt")
    groups = returns.view(-1, group_size)  # (P, k)
    others = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1)


def approx_kl(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean per-token KL(pi_old || pi) by the k3 estimator (ratio - 1 - log ratio): how far one
    update moved the policy from the one that sampled the batch; PPO's trust-region check."""
    log_ratio = (logprobs - old_logprobs) * mask
    return masked_mean(torch.expm1(log_ratio) - log_ratio, mask).item()
