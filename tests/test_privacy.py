"""Nobody reads other people's chats: bulk reads need the admin token, a user deletes their own
conversation (and nothing of it is left to export or train on), a page on another site cannot
reach the local app by DNS rebinding, and answers to anonymous callers name no server paths.

The rules in-process around a fake engine (`harness.in_process`); a real retrain cycle's job
folder and the page in a browser through `assistant run` on the shared tiny engine.
"""

from __future__ import annotations

import json
import stat
import time

import duckdb
import httpx
import pytest

from harness.app_process import ADMIN_TOKEN
from harness.browser import CHROMIUM, CHROMIUM_ARGS
from harness.in_process import ADMIN_HEADERS, export, in_process_app, new_session
from tests import store_reads


def _turn(client, message: str, session: dict) -> dict:
    r = client.post("/api/chat", json={"message": message}, headers=session)
    assert r.status_code == 200, r.text
    return r.json()


def _vote(client, pair_id: str, choice: str, session: dict) -> None:
    r = client.post("/api/vote", json={"pair_id": pair_id, "choice": choice}, headers=session)
    assert r.status_code == 200, r.text


def test_bulk_reads_of_users_chats_need_the_admin_token(app_in_process):
    client = app_in_process
    alice = new_session(client)
    turn = _turn(client, "my private question", alice)
    _vote(client, turn["pair_id"], "a", alice)
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        exported = client.get("/api/export", headers=headers)
        assert exported.status_code == 401 and "private question" not in exported.text
        chain = client.get(f"/api/critiques/{turn['candidates'][0]['id']}", headers=headers)
        assert chain.status_code == 401
    assert "my private question" in export(client).text  # the operator still can


def test_a_user_deletes_their_own_conversation_and_nothing_of_it_remains(app_in_process):
    client = app_in_process
    bob, mallory = new_session(client), new_session(client)
    first = _turn(client, "delete me please", bob)
    _vote(client, first["pair_id"], "b", bob)
    url = f"/api/conversations/{first['conversation_id']}"
    # another session (or none, or one the server never issued) may not delete it
    assert client.delete(url, headers=mallory).status_code == 403
    assert client.delete(url).status_code == 403
    real = bob["X-Session-Id"]
    forged = client.delete(
        url, headers={"X-Session-Id": real[:-1] + ("1" if real[-1] == "0" else "0")}
    )
    assert forged.status_code == 403 and "unknown session" in forged.json()["error"]
    assert "delete me please" in export(client).text

    gone = client.delete(url, headers=bob)
    assert gone.status_code == 200, gone.text
    removed = gone.json()["removed"]
    assert removed["conversations"] == 1 and removed["pairs"] == 1
    assert removed["candidates"] == 2 and removed["votes"] == 1 and removed["messages"] >= 1
    assert "delete me please" not in export(client).text
    assert client.delete(url, headers=bob).status_code == 404
    # the id is no longer a conversation one can continue
    again = client.post(
        "/api/chat",
        json={"message": "hello?", "conversation_id": first["conversation_id"]},
        headers=bob,
    )
    assert again.status_code == 404


def test_versions_and_errors_name_no_server_paths_for_anonymous_callers(app_in_process):
    client = app_in_process
    public = client.get("/api/versions").json()
    assert public["serving"] == "v0000"
    text = json.dumps(public)
    data_dir = str(client.app.state.runtime.store.path.parent)
    assert data_dir not in text and "http://" not in text
    assert "path" not in public["versions"][0]
    admin = client.get("/api/versions", headers=ADMIN_HEADERS).json()
    assert admin["versions"][0]["path"]  # the operator sees where checkpoints live


def test_foreign_host_names_are_refused_dns_rebinding(tmp_path):
    with in_process_app(tmp_path, "--allowed-host", "chat.example.org") as client:
        assert client.get("/api/health").status_code == 200  # 127.0.0.1
        rebound = client.get("/api/health", headers={"Host": "evil.example.com"})
        assert rebound.status_code == 400
        named = client.get("/api/versions", headers={"Host": "chat.example.org"})
        assert named.status_code == 200
        page = client.get("/", headers={"Host": "evil.example.com:7860"})
        assert page.status_code == 400


def test_job_folders_are_private_and_lose_the_chats_once_the_cycle_ends(
    tiny_app_factory, tiny_model_dir, monkeypatch
):
    monkeypatch.setenv("ASSISTANT_ADMIN_TOKEN", ADMIN_TOKEN)
    app = tiny_app_factory("--model", str(tiny_model_dir), "--retrain-preset", "fast")
    carol = app.new_session()
    with httpx.Client(base_url=app.url, timeout=120) as client:
        for i, choice in enumerate(["a", "b", "tie", "a", "both_bad", "b", "a", "b"]):
            turn = _turn(client, f"job question {i}?", carol)
            _vote(client, turn["pair_id"], choice, carol)  # ties, both-bad: verdicts.jsonl
    cycle = httpx.post(app.url + "/api/retrain?wait=true", headers=app.admin_headers(), timeout=600)
    assert cycle.status_code == 200, cycle.text
    (job,) = (app.data_dir / "jobs").iterdir()
    assert stat.S_IMODE(job.stat().st_mode) == 0o700
    left = {p.name for p in job.iterdir()}
    assert not left & {"preferences.jsonl", "verdicts.jsonl", "prompts.jsonl", "revisions.jsonl"}
    assert {"job.json", "progress.jsonl", "result.json"} <= left  # the metrics stay
    assert not any("job question" in p.read_text(errors="ignore") for p in job.iterdir())
    # pruning old checkpoints is the operator's: the serving and previous versions stay
    assert httpx.post(app.url + "/api/prune", json={"keep": 0}).status_code == 401
    pruned = httpx.post(app.url + "/api/prune", json={"keep": 0}, headers=app.admin_headers())
    assert pruned.status_code == 200, pruned.text
    assert pruned.json()["pruned"] == [] and "v0001" in pruned.json()["kept"]


def test_retention_deletes_old_conversations(tmp_path):
    with in_process_app(tmp_path) as client:
        dave = new_session(client)
        old = _turn(client, "an old chat", dave)
        _vote(client, old["pair_id"], "a", dave)
    con = duckdb.connect(str(tmp_path / "assistant.duckdb"))
    con.execute(
        "UPDATE conversations SET created_at = now() - INTERVAL 10 DAY WHERE id = ?",
        [old["conversation_id"]],
    )
    con.close()
    with in_process_app(tmp_path, "--retention-days", "7") as client:
        fresh = _turn(client, "a new chat", dave)  # sessions outlive a restart
        # the first round runs at start, beside the requests: wait for it, not for a sleep
        store = client.app.state.runtime.store
        deadline = time.monotonic() + 60
        while store_reads.conversation_exists(store, old["conversation_id"]):
            assert time.monotonic() < deadline, "the old conversation was not deleted"
            time.sleep(0.05)
    con = duckdb.connect(str(tmp_path / "assistant.duckdb"), read_only=True)
    ids = {r[0] for r in con.execute("SELECT id FROM conversations").fetchall()}
    votes = con.execute("SELECT count(*) FROM votes").fetchone()[0]
    con.close()
    assert ids == {fresh["conversation_id"]} and votes == 0


@pytest.mark.browser
def test_page_deletes_the_chat_it_shows(tiny_app, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(tiny_app.url, wait_until="domcontentloaded")
        # an empty page says what to do, and how far the next retrain is
        expect(page.locator("#how-to")).to_contain_text("once both are complete, vote")
        expect(page.locator("#loop-status")).to_contain_text("more votes for A or B")
        box = page.locator("#message textarea")
        box.fill("a chat I regret")
        box.press("Enter")
        vote_a = page.get_by_role("button", name="A is better")
        expect(vote_a).to_be_enabled(timeout=120_000)
        vote_a.click()
        expect(page.locator("#status")).to_contain_text("Vote saved")
        assert "a chat I regret" in tiny_app.export().text
        page.get_by_role("button", name="Delete this chat").click()
        expect(page.locator("#status")).to_contain_text("Chat deleted")
        expect(page.locator("#history")).not_to_contain_text("a chat I regret")
        page.screenshot(path=str(tmp_path / "deleted.png"), full_page=True)
        browser.close()
    assert "a chat I regret" not in tiny_app.export().text
