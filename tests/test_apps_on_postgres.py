"""Two `assistant run` processes on one Postgres and one vLLM engine (issue 38, part 2), as a
team runs them behind a load balancer: a session opened on one is used on the other, votes go
through both and none acknowledged is missing, a cycle asked for on the follower runs once (on
the leader) and both label the new version, the lead passes on within 30 s when the leader is
SIGKILLed, and a Postgres restart under load is a 503 with Retry-After, never a lost vote."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from storage import Store

TOKEN = "s3cret-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}

pytestmark = pytest.mark.cycle  # cycles and several apps: minutes (make test-fast leaves it out)


def _health(app) -> dict:
    return httpx.get(app.url + "/api/health", timeout=10).json()


def _wait(predicate, timeout: float) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, f"not within {timeout} s"
        time.sleep(0.25)
    return time.monotonic() - started


def _turn_and_vote(chat_on, vote_on, session: dict, message: str, choice: str = "a"):
    """A turn on one app and its vote on the other: the pair id when the vote was
    acknowledged (200), else None; the status codes seen."""
    turn = httpx.post(
        chat_on.url + "/api/chat", json={"message": message}, headers=session, timeout=120
    )
    if turn.status_code != 200:
        return None, turn
    pair_id = turn.json()["pair_id"]
    voted = httpx.post(
        vote_on.url + "/api/vote",
        json={"pair_id": pair_id, "choice": choice},
        headers=session,
        timeout=60,
    )
    return (pair_id if voted.status_code == 200 else None), voted


def _stored_votes(url: str) -> set[str]:
    store = Store(url, read_only=True)
    try:
        return {r["pair_id"] for r in store._rows("SELECT pair_id FROM votes")}
    finally:
        store.close()


@pytest.fixture
def two_apps(postgres_url, tiny_app_factory, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("ASSISTANT_ADMIN_TOKEN", TOKEN)
    flags = ("--db", postgres_url, "--model", str(tiny_model_dir), "--retrain-preset", "fast")
    first = tiny_app_factory(*flags)
    second = tiny_app_factory(*flags)
    return first, second


def test_sessions_votes_and_one_cycle_across_two_apps(two_apps, postgres_url):
    leader, follower = two_apps
    assert _health(leader)["leader"] and not _health(follower)["leader"]

    # votes through both at once, each turn on one app and its vote on the other
    acknowledged: list[str] = []
    refused: list[int] = []
    lock = threading.Lock()

    def user(i: int) -> None:
        session = (leader if i % 2 else follower).new_session()  # issued by either
        for k in range(5):
            chat_on, vote_on = (leader, follower) if (i + k) % 2 else (follower, leader)
            pair_id, answer = _turn_and_vote(chat_on, vote_on, session, f"u{i} q{k}", "ab"[k % 2])
            with lock:
                (acknowledged.append(pair_id) if pair_id else refused.append(answer.status_code))

    threads = [threading.Thread(target=user, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert refused == [] and len(acknowledged) == 20
    assert set(acknowledged) <= _stored_votes(postgres_url)  # 0 acknowledged votes missing

    # a cycle asked for on the follower runs on the leader, once; both serve what it deployed
    started = httpx.post(follower.url + "/api/retrain", headers=ADMIN, timeout=120)
    assert started.status_code == 202, started.text
    run_id = started.json()["run_id"]
    again = httpx.post(leader.url + "/api/retrain", headers=ADMIN, timeout=120)
    assert again.status_code == 409  # one cycle at a time, whoever is asked
    _wait(
        lambda: (
            httpx.get(f"{follower.url}/api/retrain/{run_id}", headers=ADMIN, timeout=30).json()[
                "status"
            ]
            != "running"
        ),
        timeout=600,
    )
    run = httpx.get(f"{follower.url}/api/retrain/{run_id}", headers=ADMIN, timeout=30).json()
    assert run["status"] == "deployed" and run["result"]["version"] == "v0001", run
    store = Store(postgres_url, read_only=True)
    try:
        cycles = store._rows("SELECT id FROM training_runs WHERE kind = 'cycle'")
    finally:
        store.close()
    assert [c["id"] for c in cycles] == [run_id]  # it ran once
    _wait(lambda: _health(follower)["model_version"] == "v0001", timeout=15)
    for app in (leader, follower):
        turn = httpx.post(app.url + "/api/chat", json={"message": "after"}, timeout=120).json()
        assert turn["model_version"] == "v0001"
        voted = httpx.post(
            app.url + "/api/vote", json={"pair_id": turn["pair_id"], "choice": "a"}, timeout=60
        ).json()
        assert voted["versions"] == {"a": "v0001", "b": "v0001"}  # what wrote each reply


def test_the_follower_leads_within_30_s_of_the_leader_being_killed(two_apps, postgres_url):
    leader, follower = two_apps
    assert _health(leader)["leader"] and not _health(follower)["leader"]
    leader.stop(signal.SIGKILL)
    took = _wait(lambda: _health(follower)["leader"], timeout=30)
    print(f"the follower led {took:.1f} s after the leader was killed")
    session = follower.new_session()
    pair_id, answer = _turn_and_vote(follower, follower, session, "still here")
    assert pair_id is not None, answer.text
    assert pair_id in _stored_votes(postgres_url)


def _workers(data_dir) -> list[int]:
    """The pids of cycle workers (`python -m alignment.worker JOB`) whose job is under
    `data_dir`."""
    from pathlib import Path

    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"alignment.worker" in cmd and any(str(data_dir).encode() in c for c in cmd):
            found.append(int(proc.name))
    return found


def _run(app, run_id: str) -> dict:
    return httpx.get(f"{app.url}/api/retrain/{run_id}", headers=ADMIN, timeout=30).json()


def test_a_cycle_cut_by_the_leaders_death_ends_once_and_the_next_leader_runs_the_next(
    two_apps, postgres_url
):
    """SIGKILL the leader mid-cycle: its worker dies with it, the new leader records that
    cycle failed (interrupted) once, nothing it made is recorded, and the next cycle, on the new
    leader, is the only other one: no cycle runs twice or on two processes."""
    leader, follower = two_apps
    assert _health(leader)["leader"] and not _health(follower)["leader"]
    session = follower.new_session()
    for k in range(12):
        pair_id, answer = _turn_and_vote(follower, leader, session, f"q{k}", "ab"[k % 2])
        assert pair_id is not None, answer.text
    started = httpx.post(follower.url + "/api/retrain", headers=ADMIN, timeout=120)
    assert started.status_code == 202, started.text
    cut = started.json()["run_id"]
    _wait(lambda: _workers(leader.data_dir), timeout=120)  # the leader's worker trains
    worker = _workers(leader.data_dir)
    leader.stop(signal.SIGKILL)
    _wait(lambda: not _workers(leader.data_dir), timeout=15)  # it died with its app
    _wait(lambda: _health(follower)["leader"], timeout=30)
    run = _run(follower, cut)
    assert run["status"] == "failed", run  # recorded once, by the new leader
    print(f"worker {worker} died with its leader; the cycle: {run['result']}")

    again = httpx.post(follower.url + "/api/retrain", headers=ADMIN, timeout=120)
    assert again.status_code == 202, again.text
    nxt = again.json()["run_id"]
    _wait(lambda: _run(follower, nxt)["status"] != "running", timeout=600)
    finished = _run(follower, nxt)
    assert finished["status"] in ("deployed", "challenger", "rejected"), finished
    store = Store(postgres_url, read_only=True)
    try:
        cycles = store._rows(
            "SELECT id, status FROM training_runs WHERE kind = 'cycle' ORDER BY id"
        )
        versions = store._rows("SELECT version FROM model_versions ORDER BY version")
    finally:
        store.close()
    assert sorted(c["id"] for c in cycles) == sorted([cut, nxt])  # each ran once
    # the cut cycle recorded no version; it keeps its name (v0001), so no two cycles ever
    # write one folder, and the next one (recorded even when the gate rejects it) is v0002
    assert [v["version"] for v in versions] == ["v0000", "v0002"], versions
    assert finished["result"]["version"] == "v0002", finished


def test_a_postgres_restart_under_load_is_a_503_and_loses_nothing(
    two_apps, postgres_cluster, postgres_url
):
    first, second = two_apps
    acknowledged: list[str] = []
    statuses: list[int] = []
    retry_after: set[str] = set()
    stop = threading.Event()

    def user(i: int) -> None:
        session = None
        k = 0
        while not stop.is_set():
            k += 1
            try:
                if session is None:
                    session = (first if i % 2 else second).new_session()
                pair_id, answer = _turn_and_vote(first, second, session, f"u{i} q{k}")
            except httpx.HTTPError:
                continue  # (a session request refused while the database is down)
            statuses.append(answer.status_code)
            if pair_id:
                acknowledged.append(pair_id)
            elif answer.status_code == 503:
                retry_after.add(answer.headers.get("retry-after", ""))
                time.sleep(0.5)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        _wait(lambda: len(acknowledged) >= 6, timeout=120)
        postgres_cluster.stop_server("fast")
        time.sleep(8)
    finally:
        postgres_cluster.restart_server()
    before = len(acknowledged)
    _wait(lambda: len(acknowledged) >= before + 6, timeout=120)  # both recover by themselves
    stop.set()
    for t in threads:
        t.join()
    assert 503 in statuses and "" not in retry_after, (set(statuses), retry_after)
    assert set(statuses) <= {200, 503}, set(statuses)
    assert set(acknowledged) <= _stored_votes(postgres_url)  # nothing acknowledged is lost
    _wait(lambda: _health(first)["leader"] != _health(second)["leader"], timeout=30)
