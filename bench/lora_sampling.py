"""Sampling from a LoRA adapter in vLLM's CPU build: vLLM's own LoRA ops against this project's
(`assistant/vllm_cpu_lora.py`), in one run.

For each, a fresh embedded engine on SmolLM2 (the app's engine settings: LoRA on, 2 slots)
samples a PPO round's worth of replies (8 prompts x 4 replies, up to 64 tokens, temperature 1)
from the base weights and from a LoRA adapter, `--repeats` times each. Then the "stale slot"
check: two adapters are loaded and used (they take both slots), both unloaded, and a greedy reply
from the base weights is compared with the one it gave before any adapter was loaded.

Run: `.venv/bin/python -m bench.lora_sampling [--repeats 3] [--scale 0.02]` (about 4 minutes on 2
cores; a larger `--scale` makes the adapter change the replies visibly).
vLLM's own ops are selected by starting that engine with `VLLM_PLUGINS=none`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from alignment.rollouts import VLLMRollouts
from assistant.config import EngineConfig
from engine.http import client as engine_client
from engine.vllm_server import EmbeddedVLLMServer

REPO = Path(__file__).resolve().parents[1]
SMOL = REPO / "data/models/SmolLM2-135M-Instruct"
PROMPTS = [
    [{"role": "user", "content": f"In two sentences, what is {topic}?"}]
    for topic in ("rain", "a violin", "bread", "gravity", "a comet", "chess", "honey", "a bridge")
]


def random_adapter(out: Path, seed: int, scale: float) -> Path:
    """A LoRA adapter on every linear layer with random A and B (B is zero at init: a fresh
    adapter would change nothing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(SMOL),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, scale)
    model.save_pretrained(out)
    return out


def greedy(url: str, model: str) -> str:
    with engine_client(url, timeout=120) as http:
        r = http.post(
            "/v1/chat/completions",
            json={"model": model, "messages": PROMPTS[0], "max_tokens": 32, "temperature": 0},
        )
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"]


def measure(ops: str, adapters: list[Path], repeats: int) -> dict:
    previous = os.environ.get("VLLM_PLUGINS")
    if ops == "vllm":
        os.environ["VLLM_PLUGINS"] = "none"  # no general plugin: vLLM's own ops
    else:
        os.environ.pop("VLLM_PLUGINS", None)
    log = Path(tempfile.mkdtemp()) / "engine.log"
    server = EmbeddedVLLMServer(str(SMOL), EngineConfig(), log)
    try:
        server.start()
        server.wait_ready()
        before = greedy(server.url, "policy")
        rollouts = VLLMRollouts(server.url, "policy", adapters_dir=Path(log).parent / "adapters")
        prompts = [p for p in PROMPTS for _ in range(4)]
        rollouts(prompts, 64, 1.0, 0)  # warm-up
        timings: dict[str, list[float]] = {"base": [], "lora": []}
        tokens: dict[str, list[int]] = {"base": [], "lora": []}
        for name, path in (("a", adapters[0]), ("b", adapters[1])):
            with engine_client(server.url, timeout=120) as http:
                http.post(
                    "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}
                ).raise_for_status()
        for repeat in range(repeats):
            for kind, model in (("base", None), ("lora", "a")):
                rollouts.current = model
                started = time.perf_counter()
                pairs = rollouts(prompts, 64, 1.0, 100 * repeat)
                timings[kind].append(time.perf_counter() - started)
                tokens[kind].append(sum(len(r) for _, r in pairs))
        rollouts.current = None
        with_a = greedy(server.url, "a")
        greedy(server.url, "b")  # "a" is in a slot: "b" takes the other, the last one
        with engine_client(server.url, timeout=120) as http:
            for name in ("a", "b"):
                http.post("/v1/unload_lora_adapter", json={"lora_name": name}).raise_for_status()
        after = greedy(server.url, "policy")
    finally:
        server.stop()
        if previous is None:
            os.environ.pop("VLLM_PLUGINS", None)
        else:
            os.environ["VLLM_PLUGINS"] = previous
    return {
        "ops": ops,
        "base_s": statistics.median(timings["base"]),
        "lora_s": statistics.median(timings["lora"]),
        "base_tokens": statistics.median(tokens["base"]),
        "lora_tokens": statistics.median(tokens["lora"]),
        "base_reply_unchanged_after_adapters": before == after,
        "before": before,
        "after": after,
        "adapter_a": with_a,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--scale", type=float, default=0.02, help="std of the random adapters' B matrices"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        adapters = [random_adapter(Path(tmp) / n, s, args.scale) for n, s in (("a", 1), ("b", 2))]
        rows = [measure(ops, adapters, args.repeats) for ops in ("vllm", "assistant")]
    for row in rows:
        print(json.dumps(row))
    print(f"32 replies x <= 64 tokens, median of {args.repeats}, 2 LoRA slots")
    print("| LoRA ops | base weights s | LoRA adapter s | adapter / base | base reply unchanged |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['ops']} | {row['base_s']:.2f} | {row['lora_s']:.2f} | "
            f"{row['lora_s'] / row['base_s']:.2f}x | {row['base_reply_unchanged_after_adapters']} |"
        )
    old, new = rows
    same = old["adapter_a"] == new["adapter_a"]
    print(f"greedy reply from adapter a, the same under both ops: {same}")
    print(
        f"sampling from the adapter: {old['lora_s'] / new['lora_s']:.2f}x faster; "
        f"from the base weights: {old['base_s'] / new['base_s']:.2f}x faster"
    )


if __name__ == "__main__":
    main()
