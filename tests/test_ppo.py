"""One PPO run on the tiny model, rollouts from the real vLLM engine, with a known reward."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignment.config import PPOConfig, preset
from alignment.ppo import PolicyWithValueHead, PPOTrainer, token_logprobs
from alignment.precision import attention_implementation
from alignment.rollouts import vllm_generate

PROMPTS = [
    [{"role": "user", "content": q}]
    for q in ("Why do things fall?", "What is photosynthesis?", "Say cheese in French.")
]


@pytest.mark.parametrize("advantage", ["rloo", "gae"])
def test_ppo_steps_move_lora_keep_base_and_reference(
    tiny_model_dir, tiny_engine_url, advantage, tmp_path
):
    config = replace(  # the `fast` preset's PPO, two rounds, a livelier adaptive KL
        preset("fast").ppo,
        advantage=advantage,
        steps=2,
        learning_rate=1e-2,
        init_kl_coef=0.2,
        target_kl=1.0,
        kl_horizon=100,
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = PolicyWithValueHead.from_base(str(tiny_model_dir), config)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}

    def score(conversations):  # the "voter" likes varied replies: distinct characters
        return torch.tensor([len(set(c[-1]["content"])) / 10 for c in conversations])

    trainer = PPOTrainer(
        policy, tokenizer, vllm_generate(tiny_engine_url, adapters_dir=tmp_path), score, config
    )
    seen = []
    history = trainer.train(PROMPTS, on_step=seen.append)
    assert seen == history and len(history) == 2

    # Before any update the adapter is a no-op (LoRA B = 0): policy == reference, KL exactly 0.
    assert history[0].kl == pytest.approx(0.0, abs=1e-4)
    assert history[0].beta == 0.2
    # The adaptive controller lowered beta (KL 0 is under the target) by its formula, counting
    # every rollout of the round: 4 prompts x 4 replies.
    assert history[1].beta == pytest.approx(0.2 * (1 - 0.2 * 16 / 100))
    assert all(1 <= s.updates <= 8 for s in history)  # 16 rollouts / minibatch 2, one epoch
    for s in history:
        assert all(torch.isfinite(torch.tensor(v)) for v in s.as_dict().values())
        assert 0.0 <= s.clip_frac <= 1.0 and s.entropy > 0

    changed = {n for n, p in policy.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and changed == trainable  # every LoRA matrix and the value head moved
    assert all("lora_" in n or "value_head" in n for n in changed)  # base weights frozen
    # the critic trains only for GAE; RLOO's baseline is the other replies to the same prompt
    assert any("value_head" in n for n in trainable) == (advantage == "gae")

    # The adapter-disabled model is exactly the original checkpoint: the free reference.
    original = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir,
        dtype=torch.float32,
        attn_implementation=attention_implementation(config.attention, "cpu"),
    )
    ids = tokenizer("Plants convert sunlight", return_tensors="pt")
    with torch.no_grad():
        with policy.autocast():  # same precision as the policy (bf16 matmuls where native)
            expected = original(**ids).logits.float()
        reference = policy.reference_logits(ids["input_ids"], ids["attention_mask"])
        current, _ = policy(ids["input_ids"], ids["attention_mask"])
    torch.testing.assert_close(reference, expected)
    assert not torch.allclose(current, expected)  # while the policy itself has moved


def test_trust_region_stops_a_round_once_the_policy_has_moved(
    tiny_model_dir, tiny_engine_url, tmp_path
):
    """With a (tiny) trust region every round stops after its first update: the next minibatch
    already sees a policy further than max_step_kl from the one that sampled it."""
    config = PPOConfig(
        steps=2, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=8, minibatch_size=1,
        ppo_epochs=2, learning_rate=1e-2, max_step_kl=1e-9,
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = PolicyWithValueHead.from_base(str(tiny_model_dir), config)

    def score(conversations):
        return torch.tensor([float(len(c[-1]["content"])) for c in conversations])

    history = PPOTrainer(
        policy, tokenizer, vllm_generate(tiny_engine_url, adapters_dir=tmp_path), score, config
    ).train(PROMPTS)
    assert [s.updates for s in history] == [1, 1]  # of 8 possible per round
    assert all(s.step_kl > 1e-9 for s in history)


def test_rloo_needs_several_replies_per_prompt(tiny_model_dir):
    config = PPOConfig(samples_per_prompt=1)
    policy = PolicyWithValueHead.from_base(str(tiny_model_dir), config)
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        PPOTrainer(policy, None, None, None, config)


def test_token_logprobs_align_with_next_token():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 10.0  # position 0 predicts token at position 1
    ids = torch.tensor([[1, 2, 3]])
    lp = token_logprobs(logits, ids)
    assert lp.shape == (1, 3) and lp[0, 0] == 0.0
    assert lp[0, 1].item() == pytest.approx(0.0, abs=1e-3)  # token 2 was near-certain
    assert lp[0, 2].item() == pytest.approx(torch.log(torch.tensor(0.25)).item())


def test_replies_cut_off_at_the_token_limit_are_penalised(tiny_model_dir):
    """The EOS trick: with equal scores, a reply that ran into max_new_tokens loses to one that
    finished, so the policy moves toward finishing (no engine needed: fixed rollouts)."""
    config = PPOConfig(
        steps=1, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=6, minibatch_size=4,
        ppo_epochs=4, learning_rate=5e-2, init_kl_coef=0.0, adaptive_kl=False,
        normalize_scores=False, missing_eos_penalty=1.0, max_step_kl=0.0, precision="fp32",
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tokenizer.apply_chat_template(
        PROMPTS[0], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    cut, finished = [40] * 6, [41, 41]  # same score; only the first ran out of tokens

    def generate(prompts, max_new_tokens, temperature, seed):
        return [(prompt, cut if i % 2 == 0 else finished) for i in range(len(prompts))]

    def score(conversations):
        return torch.zeros(len(conversations))

    policy = PolicyWithValueHead.from_base(str(tiny_model_dir), config)
    ids = torch.tensor([prompt], device=policy.value_head.weight.device)

    def first_token_logodds() -> float:
        with torch.no_grad():
            logits, _ = policy(ids, torch.ones_like(ids))
        return (logits[0, -1, 41] - logits[0, -1, 40]).item()

    before = first_token_logodds()
    (stats,) = PPOTrainer(policy, tokenizer, generate, score, config).train(PROMPTS[:1])
    assert stats.cut_off == 0.5
    assert first_token_logodds() > before + 0.1  # the finishing reply's first token gained


def test_replies_shorter_than_the_voted_ones_get_no_credit(tiny_model_dir):
    """A reply shorter than any voted one loses to one as long as they are, however much the
    reward models like it: their score means nothing there, so PPO must not drift into it (a
    fixed penalty under a score 5 higher, as here, let it)."""
    from alignment.support import ReplySupport

    config = PPOConfig(
        steps=1, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=8, minibatch_size=4,
        ppo_epochs=4, learning_rate=5e-2, init_kl_coef=0.0, adaptive_kl=False,
        normalize_scores=False, missing_eos_penalty=0.0, short_reply_penalty=1.0,
        max_step_kl=0.0, precision="fp32",
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tokenizer.apply_chat_template(
        PROMPTS[0], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    eos = tokenizer.eos_token_id
    long, short = [40, 42, 40, 42, 40, eos], [41, eos]  # 5 tokens and 1, the end not counted
    support = ReplySupport(shortest=4, quantile=0.05, replies=40)

    def generate(prompts, max_new_tokens, temperature, seed):
        return [(prompt, long if i % 2 == 0 else short) for i in range(len(prompts))]

    short_text = tokenizer.decode(short, skip_special_tokens=True)

    def score(conversations):  # the reward models love the short reply
        return torch.tensor([5.0 * (c[-1]["content"] == short_text) for c in conversations])

    policy = PolicyWithValueHead.from_base(str(tiny_model_dir), config)

    def reply_logprob(reply: list[int]) -> float:
        ids = torch.tensor([prompt + reply], device=policy.value_head.weight.device)
        with torch.no_grad():
            logits, _ = policy(ids, torch.ones_like(ids))
        return token_logprobs(logits, ids)[0, len(prompt) :].sum().item()

    before = reply_logprob(long) - reply_logprob(short)
    trainer = PPOTrainer(policy, tokenizer, generate, score, config, support)
    (stats,) = trainer.train(PROMPTS[:1])
    assert stats.short == 0.5
    assert reply_logprob(long) - reply_logprob(short) > before + 0.5  # the long reply gained


def test_bf16_base_weights_train_fp32_adapters(tiny_model_dir):
    """The GPU recipe's memory budget: frozen base weights in bf16 (half of fp32), LoRA and
    its optimiser state in fp32, and a PPO round still moves the adapter. Run here on the CPU
    with `base_weights: bf16`; on a GPU 'auto' chooses it."""
    config = PPOConfig(
        steps=1, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=4, minibatch_size=4,
        ppo_epochs=1, learning_rate=1e-2, base_weights="bf16", max_step_kl=0.0,
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tokenizer.apply_chat_template(
        PROMPTS[0], add_generation_prompt=True, return_dict=True
    )["input_ids"]

    def generate(prompts, max_new_tokens, temperature, seed):
        return [(prompt, [40 + i % 3, 41]) for i in range(len(prompts))]

    def score(conversations):
        return torch.arange(len(conversations), dtype=torch.float32)

    policy = PolicyWithValueHead.from_base(str(tiny_model_dir), config)
    frozen = {p.dtype for n, p in policy.lm.named_parameters() if "lora_" not in n}
    adapters = {n: p.detach().clone() for n, p in policy.lm.named_parameters() if "lora_B" in n}
    assert frozen == {torch.bfloat16}
    assert {p.dtype for p in adapters.values()} == {torch.float32}
    (stats,) = PPOTrainer(policy, tokenizer, generate, score, config).train(PROMPTS[:1])
    assert stats.updates >= 1
    moved = [
        n for n, p in policy.lm.named_parameters() if n in adapters and not p.equal(adapters[n])
    ]
    assert moved, "no LoRA matrix moved"


def test_logits_only_where_replies_are_give_the_same_logprobs(tiny_model_dir):
    """The PPO passes compute vocabulary-sized logits only from the position before the
    earliest reply token: every reply token's log-prob (policy and reference) and the entropy
    are what the full logits give."""
    from alignment.ppo import logits_window, pack_rollouts
    from alignment.ppo_math import entropy_from_logits

    policy = PolicyWithValueHead.from_base(str(tiny_model_dir), PPOConfig(precision="fp32"))
    torch.manual_seed(0)
    for p in policy.lm.parameters():  # a moved adapter, so policy and reference differ
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    pairs = [
        ([5, 6, 7, 8, 9, 10], [11, 12, 13]),
        ([5, 6, 7], [20, 21, 22, 23, 24]),
        ([5] * 9, [30]),
    ]
    device = policy.value_head.weight.device
    ids, attn, mask = (t.to(device) for t in pack_rollouts(pairs, 0))
    keep = logits_window(mask)
    assert keep == ids.shape[1] - 2  # from the position before the earliest reply token (3)
    with torch.no_grad():
        full, values_full = policy(ids, attn)
        window, values = policy(ids, attn, keep)
        ref_full = token_logprobs(policy.reference_logits(ids, attn), ids) * mask
        ref = token_logprobs(policy.reference_logits(ids, attn, keep), ids) * mask
    assert window.shape[1] == keep < full.shape[1]
    torch.testing.assert_close(token_logprobs(window, ids) * mask, token_logprobs(full, ids) * mask)
    torch.testing.assert_close(ref, ref_full)
    torch.testing.assert_close(values, values_full)
    ent_mask = torch.nn.functional.pad(mask[:, 1:], (0, 1))
    torch.testing.assert_close(
        entropy_from_logits(window, ent_mask[:, -keep:]), entropy_from_logits(full, ent_mask)
    )


def test_an_unjudged_rollout_scores_under_every_judged_one():
    from alignment.ppo import unjudged_last

    shaped = torch.tensor([0.5, 9.0, -2.0, 1.0])
    outside = torch.tensor([0.0, 1.0, 0.0, 0.0])
    assert unjudged_last(shaped, outside, 1.0).tolist() == [0.5, -3.0, -2.0, 1.0]
    assert unjudged_last(shaped, outside, 0.0).tolist() == shaped.tolist()  # disabled
    assert unjudged_last(shaped, torch.zeros(4), 1.0).tolist() == shaped.tolist()
    assert unjudged_last(shaped, torch.ones(4), 1.0).tolist() == [-3.0] * 4  # none judged
