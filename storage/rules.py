"""The vote's rules and the SQL fragments the storage modules share: one home each."""

from __future__ import annotations

import hashlib
import uuid

from storage.errors import InvalidInputError


def new_id() -> str:
    return uuid.uuid4().hex


def session_hash(session_id: str) -> str:
    """What the database keeps of a session id, the one place it is computed: its SHA-256 in
    hex. An id is a bearer token (whoever holds it continues and deletes that session's chats);
    its hash lets the rows be matched to the session without being one. Unkeyed is enough: an
    id carries 96 random bits, too many to find from a hash by trying."""
    return hashlib.sha256(session_id.encode()).hexdigest()


def version_name(number: int) -> str:
    """The one place that knows how versions are named: v0000 (the base), v0001, ..."""
    return f"v{number:04d}"


VOTE_CHOICES = ("a", "b", "tie", "both_bad")


def validate_choice(choice: object) -> str:
    """The one check of a vote's choice, where the vote is written (the API's schema lists
    the same choices for clients)."""
    if choice not in VOTE_CHOICES:
        raise InvalidInputError(
            f"'choice' must be one of {', '.join(repr(c) for c in VOTE_CHOICES)}, got {choice!r}",
            422,
        )
    return choice  # type: ignore[return-value]


def continued_slot(choice: str) -> str | None:
    """The vote's rule, in one place: the reply voted for continues the conversation, a tie
    continues with A, "both bad" with neither (the user asks again)."""
    return None if choice == "both_bad" else "b" if choice == "b" else "a"


# The same rule in SQL, for the queries over chosen replies (`v` is the votes row).
CONTINUED_SLOT_SQL = "CASE v.choice WHEN 'b' THEN 'b' WHEN 'both_bad' THEN NULL ELSE 'a' END"

# A pair's two candidates, `a` and `b`, beside the pair `p`.
BOTH_CANDIDATES = (
    "JOIN candidates a ON a.pair_id = p.id AND a.slot = 'a' "
    "JOIN candidates b ON b.pair_id = p.id AND b.slot = 'b'"
)

# Chosen replies of unflagged votes with no critique yet and not given up on (`c`: candidates).
AWAITING_CRITIQUE = (
    "FROM votes v JOIN pairs p ON p.id = v.pair_id "
    f"JOIN candidates c ON c.pair_id = p.id AND c.slot = {CONTINUED_SLOT_SQL} "
    "WHERE v.flagged IS NULL "
    "AND NOT EXISTS (SELECT 1 FROM critiques k WHERE k.candidate_id = c.id) "
    "AND NOT EXISTS (SELECT 1 FROM cai_skips s WHERE s.item_id = c.id)"
)
