"""Nobody steers the model alone and nobody exhausts the app: sessions the server issues, vote
limits per session, address and in total, a share of the backlog per address, request bodies
refused while they arrive, and scheduled cycles refused when one source cast most of the votes.

In-process around a fake engine (`harness.in_process`), clients at different addresses each a
test client connecting from its own. Through `assistant run` and real HTTP only what uvicorn
decides: a made-up `X-Forwarded-For` changes nothing unless `--forwarded-allow-ips` names the
sender (tests/test_proxy.py: behind nginx). There, clients connect from different loopback
addresses (127.0.0.2, ...: all of 127.0.0.0/8 is this machine).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import duckdb
import httpx

from assistant.limits import SessionLimit, SlidingWindow, VoteLimits
from assistant.sessions import MAX_SESSION_CHARS, SessionKeys
from harness.fake_engine import FakeEngine
from harness.in_process import from_address, in_process_app, new_session


def _turn(client, headers: dict | None = None) -> dict:
    r = client.post("/api/chat", json={"message": "hi"}, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def _vote(client, pair_id: str, headers: dict | None = None):
    return client.post("/api/vote", json={"pair_id": pair_id, "choice": "a"}, headers=headers)


def test_sessions_are_issued_by_the_server_and_made_up_ones_refused(app_in_process):
    client = app_in_process
    page = client.get("/")
    cookie = page.headers["set-cookie"]
    assert cookie.startswith("assistant_session=")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie  # no script, no other site
    issued = new_session(client)
    assert _turn(client, issued)["pair_id"]
    for made_up in ("alice", issued["X-Session-Id"] + "x", "a." + "0" * 24, "x" * 100_000):
        r = client.post("/api/chat", json={"message": "hi"}, headers={"X-Session-Id": made_up})
        assert r.status_code == 403 and "unknown session" in r.json()["error"], made_up[:20]
    assert len(issued["X-Session-Id"]) <= MAX_SESSION_CHARS


def test_votes_are_limited_per_address_and_in_total(tmp_path):
    flags = (
        "--max-votes-per-minute", "0",
        "--max-votes-per-minute-per-address", "2",
        "--max-votes-per-minute-total", "3",
    )  # fmt: skip
    with in_process_app(tmp_path, *flags, address="10.0.0.1") as client:
        pairs = [_turn(client)["pair_id"] for _ in range(5)]
        # a vote on a pair that does not exist costs nothing: looked up before it is counted
        for _ in range(3):
            assert _vote(client, "no-such-pair").status_code == 404
        assert _vote(client, pairs[0]).status_code == 200
        assert _vote(client, pairs[1]).status_code == 200
        # a third from the same address is refused, whichever session it brings
        for headers in (None, new_session(client)):
            refused = _vote(client, pairs[2], headers)
            assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
            assert "from this address: at most 2 a minute" in refused.json()["error"]
        other = from_address(client, "10.0.0.2")
        assert _vote(other, pairs[2]).status_code == 200  # a third vote in all
        refused = _vote(from_address(client, "10.0.0.3"), pairs[3])
        assert refused.status_code == 429 and "everybody together" in refused.json()["error"]
    con = duckdb.connect(str(tmp_path / "assistant.duckdb"), read_only=True)
    clients = con.execute("SELECT client FROM votes ORDER BY created_at").fetchall()
    con.close()
    # the address is kept only as a keyed tag: two from one client, one from another
    tags = [c for (c,) in clients]
    assert len(tags) == 3 and tags[0] == tags[1] != tags[2]
    assert all(t.startswith("c-") and "10.0.0" not in t for t in tags)


def test_a_made_up_forwarded_for_is_believed_from_no_one_by_default(tiny_app_factory):
    """uvicorn's own default believes X-Forwarded-For from 127.0.0.1: `assistant run` without
    --forwarded-allow-ips turns that off (what only the real server shows)."""
    app = tiny_app_factory("--max-votes-per-minute", "0", "--max-votes-per-minute-per-address", "2")

    def vote(pair_id: str, headers: dict | None = None, address: str = "127.0.0.1"):
        transport = httpx.HTTPTransport(local_address=address)
        with httpx.Client(transport=transport, timeout=120) as client:
            return client.post(
                app.url + "/api/vote", json={"pair_id": pair_id, "choice": "a"}, headers=headers
            )

    with httpx.Client(base_url=app.url, timeout=120) as client:
        pairs = [_turn(client)["pair_id"] for _ in range(4)]
    assert vote(pairs[0]).status_code == 200
    assert vote(pairs[1]).status_code == 200
    spoofed = {"X-Forwarded-For": "127.0.0.9"}
    for headers in (spoofed, {**spoofed, **app.new_session()}):
        refused = vote(pairs[2], headers)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
        assert "from this address: at most 2 a minute" in refused.json()["error"]
    assert vote(pairs[2], address="127.0.0.2").status_code == 200  # another address is not


def test_one_address_gets_its_share_of_the_backlog_not_all_of_it(tmp_path):
    engine = FakeEngine()
    engine.hold = asyncio.Event()  # replies generate until the test lets them end
    flags = ("--max-backlog", "4", "--max-backlog-share", "0.25")
    with (
        in_process_app(tmp_path, *flags, engine=engine, address="10.0.0.2") as one,
        ThreadPoolExecutor(2) as pool,
    ):
        first = pool.submit(_chat, one)
        _until(lambda: engine.held == 1)
        # 10.0.0.2's one place is taken while its first reply generates: its second is refused
        same = _chat(one)
        other = pool.submit(_chat, from_address(one, "10.0.0.3"))  # someone else still has one
        _until(lambda: engine.held == 2)
        one.portal.call(engine.hold.set)
        first, other = first.result(timeout=60), other.result(timeout=60)
    assert other.status_code == 200
    assert sorted([first.status_code, same.status_code]) == [200, 429], (first.text, same.text)
    assert same.headers["retry-after"] == "5"
    assert "this address already has 1 replies generating" in same.json()["error"]


def _chat(client):
    return client.post("/api/chat", json={"message": "hi"})


def _until(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_request_bodies_are_refused_while_they_arrive(app_in_process):
    client = app_in_process

    def chunks(opening: bytes = b'{"message": "'):  # no Content-Length: the server only learns
        yield opening  # the size by reading
        for _ in range(64):
            yield b"x" * 8192
        yield b'"}'

    # Gradio's routes that take a body, the JSON API and the admin sign-in: one limit
    gradio = b'{"data": ["', b'{"fn_index": 0, "session_hash": "s", "data": ["'
    for path, opening in [
        ("/gradio_api/call/who", gradio[0]),
        ("/gradio_api/queue/join", gradio[1]),
        ("/gradio_api/component_server", gradio[0]),
        ("/api/chat", b'{"message": "'),
        ("/admin/login", b"token="),
    ]:
        r = client.post(path, content=chunks(opening))
        assert r.status_code == 413 and "bytes" in r.json()["error"], (path, r.text[:200])
    # a declared size over the limit is refused before any of the body is read
    for path in ("/api/vote", "/gradio_api/queue/join"):
        headers = {"Content-Type": "application/json", "Content-Length": "1000000000"}
        r = client.post(path, content=b"{", headers=headers)
        assert r.status_code == 413, r.text[:200]
    # a body within the limit still reaches Gradio whole
    r = client.post("/gradio_api/call/who", json={"data": []})
    assert r.status_code == 200 and r.json()["event_id"]


def test_a_scheduled_cycle_on_one_sessions_votes_is_refused_with_the_reason(tmp_path):
    flags = (
        "--retrain-every-votes", "2",
        "--retrain-poll-seconds", "0.5",
        "--max-vote-source-share", "0.5",
    )  # fmt: skip
    with in_process_app(tmp_path, *flags) as client:
        session = new_session(client)
        for _ in range(2):
            assert _vote(client, _turn(client, session)["pair_id"], session).status_code == 200
        store = client.app.state.runtime.store
        _until(lambda: any(r["status"] == "refused" for r in store.training_runs()))
        assert client.get("/api/versions").json()["serving"] == "v0000"
    con = duckdb.connect(str(tmp_path / "assistant.duckdb"), read_only=True)
    runs = con.execute("SELECT status, error FROM training_runs").fetchall()
    con.close()
    assert runs and {status for status, _ in runs} == {"refused"}
    assert "100% of the 2 new votes came from one session (at most 50% allowed)" in runs[0][1]


def test_vote_counters_forget_idle_keys_and_hold_a_bounded_number():
    window = SlidingWindow(limit=1, max_keys=3)
    for i in range(10):
        window.record(f"session-{i}", now=float(i))
    assert len(window) == 3  # the least recently used went first
    assert window.retry_after("session-9", now=9.5) is not None
    assert window.retry_after("session-9", now=70.0) is None  # a minute later it may again
    window.record("late", now=200.0)
    assert len(window) == 1  # keys idle for over a minute are dropped


def test_refused_votes_are_not_counted_against_the_other_limits():
    limits = VoteLimits(per_session=1, per_address=5, total=5)
    assert limits.charge("s1", "c1", now=0.0) is None
    refusal = limits.charge("s1", "c1", now=1.0)
    assert refusal is not None and "this session" in refusal.message
    for i in range(4):  # the refusal took nothing from the address's or the total's allowance
        assert limits.charge(f"s{i + 2}", "c1", now=2.0) is None
    assert "this address" in limits.charge("s9", "c1", now=3.0).message


def test_sessions_issued_to_one_address_are_limited_per_minute():
    limit = SessionLimit(per_address=2)
    assert limit.charge("c1", now=0.0) is None and limit.charge("c1", now=1.0) is None
    refusal = limit.charge("c1", now=2.0)
    assert refusal is not None and refusal.retry_after_s == 59  # the first is 2 s old
    assert "too many new sessions from this address: at most 2 a minute" in refusal.message
    assert limit.charge("c2", now=2.0) is None  # another address has its own allowance
    assert limit.charge("c1", now=61.0) is None  # the first one is over a minute old
    assert SessionLimit(per_address=0).charge("c1", now=0.0) is None  # 0: no limit


def test_session_ids_are_checked_by_their_tag(tmp_path):
    keys = SessionKeys.load_or_create(tmp_path / "secrets" / "session.key")
    assert (tmp_path / "secrets" / "session.key").stat().st_mode & 0o777 == 0o600
    issued = keys.issue()
    assert keys.is_valid(issued) and not keys.is_valid(issued[:-1] + "x")
    again = SessionKeys.load_or_create(tmp_path / "secrets" / "session.key")
    assert again.is_valid(issued)  # sessions outlive a restart
    assert keys.client_tag("10.0.0.1") == again.client_tag("10.0.0.1") != keys.client_tag("x")


def test_the_admin_sign_in_is_throttled_secure_over_https_and_ended_by_signing_out(monkeypatch):
    """/admin/login in-process (the scheme as uvicorn reports it, https behind a TLS proxy)."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from assistant.admin import ADMIN_COOKIE, AdminSignIns
    from assistant.admin_login import WRONG_PER_ADDRESS, build_admin_login_router

    monkeypatch.setenv("ASSISTANT_ADMIN_TOKEN", "right")
    sign_ins = AdminSignIns()
    app = FastAPI()
    app.include_router(build_admin_login_router(sign_ins))
    https = TestClient(app, base_url="https://testserver", follow_redirects=False)
    plain = TestClient(app, base_url="http://testserver", follow_redirects=False)

    signed_in = https.post("/admin/login", data={"token": "right"})
    assert signed_in.status_code == 303
    set_cookie = signed_in.headers["set-cookie"].lower()
    assert "secure" in set_cookie and "httponly" in set_cookie and "samesite=strict" in set_cookie
    assert (
        "secure"
        not in plain.post("/admin/login", data={"token": "right"}).headers["set-cookie"].lower()
    )
    cookie = signed_in.cookies[ADMIN_COOKIE]
    assert sign_ins.problem(cookie) is None
    # signing out forgets the sign-in on the server: a copy of the cookie is refused after it
    out = https.post("/admin/logout", headers={"Cookie": f"{ADMIN_COOKIE}={cookie}"})
    assert out.status_code == 303 and "secure" in out.headers["set-cookie"].lower()
    assert "sign in" in sign_ins.problem(cookie)
    for made_up in ("1.\xe9", "\xb2.x", "", None):  # nothing a browser sends is an error
        assert sign_ins.problem(made_up) is not None

    for _ in range(WRONG_PER_ADDRESS):
        assert https.post("/admin/login", data={"token": "guess"}).status_code == 401
    refused = https.post("/admin/login", data={"token": "right"})  # refused before it is compared
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
    assert "too many wrong admin tokens" in refused.text


def test_admin_sign_ins_expire_and_stay_bounded(monkeypatch):
    from assistant.admin import MAX_LIVE_SIGN_INS, AdminSignIns

    monkeypatch.setenv("ASSISTANT_ADMIN_TOKEN", "right")
    sign_ins = AdminSignIns(max_age_s=60)
    first = sign_ins.issue(now=0.0)
    assert sign_ins.problem(first, now=59.0) is None
    assert sign_ins.problem(first, now=61.0) is not None  # expired, and forgotten
    for i in range(MAX_LIVE_SIGN_INS + 5):
        sign_ins.issue(now=100.0 + i * 1e-6)
    assert len(sign_ins) == MAX_LIVE_SIGN_INS  # the oldest went first
    sign_ins.issue(now=1000.0)
    assert len(sign_ins) == 1
