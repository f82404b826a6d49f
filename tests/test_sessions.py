"""Session ids: issued by the server, refused when made up, expired or not ASCII, and kept in the
database only as a hash. Light: `SessionKeys` and a real DuckDB file, no engine."""

from __future__ import annotations

import dataclasses
import json
import time

import duckdb
import pytest

from assistant.sessions import SessionKeys, UnknownSessionError
from storage import Store
from storage.migrations import MIGRATIONS
from storage.rules import session_hash
from storage.vote_journal import JournaledVote, journal_path


@pytest.fixture
def keys(tmp_path) -> SessionKeys:
    return SessionKeys.load_or_create(tmp_path / "secrets" / "session.key")


@pytest.mark.parametrize("sent", ["ü", "é.ü", "abc.déf", "1.ẞ.x", "\udcff", "١٢٣.x.y"])
def test_a_non_ascii_session_id_is_unknown_not_an_error(keys, sent):
    # hmac.compare_digest raises TypeError on non-ASCII str: the page's every request was a 500
    assert not keys.is_valid(sent)
    with pytest.raises(UnknownSessionError, match="unknown session"):
        keys.check(sent)
    issued = keys.issue()
    assert not keys.is_valid(issued[:-1] + "ü")


def test_a_session_expires_after_session_days(tmp_path):
    keys = SessionKeys.load_or_create(tmp_path / "session.key", session_days=30)
    now = time.time()
    fresh, old = keys.issue(now=now - 29 * 86_400), keys.issue(now=now - 31 * 86_400)
    assert keys.is_valid(fresh) and keys.check(fresh) == session_hash(fresh)
    assert keys.problem(old) == "expired" and keys.owner(old) is None  # the page: a new cookie
    with pytest.raises(UnknownSessionError, match="expired session id") as refused:
        keys.check(old)
    assert refused.value.status == 403
    # the issue time is signed: moving it forward makes the id unknown, not young again
    issued, rest = old.split(".", 1)
    assert keys.problem(f"{int(issued) + 5 * 86_400}.{rest}") == "unknown"
    assert SessionKeys.load_or_create(tmp_path / "session.key", session_days=60).is_valid(old)


def test_the_service_and_database_get_the_ids_hash_never_the_id(tmp_path):
    keys = SessionKeys.load_or_create(tmp_path / "session.key")
    issued = keys.issue()
    owner = keys.check(issued)
    assert owner == keys.owner(issued) == session_hash(issued) and issued not in owner
    path = tmp_path / "assistant.duckdb"
    store = Store(path)
    conversation = store.create_conversation(owner)
    store.check_owner(conversation, keys.owner(issued))  # the same session, by its hash
    store.close()
    assert issued.encode() not in path.read_bytes()


def test_migration_hashes_the_ids_stored_before_it(tmp_path):
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, description VARCHAR, "
        "applied_at TIMESTAMPTZ DEFAULT now())"
    )
    for version, description, step in MIGRATIONS:
        if version == 10:
            break
        con.execute(step)
        con.execute("INSERT INTO schema_migrations VALUES (?, ?, now())", [version, description])
    raw = "nonce123.0123456789abcdef01234567"
    con.execute("INSERT INTO conversations (id, session_id) VALUES ('c1', ?), ('c2', NULL)", [raw])
    con.execute("INSERT INTO pairs VALUES ('p1', 'c1', 0, '[]', 'v0000', 7, now())")
    con.execute("INSERT INTO votes (id, pair_id, choice, session_id) VALUES ('v1', 'p1', 'a', ?)",
                [raw])  # fmt: skip
    con.close()
    journal = journal_path(path)  # a vote acknowledged just before the upgrade, not stored yet
    con = duckdb.connect(str(path))
    con.execute("INSERT INTO pairs VALUES ('p2', 'c1', 2, '[]', 'v0000', 7, now())")
    for pair_id, slot in (("p2", "a"), ("p2", "b")):
        con.execute(
            "INSERT INTO candidates (id, pair_id, slot, text, model_version, sampling) "
            "VALUES (?, ?, ?, 'reply', 'v0000', '{}')",
            [pair_id + slot, pair_id, slot],
        )
    con.close()
    line = JournaledVote("v2", "p2", "a", None, raw, None, None, None, None, time.time())
    journal.write_text("\n" + json.dumps(dataclasses.asdict(line)))

    store = Store(path)
    rows = store._rows("SELECT id, session_id FROM conversations ORDER BY id")
    votes = store._rows("SELECT id, session_id FROM votes ORDER BY id")
    store.close()
    assert rows == [{"id": "c1", "session_id": session_hash(raw)}, {"id": "c2", "session_id": None}]
    assert votes == [{"id": "v1", "session_id": session_hash(raw)},
                     {"id": "v2", "session_id": session_hash(raw)}]  # fmt: skip


def test_the_app_replaces_a_bad_cookie_refuses_an_expired_id_and_stores_only_hashes(
    tiny_app_factory, tmp_path
):
    """Through `assistant run` and real HTTP; the data directory as an earlier version left it."""
    import os
    import stat

    import httpx

    data = tmp_path / "data"
    data.mkdir()
    os.chmod(data, 0o755)
    app = tiny_app_factory(data_dir=data)
    for cookie in (b"assistant_session=\xc3\xbc", b"assistant_session=1.a\xe9.b"):
        page = httpx.get(app.url + "/", headers={"Cookie": cookie})
        assert page.status_code == 200  # it was a 500 on every page request
        assert page.headers["set-cookie"].startswith("assistant_session=")  # a new session
    keys = SessionKeys.load_or_create(data / "secrets" / "session.key")
    expired = keys.issue(now=time.time() - 31 * 86_400)
    r = httpx.post(app.url + "/api/chat", json={"message": "hi"},
                   headers={"X-Session-Id": expired}, timeout=60)  # fmt: skip
    assert r.status_code == 403 and "expired session id" in r.json()["error"]
    page = httpx.get(app.url + "/", cookies={"assistant_session": expired})
    assert page.status_code == 200 and expired not in page.headers["set-cookie"]
    session = app.new_session()
    turn = httpx.post(app.url + "/api/chat", json={"message": "hi"}, headers=session, timeout=120)
    assert turn.status_code == 200, turn.text
    vote = {"pair_id": turn.json()["pair_id"], "choice": "a"}
    assert httpx.post(app.url + "/api/vote", json=vote, headers=session).status_code == 200
    app.stop()
    issued = session["X-Session-Id"].encode()
    assert not [p for p in data.rglob("*") if p.is_file() and issued in p.read_bytes()]
    con = duckdb.connect(str(data / "assistant.duckdb"), read_only=True)
    stored = con.execute(
        "SELECT DISTINCT session_id FROM conversations UNION SELECT session_id FROM votes"
    ).fetchall()
    con.close()
    assert stored == [(session_hash(session["X-Session-Id"]),)]
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "assistant.duckdb").stat().st_mode) == 0o600
