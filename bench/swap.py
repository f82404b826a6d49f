"""Hot-swap alternatives on the embedded default, each under load, with failed requests counted:

1. merged-weight reload in place (what the loop does: pause/wait, reload_weights, reset the
   prefix cache, resume);
2. loading the policy as a LoRA adapter (`/v1/load_lora_adapter`), served unmerged;
3. restarting the engine on the new checkpoint.

4 clients keep sending 16-token chat requests to the engine during each operation; a failed
request is retried after 0.2 s and counted. Also measured: decode throughput (8 requests x
64 tokens) of the base weights with and without `--enable-lora` (what on-policy PPO rollouts
cost serving), and through the adapter.

Run: `.venv/bin/python -m bench.swap` (SmolLM2, about 4 minutes on 2 cores).
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
SMOL = REPO / "data/models/SmolLM2-135M-Instruct"
MESSAGES = [{"role": "user", "content": "Tell me about the sea in two sentences."}]


async def throughput(url: str, model: str = "policy", n: int = 8, tokens: int = 64) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def one(i: int) -> int:
            r = await client.post(
                "/v1/chat/completions",
                json={
                    "model": model,
                    "messages": MESSAGES,
                    "max_tokens": tokens,
                    "ignore_eos": True,  # equal lengths: the comparison is per token
                    "seed": i,
                },
            )
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        done = await asyncio.gather(*(one(i) for i in range(n)))
        return sum(done) / (time.perf_counter() - start)


async def under_load(url_of, operation, clients: int = 4) -> dict:
    """Run `operation()` while `clients` loop on requests; `url_of()` is the engine's URL now."""
    counts = {"ok": 0, "failed": 0}
    stop = asyncio.Event()

    async def client_loop(c: int) -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            while not stop.is_set():
                try:
                    r = await client.post(
                        url_of() + "/v1/chat/completions",
                        json={"model": "policy", "messages": MESSAGES, "max_tokens": 16},
                    )
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                counts["ok" if ok else "failed"] += 1
                if not ok:
                    await asyncio.sleep(0.2)

    tasks = [asyncio.create_task(client_loop(c)) for c in range(clients)]
    await asyncio.sleep(3)  # the load is running before the operation starts
    start = time.perf_counter()
    await operation()
    seconds = time.perf_counter() - start
    await asyncio.sleep(3)
    stop.set()
    await asyncio.gather(*tasks)
    return {"seconds": round(seconds, 2), **counts}


def make_adapter(out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(SMOL, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    get_peft_model(base, lora).save_pretrained(out)
    return out


def main() -> None:
    from assistant.config import EngineConfig
    from engine.vllm_client import VLLMServerEngine
    from engine.vllm_server import EmbeddedVLLMServer

    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        adapter = make_adapter(work / "adapter")
        engine = EmbeddedVLLMServer(str(SMOL), EngineConfig(compile="no"), work / "e1.log")
        engine.start()
        engine.wait_ready()
        current = {"url": engine.url}

        async def phases() -> None:
            results["tok_s_base_with_enable_lora"] = round(await throughput(current["url"]), 1)
            client = VLLMServerEngine(current["url"], "policy", "v0000")
            results["reload_in_place"] = await under_load(
                lambda: current["url"], lambda: client.reload_weights(str(SMOL), "v0001")
            )
            await client.aclose()

            async def load_adapter() -> None:
                async with httpx.AsyncClient(timeout=300) as c:
                    r = await c.post(
                        current["url"] + "/v1/load_lora_adapter",
                        json={"lora_name": "candidate", "lora_path": str(adapter)},
                    )
                    r.raise_for_status()

            results["lora_adapter_load"] = await under_load(lambda: current["url"], load_adapter)
            results["tok_s_through_adapter"] = round(
                await throughput(current["url"], "candidate"), 1
            )

            async def restart() -> None:
                await asyncio.to_thread(engine.stop)
                fresh = EmbeddedVLLMServer(
                    str(SMOL), EngineConfig(compile="no", lora_rollouts=False), work / "e2.log"
                )
                await asyncio.to_thread(fresh.start)
                current["url"], current["engine"] = fresh.url, fresh
                await asyncio.to_thread(fresh.wait_ready)

            results["engine_restart"] = await under_load(lambda: current["url"], restart)
            results["tok_s_base_without_enable_lora"] = round(await throughput(current["url"]), 1)

        try:
            asyncio.run(phases())
        finally:
            engine.stop()
            if "engine" in current:
                current["engine"].stop()
    results["enable_lora_cost_ratio"] = round(
        results["tok_s_base_with_enable_lora"] / results["tok_s_base_without_enable_lora"], 3
    )
    results["adapter_vs_merged_ratio"] = round(
        results["tok_s_through_adapter"] / results["tok_s_base_without_enable_lora"], 3
    )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
