"""Chats at rest: the files that hold them are private whatever the umask, a deleted
conversation's text leaves the database file, and nothing pushed or exported names a server path.

A real DuckDB file, searched byte by byte as `strings FILE | grep TEXT` would.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from storage import Store
from storage.export import write_records
from storage.vote_journal import journal_path


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def loose_umask():
    """The common umask that leaves files readable by everyone (0644) and folders open (0755)."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_database_folder_file_and_journal_are_private_whatever_the_umask(tmp_path, loose_umask):
    data = tmp_path / "data"
    store = Store(data / "assistant.duckdb")
    store.create_conversation("s")
    store.close()
    assert _mode(data) == 0o700
    assert _mode(data / "assistant.duckdb") == 0o600
    assert _mode(journal_path(data / "assistant.duckdb")) == 0o600
    # files an earlier version left readable by everyone are closed on the next open
    os.chmod(data / "assistant.duckdb", 0o644)
    os.chmod(journal_path(data / "assistant.duckdb"), 0o644)
    Store(data / "assistant.duckdb").close()
    assert _mode(data / "assistant.duckdb") == 0o600
    assert _mode(journal_path(data / "assistant.duckdb")) == 0o600


def test_the_data_directory_is_made_private_but_a_shared_folder_is_not_touched(
    tmp_path, loose_umask, caplog
):
    from storage.private import private_folder

    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    private_folder(data, ours=True)  # the app's own data directory, as an earlier version left it
    assert _mode(data) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp: never narrowed, even for root; the log says what to do
    private_folder(shared, ours=True)
    assert _mode(shared) == 0o1777 and "chmod 700" in caplog.text


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_exports_are_private_whatever_the_umask(tmp_path, loose_umask, suffix):
    out = tmp_path / f"prefs{suffix}"
    write_records([{"prompt": "p", "chosen": "c", "rejected": "r"}], out)
    assert _mode(out) == 0o600
    os.chmod(out, 0o644)  # an earlier export's file, overwritten
    write_records([{"prompt": "p", "chosen": "c", "rejected": "r"}], out)
    assert _mode(out) == 0o600


MARKER = "zqx-deleted-marker-4711"


def _found(folder: Path, text: str = MARKER) -> dict[str, int]:
    """Files under `folder` whose bytes hold `text` (what `strings FILE | grep TEXT` finds),
    with how many times."""
    needle = text.encode()
    counts = {str(p.relative_to(folder)): p.read_bytes().count(needle) for p in folder.rglob("*")
              if p.is_file()}  # fmt: skip
    return {name: n for name, n in counts.items() if n}


def _chat(store: Store, message: str, session: str = "s") -> tuple[str, str]:
    """A conversation with one turn and a vote; returns (conversation id, pair id)."""
    from tests.test_store import _candidates

    conversation = store.create_conversation(session)
    pair = store.record_pair(
        conversation, message, [{"role": "user", "content": message}], "v0000", 7,
        _candidates(text_a=f"reply A to {message}", text_b=f"reply B to {message}"),
    )  # fmt: skip
    return conversation, pair.pair_id


def test_duckdb_keeps_a_deleted_rows_text_after_delete_and_checkpoint(tmp_path):
    """Why compaction exists: DuckDB alone does not erase."""
    import duckdb

    path = tmp_path / "plain.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE m (id INTEGER, content VARCHAR)")
    con.execute(
        "INSERT INTO m SELECT i, 'ordinary message ' || i || ' ' || md5(i::VARCHAR) "
        "FROM range(500) t(i)"
    )
    con.execute("INSERT INTO m VALUES (-1, ?)", [f"my secret {MARKER}"])
    con.execute("CHECKPOINT")
    con.execute("UPDATE m SET content = repeat('x', length(content)) WHERE id = -1")
    con.execute("DELETE FROM m WHERE id = -1")
    con.execute("CHECKPOINT")
    con.execute("VACUUM")
    con.close()
    assert _found(tmp_path) == {"plain.duckdb": 1}


def test_a_deleted_conversation_leaves_the_database_file_when_the_store_closes(tmp_path):
    data = tmp_path / "data"
    db = data / "assistant.duckdb"
    store = Store(db)
    gone, gone_pair = _chat(store, f"delete me {MARKER}")
    store.record_vote(gone_pair, "both_bad", session_id="s",
                      demonstration=f"my own reply {MARKER}")  # fmt: skip
    kept, kept_pair = _chat(store, "keep me")
    store.record_vote(kept_pair, "a", session_id="s")
    assert [v.pair_id for v in store._journal.read()] == [gone_pair, kept_pair]  # journaled
    store._await_acknowledged_writes()
    store._cursor().execute("CHECKPOINT")
    before = _found(data)
    assert before.get("assistant.duckdb", 0) >= 1, before

    store.delete_conversation(gone)
    store.close()
    assert _found(data) == {}, "the deleted text is still on disk"
    store = Store(db, read_only=True)  # nothing else was lost, the journaled vote included
    assert store.transcript(kept)[-1] == {"role": "assistant", "content": "reply A to keep me"}
    assert [r["choice"] for r in store.voted_pairs()] == ["a"]
    store.close()
    assert _mode(db) == 0o600 and not (data / "assistant.duckdb.erase").exists()


def test_after_a_crash_the_next_open_erases_what_was_deleted(tmp_path):
    import json
    import subprocess
    import sys

    db = tmp_path / "data" / "assistant.duckdb"
    store = Store(db)
    gone, _ = _chat(store, f"delete me {MARKER}")
    store.close()
    crash = (
        "import json, os, sys\n"
        "from storage import Store\n"
        "from tests.test_chats_at_rest import _chat\n"
        "store = Store(sys.argv[1])\n"
        "kept, pair = _chat(store, 'keep me')\n"
        "store.record_vote(pair, 'b', session_id='s')\n"
        "store.delete_conversation(sys.argv[2])\n"
        "print(json.dumps(kept), flush=True)\n"
        "os._exit(9)  # killed: no close, no checkpoint, no compaction\n"
    )
    proc = subprocess.run([sys.executable, "-c", crash, str(db), gone], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert proc.returncode == 9, proc.stderr
    kept = json.loads(proc.stdout)
    assert (tmp_path / "data" / "assistant.duckdb.erase").exists()
    store = Store(db)  # compacts before anything else
    assert _found(tmp_path / "data") == {}
    assert store.transcript(kept)[-1]["content"] == "reply B to keep me"  # the acknowledged vote
    store.close()


def test_assistant_compact_erases_by_hand_and_says_how_much(tmp_path, capsys):
    import duckdb

    from assistant.cli import main

    data = tmp_path / "data"
    db = data / "assistant.duckdb"
    store = Store(db)
    gone, _ = _chat(store, f"delete me {MARKER}")
    for i in range(20):
        _chat(store, f"keep me {i}")
    store.close()
    con = duckdb.connect(str(db))  # deleted by hand, as an operator might, then checkpointed
    for sql in (
        "DELETE FROM candidates WHERE pair_id IN (SELECT id FROM pairs WHERE conversation_id = $c)",
        "DELETE FROM messages WHERE conversation_id = $c",
        "DELETE FROM pairs WHERE conversation_id = $c",
        "DELETE FROM conversations WHERE id = $c",
    ):
        con.execute(sql, {"c": gone})
        con.execute("CHECKPOINT")
    con.close()
    assert _found(data)
    assert main(["compact", "--data-dir", str(data)]) == 0
    assert "compacted" in capsys.readouterr().out
    assert _found(data) == {}
