"""`assistant import`: a preference dataset in TRL's or HH-RLHF's formats becomes votes the
reward models train on, refused rows reported and nothing half-imported. Through the CLI as a
user runs it, on a real DuckDB file."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from storage import Store
from storage.export import preference_records
from storage.importing import parse_row

USER = [{"role": "user", "content": "Why is the sky blue?"}]
ROWS = [
    {  # TRL conversational, explicit prompt
        "prompt": USER,
        "chosen": [{"role": "assistant", "content": "Rayleigh scattering."}],
        "rejected": [{"role": "assistant", "content": "It just is."}],
    },
    {  # TRL conversational, implicit prompt
        "chosen": [*USER, {"role": "assistant", "content": "Short light scatters more."}],
        "rejected": [*USER, {"role": "assistant", "content": "Paint."}],
    },
    {"prompt": "2+2?", "chosen": "4", "rejected": "5"},  # TRL standard
    {  # HH-RLHF text
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?",
        "rejected": "\n\nHuman: Hi\n\nAssistant: What.",
    },
]


def test_each_format_parses_to_a_prompt_and_two_replies():
    pairs = [parse_row(row) for row in ROWS]
    assert [p.chosen for p in pairs] == [
        "Rayleigh scattering.", "Short light scatters more.", "4", "Hello! How can I help?"
    ]  # fmt: skip
    assert pairs[1].prompt == USER and pairs[1].rejected == "Paint."
    assert pairs[2].prompt == [{"role": "user", "content": "2+2?"}]
    assert pairs[3].prompt == [{"role": "user", "content": "Hi"}] and pairs[3].rejected == "What."


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"prompt": "x", "chosen": "y"}, "'chosen' and 'rejected'"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"},
         "differ before"),
        ({"prompt": "x", "chosen": "ok", "rejected": "bad \ud800"}, "lone surrogate"),
        ({"prompt": "x", "chosen": "ok", "rejected": "  "}, "empty reply"),
        ({"prompt": "x", "chosen": ["not", "messages"], "rejected": []}, "messages"),
    ],
)  # fmt: skip
def test_a_row_that_cannot_be_imported_says_why(row, reason):
    with pytest.raises(ValueError, match=reason):
        parse_row(row)


def _import(data_dir, path, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "assistant", "import", str(path), "--source", "seed",
         "--data-dir", str(data_dir), *extra],
        capture_output=True, text=True,
    )  # fmt: skip


def test_the_cli_imports_all_or_nothing_and_the_votes_export_back(tmp_path):
    data = tmp_path / "data"
    bad = tmp_path / "with-a-bad-row.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in [*ROWS, {"prompt": "x"}]) + "\nnot json\n")
    refused = _import(data, bad)
    assert refused.returncode == 1, refused.stderr
    assert "row 5:" in refused.stderr and "row 6: not JSON" in refused.stderr
    assert "nothing imported: 2 of 6 rows refused" in refused.stderr
    if (data / "assistant.duckdb").exists():
        store = Store(data / "assistant.duckdb", read_only=True)
        assert store.voted_pairs() == []
        store.close()

    done = _import(data, bad, "--skip-refused")
    assert done.returncode == 0, done.stderr
    assert "imported 4 preference pairs as votes from import:seed (2 rows refused)" in done.stdout
    store = Store(data / "assistant.duckdb", read_only=True)
    try:
        rows = store.voted_pairs()
    finally:
        store.close()
    assert {r["source"] for r in rows} == {"import:seed"} and len(rows) == 4
    # what the reward models will read: the same preferences, back in TRL's format
    exported = preference_records(rows, "trl")
    assert {
        "prompt": USER,
        "chosen": [{"role": "assistant", "content": "Rayleigh scattering."}],
        "rejected": [{"role": "assistant", "content": "It just is."}],
    } in exported


def test_parquet_files_import_too(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "prefs.parquet"
    pq.write_table(pa.Table.from_pylist([ROWS[2], ROWS[2]]), path)
    done = _import(tmp_path / "data", path)
    assert done.returncode == 0 and "imported 2 preference pairs" in done.stdout, done.stderr
