"""Preference data out of the store, in the formats trainers read.

- `trl`: TRL's conversational preference format, one row per decisive vote:
  `{"prompt": [messages...], "chosen": [{"role": "assistant", ...}], "rejected": [...]}`.
- `hh`: Anthropic HH-RLHF's text format: `{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...",
  "rejected": ...}`.

- `kto`: TRL's unpaired preference format, two rows per vote, ties and both-bad included:
  `{"prompt": [messages...], "completion": [{"role": "assistant", ...}], "label": bool}`: the
  winner true and the loser false; a tie's two replies true (the conversation went on with
  them), a both-bad's two false.
- `arena`: LMArena/FastChat's battle format, for votes on pairs whose replies came from two
  versions (a canary's): `{"question_id", "model_a", "model_b", "winner", "conversation_a",
  "conversation_b", "turn", "tstamp"}`, `winner` one of `model_a`, `model_b`, `tie`,
  `tie (bothbad)`, as FastChat's Elo and Bradley-Terry notebooks read it.
- `sft`: the replies users wrote themselves (demonstrations), in TRL's conversational SFT
  format: `{"messages": [...the prompt..., {"role": "assistant", "content": <their reply>}]}`.

Only decisive votes (a or b) become pairs: a tie says neither is preferred and both_bad gives no
winner, so both are left out of preference data (they stay in the database). What they say of
each reply on its own (a tie's replies were let stand, a both-bad's refused) comes out as
verdicts (`verdict_records`), which the reward models may pair across prompts
(`alignment.verdicts`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from storage.errors import InvalidInputError
from storage.private import private_fd

FORMATS = ("trl", "hh", "kto", "arena", "sft")
PREFERENCE_FORMATS = ("trl", "hh", "kto", "arena")


def winner_loser(row: dict) -> tuple[str, str] | None:
    if row["choice"] == "a":
        return row["text_a"], row["text_b"]
    if row["choice"] == "b":
        return row["text_b"], row["text_a"]
    return None


def to_trl(row: dict) -> dict | None:
    pair = winner_loser(row)
    if pair is None:
        return None
    chosen, rejected = pair
    return {
        "prompt": row["prompt"],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def hh_transcript(messages: list[dict[str, str]]) -> str:
    names = {"user": "Human", "assistant": "Assistant"}
    return "".join(
        f"\n\n{names[m['role']]}: {m['content']}" for m in messages if m["role"] in names
    )


def to_hh(row: dict) -> dict | None:
    pair = winner_loser(row)
    if pair is None:
        return None
    chosen, rejected = pair
    context = hh_transcript(row["prompt"])
    return {
        "chosen": f"{context}\n\nAssistant: {chosen}",
        "rejected": f"{context}\n\nAssistant: {rejected}",
    }


def to_kto(row: dict) -> list[dict]:
    accepted = {
        "a": (True, False), "b": (False, True), "tie": (True, True), "both_bad": (False, False)
    }[row["choice"]]  # fmt: skip
    return [
        {"prompt": row["prompt"], "completion": [{"role": "assistant", "content": text}],
         "label": label}
        for text, label in zip((row["text_a"], row["text_b"]), accepted, strict=True)
    ]  # fmt: skip


ARENA_WINNER = {"a": "model_a", "b": "model_b", "tie": "tie", "both_bad": "tie (bothbad)"}


def to_arena(row: dict) -> list[dict]:
    """A battle between two versions; a pair whose replies came from one version is none."""
    if row["version_a"] == row["version_b"]:
        return []
    return [
        {
            "question_id": row["pair_id"],
            "model_a": row["version_a"],
            "model_b": row["version_b"],
            "winner": ARENA_WINNER[row["choice"]],
            "conversation_a": [*row["prompt"], {"role": "assistant", "content": row["text_a"]}],
            "conversation_b": [*row["prompt"], {"role": "assistant", "content": row["text_b"]}],
            "turn": sum(1 for m in row["prompt"] if m["role"] == "user"),
            "tstamp": row["voted_at"].timestamp(),
        }
    ]


def demonstration_records(rows: Iterable[dict]) -> list[dict]:
    """Demonstrations (`Store.demonstrations` rows) in TRL's conversational SFT format."""
    return [{"messages": [*r["prompt"], {"role": "assistant", "content": r["text"]}]} for r in rows]


def preference_records(rows: Iterable[dict], fmt: str) -> list[dict]:
    if fmt not in PREFERENCE_FORMATS:
        raise InvalidInputError(
            f"format must be one of {', '.join(PREFERENCE_FORMATS)}, got {fmt!r}"
        )
    if fmt in ("trl", "hh"):
        convert = to_trl if fmt == "trl" else to_hh
        return [r for r in map(convert, rows) if r is not None]
    expand = to_kto if fmt == "kto" else to_arena
    return [record for row in rows for record in expand(row)]


def verdict_records(rows: Iterable[dict]) -> list[dict]:
    """`{"prompt", "reply", "accepted"}` for both replies of every tie (accepted: the
    conversation went on) and every both-bad vote (refused: the user asks again)."""
    return [
        {"prompt": r["prompt"], "reply": text, "accepted": r["choice"] == "tie"}
        for r in rows
        if r["choice"] in ("tie", "both_bad")
        for text in (r["text_a"], r["text_b"])
    ]


def write_records(records: list[dict], path: Path) -> None:
    """Write JSONL or Parquet, chosen by the file suffix; the file is 0600 (it holds users'
    conversations), also when it existed with wider rights."""
    if path.suffix not in (".parquet", ".jsonl", ".json"):
        raise InvalidInputError(f"output must end in .jsonl or .parquet, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(private_fd(path, os.O_WRONLY | os.O_TRUNC), "wb") as f:
        if path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(records), f)
        else:
            for r in records:
                f.write((json.dumps(r, ensure_ascii=False) + "\n").encode())
