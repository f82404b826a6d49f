"""The seed document's PEFT methods beyond LoRA, on the tiny model: every one trains a reward
model that learns the preference, each with its own (much smaller) number of trainable
parameters; IA3 trains an SFT stage whose result merges into an ordinary checkpoint."""

from __future__ import annotations

import pytest

from alignment.config import RewardConfig, SFTConfig
from alignment.reward_model import train_reward_model
from alignment.sft import train_sft
from tests.test_reward_model import synthetic_preferences


def test_every_peft_method_trains_a_reward_model_that_learns(tiny_model_dir, tmp_path):
    records = synthetic_preferences(40)
    trainable = {}
    for kind, lr in (
        ("lora", 5e-3),
        ("ia3", 5e-3),
        ("prompt_tuning", 3e-2),
        ("prefix_tuning", 3e-2),
    ):
        config = RewardConfig(
            adapter=kind, learning_rate=lr, epochs=3, batch_size=8, max_length=256,
            heldout_fraction=0.25, ensemble=1,
        )  # fmt: skip
        result = train_reward_model(str(tiny_model_dir), records, tmp_path / kind, config)
        assert result.adapter == kind
        assert result.heldout_accuracy >= 0.75, (kind, result.heldout_accuracy)
        trainable[kind] = result.trainable_parameters
    # every method trains the score head; beyond it, prompt tuning trains 16 virtual tokens,
    # prefix tuning 16 keys and values per layer, IA3 a scaling vector per adapted module, LoRA
    # two low-rank matrices per linear layer (which of the first three is smallest depends on
    # the model's shape: bench/RESULTS.md has SmolLM2's)
    others = [trainable[k] for k in ("ia3", "prompt_tuning", "prefix_tuning")]
    assert max(others) < trainable["lora"] / 4, trainable


def test_ia3_sft_merges_into_a_checkpoint(tiny_model_dir, tmp_path):
    records = [
        {
            "prompt": [{"role": "user", "content": f"Question {i}?"}],
            "completion": [{"role": "assistant", "content": "Plants convert sunlight."}],
        }
        for i in range(16)
    ]
    config = SFTConfig(enabled=True, adapter="ia3", learning_rate=5e-2, epochs=2)
    result = train_sft(str(tiny_model_dir), records, tmp_path / "sft", config)
    assert result["loss_after"] < result["loss_before"]
    assert (tmp_path / "sft" / "merged" / "model.safetensors").exists()


def test_an_unmergeable_policy_adapter_is_refused_with_the_reason():
    from alignment.config import cycle_config

    with pytest.raises(ValueError, match="cannot be merged into the weights vLLM serves"):
        cycle_config("fast", {"sft": {"adapter": "prefix_tuning"}})
    assert cycle_config("fast", {"reward": {"adapter": "prefix_tuning"}}).reward.adapter == (
        "prefix_tuning"
    )
