"""Which parameter-efficient method a stage trains, as PEFT's own config.

The seed document's four methods: LoRA (low-rank updates of every linear layer), IA3 (learned
rescaling of keys, values and the feed-forward activations; far fewer parameters), prompt tuning
(virtual tokens prepended to the input) and prefix tuning (virtual key/value prefixes in every
layer). The reward models are never served, so they may use any of them. What the SFT stage
trains is merged into the weights vLLM serves, so it must be mergeable: LoRA or IA3. PPO's policy
stays LoRA: vLLM samples the rollouts and serves a canary from a LoRA adapter, which it cannot do
for the others. A choice that cannot work is refused when the config is read, with the reason.
"""

from __future__ import annotations

from typing import Any

ADAPTERS = ("lora", "ia3", "prompt_tuning", "prefix_tuning")
MERGEABLE = ("lora", "ia3")
VIRTUAL_TOKENS = 16  # prompt and prefix tuning: the soft prompt's length


def adapter_problem(stage: str, kind: str) -> str | None:
    """Why `kind` cannot be the adapter of `stage` ('reward', 'sft', 'ppo'), or None."""
    if kind not in ADAPTERS:
        return f"{stage}.adapter must be one of {', '.join(ADAPTERS)}, got {kind!r}"
    if stage == "sft" and kind not in MERGEABLE:
        return (
            f"sft.adapter {kind!r} cannot be merged into the weights vLLM serves: use "
            f"{' or '.join(MERGEABLE)} (any of {', '.join(ADAPTERS)} works for the reward models)"
        )
    if stage == "ppo" and kind != "lora":
        return (
            f"ppo.adapter {kind!r}: the policy must be LoRA, the adapter vLLM samples rollouts "
            "and serves canaries from (other methods work for reward and sft)"
        )
    return None


def peft_config(kind: str, task_type: str, rank: int, alpha: int) -> Any:
    """PEFT's config for `kind` on a task ('SEQ_CLS' or 'CAUSAL_LM'); `rank`/`alpha` are LoRA's."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig

    if kind == "lora":
        return LoraConfig(
            task_type=task_type, r=rank, lora_alpha=alpha, target_modules="all-linear"
        )
    if kind == "ia3":  # peft knows each architecture's key, value and feed-forward modules
        return IA3Config(task_type=task_type)
    if kind == "prompt_tuning":
        return PromptTuningConfig(task_type=task_type, num_virtual_tokens=VIRTUAL_TOKENS)
    if kind == "prefix_tuning":
        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=VIRTUAL_TOKENS)
    raise ValueError(f"unknown adapter {kind!r}: use one of {', '.join(ADAPTERS)}")
