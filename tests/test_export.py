"""Preference export: TRL conversational and HH-RLHF text formats, JSONL and Parquet."""

from __future__ import annotations

import json

import pytest

from storage import InvalidInputError
from storage.export import preference_records, write_records

ROWS = [
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "choice": "b",
        "text_a": "Go away.",
        "text_b": "Hello!",
    },
    {
        "prompt": [{"role": "user", "content": "2+2?"}],
        "choice": "tie",
        "text_a": "4",
        "text_b": "four",
    },
    {
        "prompt": [{"role": "user", "content": "x"}],
        "choice": "both_bad",
        "text_a": "?",
        "text_b": "!",
    },
]


def test_trl_format_uses_winner_and_skips_ties_and_both_bad():
    (record,) = preference_records(ROWS, "trl")
    assert record == {
        "prompt": ROWS[0]["prompt"],
        "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "assistant", "content": "Go away."}],
    }


def test_hh_format_is_human_assistant_text_without_system():
    (record,) = preference_records(ROWS, "hh")
    assert record["chosen"] == "\n\nHuman: Hi\n\nAssistant: Hello!"
    assert record["rejected"] == "\n\nHuman: Hi\n\nAssistant: Go away."


def test_kto_format_carries_every_vote_as_two_labelled_completions():
    records = preference_records(ROWS, "kto")
    assert [(r["completion"][0]["content"], r["label"]) for r in records] == [
        ("Go away.", False), ("Hello!", True),  # b won
        ("4", True), ("four", True),  # a tie: both let stand
        ("?", False), ("!", False),  # both bad
    ]  # fmt: skip
    assert records[0]["prompt"] == ROWS[0]["prompt"]


def test_arena_format_holds_battles_between_two_versions_only():
    from datetime import datetime, timezone

    when = datetime(2026, 12, 7, 12, 0, tzinfo=timezone.utc)
    rows = [
        {**ROWS[0], "pair_id": "p1", "version_a": "v0001", "version_b": "v0000", "voted_at": when},
        {**ROWS[2], "pair_id": "p2", "version_a": "v0000", "version_b": "v0001", "voted_at": when},
        {**ROWS[1], "pair_id": "p3", "version_a": "v0000", "version_b": "v0000", "voted_at": when},
    ]
    first, second = preference_records(rows, "arena")  # p3: one version, no battle
    assert first == {
        "question_id": "p1",
        "model_a": "v0001",
        "model_b": "v0000",
        "winner": "model_b",
        "conversation_a": [*ROWS[0]["prompt"], {"role": "assistant", "content": "Go away."}],
        "conversation_b": [*ROWS[0]["prompt"], {"role": "assistant", "content": "Hello!"}],
        "turn": 1,
        "tstamp": when.timestamp(),
    }
    assert second["winner"] == "tie (bothbad)" and second["model_a"] == "v0000"


def test_unknown_format_refused():
    with pytest.raises(InvalidInputError, match="trl, hh"):
        preference_records(ROWS, "csv")


def test_jsonl_and_parquet_round_trip(tmp_path):
    import pyarrow.parquet as pq

    records = preference_records(ROWS, "trl")
    write_records(records, tmp_path / "p.jsonl")
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == records
    write_records(records, tmp_path / "p.parquet")
    assert pq.read_table(tmp_path / "p.parquet").to_pylist() == records
    with pytest.raises(InvalidInputError, match=".jsonl or .parquet"):
        write_records(records, tmp_path / "p.csv")
