"""The frozen bottom of the reward models, run once per conversation and shared.

With LoRA on the top `reward.lora_layers` blocks only, the blocks below are the base model's,
the same for every ensemble member, every epoch and every scoring pass. Recomputing them is
half a step's forward pass with the top half adapted (on SmolLM2, top 15 of 30 blocks, a step
took 2.1 s with this cache against 3.5 s adapting every block: bench/RESULTS.md). This cache
keeps each conversation's hidden state after the frozen blocks, keyed by its token ids, so:

- training: the first epoch of the first member computes the bottom once per conversation;
  later epochs and the other members (bootstrap resamples of the same votes) only run the top;
- scoring: a batch runs the bottom once and every member's top on it.

It is exact, not an approximation, under two conditions it checks on every call: right
padding (a real token never attends to a pad, so its state does not depend on the batch) and
no KV cache (generation). Otherwise it runs the blocks as usual. The bottom blocks must be
frozen and dropout-free (true of a LoRA target range on Llama-style models; TRL's reward
trainer also disables dropout).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer stack (embeddings and blocks) inside a (PEFT-wrapped) model."""
    for module in model.modules():
        if hasattr(module, "embed_tokens") and isinstance(
            getattr(module, "layers", None), torch.nn.ModuleList
        ):
            return module
    raise ValueError(f"no decoder stack with embed_tokens and layers in {type(model).__name__}")


class TrunkCache:
    """Hidden states after the first `bottom` blocks, one per token sequence."""

    def __init__(self, bottom: int) -> None:
        if bottom < 1:
            raise ValueError(f"a trunk cache needs at least one frozen block, got {bottom}")
        self.bottom = bottom
        self.states: dict[tuple[int, ...], torch.Tensor] = {}
        self.computed = 0  # sequences whose bottom states were stored
        self.reused = 0  # sequences served from the cache

    def clear(self) -> None:
        self.states.clear()

    def install(self, model: torch.nn.Module) -> None:
        """Route `model`'s bottom blocks through this cache (several models may share it: the
        bottom blocks must then be the same frozen weights)."""
        decoder = decoder_of(model)
        blocks = list(decoder.layers[: self.bottom])
        if len(blocks) < self.bottom or len(decoder.layers) <= self.bottom:
            raise ValueError(
                f"a trunk of {self.bottom} blocks leaves nothing to train in "
                f"{len(decoder.layers)} blocks"
            )
        if any(p.requires_grad for block in blocks for p in block.parameters()):
            raise ValueError("the cached bottom blocks must be frozen (adapt only the top ones)")
        originals = [block.forward for block in blocks]
        batch: dict[str, list[tuple[int, ...]] | None] = {"keys": None}

        def remember_tokens(module, args, kwargs) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            cacheable = ids is not None and kwargs.get("past_key_values") is None
            batch["keys"] = _sequence_keys(ids, kwargs.get("attention_mask")) if cacheable else None

        decoder.register_forward_pre_hook(remember_tokens, with_kwargs=True)
        for block in blocks[:-1]:
            block.forward = _passes_through
        blocks[-1].forward = self._lookup(originals, batch)

    def _lookup(
        self, originals: list[Callable], batch: dict[str, list[tuple[int, ...]] | None]
    ) -> Callable:
        def run_bottom(hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
            keys = batch["keys"]
            if keys is None:  # not cacheable (left padding, generation): the usual blocks
                for forward in originals:
                    hidden_states = forward(hidden_states, **kwargs)
                return hidden_states
            if any(key not in self.states for key in keys):
                with torch.no_grad():
                    for forward in originals:
                        hidden_states = forward(hidden_states, **kwargs)
                for key, row in zip(keys, hidden_states, strict=True):
                    if key not in self.states:
                        self.states[key] = row[: len(key)].detach()
                        self.computed += 1
                return hidden_states
            self.reused += len(keys)
            first = self.states[keys[0]]
            out = first.new_zeros((len(keys), hidden_states.shape[1], first.shape[-1]))
            for i, key in enumerate(keys):
                out[i, : len(key)] = self.states[key]
            return out

        return run_bottom


def _passes_through(hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    return hidden_states


def _sequence_keys(
    ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> list[tuple[int, ...]] | None:
    """Each row's real tokens, or None where the batch is not right-padded."""
    if attention_mask is None:
        return [tuple(row.tolist()) for row in ids]
    lengths = attention_mask.sum(dim=1)
    positions = torch.arange(ids.shape[1], device=ids.device)[None, :]
    if not torch.equal(attention_mask.bool(), positions < lengths[:, None]):
        return None
    return [tuple(row[:n].tolist()) for row, n in zip(ids, lengths.tolist(), strict=True)]
