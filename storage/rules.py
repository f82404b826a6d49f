"""The vote's rules and the SQL fragments the storage modules share: one home each."""

from __future__ import annotations

import hashlib
import unicodedata
import uuid

from storage.errors import InvalidInputError


def new_id() -> str:
    return uuid.uuid4().hex


def session_hash(session_id: str) -> str:
    """What the database keeps of a session id, the one place it is computed: its SHA-256 in
    hex. An id is a bearer token (whoever holds it continues and deletes that session's chats);
    its hash lets the rows be matched to the session without being one. Unkeyed is enough: an
    id carries 96 random bits, too many to find from a hash by trying."""
    # surrogatepass: an id from an old journal line may be any string; hashing never raises
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()


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


MAX_VOTER_CHARS = 200  # a voter's label (a name, an id from the client's own system)


def unstorable(text: str, nul_ok: bool = False) -> str | None:
    """Why the database cannot hold `text`, or None. DuckDB refuses a lone surrogate (it stores
    UTF-8, and a surrogate half has no UTF-8 form; JSON's `\\ud800` escape makes one) and
    Postgres refuses NUL; a string either refuses must never be acknowledged, since the writer
    could then never store it."""
    if "\x00" in text and not nul_ok:
        return "contains NUL (U+0000)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"contains a lone surrogate (U+{ord(text[exc.start]):04X}), which is not valid text"
    return None


def unstorable_in(value: object, field: str = "body", nul_ok: bool = False) -> str | None:
    """The first string in a JSON value (keys included) that the database could not hold, as
    a message naming where it is ('messages[0].content'), or None. `nul_ok`: NUL is left to
    the fields' own checks (a message's control characters are refused with its other rules)."""
    if isinstance(value, str):
        problem = unstorable(value, nul_ok)
        return None if problem is None else f"'{field}' {problem}"
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and (problem := unstorable(key, nul_ok)) is not None:
                return f"a key in '{field}' {problem}"
            found = unstorable_in(item, key if field == "body" else f"{field}.{key}", nul_ok)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if (found := unstorable_in(item, f"{field}[{i}]", nul_ok)) is not None:
                return found
    return None


def check_storable(text: object, field: str) -> None:
    """Raise the 422 naming `field` when the database could not store `text` (None passes)."""
    if isinstance(text, str) and (problem := unstorable(text)) is not None:
        raise InvalidInputError(f"'{field}' {problem}", 422)


def validate_voter(voter: object) -> str | None:
    """A voter's label: optional, a short line of storable text."""
    if voter is None:
        return None
    if not isinstance(voter, str):
        raise InvalidInputError("'voter' must be a string", 422)
    if len(voter) > MAX_VOTER_CHARS:
        raise InvalidInputError(
            f"'voter' is {len(voter)} characters; the limit is {MAX_VOTER_CHARS}", 422
        )
    check_storable(voter, "voter")
    if any(unicodedata.category(c) == "Cc" for c in voter):
        raise InvalidInputError("'voter' contains control characters", 422)
    return voter


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
