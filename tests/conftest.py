"""Shared fixtures: a tiny random checkpoint served by a real vLLM engine, and app launchers.

Markers are declared in pyproject.toml: `slow` (real SmolLM2) and `browser` (Debian's chromium).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.app_process import (
    ADMIN_TOKEN,
    DEPLOY_AT_THE_GATE,
    MANY_USERS_ON_ONE_ADDRESS,
    TINY_MAX_MODEL_LEN,
    AppProcess,
    tiny_app_args,
)
from harness.tiny_model import build_tiny_checkpoint, build_two_style_checkpoint

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
REPO = Path(__file__).resolve().parents[1]
SMOL_DIR = REPO / "data" / "models" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def two_style_model(tmp_path_factory) -> Path:
    """The tiny model taught two reply styles, half and half (the learning and canary tests)."""
    return build_two_style_checkpoint(tmp_path_factory.mktemp("two-style") / "model")


@pytest.fixture(scope="session")
def tiny_engine_url(tiny_model_dir, tmp_path_factory) -> Iterator[str]:
    """A real vLLM server (CPU build) serving the tiny model, shared by the whole session."""
    from assistant.config import EngineConfig
    from engine.vllm_server import EmbeddedVLLMServer

    config = EngineConfig(max_model_len=TINY_MAX_MODEL_LEN, max_num_seqs=32, compile="no")
    server = EmbeddedVLLMServer(
        str(tiny_model_dir), config, tmp_path_factory.mktemp("logs") / "tiny-engine.log"
    )
    server.start()
    try:
        server.wait_ready()
        yield server.url
    finally:
        server.stop()


def _restore_tiny_engine(url: str, model_dir: Path, always: bool = True) -> None:
    """The shared tiny engine back on its original weights, named v0000 (apps read the name:
    an app without --model refuses an engine that serves a version it cannot send back)."""
    import asyncio

    from engine.vllm_client import VLLMServerEngine

    async def restore() -> None:
        engine = VLLMServerEngine(url, "policy", "v0000")
        try:
            if always or await engine.served_version() not in ("v0000", "default"):
                await engine.reload_weights(str(model_dir), "v0000")
        finally:
            await engine.aclose()

    asyncio.run(restore())


@pytest.fixture
def restores_tiny_engine(tiny_engine_url, tiny_model_dir) -> Iterator[None]:
    """For tests that hot-swap the shared tiny engine: its original weights go back afterwards,
    also when the test fails halfway, so later tests never run on the wrong weights."""
    yield
    _restore_tiny_engine(tiny_engine_url, tiny_model_dir)


@pytest.fixture
def tiny_app_factory(tiny_engine_url, tiny_model_dir, tmp_path) -> Iterator:
    """Start apps on the shared tiny engine (the `--vllm-url` path); stopped after the test, and
    the engine put back on its original weights if one of them deployed a version."""
    apps: list[AppProcess] = []

    def start(*extra: str, data_dir: Path | None = None, cai: bool = False) -> AppProcess:
        app = AppProcess(
            tiny_app_args(tiny_engine_url, cai, *extra), data_dir or tmp_path / f"app{len(apps)}"
        )
        apps.append(app.start(timeout=120))
        return app

    yield start
    for app in apps:
        app.stop()
    _restore_tiny_engine(tiny_engine_url, tiny_model_dir, always=False)


@pytest.fixture(scope="module")
def tiny_app(tiny_engine_url, tmp_path_factory) -> Iterator[AppProcess]:
    """One app on the tiny engine shared by a module's API tests."""
    app = AppProcess(
        tiny_app_args(tiny_engine_url, False, "--max-message-chars", "4000"),
        tmp_path_factory.mktemp("tiny-app"),
        env={"ASSISTANT_ADMIN_TOKEN": ADMIN_TOKEN},
    ).start(timeout=120)
    yield app
    app.stop()


@pytest.fixture(scope="session")
def smol_app(tmp_path_factory) -> Iterator[AppProcess]:
    """The real product: `assistant run` with the embedded SmolLM2 on its own vLLM engine."""
    if not (SMOL_DIR / "config.json").exists():
        pytest.fail(
            f"the embedded model is not provisioned at {SMOL_DIR}: run `make test`, "
            "which provisions it first"
        )
    app = AppProcess(
        [
            "--model",
            str(SMOL_DIR),
            "--max-new-tokens",
            "48",
            *MANY_USERS_ON_ONE_ADDRESS,
            *DEPLOY_AT_THE_GATE,
        ],
        tmp_path_factory.mktemp("smol-app"),
        env={"ASSISTANT_ADMIN_TOKEN": ADMIN_TOKEN},
    ).start(timeout=900)
    yield app
    app.stop()


@pytest.fixture(scope="module")
def app_in_process(tmp_path_factory) -> Iterator:
    """The whole app (API, page, limits, store) in this process around a fake engine, talked to
    through Starlette's test client (`harness.in_process`), shared by a module like `tiny_app`:
    the edge's rules in milliseconds, no vLLM started. What depends on real replies or a real
    process is tested through `assistant run` instead."""
    from harness.in_process import in_process_app

    with in_process_app(
        tmp_path_factory.mktemp("in-process"), "--max-message-chars", "4000"
    ) as client:
        yield client


@pytest.fixture(scope="session")
def postgres_cluster(tmp_path_factory) -> Iterator:
    """A throwaway Postgres cluster for the session (`harness.postgres`: initdb + pg_ctl, a Unix
    socket in its own folder, no TCP port); removed at the end."""
    from harness.postgres import PostgresCluster, server_binaries

    if server_binaries() is None:
        pytest.fail("PostgreSQL's server is not installed: run `make test`, which installs it")
    cluster = PostgresCluster(tmp_path_factory.mktemp("postgres")).start()
    yield cluster
    cluster.stop()


_databases = iter(range(1_000_000))


@pytest.fixture
def postgres_url(postgres_cluster) -> Iterator[str]:
    """A new, empty database in the session's cluster, dropped after the test."""
    name = f"test_{next(_databases)}"
    yield postgres_cluster.create_database(name)
    postgres_cluster.drop_database(name)


@pytest.fixture(params=["duckdb", "postgres"])
def store_location(request, tmp_path) -> str | Path:
    """Where a store's tests keep it: a DuckDB file, then a Postgres database (the same tests
    for both backends)."""
    if request.param == "duckdb":
        return tmp_path / "db" / "test.duckdb"
    return request.getfixturevalue("postgres_url")
