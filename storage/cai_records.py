"""Constitutional AI's records: constitutions (every version kept), critique-revision chains,
AI preference labels, and the queues the background worker takes its next item from. Mixed
into `Store`, which owns the connection and transactions."""

from __future__ import annotations

import json
from typing import Any

from storage.rules import AWAITING_CRITIQUE, BOTH_CANDIDATES, new_id


class CAIRecords:
    """Requires `_transaction()`, `_rows()`, `_prompt_rows()` and `_append_version()` (see
    `storage.database.Database`)."""

    def save_constitution(self, name: str, body: dict) -> int:
        """Store a constitution as a new version (history is never overwritten)."""
        return self._append_version("constitutions", {"name": name, "body": json.dumps(body)})

    def latest_constitution(self) -> dict[str, Any] | None:
        rows = self._rows(
            "SELECT version, name, body FROM constitutions ORDER BY version DESC LIMIT 1"
        )
        if not rows:
            return None
        rows[0]["body"] = json.loads(rows[0]["body"])
        return rows[0]

    def candidates_to_critique(self, limit: int) -> list[dict[str, Any]]:
        """Chosen replies (the continued one of a/b/tie votes) with no critique round yet.
        Flagged votes (too fast to have read the replies) choose nothing: their revisions would
        reach SFT by the back door that reward-model training closed to them."""
        return self._prompt_rows(
            f"SELECT c.id AS candidate_id, c.text, p.prompt {AWAITING_CRITIQUE} "
            "ORDER BY v.created_at LIMIT ?",
            [limit],
        )

    def cai_backlog(self) -> dict[str, int]:
        """How many chosen replies await a critique and pairs await an AI judgement."""
        row = self._rows(
            f"SELECT (SELECT count(*) {AWAITING_CRITIQUE}) AS critiques, "
            "       (SELECT count(*) FROM pairs p WHERE NOT EXISTS "
            "        (SELECT 1 FROM ai_labels l WHERE l.pair_id = p.id) AND NOT EXISTS "
            "        (SELECT 1 FROM cai_skips s WHERE s.item_id = p.id)) AS judgements"
        )[0]
        return {"critiques": int(row["critiques"]), "judgements": int(row["judgements"])}

    def record_cai_skip(self, item_id: str, kind: str, reason: str, attempts: int) -> None:
        """Give up on a critique or judgement that keeps failing (too long for the judge, say),
        so it stops blocking the queue behind it; the reason stays for the operator."""
        with self._transaction() as con:
            con.execute(
                "INSERT INTO cai_skips (item_id, kind, reason, attempts) VALUES (?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                [item_id, kind, reason[:500], attempts],
            )

    def record_critique_round(
        self,
        candidate_id: str,
        round_: int,
        principle: str,
        critique: str,
        revision: str,
        model_version: str,
    ) -> None:
        with self._transaction() as con:
            con.execute(
                "INSERT INTO critiques (id, candidate_id, round, principle, critique, revision, "
                "model_version) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [new_id(), candidate_id, round_, principle, critique, revision, model_version],
            )

    def critique_chain(self, candidate_id: str) -> list[dict[str, Any]]:
        return self._rows(
            "SELECT round, principle, critique, revision, model_version, created_at "
            "FROM critiques WHERE candidate_id = ? ORDER BY round",
            [candidate_id],
        )

    def critiqued_candidates(self, limit: int = 50) -> list[dict[str, Any]]:
        """The most recently critiqued replies: candidate id, the user's question, the reply."""
        return self._prompt_rows(
            "SELECT c.id AS candidate_id, c.text, p.prompt, max(k.created_at) AS last "
            "FROM critiques k JOIN candidates c ON c.id = k.candidate_id "
            "JOIN pairs p ON p.id = c.pair_id GROUP BY c.id, c.text, p.prompt "
            "ORDER BY last DESC LIMIT ?",
            [limit],
        )

    def revisions(self) -> list[dict[str, Any]]:
        """(prompt, final revision) per critiqued reply, for the SFT stage; none from a reply
        that a flagged vote chose (critiqued before the flag rule, say)."""
        return self._prompt_rows(
            "SELECT p.prompt, k.revision FROM critiques k "
            "JOIN candidates c ON c.id = k.candidate_id JOIN pairs p ON p.id = c.pair_id "
            "JOIN votes v ON v.pair_id = p.id AND v.flagged IS NULL "
            "WHERE k.round = (SELECT max(round) FROM critiques k2 "
            "                 WHERE k2.candidate_id = k.candidate_id)"
        )

    def pairs_to_judge(self, limit: int) -> list[dict[str, Any]]:
        return self._prompt_rows(
            "SELECT p.id AS pair_id, p.prompt, a.text AS text_a, b.text AS text_b FROM pairs p "
            f"{BOTH_CANDIDATES} "
            "WHERE NOT EXISTS (SELECT 1 FROM ai_labels l WHERE l.pair_id = p.id) "
            "AND NOT EXISTS (SELECT 1 FROM cai_skips s WHERE s.item_id = p.id) "
            "ORDER BY p.created_at LIMIT ?",
            [limit],
        )

    def record_ai_label(
        self,
        pair_id: str,
        choice: str,
        principle: str,
        confidence: float,
        p_a: float,
        p_b: float,
        model_version: str,
    ) -> None:
        with self._transaction() as con:
            con.execute(
                "INSERT INTO ai_labels (id, pair_id, choice, principle, confidence, p_a, p_b, "
                "model_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [new_id(), pair_id, choice, principle, confidence, p_a, p_b, model_version],
            )

    def ai_labeled_pairs(self) -> list[dict[str, Any]]:
        """AI-labeled pairs that have no decisive human vote, shaped like `voted_pairs` rows."""
        return self._prompt_rows(
            "SELECT p.id AS pair_id, p.prompt, l.choice, 'ai' AS source, l.confidence, "
            "a.text AS text_a, b.text AS text_b FROM ai_labels l JOIN pairs p ON p.id = l.pair_id "
            f"{BOTH_CANDIDATES} "
            "LEFT JOIN votes v ON v.pair_id = p.id "
            "WHERE v.id IS NULL OR v.choice NOT IN ('a', 'b') ORDER BY l.created_at"
        )

    def label_pairs(self) -> list[dict[str, Any]]:
        """Pairs with a human vote and/or an AI label: (pair_id, human choice, AI choice)."""
        return self._rows(
            "SELECT p.id AS pair_id, v.choice AS human, l.choice AS ai, l.confidence "
            "FROM pairs p LEFT JOIN votes v ON v.pair_id = p.id "
            "LEFT JOIN ai_labels l ON l.pair_id = p.id "
            "WHERE v.id IS NOT NULL OR l.id IS NOT NULL ORDER BY p.created_at"
        )
