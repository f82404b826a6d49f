"""Faults of the data directory: a disk that fills up mid-run, a read-only one at start.

The app runs with its data directory on a real file system that really fills up or turns
read-only: a small tmpfs in a private mount namespace (`unshare --user --map-root-user --mount`,
so no privileges are needed and nothing outside the test sees the mount). Writes then fail inside
DuckDB exactly as they would on a full disk. (A file system turning read-only under the open
database is not simulated: remounting read-only is refused while DuckDB holds the file open for
writing; the store maps DuckDB's "Read-only file system" failure to the same clear 503.)

What a user should see: a clear 507 saying nothing was saved, the data committed before intact,
writes working again once space is freed, and a clean reopen; a read-only data directory is
refused at start with the reason, and its database is left byte for byte as it was.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from harness.app_process import REPO, ready_port

# After the app exits (still inside the namespace, where the tmpfs lives), open the database as
# the next start would (which stores the votes acknowledged from the journal that DuckDB could
# not take while the disk was full), then read it back with a fresh DuckDB connection.
REOPEN = """
import json, sys, duckdb
from storage import Store
Store(sys.argv[1]).close()
con = duckdb.connect(sys.argv[1])
votes = [r[0] for r in con.execute("SELECT pair_id FROM votes").fetchall()]
pairs = [r[0] for r in con.execute("SELECT id FROM pairs").fetchall()]
print("REOPENED " + json.dumps({"votes": votes, "pairs": pairs}))
"""


def _namespaced(script: str, *args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-euc", script, "sh", *args],
        stdout=subprocess.PIPE,
        stderr=open(log, "ab"),  # noqa: SIM115 - closed with the process
        text=True,
        cwd=REPO,
    )


def _wait_healthy(proc: subprocess.Popen, log: Path, timeout: float = 120) -> str:
    """The URL of the app started with `--port 0`, once it answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"app exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        port = ready_port(log)
        try:
            url = f"http://127.0.0.1:{port}"
            if port and httpx.get(url + "/api/health", timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"app not healthy in {timeout} s:\n{log.read_text()[-3000:]}")


def _fill(path: Path) -> None:
    with open(path, "wb", buffering=0) as f:
        for chunk in (1 << 20, 4096, 1):  # down to the last byte, not just the last megabyte
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == 28, exc  # ENOSPC: the disk is really full


def test_full_disk_mid_run_refuses_clearly_and_loses_nothing(tiny_engine_url, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    log = tmp_path / "app.log"
    script = (
        'mount -t tmpfs -o size=48m tmpfs "$1"\n'
        '"$2" -m assistant run --data-dir "$1" --port "$3" --vllm-url "$4" --no-cai '
        "--max-new-tokens 8 --reading-words-per-second 0 --max-votes-per-minute-per-address 0 "
        '--max-votes-per-minute-total 0 >>"$5" 2>&1 || true\n'
        '"$2" -c "$6" "$1/assistant.duckdb"\n'
    )
    proc = _namespaced(
        script, str(data), sys.executable, "0", tiny_engine_url, str(log), REOPEN, log=log
    )
    try:
        url = _wait_healthy(proc, log)
        root = Path(f"/proc/{proc.pid}/root") / str(data).lstrip("/")  # the tmpfs, seen from here

        def chat(message: str) -> httpx.Response:
            return httpx.post(url + "/api/chat", json={"message": message}, timeout=120)

        def vote(pair_id: str) -> httpx.Response:
            return httpx.post(url + "/api/vote", json={"pair_id": pair_id, "choice": "a"})

        acknowledged, stored_pairs = [], []
        for i in range(4):
            turn = chat(f"before the fault {i}").json()
            stored_pairs.append(turn["pair_id"])
            assert vote(turn["pair_id"]).status_code == 200
            acknowledged.append(turn["pair_id"])
        waiting = [
            chat(f"voted on while the disk is full {i}").json()["pair_id"] for i in range(40)
        ]
        stored_pairs += waiting

        _fill(root / "filler")
        assert os.statvfs(root).f_bavail == 0
        # A small write may still fit in the last page DuckDB's log already owns; keep voting
        # until the disk refuses one: each vote is either acknowledged and kept, or refused.
        refused = []
        for pair_id in waiting:
            r = vote(pair_id)
            if r.status_code == 200:
                acknowledged.append(pair_id)
                continue
            assert r.status_code == 507, r.text
            assert "disk is full" in r.json()["error"] and "nothing was saved" in r.json()["error"]
            refused.append(pair_id)
        assert refused, "no write was refused on a full disk"
        # Turns (within the tiny model's 512-token window) until the disk refuses one: as with
        # votes, a turn is either stored whole and kept, or refused with nothing of it stored.
        full_chat = None
        for i in range(20):
            r = chat(f"a long turn while the disk is full {i} " + "x" * 300)
            if r.status_code == 200:
                stored_pairs.append(r.json()["pair_id"])
                continue
            full_chat = r
            break
        assert full_chat is not None and full_chat.status_code == 507, full_chat and full_chat.text

        (root / "filler").unlink()  # space again: the refused votes now go through
        for pair_id in refused:
            assert vote(pair_id).status_code == 200
            acknowledged.append(pair_id)
        turn = chat("after the disk was freed").json()
        stored_pairs.append(turn["pair_id"])

        assert vote(turn["pair_id"]).status_code == 200
        acknowledged.append(turn["pair_id"])
    finally:
        for child in psutil.Process(proc.pid).children(recursive=True):
            if "assistant" in " ".join(child.cmdline()):
                child.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)

    reopened = json.loads(out.split("REOPENED ", 1)[1])
    assert sorted(reopened["votes"]) == sorted(acknowledged)
    assert sorted(reopened["pairs"]) == sorted(stored_pairs)  # the failed turn left nothing


def test_read_only_data_directory_is_refused_at_start(tiny_engine_url, tmp_path):
    from storage import Store

    data = tmp_path / "data"
    Store(data / "assistant.duckdb").close()
    before = (data / "assistant.duckdb").read_bytes()
    script = (
        'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1"\n'
        'exec "$2" -m assistant run --data-dir "$1" --port "$3" --vllm-url "$4"\n'
    )
    log = tmp_path / "app.log"
    proc = _namespaced(script, str(data), sys.executable, "0", tiny_engine_url, log=log)
    assert proc.wait(timeout=120) == 2
    message = log.read_text()
    assert "cannot open the database" in message and "Read-only file system" in message, message
    assert (data / "assistant.duckdb").read_bytes() == before
