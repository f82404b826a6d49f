"""`assistant push` and `assistant export --push`: the cards say what the database knows, and an
offline machine or a missing login gets a sentence, not a stack trace (this machine is offline,
so the upload itself is not exercised here)."""

from __future__ import annotations

import json

import pytest

from assistant.cli import main
from assistant.hub import dataset_card, model_card
from storage import Store

MANIFEST = {
    "pairs": 104,
    "reward": {"heldout_accuracy": 0.79, "n_heldout": 19},
    "gate": {"win_rate": 0.94, "interval": [0.74, 0.99], "comparisons": 18, "kl": 4.26},
}


@pytest.fixture
def data_dir(tmp_path):
    checkpoint = tmp_path / "versions" / "v0001"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text("{}")
    (checkpoint / "manifest.json").write_text(json.dumps(MANIFEST))
    store = Store(tmp_path / "assistant.duckdb")
    store.ensure_base_version("v0000", str(tmp_path / "base"), {"model": "base"})
    store.record_model_version("v0001", "v0000", str(checkpoint), "serving", MANIFEST)
    store.close()
    return tmp_path


def test_model_card_carries_the_versions_figures():
    card = model_card({"version": "v0001", "parent": "v0000", "manifest": MANIFEST}, "SmolLM2")
    assert card.startswith("---\nlibrary_name: transformers\nbase_model: SmolLM2\n")
    assert "| parent version | v0000 |" in card
    assert "| decisive votes trained on | 104 |" in card
    assert "0.94 [0.74, 0.99] on 18 comparisons" in card and "0.79 on 19 votes" in card
    assert "vllm serve" in card
    assert "17 decisive votes" in dataset_card(17, "trl") and "consent" in dataset_card(17, "trl")


def test_push_without_a_login_or_offline_says_so(data_dir, monkeypatch, capsys):
    monkeypatch.setenv("HF_HOME", str(data_dir / "hf"))  # no stored login
    monkeypatch.delenv("HF_TOKEN", raising=False)
    args = ["push", "v0001", "--repo", "me/aligned", "--data-dir", str(data_dir)]
    assert main(args) == 2
    assert "not logged in to the Hugging Face Hub" in capsys.readouterr().err
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: offline
    assert main(args) == 2
    assert "cannot reach the Hugging Face Hub" in capsys.readouterr().err
    assert main(["push", "v0007", "--repo", "me/x", "--data-dir", str(data_dir)]) == 2
    assert "no version 'v0007'" in capsys.readouterr().err


def test_export_push_offline_keeps_the_file_and_says_why(data_dir, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    out = data_dir / "prefs.jsonl"
    args = ["export", "-o", str(out), "--push", "me/votes", "--data-dir", str(data_dir)]
    assert main(args) == 2
    assert out.exists() and "cannot reach the Hugging Face Hub" in capsys.readouterr().err
