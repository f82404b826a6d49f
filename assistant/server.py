"""Assemble and run the app: store, engine, chat service, JSON API and page on one port.

Start-up fails fast, before any model loads, on an unwritable database path or a missing model.
The embedded engine is started here and stopped on shutdown; an external one (`--vllm-url`) is
only checked for reachability.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from assistant import environment
from assistant.config import AppConfig, ConfigError
from engine.protocol import EngineError
from storage.rules import version_name

log = logging.getLogger(__name__)

BASE_VERSION = version_name(0)
# Gradio routes this page never uses, each a way in for someone else's data: uploads (an open file
# drop served back by URL), recordings (any size, into temp files never deleted), deep links (a
# file per call, holding the session's component values: the admin token typed into a tab among
# them), the run history, and files: the page serves none, and `file=https://...` fetches any
# public URL for anyone (an open proxy); `proxy=` relays Spaces loaded with gr.load (none here).
# Each is closed with its sub-paths and `=` arguments (`/gradio_api/file=...`, `.../file/...`).
CLOSED_GRADIO_ROUTES = (
    "/gradio_api/upload",
    "/gradio_api/upload_progress",
    "/gradio_api/process_recording",
    "/gradio_api/deep_link",
    "/gradio_api/runs",
    "/gradio_api/run-history",
    "/gradio_api/file",
    "/gradio_api/proxy",
)


def closed_gradio_route(path: str) -> bool:
    path = path.rstrip("/")
    return any(path == r or path.startswith((r + "/", r + "=")) for r in CLOSED_GRADIO_ROUTES)


@dataclass
class ModelSource:
    path: str  # what the engine loads: a local directory or a hub id
    description: str
    base_model: str | None = None  # the hub id a model card names, when known
    license: str | None = None  # the base model's, when known

    def manifest(self) -> dict:
        """The base version's record: what every version descends from (model cards say it)."""
        return {"model": self.description, "base_model": self.base_model, "license": self.license}


def resolve_model(config: AppConfig) -> ModelSource:
    """The checkpoint to serve: --model, or the embedded default (provisioned on first use)."""
    from engine.provision import EMBEDDED_HUB_ID, is_checkpoint, provision_embedded

    model = config.engine.model
    if model is None:
        return ModelSource(
            str(provision_embedded(config.data_dir).resolve()),
            "SmolLM2-135M-Instruct (embedded default)",
            EMBEDDED_HUB_ID,
            "apache-2.0",
        )
    path = Path(model).expanduser()
    if path.exists():
        if not is_checkpoint(path):
            raise ConfigError(
                f"--model {model}: the directory has no config.json and "
                "*.safetensors weights; point it at a checkpoint directory"
            )
        return ModelSource(str(path.resolve()), str(path))
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") != 1
    if looks_like_path:
        raise ConfigError(
            f"--model {model}: no such directory. Pass a checkpoint directory, a "
            "hub id (org/name), or leave it out for the embedded default"
        )
    return ModelSource(_hub_snapshot(model), model, base_model=model)


def _hub_snapshot(repo_id: str) -> str:
    """A hub id, from the local cache or downloaded; a clear error when neither works."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            repo_id,
            local_files_only=True,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
        )
    except Exception:  # noqa: BLE001 - not cached; try the network below
        pass
    try:
        print(f"[model] downloading {repo_id} from the hub ...", file=sys.stderr, flush=True)
        return snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
        )
    except Exception as exc:  # noqa: BLE001 - any failure means the same fix
        raise ConfigError(
            f"--model {repo_id}: not in the local hub cache and the hub cannot be reached "
            f"({type(exc).__name__}). Download it on a machine with network access and pass the "
            "directory with --model DIR, or leave --model out for the embedded default."
        ) from exc


# The --max-lora-rank values vLLM accepts (its `vllm.config.lora.MaxLoRARanks`), from its default
# 16 up: copied, since importing vLLM's config would load torch into the app; tests check them.
VLLM_LORA_RANKS = (16, 32, 64, 128, 256, 320, 512)


def engine_lora_rank(rank: int) -> int:
    """The embedded engine's --max-lora-rank for the PPO adapter's rank (`ppo.lora_rank`), so a
    larger adapter keeps rollouts on-policy instead of silently falling back."""
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise ConfigError(
        f"ppo.lora_rank {rank} is over vLLM's largest LoRA rank ({VLLM_LORA_RANKS[-1]})"
    )


@dataclass
class Runtime:
    """What both the app and an offline `assistant retrain` need: store, engine, loop."""

    store: object
    engine: object
    loop: object
    embedded: object | None

    async def start(self) -> None:
        """Bring the engines to the serving version before the first request (raises
        EngineError when none can serve it)."""
        await self.engine.prepare()

    async def aclose(self) -> None:
        await self.loop.aclose()  # a cycle started through the API, before what it uses
        await self.engine.aclose()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)
        self.store.close()


def open_runtime(config: AppConfig, on_progress=None, engine=None) -> Runtime:
    """Open the store and start (or reach) the engine for a validated `config`
    (`AppConfig.validate`); raises ConfigError/StoreError early.
    `engine`: one already made (a test's `harness.fake_engine.FakeEngine`), started by nobody."""
    from alignment.launch import cycle_launcher
    from alignment.loop import AlignmentLoop
    from engine.probe import write_probe_adapter
    from engine.replicas import ReplicaSet
    from engine.vllm_client import VLLMServerEngine
    from engine.vllm_server import EmbeddedVLLMServer
    from storage import Store
    from storage.private import private_folder

    lora_rank = engine_lora_rank(config.cycle.ppo.lora_rank)  # raises before anything starts
    # where cycles run; Ray missing, or a --ray-address that does not answer, fails here too
    launcher = cycle_launcher(config.loop.ray_address, config.loop.cycle_gpus)
    private_folder(config.data_dir, ours=True)  # it holds the chats, their copies and secrets
    store = Store(config.database)  # fails fast on an unwritable path
    if not config.on_postgres:  # (on Postgres, the leading process does it when it gains)
        fail_interrupted_runs(store)
    embedded: EmbeddedVLLMServer | None = None
    if engine is not None:
        store.ensure_base_version(BASE_VERSION, config.engine.model or "given", {"model": "given"})
    elif config.engine.vllm_url:
        urls = _check_external(config.engine.vllm_url)
        # With --model too, retraining knows the served checkpoint; otherwise it cannot retrain.
        source = resolve_model(config) if config.engine.model else ModelSource(urls[0], "external")
        store.ensure_base_version(BASE_VERSION, source.path, source.manifest())
        version, path = _serving_weights(store)
        probe = None
        if config.engine.model:  # versions can be made here: prove the engines read them
            probe = write_probe_adapter(config.data_dir / "versions", Path(source.path))
        # the replicas are brought to `version` at start (`ReplicaSet.prepare`); a server that
        # reports unnamed weights is taken to serve the base checkpoint it was started on
        engine = ReplicaSet(
            [VLLMServerEngine(u, config.engine.served_model_name, version) for u in urls],
            version,
            path,
            unnamed_is=BASE_VERSION,
            engine_path=engine_paths(config),
            probe=str(probe) if probe else None,
        )
    else:
        source = resolve_model(config)
        store.ensure_base_version(BASE_VERSION, source.path, source.manifest())
        version, path = _serving_weights(store)
        if version != BASE_VERSION:
            # A restart serves what was deployed last, not the base checkpoint.
            source = ModelSource(path, version)
        embedded = EmbeddedVLLMServer(
            source.path,
            config.engine,
            config.data_dir / "logs" / "engine.log",
            private_socket=True,
            max_lora_rank=lora_rank,
            environment=environment.child_environment(),  # none of the app's secrets
        )
        embedded.start()
        try:
            embedded.wait_ready()
        except BaseException:
            embedded.stop()
            raise
        client = VLLMServerEngine(embedded.url, config.engine.served_model_name, version)
        # one replica; it (re)starts on the serving version's weights (engine.watch)
        engine = ReplicaSet([client], version, source.path, unnamed_is=None)
    loop = AlignmentLoop(
        store,
        engine,
        config.data_dir,
        config.cycle,
        on_progress,
        worker_environment=environment.child_environment,
        launcher=launcher,
        keep_versions=config.loop.keep_versions,
        ai_label_weight=config.cai.ai_label_weight,
        max_source_share=config.max_source_share,
    )
    return Runtime(store, engine, loop, embedded)


def fail_interrupted_runs(store) -> None:
    """Cycles left 'running' by a stop or crash are failed, and their chats' copies removed."""
    from alignment.launch import stop_abandoned
    from alignment.loop import remove_user_data

    for run in store.fail_interrupted_runs():
        if run.get("job"):
            stop_abandoned(Path(run["job"]))  # a Ray job outlives the app that started it
            remove_user_data(Path(run["job"]))  # the copies of chats it never got to delete


def build_app(config: AppConfig, runtime: Runtime | None = None):
    """Return a FastAPI app whose lifespan owns the runtime (engine, store): the one given (a
    test's, around a fake engine: the app's edge then runs in-process), else one it opens."""
    import gradio as gr
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from alignment.critic import CAIWorker, Critic
    from alignment.scheduler import RetrainScheduler
    from assistant.admin import AdminSignIns, SharedSignIns, SignIns
    from assistant.admin_login import build_admin_login_router
    from assistant.api import (
        build_api_router,
        install_error_handler,
        require_admin,
        set_session_cookie,
    )
    from assistant.canary_service import CanaryService
    from assistant.chat_service import ChatService, RateLimitError
    from assistant.leadership import Leadership
    from assistant.limits import BodyLimit
    from assistant.metrics import ResponseCounts, app_registry, build_metrics_router
    from assistant.openai_api import build_openai_router
    from assistant.page_auth import PageAuth
    from assistant.sessions import SESSION_COOKIE, SessionKeys
    from assistant.variant_service import VariantService
    from engine.watch import EngineWatch
    from ui.page import CSS, build_page

    if runtime is None:
        constitution = active_constitution(config)  # before the engine: a bad file fails fast
        runtime = open_runtime(config)  # a read-only data directory is refused here, with why
    else:
        constitution = active_constitution(config, runtime.store)
    try:
        # On Postgres the app runs as several processes on one database: the key is shared there
        sessions = (
            SessionKeys.shared(runtime.store, config.serve.session_days)
            if runtime.store.on_postgres
            else SessionKeys.load_or_create(
                config.data_dir / "secrets" / "session.key", config.serve.session_days
            )
        )
    except OSError as exc:
        _run_async_close(runtime)
        raise ConfigError(f"cannot write the session key under {config.data_dir}: {exc}") from exc
    service = ChatService(runtime.store, runtime.engine, config.sampling, config.serve)
    canary = CanaryService(
        runtime.store,
        runtime.engine,
        config.canary,
        runtime.loop.lock,
        max_source_share=config.max_source_share,
    )
    runtime.loop.canary = service.canary = canary
    canary.after_promotion = runtime.loop.prune_after_deploy
    variants = VariantService(runtime.store, service)
    version = runtime.store.latest_constitution()
    if version is None or version["body"] != constitution.as_json():
        runtime.store.save_constitution(constitution.name, constitution.as_json())
    critic = Critic(
        runtime.engine,
        constitution,
        rounds=config.cai.rounds,
        max_new_tokens=config.cai.max_new_tokens,
    )
    cai = CAIWorker(critic, runtime.store, service, cycle_running=lambda: runtime.loop.running)

    scheduler = RetrainScheduler(
        runtime.loop, runtime.store, config.loop, max_source_share=config.max_source_share
    )

    leader_tasks: list[asyncio.Task] = []

    def start_leader_tasks() -> None:
        """What runs once among the app processes sharing the database: here, if it leads."""

        async def serve_others() -> None:  # cycles asked for, canary votes cast, elsewhere
            while True:
                await asyncio.sleep(1.0)
                try:
                    await runtime.loop.serve_cycle_requests()
                    await canary.check()
                except Exception:  # noqa: BLE001 - the next round tries again
                    log.exception("serving the other app processes failed a round")

        leader_tasks.append(asyncio.create_task(scheduler.run_forever()))
        if config.cai.enabled:
            leader_tasks.append(asyncio.create_task(cai.run_forever()))
        if config.serve.retention_days > 0:
            leader_tasks.append(
                asyncio.create_task(_retention(runtime.store, config.serve.retention_days))
            )
        if leadership.shared:
            leader_tasks.append(asyncio.create_task(serve_others()))

    def set_part(leading: bool) -> None:
        runtime.loop.leading = canary.decides = leading
        runtime.engine.passive = not leading

    async def on_gain() -> None:  # another process led until now (it died or lost the lock)
        set_part(True)
        await asyncio.to_thread(fail_interrupted_runs, runtime.store)  # its cycle died with it
        await canary.resume()
        start_leader_tasks()

    async def on_loss() -> None:
        set_part(False)
        for task in leader_tasks:
            task.cancel()
        leader_tasks.clear()
        await runtime.loop.aclose()  # a cycle this process ran is the next leader's to fail

    async def follow() -> None:
        serving = await asyncio.to_thread(runtime.store.serving_version)
        if serving is not None and serving["version"] != runtime.engine.model_version:
            runtime.engine.follow(serving["version"], serving["path"])
            await runtime.engine.watch_once()
        await canary.adopt()

    leadership = Leadership(
        config.database if config.on_postgres else None, on_gain, on_loss, follow
    )
    service.leading = lambda: leadership.leading

    @asynccontextmanager
    async def lifespan(_app):
        try:
            if leadership.shared:
                await leadership.try_lead()
                set_part(leadership.leading)
                if leadership.leading:
                    await asyncio.to_thread(fail_interrupted_runs, runtime.store)
            await runtime.start()  # every engine on the serving version, or the start fails
            if leadership.leading:
                await canary.resume()  # a canary the last run left going goes on, or is closed
            else:
                await canary.adopt()
            await variants.load()  # the prompt variants an admin saved, if any
        except BaseException:
            leadership.release()
            await runtime.aclose()
            raise
        if leadership.leading:
            start_leader_tasks()
        tasks = [
            asyncio.create_task(runtime.engine.watch_forever()),  # replicas' rotation
            asyncio.create_task(leadership.run_forever()),
        ]
        if runtime.embedded is not None:

            async def after_restart() -> None:
                await runtime.engine.watch_once()  # back in rotation now, not at the next round
                # the leader decides what becomes of the canary; another process takes it
                await (canary.resume() if leadership.leading else canary.adopt())

            watch = EngineWatch(
                runtime.embedded, service, runtime.store, after_restart=after_restart
            )
            tasks.append(asyncio.create_task(watch.run_forever()))
        try:
            yield
        finally:
            for task in [*tasks, *leader_tasks]:
                task.cancel()
            leadership.release()
            await runtime.aclose()

    app = FastAPI(
        title="Aligned assistant",
        description="Two replies per turn; your votes retrain it. Routes: docs/api.md.",
        lifespan=lifespan,
        openapi_url="/api/openapi.json",  # beside the routes it describes; the page owns "/"
        docs_url="/api/docs",  # Swagger UI (its scripts come from a CDN: online only)
        redoc_url=None,
    )
    # Innermost of the middlewares below: a closed route or a wrong host costs no body.
    app.add_middleware(BodyLimit)
    if "*" not in config.serve.allowed_hosts:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        # DNS rebinding: a web page on another site can point its own name at 127.0.0.1 and
        # then read the local app from the victim's browser; it cannot forge the Host header.
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=config.serve.trusted_hosts())

    @app.middleware("http")
    async def close_unused_gradio_routes(request, call_next):
        if closed_gradio_route(request.url.path):
            return JSONResponse({"error": "this app does not offer that route"}, status_code=403)
        return await call_next(request)

    @app.middleware("http")
    async def issue_page_session(request, call_next):
        # The page's session is an HttpOnly cookie the server issues on the first visit (or
        # when the one sent was not issued here); API clients ask POST /api/session instead.
        # Past its address's allowance of new sessions the page is served without one (its
        # votes then count against the address's and everybody's limits only).
        response = await call_next(request)
        if not request.url.path.startswith("/api/") and not sessions.is_valid(
            request.cookies.get(SESSION_COOKIE)
        ):
            client = sessions.client_tag(request.client.host if request.client else None)
            try:
                service.admit_session(client)
            except RateLimitError:
                return response
            set_session_cookie(response, sessions.issue())
        return response

    # Added last, so outermost: every answer counts, refusals of the middlewares above included.
    by_status: collections.Counter[int] = collections.Counter()
    app.add_middleware(ResponseCounts, by_status=by_status)
    install_error_handler(app)
    app.include_router(build_api_router(service, sessions, runtime.loop, cai, canary, variants))
    # a sign-in on one process holds on every process sharing the Postgres database
    sign_ins: SignIns = (
        SharedSignIns(runtime.store) if runtime.store.on_postgres else AdminSignIns()
    )
    app.include_router(build_admin_login_router(sign_ins))
    app.include_router(build_openai_router(service, sessions))
    registry = app_registry(runtime.store, service, canary, by_status)
    app.include_router(build_metrics_router(registry, runtime.engine, require_admin))
    app.state.service = service
    app.state.runtime = runtime
    page = build_page(
        service, PageAuth(sessions, sign_ins), runtime.loop, cai, scheduler, canary, variants
    ).queue(default_concurrency_limit=None)
    return gr.mount_gradio_app(
        app, page, path="/", css=CSS, footer_links=["api"], run_history=False, max_file_size="1kb"
    )


def _run_async_close(runtime) -> None:
    asyncio.run(runtime.aclose())


async def _retention(store, days: float, every_s: float = 3600.0) -> None:
    """Delete conversations older than `days`, at start and then hourly."""
    while True:
        try:
            for conversation_id in await asyncio.to_thread(store.conversations_older_than, days):
                await asyncio.to_thread(store.delete_conversation, conversation_id)
        except Exception:  # noqa: BLE001 - retried next round; the log says why
            log.exception("retention: deleting old conversations failed")
        await asyncio.sleep(every_s)


def active_constitution(config: AppConfig, store=None):
    """--constitution FILE if given; else the latest edited version in the database; else the
    shipped default. Without an open `store` the database is opened read-only here only to
    peek; the app writes later."""
    from alignment.constitution import load_constitution, parse_constitution
    from storage import Store, StoreError

    if config.cai.constitution is not None:
        return load_constitution(config.cai.constitution)
    opened = store is None
    try:
        store = Store(config.database, read_only=True) if opened else store
    except StoreError:
        return load_constitution()
    try:
        latest = store.latest_constitution()
    except Exception:  # noqa: BLE001 - an old database without the table: use the default
        latest = None
    finally:
        if opened:
            store.close()
    return parse_constitution(latest["body"]) if latest else load_constitution()


def _check_external(urls: list[str]) -> list[str]:
    """The external engines' URLs, once at least one answers; the others join when they do."""
    import httpx

    problems = []
    for url in urls:
        try:
            if httpx.get(url.rstrip("/") + "/health", timeout=10).status_code == 200:
                continue
            problems.append(f"--vllm-url {url}: /health did not answer 200")
        except httpx.HTTPError as exc:
            problems.append(f"--vllm-url {url}: the server is unreachable ({exc!r})")
    if len(problems) == len(urls):
        raise EngineError("; ".join(problems))
    for problem in problems:
        log.warning("%s; it joins the rotation when it answers", problem)
    return [u.rstrip("/") for u in urls]


def _serving_weights(store) -> tuple[str, str | None]:
    """The version to serve at start and where its weights are here: the last deployed one
    while its weights exist, else the base (whose path is None for an external engine without
    --model: nothing to send an engine that serves something else)."""
    for row in (store.serving_version(), store.model_version(BASE_VERSION)):
        if row and row.get("path") and Path(row["path"]).is_dir():
            return row["version"], row["path"]
    return BASE_VERSION, None


def engine_paths(config: AppConfig):
    """Where the engines see a path under the app's versions folder (`--engine-versions-dir`);
    identity when they see it where the app does."""
    if not config.engine.versions_dir:
        return str
    here = (config.data_dir / "versions").resolve()
    there = config.engine.versions_dir.rstrip("/")

    def for_engine(path: str) -> str:
        resolved = Path(path).resolve()
        if resolved.is_relative_to(here):
            return f"{there}/{resolved.relative_to(here).as_posix()}"
        return path  # the base checkpoint: the engines were started on it where it is there

    return for_engine


def listen_socket(host: str, port: int) -> socket.socket:
    """Bind the page's port before anything slow starts: a port in use then fails in a second
    with a clear reason instead of after the model has loaded, and no process the app starts
    meanwhile (vLLM opens ports of its own) can take it. Port 0 lets the system pick a free one,
    the race-free way for scripts and tests to start an app."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"--host {host}: cannot listen there ({exc})") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; stop what uses it or pick "
            "another --port (0 picks a free one)"
        ) from exc
    return sock


def serve(config: AppConfig) -> None:
    import uvicorn

    from assistant.admin import ensure_admin_token

    listening = listen_socket(config.serve.host, config.serve.port)
    port = listening.getsockname()[1]
    environment.turn_off_gradio_analytics()
    app = build_app(config)
    try:
        store = app.state.runtime.store
        stored = ensure_admin_token(config.data_dir, store if store.on_postgres else None)
    except OSError as exc:
        raise ConfigError(f"cannot store the admin token under {config.data_dir}: {exc}") from exc
    host = f"[{config.serve.host}]" if ":" in config.serve.host else config.serve.host
    print(f"[app] ready on http://{host}:{port}", file=sys.stderr, flush=True)
    if stored is not None:
        path, generated = stored
        # The start that generates the token prints it; later starts only say where it is, so
        # their output (journald, docker logs) never holds it.
        token = f"{environment.admin_token()}\n      " if generated else ""
        print(
            f"[app] admin token (the Admin tab's sign-in, `Authorization: Bearer ...`): {token}"
            f"stored in {path} (readable only by you); set ASSISTANT_ADMIN_TOKEN to choose your "
            "own",
            file=sys.stderr,
            flush=True,
        )
    # uvicorn believes X-Forwarded-For from 127.0.0.1 unless told otherwise: behind a proxy that
    # passes the client's own header on, or to any local process, every client could then pick
    # the address its limits are counted on. Only the proxies named by --forwarded-allow-ips.
    proxies = config.serve.trusted_proxies()
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level="warning",
            timeout_graceful_shutdown=10,
            proxy_headers=bool(proxies),
            forwarded_allow_ips=proxies or None,
        )
    )
    server.run(sockets=[listening])
