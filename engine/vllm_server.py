"""Start and stop the embedded vLLM server in its own process group.

On this kind of machine it is vLLM's CPU build; on a GPU box the official build; the command line
is the same `vllm serve` either way. The engine core is a further child process of the server.
This module only manages the process: talking to it is `engine.vllm_client`.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Mapping
from pathlib import Path

import httpx

from engine.config import EngineConfig
from engine.hardware import cpu_has_bf16
from engine.http import client as engine_client
from engine.http import socket_url
from engine.lifetime import die_with_parent
from engine.protocol import EngineError


def engine_environment(base: Mapping[str, str], kv_cache_gib: int | None) -> dict[str, str]:
    """The embedded vLLM process's environment: `base` plus what the app needs of vLLM (an
    operator's own setting of any of them wins). `kv_cache_gib`: on a CPU only."""
    env = dict(base)
    # Weight hot-swap needs the dev endpoints (/collective_rpc, /reset_prefix_cache), which
    # listen on a private socket; on-policy rollouts load the PPO adapter at runtime.
    env.setdefault("VLLM_SERVER_DEV_MODE", "1")
    env.setdefault("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1")
    if kv_cache_gib is not None:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _on_cpu() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except ImportError:
        return True


def engine_dtype(setting: str, cpu: bool) -> str:
    """`auto`: bf16 where the hardware computes it, float32 on a CPU that would emulate it."""
    if setting != "auto":
        return setting
    return "float32" if cpu and not cpu_has_bf16() else "bfloat16"


def _child_setup(nice: int) -> None:
    """In the engine's process, before exec: die with the app; run at the given niceness (its
    engine core inherits it)."""
    die_with_parent()
    if nice:
        os.nice(nice)


class EmbeddedVLLMServer:
    """A `vllm serve` child process on a Unix socket in a private directory (`private_socket`,
    what the app always uses), or on a free loopback port (the tests' shared engine, which several
    apps reach by URL).

    On a loopback port every local user of the machine could call the engine's development
    endpoints (reload weights, pause, load adapters); the socket's 0700 directory admits only
    this user. So the app has no setting for the engine's port: an engine on a port of your
    choosing is one you run yourself (`--vllm-url`)."""

    def __init__(
        self,
        model_path: str,
        config: EngineConfig,
        log_path: Path,
        private_socket: bool = False,
        max_lora_rank: int = 16,
        environment: Mapping[str, str] | None = None,
    ) -> None:
        """`max_lora_rank` is derived from the PPO adapter's rank (`server.engine_lora_rank`),
        not a setting: a smaller one would silently push PPO to off-policy rollouts.
        `environment`: what the engine's process starts from (the app passes its own without
        its secrets, `assistant.environment.child_environment`); None: this process's."""
        self.base_environment = dict(os.environ if environment is None else environment)
        self.model_path = model_path
        self.config = config
        self.max_lora_rank = max_lora_rank
        self.log_path = log_path
        # The engine's own directory, removed when it stops: its Unix socket and vLLM's ZMQ IPC
        # sockets (which vLLM leaves in /tmp, several per start, if not told otherwise). A short
        # path in /tmp: a socket's path must fit in 107 bytes.
        self.run_dir = Path(tempfile.mkdtemp(prefix="assistant-engine-"))
        # also when `stop` is never called (an engine never started, a failed start-up): at
        # garbage collection or interpreter exit; only a killed process leaves it behind
        weakref.finalize(self, shutil.rmtree, self.run_dir, True)
        self.socket: Path | None = None
        self.port: int | None = None
        if private_socket:
            self.socket = self.run_dir / "engine.sock"
        else:
            self.port = free_port()
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        if self.socket is not None:
            return socket_url(str(self.socket))
        return f"http://127.0.0.1:{self.port}"

    def _listen_args(self) -> list[str]:
        if self.socket is not None:
            return ["--uds", str(self.socket)]
        return ["--host", "127.0.0.1", "--port", str(self.port)]

    def command(self) -> list[str]:
        c = self.config
        cpu = _on_cpu()
        eager = c.compile == "no" or (c.compile == "auto" and cpu)
        # vLLM 0.32's CPU runner crashes the engine ("CPU Generator does not use offset") when a
        # seeded request's prefill is split into chunks; every turn here is seeded, so on the
        # CPU whole prefills only.
        no_chunking = (
            [
                "--no-enable-chunked-prefill",
                "--max-num-batched-tokens",
                str(max(c.max_model_len, 2048)),
            ]
            if cpu
            else []
        )
        return [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model_path,
            "--served-model-name",
            c.served_model_name,
            *self._listen_args(),
            "--max-model-len",
            str(c.max_model_len),
            "--max-num-seqs",
            str(c.max_num_seqs),
            "--dtype",
            engine_dtype(c.dtype, cpu),
            "--gpu-memory-utilization",
            str(c.gpu_memory_utilization),
            "--disable-uvicorn-access-log",
            *(["--enforce-eager"] if eager else []),
            *no_chunking,
            *(
                ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank), "--max-loras", "2"]
                if c.lora_rollouts
                else []
            ),
            *c.extra_args,
        ]

    def start(self) -> None:
        env = engine_environment(
            self.base_environment, self.config.kv_cache_gib if _on_cpu() else None
        )
        self.run_dir.mkdir(mode=0o700, exist_ok=True)  # again after a stop (a restart)
        env.setdefault("VLLM_RPC_BASE_PATH", str(self.run_dir))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.socket is not None:
            self.socket.unlink(missing_ok=True)  # a dead engine's socket (a restart)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        print(
            f"[engine] starting vLLM on {self.url} (log: {self.log_path})",
            file=sys.stderr,
            flush=True,
        )
        self._proc = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: we can stop the engine core too
            preexec_fn=functools.partial(_child_setup, self.config.nice),
        )
        log.close()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        last_report = time.monotonic()
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise EngineError(
                    f"the vLLM engine exited with code {self._proc.returncode} while starting; "
                    f"the last lines of {self.log_path}:\n{self.tail_log()}"
                )
            try:
                with engine_client(self.url, timeout=2.0) as http:
                    if http.get("/health").status_code == 200:
                        return
            except httpx.HTTPError:
                pass
            if time.monotonic() - last_report > 15:
                print(
                    "[engine] still loading the model (about 25 s on two CPU cores; "
                    "longer with --compile yes) ...",
                    file=sys.stderr,
                    flush=True,
                )
                last_report = time.monotonic()
            time.sleep(0.5)
        self.stop()
        raise EngineError(
            f"the vLLM engine did not become ready in {self.config.startup_timeout_s:.0f} s; "
            f"see {self.log_path}"
        )

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def tail_log(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 20.0) -> None:
        try:
            self._stop_process(timeout)
        finally:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _stop_process(self, timeout: float) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        try:
            os.killpg(self._proc.pid, signal.SIGTERM)
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        except ProcessLookupError:
            pass
