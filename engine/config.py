"""The engine's settings: which vLLM serves the replies and how the embedded one is started.

Part of the app's one configuration (`assistant.config.AppConfig.engine`), kept here beside the
code that reads it; its own rules (`EngineConfig.problems`) are checked with the rest at start.
"""

from __future__ import annotations

from dataclasses import dataclass

from storage.settings import setting

# What would move the embedded engine off its private socket (its dev endpoints reload weights).
REBINDING_VLLM_ARGS = ("--host", "--port", "--uds")


@dataclass
class EngineConfig:
    """Where replies come from: an embedded vLLM server we start, or an external one by URL."""

    model: str | None = setting(
        "local checkpoint directory or hub id to serve; default: embedded SmolLM2-135M-Instruct",
        default=None,
    )
    vllm_url: list[str] = setting(
        "base URL of an external vLLM OpenAI-compatible server (e.g. http://gpu-box:8000); "
        "repeat it (a list in YAML) for several replicas, which the app routes to and swaps one "
        "at a time; when set, no engine is started here",
        default_factory=list,
    )
    versions_dir: str | None = setting(
        "where the engines see the app's versions folder (a shared filesystem mounted at "
        "another path on the engines' machines); default: the same path as here",
        default=None,
    )
    served_model_name: str = setting("model name the engine serves under", default="policy")
    max_model_len: int = setting("context window in tokens (prompt + reply)", default=2048)
    # float32 where bf16 is emulated: on a 2-core AVX2 VM bf16 decoded 8 prompts at 17 tok/s,
    # float32 at 47 (bench/RESULTS.md, "A CPU without AVX-512: the engine in float32")
    dtype: str = setting(
        "weight dtype for the embedded engine: auto (bfloat16 on a GPU or a CPU with "
        "AVX-512-BF16 or AMX; float32 on other CPUs, where bf16 would be emulated and slower), "
        "or any vLLM --dtype",
        default="auto",
    )
    max_num_seqs: int = setting(
        "sequences the engine batches at once (each turn is 2 sequences)", default=32
    )
    gpu_memory_utilization: float = setting(
        "vLLM memory fraction; on CPU builds it is the fraction of the NUMA node's RAM",
        default=0.3,
    )
    kv_cache_gib: int = setting("CPU KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE)", default=1)
    # on the CPU, compiling took the start from 25 s to 79 s for 1.25x faster decoding, and vLLM's
    # CPU compile cache does not reload, so every start pays it (bench/RESULTS.md, "Engine
    # start-up and compilation")
    compile: str = setting(
        "torch.compile the model for faster decoding: auto (on a GPU; not on a CPU, where the "
        "compiled model is not cached and every start would compile it again), yes, no",
        default="auto",
    )
    lora_rollouts: bool = setting(
        "start the embedded engine with LoRA support so PPO samples its current policy "
        "(on-policy rollouts) while users keep the serving weights",
        default=True,
    )
    startup_timeout_s: float = setting("how long to wait for the engine to come up", default=600.0)
    # under 32 simulated users on 2 cores, nice 10 moved a vote's write median from 405 to 335 ms
    # only (bench/RESULTS.md, bench.load --engine-nice)
    nice: int = setting(
        "scheduling niceness of the embedded engine's processes (0: same as the app). On a small "
        "machine a positive value gives the app's pages and votes the CPU first while the "
        "engine generates",
        default=0,
    )
    extra_args: list[str] = setting(
        "extra command-line arguments passed to the embedded `vllm serve`", default_factory=list
    )

    def problems(self) -> list[str]:
        """What is wrong with these settings, each in words that say the fix (the app's
        configuration raises the first one at start)."""
        checks = [
            (
                self.compile in ("auto", "yes", "no"),
                f"--compile must be auto, yes or no, got {self.compile!r}",
            ),
            (
                0 < self.gpu_memory_utilization <= 1,
                "--gpu-memory-utilization must be in (0, 1]",
            ),
            *(
                (
                    url.startswith(("http://", "https://")),
                    f"--vllm-url must start with http:// or https://, got {url!r}",
                )
                for url in self.vllm_url
            ),
            (
                len({u.rstrip("/") for u in self.vllm_url}) == len(self.vllm_url),
                "--vllm-url names the same server twice",
            ),
            (
                self.versions_dir is None or bool(self.vllm_url),
                "--engine-versions-dir is for engines elsewhere (--vllm-url); the embedded "
                "engine reads the versions folder where the app writes it",
            ),
            (
                not any(a.split("=")[0] in REBINDING_VLLM_ARGS for a in self.extra_args),
                "--vllm-arg may not set --host, --port or --uds: the embedded engine listens on "
                "its private socket, where the app expects it",
            ),
        ]
        return [message for ok, message in checks if not ok]
