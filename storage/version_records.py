"""Model versions, deployments and training runs: which version serves, what each cycle
measured, and the votes that are new since the last cycle. Mixed into `Store`, which owns the
connection and transactions."""

from __future__ import annotations

import json
from typing import Any

from storage.canaries import CanaryEnd, close_canary
from storage.errors import ConflictError, NotFoundError
from storage.rules import new_id, version_name


class VersionRecords:
    """Requires `_transaction()` and `_rows()` (see `Store`)."""

    def ensure_base_version(self, version: str, path: str, manifest: dict) -> None:
        """Record the base checkpoint as a model version (idempotent)."""
        with self._transaction() as con:
            exists = con.execute(
                "SELECT 1 FROM model_versions WHERE version = ?", [version]
            ).fetchone()
            if not exists:
                con.execute(
                    "INSERT INTO model_versions (version, parent, path, status, manifest) "
                    "VALUES (?, NULL, ?, 'serving', ?)",
                    [version, path, json.dumps(manifest)],
                )

    def record_model_version(
        self, version: str, parent: str | None, path: str, status: str, manifest: dict
    ) -> None:
        with self._transaction() as con:
            con.execute(
                "INSERT INTO model_versions (version, parent, path, status, manifest) "
                "VALUES (?, ?, ?, ?, ?)",
                [version, parent, path, status, json.dumps(manifest, default=str)],
            )

    def serving_version(self) -> dict[str, Any] | None:
        rows = self._rows("SELECT version, path FROM model_versions WHERE status = 'serving'")
        return rows[0] if rows else None

    def model_version(self, version: str) -> dict[str, Any]:
        rows = self._rows(
            "SELECT version, path, status FROM model_versions WHERE version = ?", [version]
        )
        if not rows:
            raise NotFoundError(f"unknown version {version!r}")
        return rows[0]

    def servable_path(self, version: str) -> str:
        """The weights a version would serve from. One rule for the app's rollback and the
        CLI's offline one: a version the gate rejected, or whose weights were pruned, has
        nothing to serve (serving it would point the engine at an empty path)."""
        row = self.model_version(version)
        if row["status"] == "rejected" or not row["path"]:
            raise ConflictError(
                f"version {version} has no weights to serve (rejected by the gate, or pruned)"
            )
        return row["path"]

    def next_version(self) -> str:
        """The next version name, never one a recorded version or any cycle (failed or
        interrupted ones too) already took, so no two cycles write the same folder."""
        rows = self._rows(
            "SELECT version AS name FROM model_versions UNION ALL "
            "SELECT json_extract_string(config, '$.version') FROM training_runs"
        )
        taken = [int(r["name"][1:]) for r in rows if r["name"] and r["name"][1:].isdigit()]
        n = max(taken, default=None)
        return version_name((-1 if n is None else n) + 1)

    def fail_interrupted_runs(self) -> list[dict[str, Any]]:
        """Cycles still 'running' when the app starts were cut off by a stop or crash: mark
        them failed (nothing of them was served) and return their configs for cleanup."""
        with self._transaction() as con:
            rows = con.execute(
                "UPDATE training_runs SET status = 'failed', finished_at = now(), "
                "error = 'interrupted: the app stopped during the cycle' "
                "WHERE status = 'running' RETURNING config"
            ).fetchall()
        return [json.loads(r[0]) if r[0] else {} for r in rows]

    def mark_pruned(self, version: str) -> None:
        """Its weights were deleted: keep the row and metrics, forget the path."""
        with self._transaction() as con:
            con.execute(
                "UPDATE model_versions SET path = '', "
                "manifest = json_merge_patch(manifest, '{\"pruned\": true}') WHERE version = ?",
                [version],
            )

    def set_serving(
        self, version: str, swap_seconds: float, ending: CanaryEnd | None = None
    ) -> None:
        """The swapped-in version becomes 'serving', the one it replaced 'previous'; `ending`
        (a canary's promotion) is recorded in the same transaction."""
        with self._transaction() as con:
            if ending is not None:
                close_canary(con, ending)
            previous = con.execute(
                "SELECT version FROM model_versions WHERE status = 'serving'"
            ).fetchone()
            con.execute("UPDATE model_versions SET status = 'previous' WHERE status = 'serving'")
            con.execute("UPDATE model_versions SET status = 'serving' WHERE version = ?", [version])
            con.execute(
                "INSERT INTO deployments (id, version, previous, swap_seconds) VALUES (?, ?, ?, ?)",
                [new_id(), version, previous[0] if previous else None, swap_seconds],
            )

    def start_run(self, kind: str, config: dict) -> str:
        run_id = new_id()
        with self._transaction() as con:
            con.execute(
                "INSERT INTO training_runs (id, kind, status, config) VALUES (?, ?, ?, ?)",
                [run_id, kind, "running", json.dumps(config, default=str)],
            )
        return run_id

    def finish_run(
        self, run_id: str, status: str, metrics: dict | None = None, error: str | None = None
    ) -> None:
        with self._transaction() as con:
            con.execute(
                "UPDATE training_runs SET status = ?, finished_at = now(), metrics = ?, error = ? "
                "WHERE id = ?",
                [status, json.dumps(metrics or {}, default=str), error, run_id],
            )

    def activity(self) -> dict[str, Any]:
        """Totals for monitoring (`GET /metrics`), in one read: turns, votes by choice, flagged
        votes, and the retrain cycles by how they ended with their seconds."""
        rows = self._rows(
            "SELECT 'turns' AS kind, NULL AS name, count(*) AS n, NULL AS seconds FROM pairs "
            "UNION ALL SELECT 'votes', choice, count(*), NULL FROM votes GROUP BY choice "
            "UNION ALL SELECT 'flagged', NULL, count(*), NULL FROM votes "
            "WHERE flagged IS NOT NULL "
            "UNION ALL SELECT 'cycles', status, count(*), "
            "sum(epoch(coalesce(finished_at, now()) - started_at)) FROM training_runs "
            "GROUP BY status"
        )
        out: dict[str, Any] = {"turns": 0, "flagged": 0, "votes": {}, "cycles": {}}
        for r in rows:
            if r["kind"] in ("turns", "flagged"):
                out[r["kind"]] = r["n"]
            elif r["kind"] == "votes":
                out["votes"][r["name"]] = r["n"]
            else:
                out["cycles"][r["name"]] = (r["n"], float(r["seconds"] or 0.0))
        return out

    def training_runs(self) -> list[dict[str, Any]]:
        rows = self._rows(
            "SELECT id, kind, status, started_at, finished_at, metrics, error "
            "FROM training_runs ORDER BY started_at"
        )
        for r in rows:
            r["metrics"] = json.loads(r["metrics"]) if r["metrics"] else {}
        return rows

    def training_run(self, run_id: str) -> dict[str, Any]:
        """One retrain cycle's row (`kind` 'cycle'), its JSON decoded and times in ISO 8601."""
        rows = self._rows(
            "SELECT id, status, started_at, finished_at, config, metrics, error "
            "FROM training_runs WHERE id = ? AND kind = 'cycle'",
            [run_id],
        )
        if not rows:
            raise NotFoundError(f"unknown retrain run {run_id!r}")
        row = rows[0]
        for key in ("config", "metrics"):
            row[key] = json.loads(row[key]) if row[key] else {}
        for key in ("started_at", "finished_at"):
            row[key] = row[key].isoformat() if row[key] is not None else None
        return row

    def new_decisive_votes(self) -> tuple[int, float | None]:
        """(decisive votes since the last cycle started, minutes since then or None if never)."""
        rows = self._rows(
            "WITH last AS (SELECT max(started_at) AS t FROM training_runs WHERE kind = 'cycle') "
            "SELECT (SELECT count(*) FROM votes, last "
            "        WHERE choice IN ('a', 'b') AND flagged IS NULL "
            "        AND (last.t IS NULL OR created_at > last.t)) AS n, "
            "       (SELECT epoch(now() - t) / 60 FROM last) AS minutes"
        )
        return rows[0]["n"], rows[0]["minutes"]

    def new_vote_sources(self) -> dict[str, Any]:
        """Where the decisive votes since the last cycle came from: their number and the share
        of the largest single session and of the largest single client address (votes without
        one count as their own source each)."""
        rows = self._rows(
            "WITH last AS (SELECT max(started_at) AS t FROM training_runs WHERE kind = 'cycle'), "
            "new AS (SELECT session_id, client FROM votes, last WHERE choice IN ('a', 'b') "
            "        AND flagged IS NULL AND (last.t IS NULL OR created_at > last.t)) "
            "SELECT (SELECT count(*) FROM new) AS n, "
            "  (SELECT coalesce(max(k), 0) FROM (SELECT count(*) AS k FROM new "
            "   WHERE session_id IS NOT NULL GROUP BY session_id) AS per_session) AS top_session, "
            "  (SELECT coalesce(max(k), 0) FROM (SELECT count(*) AS k FROM new "
            "   WHERE client IS NOT NULL GROUP BY client) AS per_client) AS top_client"
        )[0]
        n = rows["n"]
        return {
            "votes": n,
            "top_session_share": rows["top_session"] / n if n else 0.0,
            "top_address_share": rows["top_client"] / n if n else 0.0,
        }

    def refuse_cycle(self, reason: str, metrics: dict) -> None:
        """A cycle refused before it started, recorded as one (so its votes are not counted
        again as new, and the Admin tab lists it with the reason)."""
        run_id = self.start_run("cycle", {"refused": True})
        self.finish_run(run_id, "refused", metrics, reason)

    def logged_prompts(self) -> list[list[dict[str, str]]]:
        """Every distinct prompt sent to the engine, for PPO rollouts."""
        rows = self._rows("SELECT DISTINCT CAST(prompt AS VARCHAR) AS p FROM pairs")
        return [json.loads(r["p"]) for r in rows]

    def model_versions(self) -> list[dict[str, Any]]:
        rows = self._rows(
            "SELECT version, parent, path, status, manifest, created_at FROM model_versions "
            "ORDER BY created_at, version"
        )
        for r in rows:
            r["manifest"] = json.loads(r["manifest"]) if r["manifest"] else {}
            r["created_at"] = r["created_at"].isoformat()
        return rows
