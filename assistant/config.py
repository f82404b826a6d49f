"""Typed configuration for the serving side, one dataclass per subsystem.

Every field has a default that works on the embedded default (CPU, SmolLM2-135M) and a one-line
help string that the CLI shows. `AppConfig.validate()` is called once at start-up; it raises
`ConfigError` with a message that says the fix, and never rewrites a value the user gave.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from alignment.config import CanaryConfig, CycleConfig, LoopConfig
from assistant import environment
from engine.config import EngineConfig
from storage.errors import AppError
from storage.settings import setting


class ConfigError(AppError, ValueError):
    """A setting is invalid; the message says which one and how to fix it."""

    status = 400


def default_data_dir() -> Path:
    return environment.data_dir()


def database_location(value: str | Path) -> Path | str:
    """--db's value: a postgresql:// URL stays the string it is, anything else is a file."""
    from storage.postgres import is_postgres_url

    text = str(value)
    return text if is_postgres_url(text) else Path(text).expanduser()


@dataclass
class SamplingConfig:
    """How the two candidates of a turn are sampled (one request, n=2, one seed)."""

    temperature: float = setting("sampling temperature of both candidates", default=0.8)
    top_p: float = setting("nucleus sampling threshold", default=0.95)
    max_new_tokens: int = setting("longest reply in tokens", default=256)

    def as_dict(self) -> dict:
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_new_tokens,
        }


@dataclass
class ServeConfig:
    """The HTTP side: the page and the JSON API."""

    host: str = setting(
        "address to bind; keep 127.0.0.1 unless behind a reverse proxy", default="127.0.0.1"
    )
    port: int = setting(
        "port of the page and API (0: pick a free one; the ready line says which)", default=7860
    )
    max_backlog: int = setting(
        "turns generating at once before new ones get HTTP 503 'busy, retry'", default=16
    )
    retry_after_s: int = setting("Retry-After seconds sent with a 503", default=5)
    max_message_chars: int = setting("longest accepted user message in characters", default=8000)
    reading_words_per_second: float = setting(
        "votes faster than reading both replies at this pace are kept but flagged and left out "
        "of training (0: never flag)",
        default=15.0,
    )
    max_votes_per_minute: int = setting(
        "votes one session may cast per minute (0: no limit)", default=30
    )
    max_votes_per_minute_per_address: int = setting(
        "votes one client address may cast per minute, all its sessions together (0: no limit)",
        default=60,
    )
    max_votes_per_minute_total: int = setting(
        "votes everybody together may cast per minute (0: no limit)", default=600
    )
    max_sessions_per_minute_per_address: int = setting(
        "sessions issued to one client address per minute, the page's and the API's together "
        "(each brings its own vote allowance); past it POST /api/session gets HTTP 429 and the "
        "page is served without a new session (0: no limit)",
        default=30,
    )
    max_backlog_share: float = setting(
        "share of --max-backlog one client address may hold; past it, HTTP 429 (1: no share)",
        default=0.25,
    )
    system_prompt: str | None = setting(
        "system prompt prepended to every conversation", default=None
    )
    variant_share: float = setting(
        "share of turns whose two replies differ only in their prompt variant (zero-shot, "
        "few-shot, step by step: assistant/prompt_variants.json), so that the votes rate the "
        "variants (0: never)",
        default=0.0,
    )
    allowed_hosts: list[str] = setting(
        "host names the app answers to, besides loopback names and the bound address (a page "
        "on another site cannot reach the app by pointing its own name at 127.0.0.1); '*' "
        "allows any",
        default_factory=list,
    )
    single_user: bool = setting(
        "one person casts every vote (make run and the Docker image pass it): no cap on one "
        "session's or address's share of the votes a cycle trains on and a canary is judged by. "
        "Without it, at most half (--max-vote-source-share)",
        default=False,
    )
    forwarded_allow_ips: str = setting(
        "addresses of the reverse proxies trusted to name the client in X-Forwarded-For, "
        "comma-separated (127.0.0.1 for a proxy on this machine that sets it, as "
        "docs/deployment.md's nginx block does); none by default, so no client can choose the "
        "address its limits are counted on",
        default="",
    )
    retention_days: float = setting(
        "delete conversations (and their pairs, votes and critiques) older than this many days; "
        "0 keeps them",
        default=0.0,
    )
    session_days: float = setting(
        "a session id expires this many days after it was issued: the page then gets a new one "
        "silently, an API client a 403 (and the conversations it started can no longer be "
        "continued or deleted through it)",
        default=30.0,
    )

    def trusted_proxies(self) -> list[str]:
        """--forwarded-allow-ips as a list (empty: no proxy's X-Forwarded-For is believed)."""
        return [a.strip() for a in self.forwarded_allow_ips.split(",") if a.strip()]

    def trusted_hosts(self) -> list[str]:
        """What the Host header may name: loopback, the bound address, and the allow-list."""
        names = ["localhost", "127.0.0.1", "::1", "[::1]", *self.allowed_hosts]
        if self.host not in ("0.0.0.0", "::", ""):
            names.append(self.host)
        return names


@dataclass
class CAIConfig:
    """Constitutional AI in the background: critique-revision chains and AI preference labels."""

    enabled: bool = setting(
        "run the background critique/revision and AI-judge worker", default=True
    )
    constitution: Path | None = setting(
        "constitution JSON file; default: the shipped one", default=None
    )
    rounds: int = setting("critique-revision rounds per chosen reply", default=1)
    max_new_tokens: int = setting("longest critique or revision in tokens", default=128)
    ai_label_weight: float = setting(
        "weight of AI-judge labels in reward-model training (0: human votes only)", default=0.5
    )


@dataclass
class AppConfig:
    """Every setting of one app, gathered so that the CLI, a --config file and the tests build
    the same object and `validate()` checks it once, at start, before anything is served: a
    wrong value fails there with its fix, not minutes later inside a retrain cycle. Each
    subsystem then gets only its own section (`engine`, `serve`, `loop`...) and the cycle's
    settings as resolved once here (`cycle`), so no two places apply the precedence of preset,
    files and flags differently."""

    data_dir: Path = setting(
        "where models, the database and caches live ($ASSISTANT_DATA_DIR)",
        default_factory=default_data_dir,
    )
    db_path: Path | str | None = setting(
        "the database: a DuckDB file, or a postgresql:// URL that several app processes share "
        "($ASSISTANT_DATABASE_URL); default: DATA_DIR/assistant.duckdb",
        default_factory=environment.database_url,
    )
    retrain_preset: str = setting(
        "retrain cycle settings: default, or fast (for tests on the tiny model only: its gate "
        "passes any version)",
        default="default",
    )
    retrain_config: Path | None = setting(
        "JSON file overriding fields of the retrain preset, by section "
        '(reward, ppo, gate, sft), e.g. {"ppo": {"steps": 16}}',
        default=None,
    )
    retrain_settings: dict = setting(
        "the retrain sections of a --config file; --retrain-config overrides them field by field",
        default_factory=dict,
    )
    retrain_flags: dict = setting(
        "retrain fields set by command-line flags (`assistant.cli.RETRAIN_FLAGS`): they win over "
        "both files",
        default_factory=dict,
    )
    engine: EngineConfig = field(default_factory=EngineConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    canary: CanaryConfig = field(default_factory=CanaryConfig)
    cai: CAIConfig = field(default_factory=CAIConfig)
    # the retrain cycle's settings, resolved once by validate() (`cycle`)
    _cycle: CycleConfig | None = field(default=None, init=False, repr=False)

    @property
    def max_source_share(self) -> float:
        """The most of the decisive votes one session or one address may cast and still count
        (`alignment.sources`): --max-vote-source-share; else no cap with --single-user, where
        one person casts every vote; else half, wherever the app listens: on loopback it is
        as likely behind a proxy serving many as in front of one person."""
        if self.loop.max_source_share:
            return self.loop.max_source_share
        return 1.0 if self.serve.single_user else 0.5

    @property
    def database(self) -> Path | str:
        """Where the store lives: the DuckDB file, or the Postgres URL (`database_location`)."""
        return self.db_path if self.db_path is not None else self.data_dir / "assistant.duckdb"

    @property
    def on_postgres(self) -> bool:
        return isinstance(self.database, str)

    @property
    def cycle(self) -> CycleConfig:
        """The retrain cycle's settings, as `validate()` resolved them at start: what the loop
        runs every cycle with and the worker receives in its job."""
        if self._cycle is None:
            raise RuntimeError("AppConfig.validate() resolves the cycle's settings: call it first")
        return self._cycle

    def _resolve_cycle(self) -> CycleConfig:
        """The cycle's settings from their sources, each over the ones before it, field by field:
        the preset (--retrain-preset), a --config file's `retrain` section, the --retrain-config
        file, then the flags (--sft, --report-to). One rule: flags over files. Each entry is
        checked (unknown, wrong type, a wrong value) and the error names it and its source."""
        import json

        from alignment.config import check, override, preset

        sources: list[tuple[str, object]] = []
        if self.retrain_settings:
            sources.append(("the --config file's retrain section", self.retrain_settings))
        if self.retrain_config is not None:
            name = f"--retrain-config {self.retrain_config}"
            try:
                sources.append((name, json.loads(Path(self.retrain_config).read_text())))
            except OSError as exc:
                raise ConfigError(f"cannot read {name}: {exc}") from exc
            except ValueError as exc:  # JSONDecodeError
                raise ConfigError(f"{name} is not valid JSON: {exc}") from exc
        if self.retrain_flags:
            sources.append(("the command line", self.retrain_flags))
        try:
            cycle = preset(self.retrain_preset)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        for name, overrides in sources:
            try:
                cycle = override(cycle, overrides)
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}") from exc
        try:
            return check(cycle)
        except ValueError as exc:  # a wrong value, or two values that do not go together
            given = " over ".join(reversed([name for name, _ in sources])) or "the retrain preset"
            raise ConfigError(f"{given}: {exc}") from exc

    def validate(self) -> AppConfig:
        s, e, p = self.serve, self.engine, self.sampling
        checks = [
            (s.max_backlog >= 1, f"--max-backlog must be at least 1, got {s.max_backlog}"),
            (s.max_message_chars >= 1, "--max-message-chars must be positive"),
            (0 <= s.port < 65536, f"--port must be in 0..65535, got {s.port}"),
            (p.max_new_tokens >= 1, "--max-new-tokens must be at least 1"),
            (
                p.temperature > 0,
                "--temperature must be > 0: two candidates need sampling, "
                "at temperature 0 both replies would be identical",
            ),
            (0 < p.top_p <= 1, f"--top-p must be in (0, 1], got {p.top_p}"),
            (
                e.max_model_len > p.max_new_tokens,
                f"--max-model-len ({e.max_model_len}) must exceed --max-new-tokens "
                f"({p.max_new_tokens}) to leave room for the prompt",
            ),
            (
                self.loop.every_votes >= 0 and self.loop.every_minutes >= 0,
                "--retrain-every-votes and --retrain-every-minutes must be >= 0 (0 disables)",
            ),
            (self.cai.rounds >= 1, "--cai-rounds must be at least 1"),
            (self.cai.ai_label_weight >= 0, "--ai-label-weight must be >= 0"),
            *((False, problem) for problem in e.problems()),
            (
                all(_is_address_or_network(a) for a in s.trusted_proxies()),
                f"--forwarded-allow-ips takes IP addresses or networks, comma-separated (e.g. "
                f"127.0.0.1 for a proxy on this machine), got {s.forwarded_allow_ips!r}",
            ),
            (s.retention_days >= 0, "--retention-days must be >= 0 (0 keeps conversations)"),
            (s.session_days > 0, f"--session-days must be > 0, got {s.session_days}"),
            (0 < s.max_backlog_share <= 1, "--max-backlog-share must be in (0, 1]"),
            (
                min(
                    s.max_votes_per_minute,
                    s.max_votes_per_minute_per_address,
                    s.max_votes_per_minute_total,
                    s.max_sessions_per_minute_per_address,
                )
                >= 0,
                "vote and session limits must be >= 0 (0: no limit)",
            ),
            (
                not (s.single_user and s.trusted_proxies()),
                "--single-user says one person casts every vote, --forwarded-allow-ips that a "
                "proxy serves others: pass one of them (`make run` passes --single-user; to "
                "serve others: make run SINGLE_USER= ARGS=...)",
            ),
            (
                not (s.single_user and self.loop.max_source_share),
                "--single-user lifts the cap on one source's share of the votes and "
                "--max-vote-source-share sets it: pass one of them",
            ),
            (
                0 <= self.loop.max_source_share <= 1,
                "--max-vote-source-share must be in [0, 1] (0: 0.5, or 1 with --single-user)",
            ),
            (0 <= self.canary.share <= 1, "--canary-share must be in [0, 1] (0: no canary)"),
            (self.canary.min_votes >= 1, "--canary-min-votes must be at least 1"),
            (self.loop.keep_versions >= 0, "--keep-versions must be >= 0 (0 keeps everything)"),
            (self.loop.cycle_gpus >= 0, "--cycle-gpus must be >= 0 (0: a CPU-only Ray cluster)"),
            (
                self.canary.max_votes == 0 or self.canary.max_votes >= self.canary.min_votes,
                "--canary-max-votes must be 0 (no cap) or at least --canary-min-votes",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self._cycle = self._resolve_cycle()
        return self


def _is_address_or_network(value: str) -> bool:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return False
    return True


# `vllm serve` options that would move the embedded engine off loopback (or off the port the app
# talks to); its development endpoints would then be open beyond this machine's users.
# The sections of AppConfig that hold plain settings, by name: what `run`'s flags and a --config
# file's mappings are read into.
SECTIONS: dict[str, type] = {
    "engine": EngineConfig,
    "serve": ServeConfig,
    "sampling": SamplingConfig,
    "loop": LoopConfig,
    "canary": CanaryConfig,
    "cai": CAIConfig,
}
