"""The deployment gate: compare the new policy with the serving one before anything is served.

Comparisons: on held-out prompts, `samples_per_prompt` replies from the new policy (transformers,
the exact weights about to be merged) against as many from the serving one (vLLM), paired by
prompt. Every reward-model member scores both replies; a comparison counts as a win or a loss
only when all members agree on which is better, otherwise it is undecided (the models cannot tell,
so it says nothing either way). The win rate is wins / (wins + losses) with a Wilson 95 % interval.

Deploy only when the interval's lower bound reaches the floor (a regression, or a change the
reward models cannot vouch for, cannot pass by luck on a few prompts) and the mean KL(new || ref)
per reply, measured on the new policy's own samples, is under the ceiling.

The reward models vouch only for replies like the ones people voted on (`alignment.support`): a
comparison whose new reply is shorter than those is not counted, and a version that writes many
more such replies than the serving one is refused.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from alignment.config import GateConfig
from alignment.rollouts import as_rollouts
from alignment.stats import wilson_interval
from alignment.support import ReplySupport, reply_length


@dataclass
class Comparisons:
    wins: int = 0
    losses: int = 0
    undecided: int = 0  # the reward models disagree about which reply is better
    ties: int = 0  # identical scores (usually identical replies)
    unsupported: int = 0  # the new reply is shorter than the voted ones: not counted

    @property
    def decisive(self) -> int:
        return self.wins + self.losses

    @property
    def win_rate(self) -> float | None:
        return self.wins / self.decisive if self.decisive else None


@dataclass(frozen=True)
class ShortReplies:
    """How many replies of each version fall under the voted replies' lengths."""

    new: int
    serving: int
    replies: int  # per version
    shortest: int  # tokens: the bound

    def excess(self) -> float:
        return (self.new - self.serving) / max(1, self.replies)


@dataclass
class GateResult:
    win_rate: float | None
    kl: float
    deploy: bool
    reason: str
    kl_per_token: float = 0.0
    interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    comparisons: int = 0  # decisive comparisons behind the win rate
    undecided: int = 0
    ties: int = 0
    samples: int = 0  # replies compared in all
    unsupported: int = 0  # comparisons not counted: the new reply is shorter than the voted ones
    short_replies: int | None = None  # new replies shorter than the voted ones (None: no bound)
    serving_short_replies: int | None = None  # the serving version's, on the same prompts
    support_tokens: int | None = None  # the bound, in tokens (alignment.support)

    def as_dict(self) -> dict:
        return asdict(self)


def count_comparisons(
    new_scores: torch.Tensor, old_scores: torch.Tensor, supported: torch.Tensor | None = None
) -> Comparisons:
    """new_scores, old_scores: (K, N), K reward-model members scoring N paired replies;
    supported: (N,) False where the new reply lies outside what the models learned."""
    diff = new_scores - old_scores  # (K, N)
    ok = torch.ones(diff.shape[1], dtype=torch.bool) if supported is None else supported.bool()
    out = Comparisons()
    out.wins = int(((diff > 0).all(0) & ok).sum())
    out.losses = int(((diff < 0).all(0) & ok).sum())
    out.ties = int(((diff == 0).all(0) & ok).sum())
    out.unsupported = int((~ok).sum())
    out.undecided = diff.shape[1] - out.wins - out.losses - out.ties - out.unsupported
    return out


def gate_decision(
    counts: Comparisons,
    kl: float,
    config: GateConfig,
    kl_per_token: float = 0.0,
    short: ShortReplies | None = None,
) -> tuple[bool, str, tuple[float, float]]:
    """(deploy, reason in words a user reads, interval).

    KL is limited per reply and per token: a policy that collapses into one-word answers
    ("Honey.") moves few tokens far, so its per-reply KL can stay under a limit that healthy
    64-token replies need, while its per-token KL is an order of magnitude above theirs."""
    lo, hi = wilson_interval(counts.wins, counts.decisive)
    rate = counts.win_rate
    shown = (
        f"{rate:.2f} [{lo:.2f}, {hi:.2f}] on {counts.decisive} decided comparisons"
        if rate is not None
        else "no comparison the reward models agreed on"
    )
    if kl > config.max_kl:
        return (
            False,
            f"it drifted too far from the original model: KL {kl:.2f} nats per reply is over "
            f"the limit {config.max_kl}",
            (lo, hi),
        )
    if kl_per_token > config.max_kl_per_token:
        return (
            False,
            f"its replies changed too much per word to trust: KL {kl_per_token:.2f} nats per "
            f"token is over the limit {config.max_kl_per_token} (answers collapsing into a few "
            "words look like this)",
            (lo, hi),
        )
    if short is not None and short.excess() > config.max_short_share:
        return (
            False,
            f"its replies got shorter than the ones you voted on: {short.new} of {short.replies} "
            f"are under {short.shortest} tokens, against {short.serving} from the serving "
            "version; the reward models never learned to judge replies like these",
            (lo, hi),
        )
    if lo < config.min_win_rate:
        return (
            False,
            f"the new version did not clearly beat the serving one: win rate {shown}"
            f" ({counts.undecided} undecided{_unsupported(counts)}); its lower bound must reach "
            f"{config.min_win_rate}",
            (lo, hi),
        )
    return (
        True,
        f"the new version beat the serving one: win rate {shown}; KL {kl:.2f} <= {config.max_kl}",
        (lo, hi),
    )


def _unsupported(counts: Comparisons) -> str:
    return f", {counts.unsupported} too short to judge" if counts.unsupported else ""


def reward_refusal(reward, config: GateConfig) -> GateResult | None:
    """A cycle is refused before PPO when the reward models do not predict the human votes they
    never trained on: optimising them would move the model somewhere the users did not ask for.
    `reward` is an `alignment.reward_model.RewardResult`."""
    acc, n = reward.heldout_accuracy, reward.n_heldout
    if acc is None or n < config.min_rm_heldout or acc >= config.min_rm_accuracy:
        return None
    reason = (
        f"the reward models agree with only {acc:.2f} of {n} held-out votes (at least "
        f"{config.min_rm_accuracy} needed): they have not learned what you prefer yet; "
        "keep voting, consistently"
    )
    return GateResult(None, 0.0, False, reason)


@torch.no_grad()
def evaluate(
    policy,
    tokenizer,
    member_scores,
    serving_generate,
    prompts,
    config: GateConfig,
    seed=1234,
    support: ReplySupport | None = None,
) -> GateResult:
    """Sample the serving policy and the new one on the same prompts with the same seeds;
    `member_scores(conversations) -> (K, B)` is the reward-model ensemble; `support` bounds the
    replies it can judge (None: no bound). The new policy is sampled by the engine with its
    adapter loaded where the engine can (faster than transformers' `generate`, which took 41 s
    for 64 SmolLM2 replies on the 2-core CPU, and how a canary will serve it), else by
    transformers."""
    torch.manual_seed(seed)
    k = max(1, config.samples_per_prompt)
    prompts = [p for p in prompts[: config.eval_prompts] for _ in range(k)]
    engine = as_rollouts(serving_generate)
    old = engine(prompts, config.max_new_tokens, 1.0, seed)
    if engine.publish(policy.lm):
        try:
            new = engine(prompts, config.max_new_tokens, 1.0, seed)
        finally:
            engine.reset()
    else:
        new = sample_policy(policy, tokenizer, prompts, config.max_new_tokens)
    kls = reply_kl(policy, new, _pad_id(tokenizer))
    decode = lambda pairs: [tokenizer.decode(r, skip_special_tokens=True) for _, r in pairs]  # noqa: E731
    new_texts, old_texts = decode(new), decode(old)
    short, supported = None, None
    if support is not None:
        eos, limit = tokenizer.eos_token_id, config.max_new_tokens
        new_short = support.outside([reply_length(r, eos) for _, r in new], limit)
        old_short = support.outside([reply_length(r, eos) for _, r in old], limit)
        short = ShortReplies(sum(new_short), sum(old_short), len(prompts), support.bound(limit))
        supported = ~torch.tensor(new_short, dtype=torch.bool)
    counts = count_comparisons(
        member_scores(_conversations(prompts, new_texts)).cpu(),
        member_scores(_conversations(prompts, old_texts)).cpu(),
        supported,
    )
    kl = sum(kls) / len(kls)
    kl_per_token = sum(kls) / max(1, sum(len(r) for _, r in new))
    deploy, reason, (lo, hi) = gate_decision(counts, kl, config, kl_per_token, short)
    return GateResult(
        counts.win_rate,
        kl,
        deploy,
        reason,
        kl_per_token,
        [lo, hi],
        counts.decisive,
        counts.undecided,
        counts.ties,
        len(prompts),
        counts.unsupported,
        short.new if short else None,
        short.serving if short else None,
        short.shortest if short else None,
    )


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def sample_policy(
    policy, tokenizer, prompts, max_new_tokens: int, batch: int = 16
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reply ids up to and including the end token) per prompt, sampled from the
    policy at temperature 1 in left-padded batches."""
    device = next(policy.parameters()).device
    eos, pad = tokenizer.eos_token_id, _pad_id(tokenizer)
    pairs = []
    for i in range(0, len(prompts), batch):
        chunk = [
            tokenizer.apply_chat_template(m, add_generation_prompt=True, return_dict=True)[
                "input_ids"
            ]
            for m in prompts[i : i + batch]
        ]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk], device=device)
        attn = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=device)
        with policy.autocast():
            out = policy.lm.generate(
                input_ids=ids,
                attention_mask=attn,
                do_sample=True,
                temperature=1.0,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
            )
        for prompt, row in zip(chunk, out[:, width:].tolist(), strict=True):
            pairs.append((prompt, row[: row.index(eos) + 1] if eos in row else row))
    return pairs


@torch.no_grad()
def reply_kl(policy, pairs, pad_id: int, batch: int = 8) -> list[float]:
    """sum_t log pi_new - log pi_ref over each reply's tokens (the k1 estimate on its own
    samples)."""
    from alignment.ppo import logits_window, pack_rollouts, token_logprobs

    device = next(policy.parameters()).device
    kls: list[float] = []
    for i in range(0, len(pairs), batch):
        ids, attn, resp = (t.to(device) for t in pack_rollouts(pairs[i : i + batch], pad_id))
        keep = logits_window(resp)
        logits, _ = policy(ids, attn, keep)
        lp = token_logprobs(logits, ids)
        ref = token_logprobs(policy.reference_logits(ids, attn, keep), ids)
        kls.extend(((lp - ref) * resp).sum(dim=1).tolist())
    return kls


def _conversations(prompts, replies):
    return [
        p + [{"role": "assistant", "content": r}] for p, r in zip(prompts, replies, strict=True)
    ]
