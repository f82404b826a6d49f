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
