"""Rollouts for PPO from the serving vLLM engine (OpenAI-compatible server), with token ids.

vLLM returns the exact prompt and response token ids (`return_token_ids`), so the trainer scores
precisely the tokens that were sampled, with no re-tokenisation drift.
"""

from __future__ import annotations

import asyncio

import httpx


def vllm_generate(base_url: str, model_name: str = "policy", timeout_s: float = 600.0):
    """A `GenerateFn` that sends one chat request per prompt, concurrently (vLLM batches them)."""

    async def _all(prompts, max_new_tokens, temperature, seed):
        async with httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout_s) as client:

            async def one(i, messages):
                r = await client.post(
                    "/v1/chat/completions",
                    json={
                        "model": model_name,
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

    def generate(prompts, max_new_tokens, temperature, seed):
        return asyncio.run(_all(prompts, max_new_tokens, temperature, seed))

    return generate
