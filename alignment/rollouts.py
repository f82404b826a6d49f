"""Rollouts for PPO from the serving vLLM engine (OpenAI-compatible server), with token ids.

vLLM returns the exact prompt and response token ids (`return_token_ids`), so the trainer scores
precisely the tokens that were sampled, with no re-tokenisation drift.

On-policy: after each PPO update the trainer `publish`es its LoRA adapter; when the engine runs
with `--enable-lora` (the embedded one does) it is loaded under a fresh name and the next
rollouts sample the current policy, while users keep being served the base weights. Without
LoRA support the rollouts stay on the serving weights (off-policy) and `on_policy` says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import httpx

from engine.http import async_client
from engine.http import client as engine_client

log = logging.getLogger(__name__)
_names = itertools.count()

# prompts (chat messages) -> [(prompt_token_ids, response_token_ids)], one per prompt
GenerateFn = Callable[
    [list[list[dict[str, str]]], int, float, int], list[tuple[list[int], list[int]]]
]


@runtime_checkable
class Rollouts(Protocol):
    """What PPO and the gate sample from: a `GenerateFn` that may follow the policy."""

    on_policy: bool  # did the last rollouts come from the current adapter?

    def __call__(
        self,
        prompts: list[list[dict[str, str]]],
        max_new_tokens: int,
        temperature: float,
        seed: int,
    ) -> list[tuple[list[int], list[int]]]: ...

    def publish(self, peft_model) -> bool:
        """Sample the next rollouts from this adapter; False if that cannot be done."""
        ...

    def reset(self) -> None:
        """Back to the serving weights (the gate compares against them)."""
        ...

    def stay_off_policy(self) -> None:
        """Never follow the policy from now on (after SFT the engine serves other weights)."""
        ...


@dataclass
class FixedRollouts:
    """A plain sampling function as `Rollouts` that always samples the same weights (tests,
    diagnostics, a server without LoRA)."""

    generate: GenerateFn
    on_policy: bool = False

    def __call__(self, prompts, max_new_tokens, temperature, seed):
        return self.generate(prompts, max_new_tokens, temperature, seed)

    def publish(self, peft_model) -> bool:
        return False

    def reset(self) -> None:
        pass

    def stay_off_policy(self) -> None:
        pass


def as_rollouts(generate: Rollouts | GenerateFn) -> Rollouts:
    return generate if isinstance(generate, Rollouts) else FixedRollouts(generate)


class VLLMRollouts:
    """`Rollouts` from the engine: one chat request per prompt, concurrently (vLLM batches
    them), on-policy through runtime-loaded LoRA adapters where the engine allows."""

    def __init__(
        self,
        base_url: str,
        model_name: str = "policy",
        timeout_s: float = 600.0,
        lora: bool = True,
        *,
        adapters_dir: Path,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model_name = model_name
        self.timeout_s = timeout_s
        self.lora = lora
        self.current: str | None = None  # loaded adapter name, None = serving weights
        self.on_policy = False
        # where the adapters the engine loads are written: a cycle's job folder, which the app
        # owns and cleans, not /tmp, where a cycle's would outlive it
        self._dir = adapters_dir

    def __call__(self, prompts, max_new_tokens, temperature, seed):
        return asyncio.run(self._all(prompts, max_new_tokens, temperature, seed))

    async def _all(self, prompts, max_new_tokens, temperature, seed):
        model = self.current or self.model_name
        async with async_client(self.base_url, timeout=self.timeout_s) as client:

            async def one(i, messages):
                r = await client.post(
                    "/v1/chat/completions",
                    json={
                        "model": model,
                        "messages": messages,
                        "max_tokens": max_new_tokens,
                        "temperature": temperature,
                        "seed": seed + i,
                        "return_token_ids": True,
                    },
                )
                r.raise_for_status()
                body = r.json()
                return body["prompt_token_ids"], body["choices"][0]["token_ids"]

            return await asyncio.gather(*(one(i, m) for i, m in enumerate(prompts)))

    def publish(self, peft_model) -> bool:
        """Sample the next rollouts from this adapter; False if the engine cannot load it."""
        if not self.lora:
            return False
        name = f"ppo-{next(_names)}-{id(self) % 100000}"
        path = self._dir / name
        self._dir.mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(path)
        try:
            with engine_client(self.base_url, timeout=120) as http:
                r = http.post(
                    "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}
                )
        except httpx.HTTPError:
            r = None
        if r is None or r.status_code != 200:
            log.warning(
                "the engine could not load the PPO adapter (%s); rollouts stay "
                "off-policy on the serving weights",
                None if r is None else r.text[:200],
            )
            self.lora = False
            shutil.rmtree(path, ignore_errors=True)
            return False
        self.reset()
        self.current, self.on_policy = name, True
        return True

    def stay_off_policy(self) -> None:
        self.reset()
        self.lora = False

    def reset(self) -> None:
        """Back to the serving weights (unload the adapter)."""
        if self.current is not None:
            with contextlib.suppress(httpx.HTTPError), engine_client(self.base_url) as http:
                http.post("/v1/unload_lora_adapter", json={"lora_name": self.current}, timeout=60)
            shutil.rmtree(self._dir / self.current, ignore_errors=True)
            self.current = None


def vllm_generate(
    base_url: str,
    model_name: str = "policy",
    timeout_s: float = 600.0,
    lora: bool = True,
    *,
    adapters_dir: Path,
) -> VLLMRollouts:
    return VLLMRollouts(base_url, model_name, timeout_s, lora, adapters_dir=adapters_dir)
