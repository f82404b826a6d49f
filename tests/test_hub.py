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
    from huggingface_hub import DatasetCard, ModelCard

    card = model_card(
        {"version": "v0001", "parent": "v0000", "manifest": MANIFEST},
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "apache-2.0",
    )
    meta = ModelCard(card).data  # what the Hub reads from the front matter
    assert meta.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta.license == "apache-2.0" and meta.library_name == "transformers"
    assert "| parent version | v0000 |" in card
    assert "| decisive votes trained on | 104 |" in card
    assert "0.94 [0.74, 0.99] on 18 comparisons" in card and "0.79 on 19 votes" in card
    assert "vllm serve" in card
    unknown = ModelCard(model_card({"version": "v0002", "manifest": {}}, "my-base")).data
    assert unknown.license == "other"  # not recorded: the card does not make one up
    trl = dataset_card(17, "trl")
    assert "17 rows of votes" in trl and "consent" in trl and "`prompt`, `chosen`" in trl
    sft = DatasetCard(dataset_card(5, "sft", "demonstrations.parquet"))
    assert "supervised fine-tuning data, not preferences" in sft.text
    assert 'load_dataset("parquet", data_files="demonstrations.parquet")' in sft.text
    assert sft.data.configs[0]["data_files"] == "demonstrations.parquet"


def test_the_base_model_and_its_license_come_from_the_first_version():
    from assistant.hub import base_model

    versions = [
        {"version": "v0000", "parent": None,
         "manifest": {"model": "SmolLM2 (embedded)", "base_model": "HF/SmolLM2", "license": "mit"}},
        {"version": "v0001", "parent": "v0000", "manifest": MANIFEST},
        {"version": "v0002", "parent": "v0001", "manifest": MANIFEST},
    ]  # fmt: skip
    assert base_model(versions, versions[2], "--model") == ("HF/SmolLM2", "mit")
    old = [{**versions[0], "manifest": {"model": "base"}}, *versions[1:]]  # an older database
    assert base_model(old, old[2], None) == ("base", None)


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


def test_nothing_pushed_names_a_server_path(data_dir, monkeypatch, capsys):
    """The version folder's manifest names the reward models' folder, and transformers' configs
    the folder the weights came from: the upload carries neither."""
    checkpoint = data_dir / "versions" / "v0001"
    manifest = {**MANIFEST, "reward_model": str(data_dir / "versions" / "runs" / "rm"),
                "sft": {"path": str(data_dir / "jobs" / "sft"), "steps": 3}}  # fmt: skip
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    (checkpoint / "config.json").write_text(
        json.dumps({"_name_or_path": str(data_dir / "models" / "SmolLM2-135M-Instruct")})
    )
    (checkpoint / "tokenizer_config.json").write_text(json.dumps({"name_or_path": str(checkpoint)}))
    sent: dict[str, bytes] = {}

    def upload(folder, repo, repo_type, private):
        sent.update({p.name: p.read_bytes() for p in folder.rglob("*") if p.is_file()})
        return f"https://huggingface.co/{repo}"

    monkeypatch.setattr("assistant.hub.upload", upload)
    for args in (
        ["push", "v0001", "--repo", "me/aligned", "--data-dir", str(data_dir)],
        ["export", "-o", str(data_dir / "prefs.jsonl"), "--push", "me/votes",
         "--data-dir", str(data_dir)],
    ):  # fmt: skip
        assert main(args) == 0, capsys.readouterr().err
    assert {"manifest.json", "config.json", "README.md", "preferences.jsonl"} <= set(sent)
    for name, body in sent.items():
        assert str(data_dir).encode() not in body, name
    assert json.loads(sent["manifest.json"])["gate"] == MANIFEST["gate"]  # the figures stay
    assert json.loads(sent["config.json"]) == {"_name_or_path": "SmolLM2-135M-Instruct"}
    assert b"reward_model" not in sent["manifest.json"]

    (checkpoint / "notes.txt").write_text(f"trained in {data_dir}")  # anything else: refused
    assert main(["push", "v0001", "--repo", "me/aligned", "--data-dir", str(data_dir)]) == 2
    assert "notes.txt names a path on this server" in capsys.readouterr().err
