"""Several app processes on one Postgres (issue 38, part 2), in-process: two apps built from
`assistant run`'s flags on one database, each with its own data directory, as two processes
behind a load balancer would be. Exactly one leads; a cycle asked for on the other is started
(or refused) by the leader and answered the same; the lead passes on when the leader goes.
The same through real processes and a real engine: tests/test_apps_on_postgres.py."""

from __future__ import annotations

import time
from contextlib import ExitStack

from harness.in_process import ADMIN_TOKEN, in_process_app, new_session

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _leader(client) -> bool:
    return client.get("/api/health").json()["leader"]


def _wait(predicate, timeout: float = 30.0) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, "timed out"
        time.sleep(0.2)
    return time.monotonic() - started


def test_one_app_leads_and_a_cycle_asked_elsewhere_is_answered_by_it(tmp_path, postgres_url):
    with in_process_app(tmp_path / "one", "--db", postgres_url) as first:
        with in_process_app(tmp_path / "two", "--db", postgres_url) as second:
            assert _leader(first) and not _leader(second)
            # no decisive votes yet: the leader refuses, and the follower passes its answer on
            asked = second.post("/api/retrain", headers=ADMIN)
            direct = first.post("/api/retrain", headers=ADMIN)
            assert asked.status_code == direct.status_code == 409, asked.text
            assert asked.json()["error"] == direct.json()["error"]
            # what must run once is refused on the follower with where to send it
            pruned = second.post("/api/prune", json={"keep": 3}, headers=ADMIN)
            assert pruned.status_code == 409 and "does not lead" in pruned.json()["error"]
            # a vote cast on either is stored once, in the one database
            session = new_session(first)
            turn = first.post("/api/chat", json={"message": "hi"}, headers=session).json()
            voted = second.post(
                "/api/vote", json={"pair_id": turn["pair_id"], "choice": "a"}, headers=session
            )
            again = first.post(
                "/api/vote", json={"pair_id": turn["pair_id"], "choice": "b"}, headers=session
            )
            assert voted.status_code == 200 and again.status_code == 409
        # the leader stays the leader when the other stops
        assert _leader(first)


def test_the_lead_passes_on_when_the_leader_stops(tmp_path, postgres_url, monkeypatch):
    """The leader's lock goes with it: the other app leads within its next try (5 s), and
    from then on it runs what runs once (here: it starts or refuses cycles itself)."""
    monkeypatch.setenv("ASSISTANT_ADMIN_TOKEN", ADMIN_TOKEN)  # outlives the first app's setting
    with ExitStack() as first_app, ExitStack() as second_app:
        first = first_app.enter_context(in_process_app(tmp_path / "one", "--db", postgres_url))
        second = second_app.enter_context(in_process_app(tmp_path / "two", "--db", postgres_url))
        assert _leader(first) and not _leader(second)
        first_app.close()  # the leader stops
        took = _wait(lambda: _leader(second), timeout=30)
        assert took < 30
        refused = second.post("/api/retrain", headers=ADMIN)  # its own answer now, at once
        assert refused.status_code == 409 and "does not lead" not in refused.json()["error"]


def test_the_cli_asks_the_apps_while_one_leads_and_opens_the_database_when_none_runs(
    tmp_path, postgres_url
):
    from assistant.cli.admin_client import LocalAdmin, RemoteAdmin, admin_client
    from assistant.config import AppConfig

    config = AppConfig(data_dir=tmp_path / "cli", db_path=postgres_url)
    with in_process_app(tmp_path / "one", "--db", postgres_url):
        assert isinstance(admin_client(config, "http://127.0.0.1:9", ADMIN_TOKEN), RemoteAdmin)
    assert isinstance(admin_client(config, "http://127.0.0.1:9", ADMIN_TOKEN), LocalAdmin)
