"""Several app processes on one Postgres database, behind one load balancer: a session or an admin
sign-in made on one of them holds on every other, and a sign-out on any of them ends it
everywhere. Two in-process apps (`harness.in_process`, fake engines) on the same database with
data directories of their own stand for two processes. A DuckDB app keeps its key file and its
in-memory sign-ins as before."""

from __future__ import annotations

import pytest

from assistant import environment
from assistant.admin import ADMIN_COOKIE, TOKEN_FILE, SharedSignIns, ensure_admin_token
from harness.app_process import ADMIN_TOKEN
from harness.in_process import in_process_app, new_session
from storage import Store

SESSION_KEY = ("secrets", "session.key")


def who(client, cookie: str | None) -> str:
    """The page's "who" handler (Gradio's API), as a browser holding the admin cookie calls it."""
    headers = {"Cookie": f"{ADMIN_COOKIE}={cookie}"} if cookie else {}
    r = client.post("/gradio_api/call/who", json={"data": []}, headers=headers)
    assert r.status_code == 200, r.text
    event = r.json()["event_id"]
    return client.get(f"/gradio_api/call/who/{event}", headers=headers).text


def test_sessions_and_admin_sign_ins_hold_on_every_process(postgres_url, tmp_path):
    with (
        in_process_app(tmp_path / "one", "--db", postgres_url) as one,
        in_process_app(tmp_path / "two", "--db", postgres_url) as two,
    ):
        # a session issued by one process chats there and votes on the other
        session = new_session(one)
        turn = one.post("/api/chat", json={"message": "hi"}, headers=session)
        assert turn.status_code == 200, turn.text
        voted = two.post(
            "/api/vote", json={"pair_id": turn.json()["pair_id"], "choice": "a"}, headers=session
        )
        assert voted.status_code == 200, voted.text
        # the key is in the database, not in either data directory
        for data_dir in (tmp_path / "one", tmp_path / "two"):
            assert not data_dir.joinpath(*SESSION_KEY).exists()

        # an admin signed in on one process is signed in on the other
        login = one.post("/admin/login", data={"token": ADMIN_TOKEN})
        assert login.status_code == 303, login.text
        cookie = login.cookies[ADMIN_COOKIE]
        assert "Signed in as admin" in who(two, cookie)
        assert "Not signed in" in who(two, "made-up")
        store = one.app.state.runtime.store
        stored = store._rows("SELECT id_hash FROM admin_sign_ins")
        assert len(stored) == 1 and cookie not in stored[0]["id_hash"]  # only its hash

        # signing out on the other ends it everywhere
        out = two.post("/admin/logout", headers={"Cookie": f"{ADMIN_COOKIE}={cookie}"})
        assert out.status_code == 303
        assert "Not signed in" in who(one, cookie)
        assert "Not signed in" in who(two, cookie)


def test_a_duckdb_app_keeps_its_key_file_and_its_sign_ins_in_memory(tmp_path):
    with in_process_app(tmp_path) as client:
        session = new_session(client)
        assert client.post("/api/chat", json={"message": "hi"}, headers=session).status_code == 200
        login = client.post("/admin/login", data={"token": ADMIN_TOKEN})
        assert "Signed in as admin" in who(client, login.cookies[ADMIN_COOKIE])
        store = client.app.state.runtime.store
        assert store._rows("SELECT * FROM shared_keys") == []
        assert store._rows("SELECT * FROM admin_sign_ins") == []
    assert len(tmp_path.joinpath(*SESSION_KEY).read_bytes()) == 32


def test_the_generated_admin_token_is_the_same_on_every_process(
    postgres_url, tmp_path, monkeypatch
):
    monkeypatch.setenv(environment.ADMIN_TOKEN, "restored-after-the-test")
    monkeypatch.delenv(environment.ADMIN_TOKEN)
    first, second = Store(postgres_url), Store(postgres_url)
    try:
        path, generated = ensure_admin_token(tmp_path / "one", first)
        token = environment.admin_token()
        assert generated and token and path.read_text().strip() == token
        monkeypatch.delenv(environment.ADMIN_TOKEN)
        # another process, its data directory holding a token of its own: the shared one wins
        (tmp_path / "two" / TOKEN_FILE).parent.mkdir(parents=True)
        (tmp_path / "two" / TOKEN_FILE).write_text("an-older-token\n")
        path, generated = ensure_admin_token(tmp_path / "two", second)
        assert not generated and environment.admin_token() == token
        assert path.read_text().strip() == token  # where the CLI reads it
    finally:
        first.close()
        second.close()


def test_a_changed_admin_token_ends_the_shared_sign_ins(postgres_url, monkeypatch):
    monkeypatch.setenv(environment.ADMIN_TOKEN, "first-token")
    store = Store(postgres_url)
    try:
        sign_ins = SharedSignIns(store, max_age_s=60)
        cookie = sign_ins.issue(now=1000.0)
        assert sign_ins.problem(cookie, now=1059.0) is None
        assert sign_ins.problem(cookie, now=1061.0) is not None  # expired
        assert len(sign_ins) == 1
        sign_ins.issue(now=1100.0)  # forgets the expired one
        assert len(sign_ins) == 1
        fresh = sign_ins.issue(now=1100.0)
        assert sign_ins.problem(fresh, now=1100.0) is None
        monkeypatch.setenv(environment.ADMIN_TOKEN, "second-token")
        assert sign_ins.problem(fresh, now=1100.0) is not None
    finally:
        store.close()


@pytest.fixture
def store(store_location):
    s = Store(store_location)
    yield s
    s.close()


def test_shared_records_on_both_backends(store):
    assert store.shared_key("k", lambda: "first") == "first"
    assert store.shared_key("k", lambda: "second") == "first"  # insert-if-absent
    store.add_sign_in("h1", 10.0)
    store.add_sign_in("h2", 20.0)
    store.add_sign_in("h3", 30.0, keep=2)  # the oldest goes
    assert store.sign_in_issued_at("h1") is None
    assert store.sign_in_issued_at("h3") == 30.0
    store.forget_sign_ins_before(25.0)
    assert store.sign_in_issued_at("h2") is None and store.sign_in_count() == 1
    store.revoke_sign_in("h3")
    assert store.sign_in_count() == 0
