"""The JSON API. Its rules (statuses, sessions, limits, what is stored and exported) in-process
around a fake engine (`app_in_process`, `harness.in_process`); what only a real process or the
real engine shows (real replies, the context window, batching, kill -9, the CLI asking the
running app) over real HTTP against `assistant run` on a real vLLM engine (tiny model)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import duckdb
import httpx
import pytest

from harness.app_process import ADMIN_TOKEN
from harness.fake_engine import FakeEngine
from harness.in_process import ADMIN_HEADERS, export, in_process_app, new_session
from storage import Store
from tests import store_reads


def chat(client, message="Hello there", conversation_id=None, **extra):
    """`POST /api/chat` through `client`: the in-process app's, or `_over_http(app)`."""
    body = {"message": message, **extra}
    if conversation_id:
        body["conversation_id"] = conversation_id
    return client.post("/api/chat", json=body)


def vote(client, pair_id, choice="a"):
    return client.post("/api/vote", json={"pair_id": pair_id, "choice": choice})


def _over_http(app) -> httpx.Client:
    return httpx.Client(base_url=app.url, timeout=120)


def test_chat_returns_two_candidates_from_serving_version(tiny_app):
    """Real replies from the real engine, through the app process."""
    with _over_http(tiny_app) as client:
        resp = chat(client)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert set(body) == {"conversation_id", "pair_id", "candidates", "model_version"}
        assert body["model_version"] == client.get("/api/versions").json()["serving"]
        a, b = body["candidates"]
        assert a["id"] != b["id"] and a["text"] and b["text"]
        # Seeds seed and seed+1 at temperature 1 on a random model: the replies differ.
        assert a["text"] != b["text"]
        vote(client, body["pair_id"], "a")


def test_vote_continues_conversation_and_second_vote_is_409(app_in_process):
    client = app_in_process
    first = chat(client, "Tell me about gravity").json()
    conv = first["conversation_id"]
    blocked = chat(client, "and more?", conv)
    assert blocked.status_code == 409 and "vote" in blocked.json()["error"]
    ok = vote(client, first["pair_id"], "b")
    assert ok.status_code == 200 and ok.json()["continued_with"] == first["candidates"][1]["text"]
    again = vote(client, first["pair_id"], "a")
    assert again.status_code == 409
    second = chat(client, "and more?", conv)
    assert second.status_code == 200
    assert second.json()["conversation_id"] == conv
    vote(client, second.json()["pair_id"], "tie")


BAD_REQUESTS = [
    ("chat", b"not json", 400, "not valid JSON"),
    ("chat", b"[1, 2]", 400, "JSON object"),
    ("chat", b"{}", 400, "missing 'message'"),
    ("chat", b'{"message": ""}', 400, "empty"),
    ("chat", b'{"message": "   \\n "}', 400, "empty"),
    ("chat", b'{"message": 42}', 422, "string"),
    ("chat", json.dumps({"message": "x" * 5000}).encode(), 413, "limit"),
    ("chat", json.dumps({"message": "x" * (1 << 20)}).encode(), 413, "bytes"),  # 1 MB
    ("chat", b'{"message": "<script>alert(1)</script>", "session_id": 7}', 422, "string"),
    ("chat", b'{"message": "hi\\u0000there"}', 400, "control"),
    ("chat", b'{"message": "hi", "conversation_id": "nope"}', 404, "unknown conversation"),
    ("chat", b'{"message": "hi", "conversation_id": 5}', 422, "string"),
    ("chat", b"\xff\xfe", 400, "not valid JSON"),
    ("vote", b'{"pair_id": "nope", "choice": "a"}', 404, "unknown pair"),
    ("vote", b'{"pair_id": "nope", "choice": "c"}', 422, "choice"),
    ("vote", b'{"choice": "a"}', 400, "missing 'pair_id'"),
    ("vote", b'{"pair_id": "x"}', 400, "missing 'choice'"),
    ("vote", b"oops", 400, "not valid JSON"),
    ("vote", b'{"pair_id": ["x"], "choice": "a"}', 422, "string"),
    ("vote", b'{"pair_id": "x", "choice": null}', 422, "choice"),
    # what no database stores is refused at the edge, naming the field (issue 36)
    ("vote", b'{"pair_id": "nope", "choice": "a", "voter": "\\ud800"}', 422, "'voter'"),
    ("vote", json.dumps({"pair_id": "nope", "choice": "a", "voter": "v" * 201}).encode(), 422,
     "voter"),
    ("chat", b'{"message": "hi \\udfff"}', 422, "'message' contains a lone surrogate"),
    ("demonstration", b'{"pair_id": "nope", "text": "\\ud83d"}', 422, "'text'"),
    ("chat", b"[" * 100_000, 400, "nested deeper"),
    ("chat", b'{"message": "hi", "x": ' + b"[" * 40 + b"]" * 40 + b"}", 400, "nested deeper"),
]  # fmt: skip


@pytest.mark.parametrize(("route", "body", "status", "message"), BAD_REQUESTS)
def test_bad_input_gets_4xx_json_and_changes_nothing(app_in_process, route, body, status, message):
    admin = ADMIN_HEADERS
    exported = app_in_process.get("/api/export", headers=admin)
    assert exported.status_code == 200, exported.text  # the comparison below means something
    before = exported.text
    resp = app_in_process.post(
        f"/api/{route}", content=body, headers={"content-type": "application/json"}
    )
    assert resp.status_code == status, resp.text
    assert message in resp.json()["error"]
    assert app_in_process.get("/api/export", headers=admin).text == before


def test_another_sessions_conversation_cannot_be_continued_or_voted_in(app_in_process):
    client = app_in_process
    alice, mallory = new_session(client), new_session(client)
    turn = client.post("/api/chat", json={"message": "mine"}, headers=alice).json()
    vote = {"pair_id": turn["pair_id"], "choice": "a"}
    for headers in (mallory, {}):
        resp = client.post("/api/vote", json=vote, headers=headers)
        assert resp.status_code == 403 and "another session" in resp.json()["error"]
    follow = {"message": "hijack", "conversation_id": turn["conversation_id"]}
    resp = client.post("/api/chat", json=follow, headers=mallory)
    assert resp.status_code == 403
    resp = client.post("/api/vote", json=vote, headers=alice)
    assert resp.status_code == 200, resp.text  # the owner still can: the refusals stored nothing


def gradio_call(client, name: str, data: list | None = None, cookie: bytes | None = None) -> str:
    """Call a page handler by name through Gradio's API, as anyone can (`/gradio_api/info`
    lists them); the event stream of its answer."""
    headers = {"Cookie": cookie} if cookie else {}
    r = client.post(f"/gradio_api/call/{name}", json={"data": data or []}, headers=headers)
    assert r.status_code == 200, r.text
    event = r.json()["event_id"]
    return client.get(f"/gradio_api/call/{name}/{event}", headers=headers).text


def test_page_serves_no_files_beyond_its_own(app_in_process):
    # The page serves no files: Gradio's file route is closed, so neither the database, the
    # source, system files nor traversal; nor any URL (`file=https://...` fetched any public
    # URL for anyone: an open proxy); nor its upload route (the page takes no files).
    client = app_in_process
    health = f"{client.base_url}/api/health"
    for path in (f"/gradio_api/file={health}", f"/gradio_api/file/{health}",
                 "/gradio_api/file=https://127.0.0.1/", "/gradio_api/proxy=https://127.0.0.1/",
                 "/gradio_api/file=pyproject.toml"):  # fmt: skip
        resp = client.get(path)
        assert resp.status_code == 403 and "does not offer" in resp.json()["error"], path
    for path in (
        f"/gradio_api/file={client.app.state.runtime.store.path}",
        "/gradio_api/file=/etc/passwd",
        "/gradio_api/file=pyproject.toml",
        "/gradio_api/file=..%2f..%2fetc%2fpasswd",
        "/assets/..%2f..%2f..%2fetc%2fpasswd",
        "/static/../../../etc/passwd",
    ):
        resp = client.get(path)
        assert resp.status_code in (403, 404), (path, resp.status_code)
        assert "root:" not in resp.text
    upload = client.post("/gradio_api/upload", files={"files": ("x.txt", b"dropped file")})
    assert upload.status_code == 403 and "does not offer" in upload.json()["error"]
    # the other Gradio routes the page never uses: recordings, deep links, run history
    recording = client.post(
        "/gradio_api/process_recording", files={"audio": ("a.wav", b"x" * 4096)}
    )
    assert recording.status_code == 403
    for path in ("/gradio_api/deep_link?session_hash=x", "/gradio_api/runs",
                 "/gradio_api/run-history/records"):  # fmt: skip
        assert client.get(path).status_code == 403, path
    assert client.get("/").status_code == 200  # the page itself still loads


def test_the_admin_tab_answers_a_signed_in_admin_only(app_in_process):
    """Every Admin-tab handler is callable by name through Gradio's API; the refresh (a scan of
    every version's replies, which shows server paths) answers nobody but a signed-in admin,
    and a sign-out ends the sign-in on the server, for every copy of the cookie."""
    client = app_in_process
    info = client.get("/gradio_api/info").json()["named_endpoints"]
    refreshes = [n[1:] for n, e in info.items() if n.startswith("/refresh") and not e["parameters"]]
    assert len(refreshes) >= 3, list(info)

    def tab(cookie: bytes | None) -> str:
        return "".join(gradio_call(client, name, cookie=cookie) for name in refreshes)

    assert "v0000" not in tab(None)  # the version table stays empty
    # a cookie that is no sign-in, non-ASCII included, is refused in words, not with an error
    for made_up in (b"assistant_admin=1.\xe9", b"assistant_admin=\xb2.x", b"assistant_admin=x"):
        answer = gradio_call(client, "who", cookie=made_up)
        assert "event: complete" in answer and "Not signed in" in answer, answer
        assert "v0000" not in tab(made_up)
    login = client.post("/admin/login", data={"token": ADMIN_TOKEN})
    assert login.status_code == 303 and "Secure" not in login.headers["set-cookie"]  # plain HTTP
    cookie = f"assistant_admin={login.cookies['assistant_admin']}".encode()
    assert ADMIN_TOKEN not in cookie.decode()
    assert "Signed in as admin" in gradio_call(client, "who", cookie=cookie)
    assert "v0000" in tab(cookie)
    out = client.post("/admin/logout", headers={"Cookie": cookie})
    assert out.status_code == 303
    # the copy this client kept of the cookie is dead too: the server forgot the sign-in
    assert "Not signed in" in gradio_call(client, "who", cookie=cookie)
    assert "v0000" not in tab(cookie)


def test_message_longer_than_context_is_413(tiny_app):
    # Within the character limit but far beyond the tiny engine's 512-token window: the real
    # engine's refusal, mapped to 413.
    with _over_http(tiny_app) as client:
        resp = chat(client, "gravity spacetime curvature " * 140)
    assert resp.status_code == 413, resp.text
    assert "context" in resp.json()["error"]


def test_health_and_versions(tiny_app):
    health = httpx.get(tiny_app.url + "/api/health").json()
    assert health["status"] == "ok" and health["engine"] is True
    versions = httpx.get(tiny_app.url + "/api/versions").json()
    assert versions["serving"] == "v0000"
    assert [v["version"] for v in versions["versions"]] == ["v0000"]
    assert versions["versions"][0]["status"] == "serving"
    # the engine's own metrics, from the real vLLM server, through the app (admin only)
    engine = httpx.get(tiny_app.url + "/metrics/engine", headers=tiny_app.admin_headers())
    assert engine.status_code == 200 and "vllm:" in engine.text, engine.text[:300]


def test_export_endpoint_returns_trl_records(app_in_process):
    client = app_in_process
    first = chat(client, "Pick one").json()
    vote(client, first["pair_id"], "b")
    lines = export(client, "trl").text.splitlines()
    records = [json.loads(line) for line in lines]
    match = [r for r in records if r["prompt"][-1]["content"] == "Pick one"]
    assert match and match[-1]["chosen"][0]["content"] == first["candidates"][1]["text"]
    assert export(client, "x").status_code == 422


def test_concurrent_users_are_batched_not_serialised(tiny_app):
    async def one(client, i):
        r = await client.post(tiny_app.url + "/api/chat", json={"message": f"user {i} says hi"})
        return r.status_code

    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(8)))

    assert asyncio.run(burst()) == [200] * 8


def test_backlog_full_gets_503_with_retry_after(tmp_path):
    engine = FakeEngine()
    engine.hold = asyncio.Event()  # replies generate until the test lets them end
    with (
        in_process_app(tmp_path, "--max-backlog", "1", engine=engine) as client,
        ThreadPoolExecutor(6) as pool,
    ):
        sent = [pool.submit(chat, client, f"hi {i}") for i in range(6)]
        deadline = time.monotonic() + 60  # the others are answered while one generates
        while sum(f.done() for f in sent) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.held == 1
        client.portal.call(engine.hold.set)
        responses = [f.result(timeout=60) for f in sent]
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes, codes
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] == "5"
    assert "busy" in busy.json()["error"]


def test_candidates_logged_with_version_sampling_tokens_latency(tmp_path):
    """What the engine reports is stored with each candidate (the real engine reporting it:
    tests/test_engine.py)."""
    with in_process_app(tmp_path) as client:
        body = chat(client, "Log me").json()
    store = Store(tmp_path / "assistant.duckdb", read_only=True)
    pair = store_reads.pair(store, body["pair_id"])
    store.close()
    for cand, slot in zip(pair["candidates"], "ab", strict=True):
        assert cand["slot"] == slot and cand["model_version"] == "v0000"
        sampling = json.loads(cand["sampling"])
        assert sampling["temperature"] == 1.0 and sampling["max_tokens"] == 16
        assert 0 < cand["completion_tokens"] <= 16
        assert cand["prompt_tokens"] > 0 and cand["latency_ms"] > 0
    seeds = sorted(json.loads(c["sampling"])["seed"] for c in pair["candidates"])
    assert seeds[1] == seeds[0] + 1 == pair["seed"] + 1


def test_acknowledged_vote_survives_kill_9(tiny_app_factory):
    app = tiny_app_factory()
    acknowledged = []
    with _over_http(app) as client:
        for i in range(3):
            turn = chat(client, f"durable {i}").json()
            if vote(client, turn["pair_id"], "a").status_code == 200:
                acknowledged.append(turn["pair_id"])
    app.stop(signal.SIGKILL)
    Store(app.db).close()  # the next start stores what only the vote journal had
    con = duckdb.connect(str(app.db), read_only=True)
    stored = {r[0] for r in con.execute("SELECT pair_id FROM votes").fetchall()}
    con.close()
    assert set(acknowledged) == stored and len(stored) == 3


def test_cli_export_reads_the_file_or_asks_the_running_app(tiny_app_factory, tmp_path, monkeypatch):
    import subprocess
    import sys

    import pyarrow.parquet as pq

    monkeypatch.setenv("ASSISTANT_ADMIN_TOKEN", ADMIN_TOKEN)  # an export holds users' chats
    app = tiny_app_factory()
    with _over_http(app) as client:
        turn = chat(client, "Export me").json()
        vote(client, turn["pair_id"], "b")
    winner = turn["candidates"][1]["text"]

    def export(fmt, out):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "assistant",
                "export",
                "--db",
                str(app.db),
                "--format",
                fmt,
                "-o",
                str(out),
                "--url",
                app.url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )

    live = export("hh", tmp_path / "live.jsonl")  # the app holds the file: export asks the app
    assert live.returncode == 0, live.stderr
    assert "in use by the running app" in live.stderr
    (record,) = [json.loads(x) for x in (tmp_path / "live.jsonl").read_text().splitlines()]
    assert record["chosen"].endswith(f"\n\nAssistant: {winner}")

    app.stop()
    offline = export("trl", tmp_path / "prefs.parquet")
    assert offline.returncode == 0, offline.stderr
    (row,) = pq.read_table(tmp_path / "prefs.parquet").to_pylist()
    assert row["chosen"] == [{"role": "assistant", "content": winner}]
    assert row["prompt"][-1] == {"role": "user", "content": "Export me"}


def test_too_fast_votes_are_kept_but_flagged_and_sessions_are_rate_limited(tmp_path):
    # The default reading pace (15 words/s) applies: an instant vote cannot have read 2 replies.
    flags = ("--reading-words-per-second", "15", "--max-votes-per-minute", "2")
    with in_process_app(tmp_path, *flags) as client:
        headers = new_session(client)
        pairs = []
        for i in range(3):
            turn = client.post("/api/chat", json={"message": f"fast {i}"}, headers=headers).json()
            pairs.append(turn["pair_id"])
            v = client.post(
                "/api/vote", json={"pair_id": turn["pair_id"], "choice": "a"}, headers=headers
            )
            if i < 2:
                assert v.status_code == 200 and v.json()["flagged"].startswith("voted ")
            else:
                assert v.status_code == 429 and int(v.headers["retry-after"]) > 0
                assert "at most 2 a minute" in v.json()["error"]
        # Flagged votes are stored but left out of training data.
        assert export(client).text == ""
    con = duckdb.connect(str(tmp_path / "assistant.duckdb"), read_only=True)
    rows = con.execute("SELECT pair_id, flagged IS NOT NULL FROM votes").fetchall()
    con.close()
    assert sorted(rows) == sorted([(pairs[0], True), (pairs[1], True)])


def test_openapi_schema_describes_the_pinned_routes(app_in_process):
    schema = app_in_process.get("/api/openapi.json").json()
    paths = schema["paths"]
    for route in ("/api/chat", "/api/vote", "/api/session", "/api/versions", "/api/canary"):
        assert route in paths, route
    retrain = paths["/api/retrain"]["post"]
    assert retrain["responses"]["202"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "RetrainStarted"
    )
    assert "/api/retrain/{run_id}" in paths and "/api/retrain/{run_id}/events" in paths
    vote_body = paths["/api/vote"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert vote_body["required"] == ["pair_id", "choice"]
    assert vote_body["properties"]["choice"]["enum"] == ["a", "b", "tie", "both_bad"]
    answer = schema["components"]["schemas"]["VoteAnswer"]["properties"]
    assert {"vote_id", "continued_with", "flagged", "versions"} <= set(answer)
    errors = paths["/api/chat"]["post"]["responses"]
    assert errors["422"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorAnswer")
    # the admin routes declare the bearer scheme they need; the users' routes need none
    assert schema["components"]["securitySchemes"]["admin token"]["scheme"] == "bearer"
    assert retrain["security"] == [{"admin token": []}]
    assert paths["/api/export"]["get"]["security"] == [{"admin token": []}]
    assert "security" not in paths["/api/vote"]["post"]


def test_a_reply_the_user_wrote_continues_and_is_exported_for_sft(app_in_process):
    client = app_in_process
    session = new_session(client)
    turn = client.post("/api/chat", json={"message": "Say hi"}, headers=session).json()
    url = "/api/demonstration"
    body = {"pair_id": turn["pair_id"], "text": "Hi! Nice to meet you."}
    assert client.post(url, json={**body, "text": " "}, headers=session).status_code == 400
    assert client.post(url, json={"pair_id": turn["pair_id"]}, headers=session).status_code == 400
    assert client.post(url, json=body, headers=new_session(client)).status_code == 403
    wrote = client.post(url, json=body, headers=session)
    assert wrote.status_code == 200, wrote.text
    answer = wrote.json()
    assert answer["continued_with"] == "Hi! Nice to meet you." and answer["choice"] == "both_bad"
    assert answer["demonstration_id"] and set(answer["versions"]) == {"a", "b"}
    assert client.post(url, json=body, headers=session).status_code == 409  # one per pair
    follow = {"message": "and then?", "conversation_id": turn["conversation_id"]}
    more = client.post("/api/chat", json=follow, headers=session)
    assert more.status_code == 200, more.text  # the written reply continued the conversation
    exported = [json.loads(line) for line in export(client, "sft").text.splitlines()]
    assert {
        "messages": [
            {"role": "user", "content": "Say hi"},
            {"role": "assistant", "content": "Hi! Nice to meet you."},
        ]
    } in exported
    assert "Hi! Nice to meet you." not in export(client, "trl").text  # not a preference pair
