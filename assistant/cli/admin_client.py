"""The CLI's admin actions, done on the database file or asked of the running app that holds it.

`admin_client` picks one: `LocalAdmin` when no app holds the database (it opens the store), else
`RemoteAdmin`, which calls the app's admin API with the admin token. The commands call the
`AdminClient` they are given and never ask which it is. Neither prints a command's result; the
remote one says on stderr that it asks the app, and follows a cycle's progress stream.

Heavy or slow imports (storage, httpx, the server) happen inside the methods, so `--help` stays
instant.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from assistant.config import AppConfig, ConfigError

Progress = Callable[[dict], None]  # a cycle's progress event (`alignment.worker` writes them)


@dataclass(frozen=True)
class Rollback:
    version: str
    swap_seconds: float | None  # None: no app swapped it in; it is served at the next start


class AdminClient(Protocol):
    def versions(self) -> dict:
        """`{"serving": name or None, "versions": [row, ...]}`, newest first, with their paths."""
        ...

    def retrain(self, on_progress: Progress, settings_given: bool) -> dict:
        """Run one cycle and return its summary. `settings_given`: the command line named cycle
        settings (a running app refuses them: it retrains with those it was started with)."""
        ...

    def rollback(self, version: str) -> Rollback: ...

    def prune(self, keep: int) -> dict:
        """`{"pruned": [...], "kept": [...], "freed_mb": float}`."""
        ...

    def export(self, format: str) -> list[dict]:
        """The records of `storage.export`'s `format`."""
        ...


def admin_client(config: AppConfig, url: str, token: str | None) -> AdminClient:
    """`RemoteAdmin` at `url` when a running app holds the database, else `LocalAdmin`. Without
    `token`: $ASSISTANT_ADMIN_TOKEN, else the one `assistant run` stored in the data directory."""
    if not _app_holds_db(config):
        return LocalAdmin(config)
    from assistant import environment
    from assistant.admin import stored_admin_token

    token = token or environment.admin_token() or stored_admin_token(config.data_dir) or ""
    return RemoteAdmin(url, token)


def _app_holds_db(config: AppConfig) -> bool:
    """Whether a running app holds the database (DuckDB lets one process write it); on
    Postgres, whether an app process leads there (the CLI then asks an app, never runs a cycle
    or a rollback beside the leader)."""
    from storage import DatabaseInUseError, Store

    try:
        Store(config.database, read_only=True).close()  # unreachable Postgres: said here
    except DatabaseInUseError:
        return True
    if config.on_postgres:  # any number of processes open it: one runs if one leads
        from storage.leader_lock import LeaderLock

        lock = LeaderLock(config.database)
        try:
            return not lock.try_acquire()
        finally:
            lock.release()
    return False


class LocalAdmin:
    """The database file opened here: no app is running."""

    def __init__(self, config: AppConfig) -> None:
        self.config = config

    def versions(self) -> dict:
        from storage import Store

        store = Store(self.config.database, read_only=True)
        try:
            rows = store.model_versions()
        finally:
            store.close()
        serving = next((r["version"] for r in rows if r["status"] == "serving"), None)
        return {"serving": serving, "versions": rows}

    def retrain(self, on_progress: Progress, settings_given: bool) -> dict:
        import asyncio

        from assistant.server import open_runtime

        runtime = open_runtime(self.config, on_progress=on_progress)

        async def once():
            try:
                await runtime.start()
                return await runtime.loop.retrain()
            finally:
                await runtime.aclose()

        return asyncio.run(once())

    def rollback(self, version: str) -> Rollback:
        from storage import Store

        store = Store(self.config.database)
        try:
            store.servable_path(version)  # refuses a rejected or pruned version
            store.set_serving(version, 0.0)
        finally:
            store.close()
        return Rollback(version, None)

    def prune(self, keep: int) -> dict:
        from alignment.pruning import prune
        from storage import Store

        store = Store(self.config.database)
        try:
            return prune(store, self.config.data_dir / "versions", keep).as_dict()
        finally:
            store.close()

    def export(self, format: str) -> list[dict]:
        from storage import Store
        from storage.export import demonstration_records, preference_records

        store = Store(self.config.database, read_only=True)
        try:
            if format == "sft":
                return demonstration_records(store.demonstrations())
            return preference_records(store.voted_pairs(), format)
        finally:
            store.close()


class RemoteAdmin:
    """The running app, which holds the database, asked over its admin API (/api/...)."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url  # as given: the messages name it so
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def versions(self) -> dict:
        return self._ask("GET", "versions").json()

    def retrain(self, on_progress: Progress, settings_given: bool) -> dict:
        if settings_given:
            raise ConfigError(
                "the running app retrains with the settings it was started with "
                "(--retrain-preset, --retrain-config, --report-to or --config of `assistant run`); "
                "restart it "
                "with these, or stop it to retrain offline with them"
            )
        run_id = self._ask("POST", "retrain").json()["run_id"]
        print(f"cycle {run_id} started; following its progress", file=sys.stderr)
        return self._follow_cycle(run_id, on_progress)

    def rollback(self, version: str) -> Rollback:
        result = self._ask("POST", "rollback", {"version": version}).json()
        return Rollback(result["version"], result["swap_seconds"])

    def prune(self, keep: int) -> dict:
        return self._ask("POST", "prune", {"keep": keep}).json()

    def export(self, format: str) -> list[dict]:
        lines = self._ask("GET", "export", params={"format": format}).text.splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def _ask(self, method: str, route: str, body: dict | None = None, params: dict | None = None):
        """The one way the CLI asks the app: the admin token, and the app's refusals as errors
        the CLI prints."""
        import httpx

        print(
            f"the database is in use by the running app; asking it at {self.url}", file=sys.stderr
        )
        try:
            resp = httpx.request(
                method,
                f"{self.url.rstrip('/')}/api/{route}",
                json=body,
                params=params,
                headers=self.headers,
                timeout=None,
            )
        except httpx.HTTPError as exc:
            raise ConfigError(
                f"the database is locked by another process and the app at "
                f"{self.url} did not answer ({exc}); pass --url"
            ) from exc
        _check_answer(resp)
        return resp

    def _follow_cycle(self, run_id: str, on_progress: Progress) -> dict:
        """Follow a cycle the app runs through its progress stream (GET /api/retrain/ID/events);
        returns its summary. A dropped stream is taken up again where it broke (Last-Event-ID)."""
        import httpx

        url = f"{self.url.rstrip('/')}/api/retrain/{run_id}/events"
        seen, drops = 0, 0
        while True:
            headers = {**self.headers, "Last-Event-ID": str(seen)}
            try:
                # the app sends a comment at least every 15 s while the cycle runs
                with httpx.stream("GET", url, headers=headers, timeout=httpx.Timeout(60)) as resp:
                    _check_answer(resp)
                    for kind, n, data in server_sent_events(resp.iter_lines()):
                        if kind == "result":
                            return data
                        seen, drops = n, 0
                        on_progress(data)
                problem = "the stream ended before the cycle did"
            except httpx.HTTPError as exc:
                problem = str(exc) or type(exc).__name__
            drops += 1
            if drops > 3:
                raise ConfigError(
                    f"lost the app's progress stream ({problem}); the cycle goes on: "
                    f"GET /api/retrain/{run_id} says how it ends"
                )
            time.sleep(2)


def _check_answer(resp) -> None:
    """The app's refusal as an error the CLI prints."""
    if resp.status_code >= 400:
        resp.read()  # a streamed answer too
        try:
            error = resp.json().get("error", resp.text)
        except ValueError:  # not JSON: a proxy's page, say
            error = resp.text[:200]
        raise ConfigError(f"the app refused ({resp.status_code}): {error}")


def server_sent_events(lines) -> Iterator[tuple[str, int, dict]]:
    """(event, id, JSON data) for each event in a text/event-stream, comments skipped."""
    kind, number, data = "message", 0, ""
    for line in lines:
        if not line:
            if data:
                yield kind, number, json.loads(data)
            kind, data = "message", ""
        elif not line.startswith(":"):
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                kind = value
            elif field == "id" and value.isdigit():
                number = int(value)
            elif field == "data":
                data += value
