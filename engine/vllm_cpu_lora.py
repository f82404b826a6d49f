"""LoRA kernels for vLLM's CPU build: one matrix product per adapter instead of a copy of the
adapter's weights per token, and no adapter at all for tokens that asked for none.

vLLM 0.32's CPU runner applies LoRA with PyTorch-native "punica" ops that gather every token's
adapter matrices into a (tokens, out, rank) tensor and contract it with `einsum`. For a PPO
round on SmolLM2 (32 replies of 64 tokens) that made sampling from the adapter 3.6x slower than
from the base weights (20 s against 5.5 s, bench/RESULTS.md), most of a cycle's rollout time.
Requests for the base weights paid too: with LoRA enabled every decode step ran the same
gathers for them (on an empty slot), and sampling from the base weights was 1.33x slower.

These replacements compute what the originals' docstrings say (y += x @ A * scale, y += x @ B,
in the same dtypes) with one product per adapter slot in the batch, and add nothing for the
tokens that asked for no adapter (index -1, which vLLM's torch ops read as the last slot: zero
as long as that slot is empty).

They are installed in every vLLM process by a `vllm.general_plugins` entry point (pyproject.toml),
on the CPU platform only; `VLLM_PLUGINS` (vLLM's allow-list) can leave them out. Only torch is
imported here: the engine's processes load this module.
"""

from __future__ import annotations

import logging

import torch

NO_ADAPTER = -1


def _per_slot(
    inputs: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """(rows, out): each token's inputs times its slot's (out, in) matrix, in `dtype`; zero
    for the tokens with no adapter."""
    if weights.dim() == 4:  # (slots, 1, out, in)
        weights = weights.squeeze(1)
    inputs = inputs.to(dtype)
    rows, out_features = inputs.shape[0], weights.shape[1]
    if rows == 0:
        return inputs.new_zeros(0, out_features)
    low, high = int(slots.min()), int(slots.max())
    if low == high:  # one adapter for the whole batch (every PPO rollout), or none at all
        if low == NO_ADAPTER:
            return inputs.new_zeros(rows, out_features)
        return inputs @ weights[low].to(dtype).T
    outputs = inputs.new_zeros(rows, out_features)
    for slot in slots.unique().tolist():
        if slot == NO_ADAPTER:
            continue
        picked = (slots == slot).nonzero().squeeze(1)
        outputs[picked] = inputs[picked] @ weights[slot].to(dtype).T
    return outputs


def _exploded(slots: torch.Tensor, seq_lengths: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(slots, seq_lengths)


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_a_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    outputs = _per_slot(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    outputs = _per_slot(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1  # as vLLM's op: one row of output for a batch of one
    # the adapter and the model may pad their outputs differently
    common = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    outputs = _per_slot(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    target = output_tensor[:, slice_offset : slice_offset + slice_size]
    if add_inputs:
        target += outputs
    else:
        target.copy_(outputs)


def sgmv_shrink(
    inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
    lora_indices_tensor, batches, max_seq_length, token_nums, scaling,
) -> None:  # fmt: skip
    slots = _exploded(lora_indices_tensor, seq_len_tensor)
    bgmv_shrink(inputs, lora_a_weights, output_tensor, slots, scaling)


def sgmv_expand(
    inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
    lora_indices_tensor, batches, max_seq_length, token_nums, add_inputs=False,
) -> None:  # fmt: skip
    slots = _exploded(lora_indices_tensor, seq_len_tensor)
    bgmv_expand(inputs, lora_b_weights, output_tensor, slots, add_inputs)


def sgmv_expand_slice(
    inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
    lora_indices_tensor, batches, max_seq_length, token_nums, slice_offset, slice_size,
    add_inputs=False,
) -> None:  # fmt: skip
    slots = _exploded(lora_indices_tensor, seq_len_tensor)
    bgmv_expand_slice(
        inputs, lora_b_weights, output_tensor, slots, slice_offset, slice_size, add_inputs
    )


OPS = (
    "bgmv_shrink",
    "bgmv_expand",
    "bgmv_expand_slice",
    "sgmv_shrink",
    "sgmv_expand",
    "sgmv_expand_slice",
)


def register() -> None:
    """vLLM general plugin: on the CPU platform, point its CPU LoRA wrapper at these ops.
    Loaded once per vLLM process; harmless to run twice."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.lora.punica_wrapper import punica_cpu

    here = globals()
    replaced = [name for name in OPS if hasattr(punica_cpu, name)]
    for name in replaced:
        setattr(punica_cpu, name, here[name])
    # under vLLM's logger, so the line lands in the engine's log
    logging.getLogger("vllm.assistant_cpu_lora").info(
        "CPU LoRA ops from engine.vllm_cpu_lora: %s", ", ".join(replaced)
    )
