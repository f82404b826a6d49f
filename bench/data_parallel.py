"""vLLM's own data-parallel deployment on the CPU build: one endpoint, two engine ranks behind
vLLM's internal balancer. Does the app's hot swap (`VLLMServerEngine.reload_weights`: pause,
`collective_rpc reload_weights`, reset the prefix cache, resume) reach every rank?

The tiny model is served with `--data-parallel-size 2` (all on 127.0.0.1: `VLLM_HOST_IP` and
`--data-parallel-address`), 16 concurrent seeded requests go through the one endpoint (the
balancer spreads them over both ranks: vLLM's metrics count each rank's requests), the app's
swap loads other weights, and the same 16 requests go again. Same seed and same weights give the
same text on either rank, so one text before and one other text after means every rank swapped;
a rank left on the old weights would show as a second text after.

Run: `.venv/bin/python -m bench.data_parallel` (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
from pathlib import Path

from engine.config import EngineConfig
from engine.vllm_client import VLLMServerEngine
from engine.vllm_server import EmbeddedVLLMServer
from harness.app_process import TINY_MAX_MODEL_LEN
from harness.tiny_model import build_tiny_checkpoint

SEEDED = {"temperature": 1.0, "max_tokens": 8}


async def texts(engine: VLLMServerEngine, n: int = 16) -> list[str]:
    async def one() -> str:
        final = [u async for u in engine.stream_pair([{"role": "user", "content": "hi"}],
                                                     SEEDED, 3)][-1]  # fmt: skip
        return final.candidates[0].text

    return await asyncio.gather(*(one() for _ in range(n)))


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-dp-") as tmp:
        work = Path(tmp)
        model = build_tiny_checkpoint(work / "tiny")
        other = build_tiny_checkpoint(work / "other", seed=7)
        config = EngineConfig(
            max_model_len=TINY_MAX_MODEL_LEN,
            max_num_seqs=16,
            compile="no",
            lora_rollouts=False,
            extra_args=["--data-parallel-size", "2", "--data-parallel-address", "127.0.0.1"],
        )
        log = work / "engine.log"
        server = EmbeddedVLLMServer(
            str(model), config, log, environment={**os.environ, "VLLM_HOST_IP": "127.0.0.1"}
        )
        server.start()
        try:
            server.wait_ready()

            async def run() -> tuple[list[str], list[str], float, str]:
                engine = VLLMServerEngine(server.url, "policy", "v0000")
                try:
                    before = await texts(engine)
                    seconds = await engine.reload_weights(str(other), "v0001")
                    return before, await texts(engine), seconds, await engine.metrics()
                finally:
                    await engine.aclose()

            before, after, seconds, metrics = asyncio.run(run())
        finally:
            server.stop()
        # vLLM labels its request counters by engine rank
        served = re.findall(
            r'vllm:request_success_total\{[^}]*engine="(\d+)"[^}]*\} ([\d.]+)', metrics
        )
        busy = sorted({rank for rank, n in served if float(n) > 0})
    print(f"ranks that served requests: {busy}")
    print(f"swap through the one endpoint: {seconds:.2f} s")
    print(f"distinct texts before: {len(set(before))}, after: {len(set(after))}, "
          f"shared: {len(set(before) & set(after))}")  # fmt: skip
    every_rank = len(busy) == 2 and len(set(before)) == len(set(after)) == 1
    print("every rank swapped" if every_rank and set(before) != set(after) else "NOT every rank")


if __name__ == "__main__":
    main()
