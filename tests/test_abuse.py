"""Nobody steers the model alone and nobody exhausts the app: sessions the server issues, vote
limits per session, address and in total, a share of the backlog per address, request bodies
refused while they arrive, and scheduled cycles refused when one source cast most of the votes.

Through `assistant run` on the shared tiny engine and real HTTP. Clients at different addresses
connect from different loopback addresses (127.0.0.2, ...: all of 127.0.0.0/8 is this machine);
a made-up `X-Forwarded-For` changes nothing unless `--forwarded-allow-ips` names the sender
(tests/test_proxy.py: behind nginx).
"""

from __future__ import annotations

import asyncio
import socket
import time

import duckdb
import httpx

from assistant.limits import SessionLimit, SlidingWindow, VoteLimits
from assistant.sessions import MAX_SESSION_CHARS, SessionKeys


def _from(address: str) -> httpx.HTTPTransport:
    """Connections from `address`: to the app, another client."""
    return httpx.HTTPTransport(local_address=address)


def _turn(app, headers: dict | None = None) -> dict:
    r = httpx.post(app.url + "/api/chat", json={"message": "hi"}, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _vote(app, pair_id: str, headers: dict | None = None, address: str = "127.0.0.1"):
    with httpx.Client(transport=_from(address), timeout=120) as client:
        return client.post(
            app.url + "/api/vote", json={"pair_id": pair_id, "choice": "a"}, headers=headers
        )


def test_sessions_are_issued_by_the_server_and_made_up_ones_refused(tiny_app):
    page = httpx.get(tiny_app.url + "/")
    cookie = page.headers["set-cookie"]
    assert cookie.startswith("assistant_session=")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie  # no script, no other site
    issued = tiny_app.new_session()
    assert _turn(tiny_app, issued)["pair_id"]
    for made_up in ("alice", issued["X-Session-Id"] + "x", "a." + "0" * 24, "x" * 100_000):
        r = httpx.post(
            tiny_app.url + "/api/chat",
            json={"message": "hi"},
            headers={"X-Session-Id": made_up},
            timeout=30,
        )
        assert r.status_code == 403 and "unknown session" in r.json()["error"], made_up[:20]
    assert len(issued["X-Session-Id"]) <= MAX_SESSION_CHARS


def test_votes_are_limited_per_address_and_in_total(tiny_app_factory):
    app = tiny_app_factory(
        "--max-votes-per-minute", "0",
        "--max-votes-per-minute-per-address", "2",
        "--max-votes-per-minute-total", "3",
    )  # fmt: skip
    pairs = [_turn(app)["pair_id"] for _ in range(5)]
    # a vote on a pair that does not exist costs nothing: looked up before it is counted
    for _ in range(3):
        assert _vote(app, "no-such-pair").status_code == 404
    assert _vote(app, pairs[0]).status_code == 200
    assert _vote(app, pairs[1]).status_code == 200
    # a third from the same address is refused, whichever session it brings, and whatever
    # address it claims to be forwarded for (no --forwarded-allow-ips: nobody is believed)
    spoofed = {"X-Forwarded-For": "127.0.0.9"}
    for headers in (None, app.new_session(), spoofed, {**spoofed, **app.new_session()}):
        refused = _vote(app, pairs[2], headers)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
        assert "from this address: at most 2 a minute" in refused.json()["error"]
    assert _vote(app, pairs[2], address="127.0.0.2").status_code == 200  # a third vote in all
    refused = _vote(app, pairs[3], address="127.0.0.3")
    assert refused.status_code == 429 and "everybody together" in refused.json()["error"]
    app.stop()
    con = duckdb.connect(str(app.db), read_only=True)
    clients = con.execute("SELECT client FROM votes ORDER BY created_at").fetchall()
    con.close()
    # the address is kept only as a keyed tag: two from one client, one from another
    tags = [c for (c,) in clients]
    assert len(tags) == 3 and tags[0] == tags[1] != tags[2]
    assert all(t.startswith("c-") and "127.0.0" not in t for t in tags)


def test_one_address_gets_its_share_of_the_backlog_not_all_of_it(tiny_app_factory):
    app = tiny_app_factory(
        "--max-backlog", "4", "--max-backlog-share", "0.25", "--max-new-tokens", "200"
    )

    async def run():
        def client(address):
            transport = httpx.AsyncHTTPTransport(local_address=address)
            return httpx.AsyncClient(base_url=app.url, timeout=120, transport=transport)

        async with client("127.0.0.2") as one, client("127.0.0.3") as other:

            def chat(c):
                return c.post("/api/chat", json={"message": "hi"})

            # all three at once: whichever of 127.0.0.2's two is admitted first holds its one
            # place for the whole generation (an engine round trip at least), so the other is
            # refused; a fixed sleep before the second raced a first reply that ended early
            return await asyncio.gather(chat(one), chat(one), chat(other))

    one, two, other = asyncio.run(run())
    assert other.status_code == 200
    assert sorted([one.status_code, two.status_code]) == [200, 429], (one.text, two.text)
    same = one if one.status_code == 429 else two
    assert same.headers["retry-after"] == "5"
    assert "this address already has 1 replies generating" in same.json()["error"]


def test_request_bodies_are_refused_while_they_arrive(tiny_app):
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
        r = httpx.post(tiny_app.url + path, content=chunks(opening), timeout=30)
        assert r.status_code == 413 and "bytes" in r.json()["error"], (path, r.text[:200])
    # a declared size over the limit is refused before any of the body is read
    for path in (b"/api/vote", b"/gradio_api/queue/join"):
        with socket.create_connection(("127.0.0.1", tiny_app.port), timeout=30) as sock:
            sock.sendall(
                b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n{"
            )
            answer = sock.recv(4096).decode()
        assert answer.startswith("HTTP/1.1 413"), answer[:200]
    # a body within the limit still reaches Gradio whole
    r = httpx.post(tiny_app.url + "/gradio_api/call/who", json={"data": []}, timeout=30)
    assert r.status_code == 200 and r.json()["event_id"]


def test_a_scheduled_cycle_on_one_sessions_votes_is_refused_with_the_reason(
    tiny_app_factory, tiny_model_dir
):
    app = tiny_app_factory(
        "--model", str(tiny_model_dir),
        "--retrain-preset", "fast",
        "--retrain-every-votes", "2",
        "--retrain-poll-seconds", "0.5",
        "--max-vote-source-share", "0.5",
    )  # fmt: skip
    session = app.new_session()
    for _ in range(2):
        assert _vote(app, _turn(app, session)["pair_id"], session).status_code == 200
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "scheduled cycle refused" not in app.log.read_text():
        time.sleep(0.5)
    assert httpx.get(app.url + "/api/versions").json()["serving"] == "v0000"
    app.stop()
    con = duckdb.connect(str(app.db), read_only=True)
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
