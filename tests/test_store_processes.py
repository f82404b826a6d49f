"""The store's faults across real processes: what an in-process test cannot show.

A vote is acknowledged once it is durable, so a `kill -9` of the app between two statements must
lose none of them and leave no half-written turn (DuckDB: the reopen stores what the journal
acknowledged; Postgres: the commit did). On Postgres several app processes may share one
database: two of them voting on the same pairs at once must store exactly one vote per pair and
answer the other with a 409, never a server error. And a Postgres server that restarts under a
running store must give a clean 503 while it is down, then serve the same store again without a
reopen, with nothing acknowledged before the stop lost.

Each child is a plain Python process on `Store` (no app, no engine): the faults are the store's.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from storage import Store
from storage.errors import DatabaseUnavailableError
from tests.test_store import _turn

REPO = Path(__file__).resolve().parents[1]
POSTGRES_ONLY = pytest.mark.parametrize("store_location", ["postgres"], indirect=True)

# Turns and their votes in a loop, each pair's id printed once its vote is acknowledged; a
# second thread writes unvoted turns beside them, so that the writer commits batches of both.
WRITER = """
import sys, threading
from storage import Store
from storage.store import CandidateRecord

store = Store(sys.argv[1])
candidates = tuple(
    CandidateRecord(s, f"reply {s} " + "words " * 200, "v0000", {"seed": 7}, 12, 5, "stop", 9.0)
    for s in "ab"
)

def turns(voted):
    conversation = None
    for turn in range(1_000_000):
        if turn % 5 == 0:
            conversation = store.create_conversation()
        prompt = store.transcript(conversation) + [{"role": "user", "content": f"q{turn}"}]
        pair = store.record_pair(conversation, f"q{turn}", prompt, "v0000", 7, candidates)
        if voted:
            store.record_vote(pair.pair_id, "a")
            print(pair.pair_id, flush=True)
        elif turn % 5 == 4:
            store.record_vote(pair.pair_id, "b")  # the conversation's turns are not left pending

threading.Thread(target=turns, args=(False,), daemon=True).start()
turns(True)
"""

# One process of two voting on the same pairs, in the same order, from the moment `go` appears.
VOTER = """
import os, sys, time
from storage import ConflictError, Store

location, go, choice, pairs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")
store = Store(location)
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.0005)
for pair_id in pairs:
    try:
        store.record_vote(pair_id, choice)
        print("stored", pair_id, flush=True)
    except ConflictError as exc:
        print("conflict", pair_id, exc.status, flush=True)
    except Exception as exc:
        print("error", pair_id, type(exc).__name__, str(exc).splitlines()[0][:300], flush=True)
store.close()
"""


def _child(script: str, *args: str, log: Path) -> subprocess.Popen:
    with open(log, "ab") as err:
        return subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=REPO,
        )


def _lines(proc: subprocess.Popen) -> queue.Queue:
    """The child's complete stdout lines as they come (None at its end)."""
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            if line.endswith("\n"):  # a line cut by the kill was not acknowledged
                lines.put(line.strip())
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def _next(lines: queue.Queue, deadline: float, log: Path) -> str:
    try:
        line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
    except queue.Empty:
        line = None
    if line is None:
        raise AssertionError(f"the child stopped answering:\n{log.read_text()[-3000:]}")
    return line


def test_kill_9_mid_write_loses_no_acknowledged_vote(store_location, tmp_path):
    log = tmp_path / "writer.log"
    child = _child(WRITER, str(store_location), log=log)
    try:
        lines, deadline = _lines(child), time.monotonic() + 120
        acknowledged = [_next(lines, deadline, log) for _ in range(30)]
        assert child.poll() is None, "the child was to be killed mid-stream, not after its end"
        child.kill()  # SIGKILL, while both threads are writing
        assert child.wait(timeout=30) == -9
        while (line := lines.get(timeout=30)) is not None:
            acknowledged.append(line)  # printed before the kill, read after it
    finally:
        child.kill()
        child.wait()

    store = Store(store_location)  # DuckDB: stores the votes acknowledged from the journal
    try:
        voted = {r["pair_id"] for r in store._rows("SELECT pair_id FROM votes")}
        missing = set(acknowledged) - voted
        assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged votes lost"
        half = store._rows(
            "SELECT p.id, (SELECT count(*) FROM candidates c WHERE c.pair_id = p.id) AS n, "
            "(SELECT count(*) FROM messages m WHERE m.pair_id = p.id AND m.role = 'user') AS u "
            "FROM pairs p"
        )
        assert len(half) >= len(acknowledged)
        assert [r for r in half if r["n"] != 2 or r["u"] != 1] == [], "a turn was half stored"
        replies = store._rows(
            "SELECT v.pair_id, count(m.id) AS n FROM votes v LEFT JOIN messages m "
            "ON m.pair_id = v.pair_id AND m.role = 'assistant' GROUP BY v.pair_id"
        )
        assert [r for r in replies if r["n"] != 1] == [], "a vote without its reply"
        assert store.create_conversation()  # and the store writes again
    finally:
        store.close()


@POSTGRES_ONLY
def test_two_processes_vote_on_the_same_pairs(store_location, tmp_path):
    store = Store(store_location)
    try:
        pairs = [_turn(store, store.create_conversation(), f"q{i}").pair_id for i in range(20)]
    finally:
        store.close()
    go = tmp_path / "go"
    logs = [tmp_path / "voter-a.log", tmp_path / "voter-b.log"]
    voters = [
        _child(VOTER, store_location, str(go), choice, ",".join(pairs), log=log)
        for choice, log in zip("ab", logs, strict=True)
    ]
    try:
        streams = [_lines(v) for v in voters]
        deadline = time.monotonic() + 120
        for stream, log in zip(streams, logs, strict=True):
            assert _next(stream, deadline, log) == "ready"
        go.touch()  # both have the store open: they start together
        answers = {}
        for choice, stream, log in zip("ab", streams, logs, strict=True):
            answers[choice] = [_next(stream, deadline, log).split() for _ in pairs]
        assert [v.wait(timeout=60) for v in voters] == [0, 0]
    finally:
        for v in voters:
            v.kill()
            v.wait()

    errors = [a for said in answers.values() for a in said if a[0] not in ("stored", "conflict")]
    assert errors == []
    assert all(a[2] == "409" for said in answers.values() for a in said if a[0] == "conflict")
    winners = {}
    for pair_id in pairs:
        outcome = {c: [a[0] for a in answers[c] if a[1] == pair_id] for c in "ab"}
        assert sorted(outcome["a"] + outcome["b"]) == ["conflict", "stored"], (pair_id, outcome)
        winners[pair_id] = "a" if outcome["a"] == ["stored"] else "b"
    store = Store(store_location)
    try:
        rows = store._rows("SELECT pair_id, choice FROM votes")
        replies = store._rows("SELECT pair_id FROM messages WHERE role = 'assistant'")
    finally:
        store.close()
    assert sorted((r["pair_id"], r["choice"]) for r in rows) == sorted(winners.items())
    assert sorted(r["pair_id"] for r in replies) == sorted(pairs)  # one reply each


def _assert_unavailable(error: DatabaseUnavailableError, cluster) -> None:
    assert error.status == 503 and error.retry_after_s == 5
    public = error.public()  # what a caller reads: no URL, no socket path (the log has them)
    assert "postgres" not in public.lower() and "pgsock" not in public and "%2F" not in public


@POSTGRES_ONLY
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_restarted_under_the_store(store_location, postgres_cluster, mode):
    store = Store(store_location)
    # threads whose connections sit idle through the restart (the app's worker threads)
    reader, writer = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    try:
        conversation = store.create_conversation()
        before = _turn(store, conversation, "before")
        store.record_vote(before.pair_id, "a")  # acknowledged before the stop
        waiting = _turn(store, conversation, "during")
        for idle in (reader, writer):
            assert idle.submit(store.transcript, conversation).result()
        postgres_cluster.stop_server(mode)
        try:
            with pytest.raises(DatabaseUnavailableError) as down:
                store.create_conversation()
            _assert_unavailable(down.value, postgres_cluster)
            with pytest.raises(DatabaseUnavailableError) as down:
                store.record_vote(waiting.pair_id, "b")  # the writer thread's connection
            _assert_unavailable(down.value, postgres_cluster)
            with pytest.raises(DatabaseUnavailableError):
                store.transcript(conversation)
        finally:
            postgres_cluster.restart_server()  # the cluster is the session's: always back up

        # the same store object, no reopen: each thread's connection is made again
        assert len(reader.submit(store.transcript, conversation).result()) == 3
        assert writer.submit(store.create_conversation).result()
        assert store.record_vote(waiting.pair_id, "b").choice == "b"
        assert store.transcript(conversation) == [
            {"role": "user", "content": "before"},
            {"role": "assistant", "content": "reply A"},
            {"role": "user", "content": "during"},
            {"role": "assistant", "content": "reply B"},
        ]
        later = _turn(store, store.create_conversation(), "after")
        assert store.record_vote(later.pair_id, "a").continued_with == "reply A"
    finally:
        reader.shutdown()
        writer.shutdown()
        store.close()


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 24 MB tmpfs: a disk that really fills (mounting needs root, as the test machines run)."""
    import os

    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m,mode=0777", "tmpfs", str(mount)],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (uid {os.geteuid()}): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _give_to_the_server(folder: Path) -> None:
    """A tablespace's folder must belong to the server's user, who must reach it."""
    import os
    import pwd

    if os.geteuid() == 0:
        account = pwd.getpwnam("postgres")
        os.chown(folder, account.pw_uid, account.pw_gid)
    parent = folder.parent
    while parent != parent.parent:
        os.chmod(parent, parent.stat().st_mode | 0o001)
        parent = parent.parent


def test_a_full_disk_under_postgres_is_refused_and_loses_no_acknowledged_vote(
    postgres_cluster, small_disk
):
    """The database's tables on a disk that fills (a tablespace on a 24 MB tmpfs; the WAL stays
    on the cluster's disk, as a team that puts its data on a volume of its own would have it):
    Postgres refuses the write that does not fit ("could not extend file": 53100), the store
    says `StorageWriteError` (the app's 507) with the disk named as the cause, every vote
    acknowledged before is there, and writes succeed again once space is freed, on the same
    store, without a restart."""
    import os

    import psycopg

    from storage.errors import StorageWriteError

    _give_to_the_server(small_disk)
    with psycopg.connect(postgres_cluster.database_url("postgres"), autocommit=True) as con:
        con.execute(f"CREATE TABLESPACE small_disk LOCATION '{small_disk}'")
        con.execute('CREATE DATABASE "on_a_small_disk" TABLESPACE small_disk')
    store = Store(postgres_cluster.database_url("on_a_small_disk"))
    filler = small_disk / "filler"
    try:
        free = os.statvfs(small_disk)
        with open(filler, "wb") as f:  # all but half a megabyte
            f.write(b"\0" * (free.f_bavail * free.f_frsize - 512 * 1024))
        acknowledged: list[str] = []
        with pytest.raises(StorageWriteError) as full:
            for i in range(20_000):
                conversation = store.create_conversation()
                pair = _turn(store, conversation, f"q{i} " + "words " * 300)
                store.record_vote(pair.pair_id, "a")
                acknowledged.append(pair.pair_id)
        assert full.value.disk_full, full.value
        assert acknowledged, "the disk filled before the first vote: make the filler smaller"
        filler.unlink()
        later = _turn(store, store.create_conversation(), "after the disk was freed")
        assert store.record_vote(later.pair_id, "b").choice == "b"
        stored = {r["pair_id"] for r in store._rows("SELECT pair_id FROM votes")}
        assert set(acknowledged) | {later.pair_id} <= stored
        print(f"{len(acknowledged)} votes acknowledged before the disk filled: {full.value}")
    finally:
        store.close()
        filler.unlink(missing_ok=True)
        postgres_cluster.drop_database("on_a_small_disk")
        with psycopg.connect(postgres_cluster.database_url("postgres"), autocommit=True) as con:
            con.execute("DROP TABLESPACE IF EXISTS small_disk")
