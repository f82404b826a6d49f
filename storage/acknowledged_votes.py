"""Votes acknowledged on the journal before DuckDB has them, and what deciding one needs.

A vote is checked against its pair (it exists, it belongs to the session, it has no vote yet),
paced against its age and length, and answered with the reply that continues the conversation.
The pairs the app wrote recently are kept here with exactly those facts, so a vote on one is
decided and answered on the event loop, made durable by its journal line
(`storage.vote_journal`), and handed to the writer thread to store. A vote on a pair not kept
here (older, or the app restarted) takes the writer's path as before.

Until the writer has stored it, a reader must not miss it: reads through the store wait until
the votes acknowledged before them are stored (`wait_stored`), except a turn's opening read,
which instead completes a stale read with the one vote it can miss (`OpenedTurn` in the store):
a turn must not wait for the writer, or the vote's wait would only move to the next chat.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from storage.request_writes import RecordedVote

RECENT_PAIRS = 4096  # ~1 MB of reply text: the pairs a vote is expected on soon


@dataclass
class PairFacts:
    """What deciding a vote needs of its pair, in the shape `VoteWrite` reads from DuckDB."""

    conversation: str
    owner: str | None
    texts: dict[str, str]
    versions: dict[str, str]
    variants: dict[str, str | None]
    written_at: float = field(default_factory=time.monotonic)
    voted: bool = False

    def as_found(self) -> dict:
        return {
            "conversation": self.conversation, "owner": self.owner, "voted": self.voted,
            "age": time.monotonic() - self.written_at, "texts": self.texts,
            "versions": self.versions, "variants": self.variants,
        }  # fmt: skip


class AcknowledgedVotes:
    """Recent pairs' facts, votes acknowledged but not yet stored, and the barrier for reads."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._pairs: OrderedDict[str, PairFacts] = OrderedDict()
        self._unstored: dict[str, tuple[int, RecordedVote]] = {}  # pair id -> (line, vote)
        self._retrying: dict[int, str] = {}  # line -> conversation, of votes a write failed
        self._acknowledged = 0  # journal line of the last vote acknowledged
        self._stored = 0  # ... and of the last one the writer has finished with

    def remember(self, pair_id: str, facts: PairFacts) -> None:
        with self._lock:
            self._pairs[pair_id] = facts
            while len(self._pairs) > RECENT_PAIRS:
                self._pairs.popitem(last=False)

    def facts(self, pair_id: str) -> PairFacts | None:
        with self._lock:
            return self._pairs.get(pair_id)

    def forget_pair(self, pair_id: str) -> None:
        with self._lock:
            self._pairs.pop(pair_id, None)

    def forget_conversation(self, conversation_id: str) -> None:
        """Its pairs go to the writer's path: a vote on them is checked against DuckDB."""
        with self._lock:
            for pair_id in [p for p, f in self._pairs.items() if f.conversation == conversation_id]:
                del self._pairs[pair_id]

    def acknowledged(self, line: int, vote: RecordedVote) -> None:
        """Called with the journal's lock held, once the vote's line is durable."""
        with self._lock:
            facts = self._pairs.get(vote.pair_id)
            if facts is not None:
                facts.voted = True
            self._unstored[vote.pair_id] = (line, vote)
            self._acknowledged = line

    def stored(self, line: int, pair_id: str, ok: bool) -> None:
        """The writer finished with the vote of journal line `line`. One it could not store
        (the disk is full) is tried again; until then it stays unstored here, so that a turn's
        opening read still completes with it, and its conversation takes no new turn
        (`retrying_in`): the turn would take the place of the vote's reply."""
        with self._lock:
            if ok:
                self._unstored.pop(pair_id, None)
                self._retrying.pop(line, None)
            else:
                unstored = self._unstored.get(pair_id)
                if unstored is not None:
                    self._retrying[line] = unstored[1].conversation_id
            self._stored = max(self._stored, line)
            self._lock.notify_all()

    def retrying_in(self, conversation_id: str) -> bool:
        with self._lock:
            return conversation_id in self._retrying.values()

    def journal_stored_through(self) -> int:
        """Every journal line up to this one is in DuckDB (what the journal may drop)."""
        with self._lock:
            return min(self._retrying, default=self._stored + 1) - 1

    def wait_stored(self) -> None:
        """Until the writer has had every vote acknowledged before this call (one whose write
        failed is retried in the background: a read does not wait for the disk to free)."""
        with self._lock:
            target = self._acknowledged
            self._lock.wait_for(lambda: self._stored >= target)

    def unstored_in(self, conversation_id: str) -> dict[str, RecordedVote]:
        """pair id -> vote, for this conversation's votes DuckDB may not have yet."""
        with self._lock:
            return {
                pair_id: vote
                for pair_id, (_, vote) in self._unstored.items()
                if vote.conversation_id == conversation_id
            }
