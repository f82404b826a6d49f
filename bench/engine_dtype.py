"""The embedded engine's weight dtype on this CPU: bfloat16 against float32, in one run.

bf16 is fast only where the CPU computes it (AVX-512-BF16, AMX); elsewhere vLLM's CPU build falls
back to emulated bf16 matmuls ("Failed to create oneDNN linear" in its log). `EngineConfig.dtype`
`auto` picks by the CPU's flags (`engine.vllm_server.engine_dtype`); this measures what the
choice is worth: decode tokens/s for 1 and for 8 concurrent prompts of 2 replies x 64 forced
tokens, each dtype on a fresh engine.

Run: `.venv/bin/python -m bench.engine_dtype` (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from assistant.config import EngineConfig
from engine.hardware import cpu_has_bf16
from engine.http import async_client
from engine.vllm_server import EmbeddedVLLMServer

REPO = Path(__file__).resolve().parents[1]
TOKENS = 64


async def tokens_per_second(url: str) -> dict[str, float]:
    async with async_client(url, timeout=600) as client:

        async def reply(i: int) -> None:
            r = await client.post(
                "/v1/chat/completions",
                json={
                    "model": "policy",
                    "messages": [{"role": "user", "content": f"Tell me about topic {i}."}],
                    "max_tokens": TOKENS, "n": 2, "temperature": 1.0, "ignore_eos": True,
                    "seed": i,
                },
            )  # fmt: skip
            r.raise_for_status()

        await reply(99)  # warm-up
        start = time.perf_counter()
        await reply(0)
        one = time.perf_counter() - start
        start = time.perf_counter()
        await asyncio.gather(*(reply(i) for i in range(8)))
        eight = time.perf_counter() - start
    return {"1_prompt_tok_s": 2 * TOKENS / one, "8_prompts_tok_s": 16 * TOKENS / eight}


def measure(model: str, dtype: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        engine = EmbeddedVLLMServer(model, EngineConfig(dtype=dtype), Path(tmp) / "engine.log")
        engine.start()
        try:
            engine.wait_ready()
            return asyncio.run(tokens_per_second(engine.url))
        finally:
            engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "data/models/SmolLM2-135M-Instruct"))
    args = parser.parse_args()
    bf16, fp32 = measure(args.model, "bfloat16"), measure(args.model, "float32")
    print(
        json.dumps(
            {
                "cpu_has_bf16": cpu_has_bf16(),
                "bfloat16": bf16,
                "float32": fp32,
                "float32_over_bfloat16": {k: fp32[k] / bf16[k] for k in bf16},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
