"""Acknowledged records the database refused: kept on disk, counted, never retried.

A vote is acknowledged once its journal line is durable (`storage.vote_journal`), before DuckDB
has it. If DuckDB then refuses it for what it holds (not for a full disk, which passes), trying
again cannot help: retrying it forever held every other write back, and replaying it on the next
start stopped the app from starting (issue 36: a voter label with a lone surrogate). Such a record
is appended here instead, with the reason, and the rest goes on; the edge and the store already
refuse such input, so a line here means a check was missed: the log says so, `/api/health`
counts them, and an operator can read the file (0600: it names sessions and may hold a user's text).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from storage.vote_journal import open_private

log = logging.getLogger(__name__)


def set_aside_path(database: Path) -> Path:
    return database.with_name(database.name + ".set-aside.jsonl")


class SetAside:
    """An append-only file of refused records, one JSON line each."""

    def __init__(self, path: Path | None) -> None:
        """`path` None: a store with no journal (Postgres), where nothing is ever set aside."""
        self.path = path
        self._lock = threading.Lock()
        self._count = (
            sum(1 for line in path.read_bytes().split(b"\n") if line)
            if path is not None and path.exists()
            else 0
        )

    @property
    def count(self) -> int:
        return self._count

    def add(self, kind: str, record: dict, reason: str) -> None:
        # ensure_ascii: a lone surrogate is written as its escape, so the line itself is valid
        line = json.dumps(
            {"set_aside_at": time.time(), "kind": kind, "reason": reason, "record": record},
            ensure_ascii=True,
            default=str,
        )
        with self._lock, open_private(self.path) as f:
            f.write(line.encode() + b"\n")
            os.fsync(f.fileno())
            self._count += 1
        log.error(
            "the database refused an acknowledged %s; set aside in %s (not retried): %s",
            kind, self.path, reason,
        )  # fmt: skip
