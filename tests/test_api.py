"""The JSON API over real HTTP, against an app process on a real vLLM engine (tiny model)."""

from __future__ import annotations

import asyncio
import json
import signal

import duckdb
import httpx
import pytest

from harness.app_process import ADMIN_TOKEN
from storage import Store
from tests import store_reads


def chat(app, message="Hello there", conversation_id=None, **extra):
    body = {"message": message, **extra}
    if conversation_id:
        body["conversation_id"] = conversation_id
    return httpx.post(app.url + "/api/chat", json=body, timeout=120)


def vote(app, pair_id, choice="a"):
    return httpx.post(
        app.url + "/api/vote", json={"pair_id": pair_id, "choice": choice}, timeout=30
    )


def test_chat_returns_two_candidates_from_serving_version(tiny_app):
    resp = chat(tiny_app)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"conversation_id", "pair_id", "candidates", "model_version"}
    assert body["model_version"] == httpx.get(tiny_app.url + "/api/versions").json()["serving"]
    a, b = body["candidates"]
    assert a["id"] != b["id"] and a["text"] and b["text"]
    # Seeds seed and seed+1 at temperature 1 on a random model: the replies differ.
    assert a["text"] != b["text"]
    vote(tiny_app, body["pair_id"], "a")


def test_vote_continues_conversation_and_second_vote_is_409(tiny_app):
    first = chat(tiny_app, "Tell me about gravity").json()
    conv = first["conversation_id"]
    blocked = chat(tiny_app, "and more?", conv)
    assert blocked.status_code == 409 and "vote" in blocked.json()["error"]
    ok = vote(tiny_app, first["pair_id"], "b")
    assert ok.status_code == 200 and ok.json()["continued_with"] == first["candidates"][1]["text"]
    again = vote(tiny_app, first["pair_id"], "a")
    assert again.status_code == 409
    second = chat(tiny_app, "and more?", conv)
    assert second.status_code == 200
    assert second.json()["conversation_id"] == conv
    vote(tiny_app, second.json()["pair_id"], "tie")


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
    """The edge's refusals do not depend on the model: in-process, around a fake engine."""
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    exported = app_in_process.get("/api/export", headers=admin)
    assert exported.status_code == 200, exported.text  # the comparison below means something
    before = exported.text
    resp = app_in_process.post(
        f"/api/{route}", content=body, headers={"content-type": "application/json"}
    )
    assert resp.status_code == status, resp.text
    assert message in resp.json()["error"]
    assert app_in_process.get("/api/export", headers=admin).text == before


def test_another_sessions_conversation_cannot_be_continued_or_voted_in(tiny_app):
    alice, mallory = tiny_app.new_session(), tiny_app.new_session()
    turn = httpx.post(
        tiny_app.url + "/api/chat", json={"message": "mine"}, headers=alice, timeout=60
    ).json()
    vote = {"pair_id": turn["pair_id"], "choice": "a"}
    for headers in (mallory, {}):
        resp = httpx.post(tiny_app.url + "/api/vote", json=vote, headers=headers)
        assert resp.status_code == 403 and "another session" in resp.json()["error"]
    follow = {"message": "hijack", "conversation_id": turn["conversation_id"]}
    resp = httpx.post(tiny_app.url + "/api/chat", json=follow, headers=mallory, timeout=60)
    assert resp.status_code == 403
    resp = httpx.post(tiny_app.url + "/api/vote", json=vote, headers=alice)
    assert resp.status_code == 200, resp.text  # the owner still can: the refusals stored nothing


def gradio_call(app, name: str, data: list | None = None, cookie: bytes | None = None) -> str:
    """Call a page handler by name through Gradio's API, as anyone can (`/gradio_api/info`
    lists them); the event stream of its answer."""
    headers = {"Cookie": cookie} if cookie else {}
    r = httpx.post(
        f"{app.url}/gradio_api/call/{name}", json={"data": data or []}, headers=headers, timeout=30
    )
    assert r.status_code == 200, r.text
    event = r.json()["event_id"]
    return httpx.get(f"{app.url}/gradio_api/call/{name}/{event}", headers=headers, timeout=60).text


def test_page_serves_no_files_beyond_its_own(tiny_app):
    # The page serves no files: Gradio's file route is closed, so neither the database, the
    # source, system files nor traversal; nor any URL (`file=https://...` fetched any public
    # URL for anyone: an open proxy); nor its upload route (the page takes no files).
    health = f"http://127.0.0.1:{tiny_app.port}/api/health"
    for path in (f"/gradio_api/file={health}", f"/gradio_api/file/{health}",
                 "/gradio_api/file=https://127.0.0.1/", "/gradio_api/proxy=https://127.0.0.1/",
                 "/gradio_api/file=pyproject.toml"):  # fmt: skip
        resp = httpx.get(tiny_app.url + path)
        assert resp.status_code == 403 and "does not offer" in resp.json()["error"], path
    for path in (
        f"/gradio_api/file={tiny_app.db}",
        "/gradio_api/file=/etc/passwd",
        "/gradio_api/file=pyproject.toml",
        "/gradio_api/file=..%2f..%2fetc%2fpasswd",
        "/assets/..%2f..%2f..%2fetc%2fpasswd",
        "/static/../../../etc/passwd",
    ):
        resp = httpx.get(tiny_app.url + path)
        assert resp.status_code in (403, 404), (path, resp.status_code)
        assert "root:" not in resp.text
    upload = httpx.post(
        tiny_app.url + "/gradio_api/upload", files={"files": ("x.txt", b"dropped file")}
    )
    assert upload.status_code == 403 and "does not offer" in upload.json()["error"]
    # the other Gradio routes the page never uses: recordings, deep links, run history
    recording = httpx.post(
        tiny_app.url + "/gradio_api/process_recording", files={"audio": ("a.wav", b"x" * 4096)}
    )
    assert recording.status_code == 403
    for path in ("/gradio_api/deep_link?session_hash=x", "/gradio_api/runs",
                 "/gradio_api/run-history/records"):  # fmt: skip
        assert httpx.get(tiny_app.url + path).status_code == 403, path
    assert httpx.get(tiny_app.url + "/").status_code == 200  # the page itself still loads


def test_the_admin_tab_answers_a_signed_in_admin_only(tiny_app):
    """Every Admin-tab handler is callable by name through Gradio's API; the refresh (a scan of
    every version's replies, which shows server paths) answers nobody but a signed-in admin,
    and a sign-out ends the sign-in on the server, for every copy of the cookie."""
    info = httpx.get(tiny_app.url + "/gradio_api/info", timeout=30).json()["named_endpoints"]
    refreshes = [n[1:] for n, e in info.items() if n.startswith("/refresh") and not e["parameters"]]
    assert len(refreshes) >= 3, list(info)

    def tab(cookie: bytes | None) -> str:
        return "".join(gradio_call(tiny_app, name, cookie=cookie) for name in refreshes)

    assert "v0000" not in tab(None)  # the version table stays empty
    # a cookie that is no sign-in, non-ASCII included, is refused in words, not with an error
    for made_up in (b"assistant_admin=1.\xe9", b"assistant_admin=\xb2.x", b"assistant_admin=x"):
        answer = gradio_call(tiny_app, "who", cookie=made_up)
        assert "event: complete" in answer and "Not signed in" in answer, answer
        assert "v0000" not in tab(made_up)
    login = httpx.post(tiny_app.url + "/admin/login", data={"token": ADMIN_TOKEN})
    assert login.status_code == 303 and "Secure" not in login.headers["set-cookie"]  # plain HTTP
    cookie = f"assistant_admin={login.cookies['assistant_admin']}".encode()
    assert ADMIN_TOKEN not in cookie.decode()
    assert "Signed in as admin" in gradio_call(tiny_app, "who", cookie=cookie)
    assert "v0000" in tab(cookie)
    out = httpx.post(tiny_app.url + "/admin/logout", headers={"Cookie": cookie})
    assert out.status_code == 303
    # the copy this client kept of the cookie is dead too: the server forgot the sign-in
    assert "Not signed in" in gradio_call(tiny_app, "who", cookie=cookie)
    assert "v0000" not in tab(cookie)


def test_message_longer_than_context_is_413(tiny_app):
    # Within the character limit but far beyond the tiny engine's 512-token window.
    resp = chat(tiny_app, "gravity spacetime curvature " * 140)
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


def test_export_endpoint_returns_trl_records(tiny_app):
    first = chat(tiny_app, "Pick one").json()
    vote(tiny_app, first["pair_id"], "b")
    lines = tiny_app.export("trl").text.splitlines()
    records = [json.loads(line) for line in lines]
    match = [r for r in records if r["prompt"][-1]["content"] == "Pick one"]
    assert match and match[-1]["chosen"][0]["content"] == first["candidates"][1]["text"]
    assert tiny_app.export("x").status_code == 422


def test_concurrent_users_are_batched_not_serialised(tiny_app):
    async def one(client, i):
        r = await client.post(tiny_app.url + "/api/chat", json={"message": f"user {i} says hi"})
        return r.status_code

    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(8)))

    assert asyncio.run(burst()) == [200] * 8


def test_backlog_full_gets_503_with_retry_after(tiny_app_factory):
    app = tiny_app_factory("--max-backlog", "1", "--max-new-tokens", "200")

    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(
                *(client.post(app.url + "/api/chat", json={"message": f"hi {i}"}) for i in range(6))
            )

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes, codes
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] == "5"
    assert "busy" in busy.json()["error"]


def test_candidates_logged_with_version_sampling_tokens_latency(tiny_app_factory):
    app = tiny_app_factory()
    body = chat(app, "Log me").json()
    app.stop()
    store = Store(app.db, read_only=True)
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
    for i in range(3):
        turn = chat(app, f"durable {i}").json()
        if vote(app, turn["pair_id"], "a").status_code == 200:
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
    turn = chat(app, "Export me").json()
    vote(app, turn["pair_id"], "b")
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


def test_too_fast_votes_are_kept_but_flagged_and_sessions_are_rate_limited(
    tiny_app_factory, monkeypatch
):
    monkeypatch.setenv("ASSISTANT_ADMIN_TOKEN", ADMIN_TOKEN)
    # The default reading pace (15 words/s) applies: an instant vote cannot have read 2 replies.
    app = tiny_app_factory("--reading-words-per-second", "15", "--max-votes-per-minute", "2")
    headers = app.new_session()
    pairs = []
    for i in range(3):
        turn = httpx.post(
            app.url + "/api/chat", json={"message": f"fast {i}"}, headers=headers, timeout=120
        ).json()
        pairs.append(turn["pair_id"])
        v = httpx.post(
            app.url + "/api/vote",
            json={"pair_id": turn["pair_id"], "choice": "a"},
            headers=headers,
            timeout=30,
        )
        if i < 2:
            assert v.status_code == 200 and v.json()["flagged"].startswith("voted ")
        else:
            assert v.status_code == 429 and int(v.headers["retry-after"]) > 0
            assert "at most 2 a minute" in v.json()["error"]
    # Flagged votes are stored but left out of training data.
    assert app.export().text == ""
    app.stop()
    con = duckdb.connect(str(app.db), read_only=True)
    rows = con.execute("SELECT pair_id, flagged IS NOT NULL FROM votes").fetchall()
    con.close()
    assert sorted(rows) == sorted([(pairs[0], True), (pairs[1], True)])


def test_openapi_schema_describes_the_pinned_routes(tiny_app):
    schema = httpx.get(tiny_app.url + "/api/openapi.json", timeout=30).json()
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


def test_a_reply_the_user_wrote_continues_and_is_exported_for_sft(tiny_app):
    session = tiny_app.new_session()
    turn = httpx.post(
        tiny_app.url + "/api/chat", json={"message": "Say hi"}, headers=session, timeout=120
    ).json()
    url = tiny_app.url + "/api/demonstration"
    body = {"pair_id": turn["pair_id"], "text": "Hi! Nice to meet you."}
    assert httpx.post(url, json={**body, "text": " "}, headers=session).status_code == 400
    assert httpx.post(url, json={"pair_id": turn["pair_id"]}, headers=session).status_code == 400
    assert httpx.post(url, json=body, headers=tiny_app.new_session()).status_code == 403
    wrote = httpx.post(url, json=body, headers=session)
    assert wrote.status_code == 200, wrote.text
    answer = wrote.json()
    assert answer["continued_with"] == "Hi! Nice to meet you." and answer["choice"] == "both_bad"
    assert answer["demonstration_id"] and set(answer["versions"]) == {"a", "b"}
    assert httpx.post(url, json=body, headers=session).status_code == 409  # one per pair
    follow = {"message": "and then?", "conversation_id": turn["conversation_id"]}
    more = httpx.post(tiny_app.url + "/api/chat", json=follow, headers=session, timeout=120)
    assert more.status_code == 200, more.text  # the written reply continued the conversation
    exported = [json.loads(line) for line in tiny_app.export("sft").text.splitlines()]
    assert {
        "messages": [
            {"role": "user", "content": "Say hi"},
            {"role": "assistant", "content": "Hi! Nice to meet you."},
        ]
    } in exported
    assert "Hi! Nice to meet you." not in tiny_app.export("trl").text  # not a preference pair
