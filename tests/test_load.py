"""Load: 32 simulated users chat and vote concurrently for a bounded time (tiny model, real HTTP,
real engine, real DuckDB); every acknowledged vote is in the database afterwards and nothing 5xx.
The user simulation is `bench.load.run_load`, so the test and the benchmark measure the same."""

from __future__ import annotations

import duckdb

from bench.load import run_load


def test_32_users_every_acknowledged_vote_is_stored(tiny_app_factory):
    app = tiny_app_factory("--max-backlog", "64", "--max-new-tokens", "8")
    result = run_load(app.url, users=32, seconds=30)
    app.stop()
    assert not [s for s in result.statuses if s >= 500], sorted(set(result.statuses))
    assert len(result.acknowledged) >= 32  # every user got at least one turn through
    con = duckdb.connect(str(app.db), read_only=True)
    stored = {r[0] for r in con.execute("SELECT pair_id FROM votes").fetchall()}
    con.close()
    assert stored == set(result.acknowledged)
    # every acknowledged vote reported its write time (Server-Timing), a real duration
    assert len(result.vote_db_ms) == len(result.acknowledged)
    assert all(ms > 0 for ms in result.vote_db_ms)
    print(result.summary())
