"""Generation benchmark on the embedded default (or any --model).

1. Time to two complete candidates through the app's JSON API (`POST /api/chat`), p50/p95, for
   1 user and for 8 concurrent users.
2. Tokens/s of vLLM against plain transformers `generate` on the same model, prompts and sampling
   (n=2 per prompt, fixed length via ignore_eos / min_new_tokens), at 1 and 8 concurrent prompts,
   as ratios measured in one run.

Run: `.venv/bin/python -m bench.generation` (about 6 minutes on 2 cores). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from assistant.config import EngineConfig
from engine.vllm_server import EmbeddedVLLMServer
from harness.app_process import MANY_USERS_ON_ONE_ADDRESS, AppProcess

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Explain gravity to a 5-year-old.",
    "What is photosynthesis?",
    "Give me three tips for learning to cook.",
    "Write a short poem about the sea.",
    "How do I make a cup of tea?",
    "Why is the sky blue?",
    "Translate 'cheese' to French and use it in a sentence.",
    "What should I pack for a weekend hike?",
]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def api_latencies(url: str, users: int, turns_per_user: int) -> list[float]:
    async def user(client: httpx.AsyncClient, u: int) -> list[float]:
        out, conv = [], None
        for t in range(turns_per_user):
            body = {"message": PROMPTS[(u + t) % len(PROMPTS)]}
            if conv:
                body["conversation_id"] = conv
            start = time.perf_counter()
            r = await client.post(url + "/api/chat", json=body)
            out.append(time.perf_counter() - start)
            r.raise_for_status()
            conv = r.json()["conversation_id"]
            await client.post(
                url + "/api/vote", json={"pair_id": r.json()["pair_id"], "choice": "a"}
            )
        return out

    async with httpx.AsyncClient(timeout=600) as client:
        results = await asyncio.gather(*(user(client, u) for u in range(users)))
    return [x for r in results for x in r]


async def vllm_tokens_per_s(url: str, concurrency: int, max_tokens: int) -> float:
    body = {
        "model": "policy",
        "n": 2,
        "temperature": 0.8,
        "top_p": 0.95,
        "max_tokens": max_tokens,
        "ignore_eos": True,
    }

    async def one(client, i):
        r = await client.post(
            url + "/v1/chat/completions",
            json={**body, "seed": i, "messages": [{"role": "user", "content": PROMPTS[i]}]},
        )
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600) as client:
        await one(client, 0)  # warm-up
        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(client, i) for i in range(concurrency))))
        return tokens / (time.perf_counter() - start)


def transformers_tokens_per_s(model_dir: str, concurrency: int, max_tokens: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in PROMPTS[:concurrency]
    ]
    batch = tok(texts, return_tensors="pt", padding=True)
    kwargs = dict(
        do_sample=True,
        temperature=0.8,
        top_p=0.95,
        max_new_tokens=max_tokens,
        min_new_tokens=max_tokens,
        num_return_sequences=2,
        pad_token_id=tok.pad_token_id,
    )
    with torch.inference_mode():
        model.generate(
            **tok(texts[:1], return_tensors="pt"),
            **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4},
        )
        start = time.perf_counter()
        out = model.generate(**batch, **kwargs)
        elapsed = time.perf_counter() - start
    generated = (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]
    return generated / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(REPO / "data/models/SmolLM2-135M-Instruct"))
    parser.add_argument("--turns", type=int, default=6, help="turns for the 1-user case")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens/s comparison length")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        engine = EmbeddedVLLMServer(args.model, EngineConfig(), Path(tmp) / "engine.log")
        engine.start()
        engine.wait_ready()
        app = AppProcess(
            ["--vllm-url", engine.url, "--no-cai", *MANY_USERS_ON_ONE_ADDRESS], Path(tmp) / "app"
        ).start()
        try:
            lat1 = asyncio.run(api_latencies(app.url, 1, args.turns))
            lat8 = asyncio.run(api_latencies(app.url, 8, 2))
            v1 = asyncio.run(vllm_tokens_per_s(engine.url, 1, args.max_tokens))
            v8 = asyncio.run(vllm_tokens_per_s(engine.url, 8, args.max_tokens))
        finally:
            app.stop()
            engine.stop()
    t1 = transformers_tokens_per_s(args.model, 1, args.max_tokens)
    t8 = transformers_tokens_per_s(args.model, 8, args.max_tokens)

    print("| users | turns | p50 s | p95 s |\n|---|---|---|---|")
    for users, lat in ((1, lat1), (8, lat8)):
        print(f"| {users} | {len(lat)} | {statistics.median(lat):.2f} | {pct(lat, 0.95):.2f} |")
    print("\n| concurrent prompts (x2 candidates) | vLLM tok/s | transformers tok/s | ratio |")
    print("|---|---|---|---|")
    for c, v, t in ((1, v1, t1), (8, v8, t8)):
        print(f"| {c} | {v:.1f} | {t:.1f} | {v / t:.2f}x |")


if __name__ == "__main__":
    main()
