"""The alignment math against hand-computed values (the seed's worked examples among them)."""

from __future__ import annotations

import math

import pytest
import torch

from alignment.kl_controller import AdaptiveKLController
from alignment.losses import bradley_terry_loss, kl_regularised_objective, preference_accuracy
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
from alignment.stats import wilson_interval


def test_bradley_terry_seed_example_gap_2_8_gives_0_059():
    loss = bradley_terry_loss(torch.tensor([2.3]), torch.tensor([-0.5]))
    assert loss.item() == pytest.approx(0.059, abs=5e-4)
    # Closer scores -> higher loss; reversed order -> much higher.
    assert bradley_terry_loss(torch.tensor([0.1]), torch.tensor([0.0])) > loss
    assert bradley_terry_loss(torch.tensor([-0.5]), torch.tensor([2.3])).item() == pytest.approx(
        2.8 + 0.059, abs=5e-3
    )


def test_preference_accuracy_counts_ordered_pairs():
    acc = preference_accuracy(
        torch.tensor([1.0, 0.0, 2.0, 1.0]), torch.tensor([0.0, 1.0, 1.0, 1.0])
    )
    assert acc == 0.5


def test_ppo_objective_seed_example_is_1_63():
    j = kl_regularised_objective(
        torch.tensor(1.8), torch.tensor(math.log(0.07)), torch.tensor(math.log(0.03)), beta=0.2
    )
    assert j.item() == pytest.approx(1.63, abs=5e-3)


def test_per_token_kl_rewards_sum_to_the_sequence_objective():
    # Three response tokens whose log-ratios add up to log(0.07/0.03); one padding position.
    total = math.log(0.07 / 0.03)
    logp = torch.tensor([[-0.1, -0.2, -0.3, -9.0]])
    ref = logp - torch.tensor([[total / 2, total / 4, total / 4, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    rewards, kl = kl_penalised_rewards(torch.tensor([1.8]), logp, ref, mask, beta=0.2)
    assert rewards.sum().item() == pytest.approx(1.63, abs=5e-3)
    assert rewards[0, 3].item() == 0.0 and kl[0, 3].item() == 0.0  # padding carries nothing
    assert rewards[0, 2].item() == pytest.approx(1.8 - 0.2 * total / 4)  # score on last token


def test_score_lands_on_last_response_token_after_a_prompt():
    # Prompt positions 0-1, response 2-3, padding 4: the score belongs at position 3.
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]])
    zeros = torch.zeros(1, 5)
    rewards, _ = kl_penalised_rewards(torch.tensor([2.0]), zeros, zeros, mask, beta=0.2)
    assert rewards[0].tolist() == [0.0, 0.0, 0.0, 2.0, 0.0]


def test_gae_matches_hand_computation_and_ignores_padding():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 7.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 3.0]])  # last position is padding junk
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # d2 = 1 - 0.7 = 0.3; d1 = 0.7 - 0.6 = 0.1; d0 = 0.6 - 0.5 = 0.1
    # A2 = 0.3; A1 = 0.1 + 0.95*0.3 = 0.385; A0 = 0.1 + 0.95*0.385 = 0.46575
    assert adv[0].tolist() == pytest.approx([0.46575, 0.385, 0.3, 0.0])
    assert ret[0, :3].tolist() == pytest.approx([0.96575, 0.985, 1.0])


def test_whiten_uses_only_real_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = whiten(x, mask)
    assert w[0, :3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-4)  # unbiased std = 1
    assert w[0, 3].item() == 0.0


def test_clipped_policy_loss_is_pessimistic():
    old = torch.zeros(1, 2)
    new = torch.full((1, 2), 0.5)  # ratio e^0.5 = 1.6487, outside 1 +- 0.2
    mask = torch.ones(1, 2)
    loss, frac = clipped_policy_loss(new, old, torch.ones(1, 2), mask, clip_range=0.2)
    assert loss.item() == pytest.approx(-1.2) and frac.item() == 1.0  # positive A: clipped
    loss, frac = clipped_policy_loss(new, old, -torch.ones(1, 2), mask, clip_range=0.2)
    assert loss.item() == pytest.approx(math.exp(0.5)) and frac.item() == 0.0


def test_clipped_value_loss():
    loss = clipped_value_loss(
        torch.tensor([[1.0]]),
        torch.tensor([[0.0]]),
        torch.tensor([[1.0]]),
        torch.ones(1, 1),
        clip_range=0.2,
    )
    assert loss.item() == pytest.approx(0.5 * 0.8**2)  # clipped prediction 0.2 vs return 1


def test_entropy_of_uniform_is_log_vocab():
    logits = torch.zeros(2, 3, 10)
    assert entropy_from_logits(logits, torch.ones(2, 3)).item() == pytest.approx(math.log(10))


def test_adaptive_kl_controller_moves_toward_target():
    ctl = AdaptiveKLController(value=0.2, target=6.0, horizon=10000)
    assert ctl.update(current_kl=12.0, n_steps=256) == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000))
    ctl = AdaptiveKLController(value=0.2, target=6.0, horizon=10000)
    assert ctl.update(current_kl=3.0, n_steps=256) == pytest.approx(0.2 * (1 - 0.2 * 256 / 10000))


def test_leave_one_out_baseline_is_the_mean_of_the_other_replies():
    returns = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0])  # two prompts, three replies each
    adv = leave_one_out_advantages(returns, 3)
    # 1 - (2+3)/2 = -1.5; 2 - 2 = 0; 3 - 1.5 = 1.5; 6 - 0 = 6; 0 - 3 = -3 (twice)
    assert adv.tolist() == [-1.5, 0.0, 1.5, 6.0, -3.0, -3.0]
    assert leave_one_out_advantages(torch.tensor([4.0, 4.0]), 2).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out_advantages(returns, 1)


def test_approx_kl_is_zero_for_the_same_policy_and_grows_with_the_change():
    old = torch.log(torch.tensor([[0.5, 0.25, 0.9]]))
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert approx_kl(old, old, mask) == 0.0
    new = torch.log(torch.tensor([[0.25, 0.25, 0.1]]))  # the padded position must not count
    # token 0: ratio 0.5 -> 0.5 - 1 - log 0.5 = 0.1931; token 1: 0; mean 0.0966
    assert approx_kl(new, old, mask) == pytest.approx(0.0966, abs=1e-4)


def test_wilson_interval_against_hand_values():
    lo, hi = wilson_interval(7, 10)
    assert (lo, hi) == (pytest.approx(0.3968, abs=1e-4), pytest.approx(0.8922, abs=1e-4))
    lo, hi = wilson_interval(0, 5)
    assert lo == 0.0 and hi == pytest.approx(0.4345, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_precision_setting_is_checked_and_fp32_means_no_autocast():
    from alignment.precision import autocast, use_bf16

    assert use_bf16("fp32", "cpu") is False and use_bf16("bf16", "cpu") is True
    with pytest.raises(ValueError, match="precision must be one of"):
        use_bf16("half", "cpu")
    with autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast("bf16", "cpu"):
        y = torch.nn.Linear(4, 4)(torch.ones(2, 4))
    assert y.dtype == torch.bfloat16  # matmuls ran in bf16; the weights stay fp32


def test_attention_setting_is_checked_and_auto_picks_the_kernel_by_device():
    from alignment.precision import attention_implementation

    assert attention_implementation("auto", "cpu") == "eager"
    assert attention_implementation("auto", "cuda") == "sdpa"
    assert attention_implementation("sdpa", "cpu") == "sdpa"
    with pytest.raises(ValueError, match="attention must be one of"):
        attention_implementation("flash", "cpu")
