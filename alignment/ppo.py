"""PPO with a KL penalty on LoRA adapters: small and readable, since TRL >= 1.13 has no PPOTrainer.

- Policy: base model + LoRA, with a scalar value head on the last hidden state.
- Reference: the same model with the adapter disabled (`peft.disable_adapter()`), so the reference
  costs no second copy of the weights.
- Rollouts: sampled by the serving vLLM engine (`generate` callback), not a second generation stack.
  Their log-probabilities are recomputed by the trainer, so the importance ratio is always against
  the trainer's own policy at rollout time.
- Rewards: reward-model score minus beta * (log pi - log pi_ref) summed over the reply's tokens;
  beta follows an adaptive controller toward a target KL.
- Advantages: by default several replies per prompt, each one's return minus the mean of the
  others' (RLOO's leave-one-out baseline; no value head). `advantage="gae"` keeps the classic value
  head + whitened GAE with a clipped value loss. Either way the clipped surrogate is the loss.
- Trust region: a round's updates stop as soon as the policy has moved `max_step_kl` (per token)
  from the one that sampled the round. Without it a LoRA at a high learning rate jumped several
  nats per round and the KL penalty then threw it back: the policy oscillated and a cycle ended
  wherever the swing happened to be (bench/RESULTS.md, "Why cycles regressed").
See `alignment.ppo_math` for each formula.

Per-step statistics (reward mean, KL, beta, entropy, clip fraction, losses) go to `on_step`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from alignment.config import PPOConfig
from alignment.kl_controller import AdaptiveKLController, FixedKLController
from alignment.ppo_math import (
    approx_kl,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    gae,
    kl_penalised_rewards,
    leave_one_out_advantages,
    whiten,
)
from alignment.precision import attention_implementation, autocast, base_dtype, train_device
from alignment.rollouts import GenerateFn, Rollouts, as_rollouts
from alignment.support import ReplySupport, reply_length

# conversations (prompt + assistant reply) -> scores (B,)
ScoreFn = Callable[[list[list[dict[str, str]]]], torch.Tensor]


@dataclass
class StepStats:
    step: int
    reward_mean: float
    kl: float  # mean per-response KL(pi || pi_ref) estimate, nats
    beta: float
    entropy: float
    clip_frac: float
    policy_loss: float
    value_loss: float
    step_kl: float = 0.0  # mean per-token KL(pi_old || pi) after the round's updates
    updates: int = 0  # gradient steps taken before the trust region stopped the round
    cut_off: float = 0.0  # share of the round's replies that hit max_new_tokens
    short: float = 0.0  # share shorter than the voted replies (alignment.support)
    # where the round's time went: sampling (vLLM), the no-grad passes and the reward models'
    # scores, the gradient steps
    rollout_s: float = 0.0
    score_s: float = 0.0
    update_s: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


class PolicyWithValueHead(nn.Module):
    """A peft LoRA causal LM plus a linear value head; `reference()` disables the adapter."""

    def __init__(self, peft_model, precision: str = "fp32") -> None:
        super().__init__()
        self.lm = peft_model
        self.precision = precision  # matmuls in bf16 under autocast; weights stay fp32
        hidden = peft_model.config.hidden_size
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @classmethod
    def from_base(cls, base_model: str, config: PPOConfig) -> PolicyWithValueHead:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        device = train_device()
        base = AutoModelForCausalLM.from_pretrained(
            base_model,
            dtype=base_dtype(config.base_weights, device),
            attn_implementation=attention_implementation(config.attention, device),
        )
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        policy = cls(get_peft_model(base, lora), config.precision)
        # RLOO needs no critic: a frozen head keeps "every trainable parameter moved" true
        policy.value_head.requires_grad_(config.advantage == "gae")
        return policy.to(device)

    def autocast(self):
        return autocast(self.precision, str(next(self.parameters()).device))

    def forward(self, input_ids, attention_mask, logits_to_keep: int = 0):
        """(logits of the last `logits_to_keep` positions, or all for 0; values at every
        position). `logits_window` says how many the replies need: the prompt's positions
        would be vocabulary-sized rows computed only to be thrown away."""
        with self.autocast():
            out = self.lm(
                input_ids=input_ids,
                attention_mask=attention_mask,
                output_hidden_states=True,
                use_cache=False,
                logits_to_keep=logits_to_keep,
            )
        values = self.value_head(out.hidden_states[-1].float()).squeeze(-1)  # (B, L)
        return out.logits.float(), values  # (B, K, V), (B, L)

    @torch.no_grad()
    def reference_logits(self, input_ids, attention_mask, logits_to_keep: int = 0):
        with self.lm.disable_adapter(), self.autocast():
            return self.lm(
                input_ids=input_ids,
                attention_mask=attention_mask,
                use_cache=False,
                logits_to_keep=logits_to_keep,
            ).logits.float()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


@dataclass
class Rollout:
    input_ids: torch.Tensor  # (B, L) prompt + response, right-padded
    attention_mask: torch.Tensor  # (B, L)
    response_mask: torch.Tensor  # (B, L) 1 on response tokens
    prompts: list[list[dict[str, str]]]
    responses: list[str]
    cut_off: torch.Tensor  # (B,) 1.0 where the reply used every token it was allowed
    short: torch.Tensor  # (B,) 1.0 where the reply is shorter than the voted ones


def pack_rollouts(
    pairs: list[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, ...]:
    length = max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((len(pairs), length), pad_id, dtype=torch.long)
    attn = torch.zeros((len(pairs), length), dtype=torch.long)
    resp = torch.zeros((len(pairs), length))
    for i, (p, r) in enumerate(pairs):
        seq = p + r
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        resp[i, len(p) : len(seq)] = 1
    return ids, attn, resp


def logits_window(response_mask: torch.Tensor) -> int:
    """How many final positions need logits for every reply token's log-prob: from the
    position before the earliest reply token of the batch to the end (transformers'
    `logits_to_keep`). On SmolLM2 rollouts about half the positions are prompt."""
    length = response_mask.shape[1]
    columns = response_mask.any(dim=0).nonzero()
    if len(columns) == 0:
        return 0  # no reply tokens: keep everything (0 means all)
    return length - (int(columns[0]) - 1)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(x_t | x_<t) aligned to position t. (B, L)

    `logits` are those of the last K positions (K = L: all); positions they do not predict
    get 0. Computed as the picked logit minus logsumexp, so no second (B, K, V) tensor of
    log-softmax is held next to the logits (V is 49152 on SmolLM2)."""
    length, kept = input_ids.shape[1], logits.shape[1]
    first = length - kept + 1  # the first token the kept logits predict
    logits = logits[:, :-1].float()  # (B, K-1, V) predicts tokens first..L-1
    picked = logits.gather(-1, input_ids[:, first:].unsqueeze(-1)).squeeze(-1)  # (B, K-1)
    return torch.nn.functional.pad(picked - torch.logsumexp(logits, dim=-1), (first, 0))


def unjudged_last(shaped: torch.Tensor, outside: torch.Tensor, penalty: float) -> torch.Tensor:
    """Rollouts outside what the reward models learned (shorter than the voted replies) get no
    credit from their scores: each is put `penalty` under the lowest judged rollout of the
    batch. A fixed penalty subtracted from their score was not enough: on SmolLM2 the reward
    models rated such replies so high that PPO drifted into them anyway (`plain` 3, `complete` 2
    and 3 refused at the gate, bench/RESULTS.md). 0 disables."""
    if penalty <= 0 or not outside.any():
        return shaped
    judged = shaped[outside == 0]
    floor = (judged if len(judged) else shaped).min()
    return torch.where(outside.bool(), floor - penalty, shaped)


class PPOTrainer:
    """PPO on the policy's LoRA adapter, the reference being the same model with the adapter
    disabled (no second copy of the weights). A round: sample rollouts (from the serving engine
    with the current adapter when `generate` is a `Rollouts`, else in-process), score them with
    the reward-model ensemble (mean minus spread), subtract a per-token KL penalty to the
    reference, take advantages (RLOO across each prompt's samples, or GAE with the value head),
    then clipped policy and value updates over minibatches. The maths is in `ppo_math`, tested
    against hand-computed values; this class owns the loop and the tensors' shapes."""

    def __init__(
        self,
        policy: PolicyWithValueHead,
        tokenizer,
        generate: Rollouts | GenerateFn,
        score: ScoreFn,
        config: PPOConfig,
        support: ReplySupport | None = None,
    ) -> None:
        self.policy = policy
        self.support = support  # None: no bound on how short a rollout may be
        self.tokenizer = tokenizer
        self.generate = as_rollouts(generate)
        self.score = score
        self.config = config
        if config.advantage not in ("rloo", "gae"):
            raise ValueError(f"ppo.advantage must be 'rloo' or 'gae', got {config.advantage!r}")
        if config.advantage == "rloo" and config.samples_per_prompt < 2:
            raise ValueError("ppo.advantage 'rloo' needs ppo.samples_per_prompt >= 2")
        self.kl_ctl = (
            AdaptiveKLController(config.init_kl_coef, config.target_kl, config.kl_horizon)
            if config.adaptive_kl
            else FixedKLController(config.init_kl_coef)
        )
        self.optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=config.learning_rate)
        self.rng = random.Random(config.seed)
        self._score_scale: tuple[float, float] | None = None  # (mean, std) of the first batch
        self.device = next(policy.parameters()).device

    def rollout(self, prompts: list[list[dict[str, str]]], step: int) -> Rollout:
        c = self.config
        if step > 0:  # step 0: the adapter is still the identity
            self.generate.publish(self.policy.lm)
        pairs = self.generate(prompts, c.max_new_tokens, c.temperature, c.seed * 100003 + step)
        pad = self.tokenizer.pad_token_id
        ids, attn, resp = pack_rollouts(pairs, pad if pad is not None else 0)
        texts = [self.tokenizer.decode(r, skip_special_tokens=True) for _, r in pairs]
        cut = torch.tensor([float(len(r) >= c.max_new_tokens) for _, r in pairs])
        short = torch.zeros(len(pairs))
        if self.support is not None:
            eos = self.tokenizer.eos_token_id
            lengths = [reply_length(r, eos) for _, r in pairs]
            short = torch.tensor(self.support.outside(lengths, c.max_new_tokens))
        d = self.device
        return Rollout(
            ids.to(d), attn.to(d), resp.to(d), prompts, texts, cut.to(d), short.float().to(d)
        )

    def step(self, prompts: list[list[dict[str, str]]], step: int) -> StepStats:
        """One round: `samples_per_prompt` replies to each prompt (consecutive), then updates."""
        c = self.config
        k = max(1, c.samples_per_prompt)
        started = time.perf_counter()
        ro = self.rollout([p for p in prompts for _ in range(k)], step)
        rolled = time.perf_counter()
        # Token t's log-prob sits at position t; the value of the state *before* token t is
        # the value head's output at position t-1, so shift values right by one.
        mask = ro.response_mask  # (B, L)
        keep = logits_window(mask)  # logits only where replies are: half the vocabulary work
        with torch.no_grad():
            logits, values = self.policy(ro.input_ids, ro.attention_mask, keep)
            old_logprobs = token_logprobs(logits, ro.input_ids) * mask  # (B, L) log pi_old
            ref_logits = self.policy.reference_logits(ro.input_ids, ro.attention_mask, keep)
            ref_logprobs = token_logprobs(ref_logits, ro.input_ids) * mask  # (B, L) log pi_ref
            del logits, ref_logits
            old_values = torch.nn.functional.pad(values[:, :-1], (1, 0)) * mask  # (B, L)
            scores = self.score(
                [
                    p + [{"role": "assistant", "content": r}]
                    for p, r in zip(ro.prompts, ro.responses, strict=True)
                ]
            ).to(self.device)
            beta = self.kl_ctl.value
            shaped = unjudged_last(
                self._normalised(scores) - c.missing_eos_penalty * ro.cut_off,
                ro.short,
                c.short_reply_penalty,
            )
            rewards, kl = kl_penalised_rewards(shaped, old_logprobs, ref_logprobs, mask, beta)
            if c.advantage == "rloo":
                # (B,) the whole reply's return, against the other replies to its prompt
                advantages = leave_one_out_advantages(rewards.sum(dim=1), k)[:, None] * mask
                returns = old_values  # unused: no value loss
            else:
                advantages, returns = gae(rewards, old_values, mask, c.gamma, c.lam)
                advantages = whiten(advantages, mask)

        scored = time.perf_counter()
        batch = ro.input_ids.shape[0]
        stats: dict[str, list[float]] = {"pl": [], "vl": [], "cf": [], "ent": []}
        step_kl, stop = 0.0, False
        for _ in range(c.ppo_epochs):
            order = list(range(batch))
            self.rng.shuffle(order)
            for start in range(0, batch, c.minibatch_size):
                idx = torch.tensor(order[start : start + c.minibatch_size], device=self.device)
                m = mask[idx]
                logits, values = self.policy(ro.input_ids[idx], ro.attention_mask[idx], keep)
                logprobs = token_logprobs(logits, ro.input_ids[idx]) * m
                step_kl = approx_kl(logprobs.detach(), old_logprobs[idx], m)
                if c.max_step_kl > 0 and step_kl > c.max_step_kl and stats["pl"]:
                    stop = True  # past the trust region: this round's rollouts are spent
                    break
                pl, cf = clipped_policy_loss(
                    logprobs, old_logprobs[idx], advantages[idx], m, c.cliprange
                )
                loss = pl
                vl = torch.zeros(())
                if c.advantage == "gae":
                    values = torch.nn.functional.pad(values[:, :-1], (1, 0)) * m
                    vl = clipped_value_loss(
                        values, old_values[idx], returns[idx], m, c.cliprange_value
                    )
                    loss = pl + c.vf_coef * vl
                self.optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.policy.trainable_parameters(), c.max_grad_norm)
                self.optimizer.step()
                # logits at t-1 predict token t: shift the mask to score the right positions
                ent_mask = torch.nn.functional.pad(m[:, 1:], (0, 1))[:, -logits.shape[1] :]
                stats["pl"].append(pl.item())
                stats["vl"].append(vl.item())
                stats["cf"].append(cf.item())
                stats["ent"].append(entropy_from_logits(logits.detach(), ent_mask).item())
            if stop:
                break

        mean_kl = kl.sum(dim=1).mean().item()  # per-response KL, nats
        self.kl_ctl.update(mean_kl, batch)
        return StepStats(
            step=step,
            reward_mean=scores.mean().item(),
            kl=mean_kl,
            beta=beta,
            entropy=sum(stats["ent"]) / len(stats["ent"]),
            clip_frac=sum(stats["cf"]) / len(stats["cf"]),
            policy_loss=sum(stats["pl"]) / len(stats["pl"]),
            value_loss=sum(stats["vl"]) / len(stats["vl"]),
            step_kl=step_kl,
            updates=len(stats["pl"]),
            cut_off=ro.cut_off.mean().item(),
            short=ro.short.mean().item(),
            rollout_s=rolled - started,
            score_s=scored - rolled,
            update_s=time.perf_counter() - scored,
        )

    def _normalised(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores on a unit scale fixed by the first rollout batch (the initial policy), as in
        Ziegler et al. (2019): the value loss stays on the policy loss's scale, so gradient
        clipping does not let an untrained value head drown the policy gradient. Fixed, not
        per batch: once the policy has converged its batches score alike, and re-standardising
        them would blow small reward-model noise up to unit size and drive the policy off
        (observed: the KL to the reference grew past the gate's limit)."""
        if not self.config.normalize_scores or len(scores) < 2:
            return scores
        if self._score_scale is None:
            self._score_scale = (scores.mean().item(), max(scores.std().item(), 1e-3))
        mean, std = self._score_scale
        return (scores - mean) / std

    def train(
        self,
        prompts: list[list[dict[str, str]]],
        on_step: Callable[[StepStats], None] | None = None,
        should_stop: Callable[[list[float]], bool] | None = None,
    ) -> list[StepStats]:
        """Up to `config.steps` rounds; `should_stop(seconds of each round so far)` is asked
        before each one (a cycle's time budget, `alignment.budget`)."""
        if not prompts:
            raise ValueError("no prompts to roll out: chat with the assistant first")
        history: list[StepStats] = []
        for step in range(self.config.steps):
            took = [s.rollout_s + s.score_s + s.update_s for s in history]
            if should_stop is not None and should_stop(took):
                break
            batch = [self.rng.choice(prompts) for _ in range(self.config.prompts_per_step)]
            stats = self.step(batch, step)
            history.append(stats)
            if on_step:
                on_step(stats)
        return history
