"""Preference data into the store: a team seeds the reward model before users arrive.

`assistant import FILE --source NAME` reads a preference dataset in the formats TRL and
Anthropic's HH-RLHF publish, JSON lines or Parquet:

- TRL conversational: `{"prompt": [messages], "chosen": [{"role": "assistant", ...}],
  "rejected": [...]}`, or with the prompt left implicit (`chosen` and `rejected` are whole
  conversations sharing everything but their last message);
- TRL standard: `{"prompt": "text", "chosen": "text", "rejected": "text"}`;
- HH-RLHF text: `{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}`.

Each row becomes a pair whose reply A is the chosen one and a decisive vote for it, from the
source `import:NAME` (no session, no client address: the source caps for users' votes do not
apply to an operator's data), so the reward models train on it as on users' votes. Every row is
checked first; a file with a refused row imports nothing unless the caller skips those rows,
and the rows that are imported go in one transaction (a crash leaves none of them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from storage.errors import InvalidInputError
from storage.rules import new_id, unstorable_in

IMPORTED_VERSION = "imported"  # the "model" that wrote an imported reply


@dataclass(frozen=True)
class ImportedPair:
    prompt: list[dict[str, str]]  # the conversation up to the reply, ending with a user turn
    chosen: str
    rejected: str


@dataclass(frozen=True)
class Refused:
    row: int  # 1-based, in the file's order
    reason: str


def read_rows(path: Path) -> list[object]:
    """The file's rows: JSON lines (`.jsonl`, `.json`) or Parquet."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix not in (".jsonl", ".json"):
        raise InvalidInputError(f"{path.name}: expected .jsonl or .parquet")
    rows: list[object] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as exc:
            rows.append(Refused(n, f"not JSON: {exc}"))
    return rows


def parse_rows(rows: list[object]) -> tuple[list[ImportedPair], list[Refused]]:
    pairs, refused = [], []
    for n, row in enumerate(rows, 1):
        if isinstance(row, Refused):
            refused.append(row)
            continue
        try:
            pairs.append(parse_row(row))
        except ValueError as exc:
            refused.append(Refused(n, str(exc)))
    return pairs, refused


def parse_row(row: object) -> ImportedPair:
    """One row in any of the formats above, or ValueError saying what is wrong with it."""
    if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
        raise ValueError("expected an object with 'chosen' and 'rejected'")
    if (problem := unstorable_in(row)) is not None:
        raise ValueError(problem)
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if isinstance(prompt, str):  # TRL standard
            pair = ImportedPair([{"role": "user", "content": prompt}], chosen, rejected)
        elif prompt is None:  # HH-RLHF text
            pair = _from_hh(chosen, rejected)
        else:
            raise ValueError("'prompt' must be text when 'chosen' and 'rejected' are")
    elif isinstance(chosen, list) and isinstance(rejected, list):
        pair = _from_messages(prompt, chosen, rejected)
    else:
        raise ValueError("'chosen' and 'rejected' must both be text or both message lists")
    if not pair.chosen.strip() or not pair.rejected.strip():
        raise ValueError("an empty reply")
    if not pair.prompt or pair.prompt[-1]["role"] != "user":
        raise ValueError("the prompt must end with a user message")
    return pair


def _messages(value: object, what: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not all(
        isinstance(m, dict)
        and m.get("role") in ("system", "user", "assistant")
        and isinstance(m.get("content"), str)
        for m in value
    ):
        raise ValueError(f"'{what}' must be a list of {{role, content}} messages")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _from_messages(prompt: object, chosen: object, rejected: object) -> ImportedPair:
    chosen_m, rejected_m = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    if prompt is None:  # implicit prompt: whole conversations, alike but for the last reply
        if chosen_m[:-1] != rejected_m[:-1] or not chosen_m:
            raise ValueError("'chosen' and 'rejected' differ before their last message")
        prompt_m, chosen_m, rejected_m = chosen_m[:-1], chosen_m[-1:], rejected_m[-1:]
    else:
        prompt_m = _messages(prompt, "prompt")
    if (
        len(chosen_m) != 1
        or len(rejected_m) != 1
        or {chosen_m[0]["role"], rejected_m[0]["role"]} != {"assistant"}
    ):
        raise ValueError("'chosen' and 'rejected' must each end in one assistant reply")
    return ImportedPair(prompt_m, chosen_m[0]["content"], rejected_m[0]["content"])


def _from_hh(chosen: str, rejected: str) -> ImportedPair:
    chosen_m, rejected_m = _hh_messages(chosen), _hh_messages(rejected)
    if chosen_m[:-1] != rejected_m[:-1]:
        raise ValueError("the two HH-RLHF transcripts differ before their last reply")
    if chosen_m[-1]["role"] != "assistant" or rejected_m[-1]["role"] != "assistant":
        raise ValueError("an HH-RLHF transcript must end with 'Assistant:'")
    return ImportedPair(chosen_m[:-1], chosen_m[-1]["content"], rejected_m[-1]["content"])


def _hh_messages(text: str) -> list[dict[str, str]]:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' as messages."""
    messages: list[dict[str, str]] = []
    for block in text.split("\n\n"):
        for speaker, role in (("Human:", "user"), ("Assistant:", "assistant")):
            if block.startswith(speaker):
                messages.append({"role": role, "content": block[len(speaker) :].strip()})
                break
        else:
            if not messages:
                if block.strip():
                    raise ValueError("an HH-RLHF transcript must start with 'Human:'")
                continue
            messages[-1]["content"] += "\n\n" + block  # a reply that has paragraphs
    if not messages:
        raise ValueError("an empty HH-RLHF transcript")
    return messages


def import_rows(con, pairs: list[ImportedPair], source: str) -> int:
    """Insert the pairs and their votes (the caller's transaction)."""
    for pair in pairs:
        conversation, pair_id, a, b = new_id(), new_id(), new_id(), new_id()
        con.execute("INSERT INTO conversations (id) VALUES (?)", [conversation])
        con.execute(
            "INSERT INTO messages (id, conversation_id, position, role, content, pair_id) "
            "VALUES (?, ?, 0, 'user', ?, ?), (?, ?, 1, 'assistant', ?, ?)",
            [new_id(), conversation, pair.prompt[-1]["content"], pair_id,
             new_id(), conversation, pair.chosen, pair_id],
        )  # fmt: skip
        con.execute(
            "INSERT INTO pairs (id, conversation_id, position, prompt, model_version, seed) "
            "VALUES (?, ?, 0, ?, ?, 0)",
            [pair_id, conversation, json.dumps(pair.prompt), IMPORTED_VERSION],
        )
        con.execute(
            "INSERT INTO candidates (id, pair_id, slot, text, model_version, sampling) "
            "VALUES (?, ?, 'a', ?, ?, '{}'), (?, ?, 'b', ?, ?, '{}')",
            [a, pair_id, pair.chosen, IMPORTED_VERSION, b, pair_id, pair.rejected,
             IMPORTED_VERSION],
        )  # fmt: skip
        con.execute(
            "INSERT INTO votes (id, pair_id, choice, voter, source) VALUES (?, ?, 'a', ?, ?)",
            [new_id(), pair_id, source, f"import:{source}"],
        )
    return len(pairs)
