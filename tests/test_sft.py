"""The SFT stage on constitutional revisions, and AI-label weighting (tiny model)."""

from __future__ import annotations

from alignment.config import SFTConfig
from alignment.labels import weighted_ai_rows
from alignment.sft import sft_records, train_sft


def test_sft_on_revisions_lowers_completion_loss(tiny_model_dir, tmp_path):
    revisions = [
        {
            "prompt": [{"role": "user", "content": f"Why do things fall? ({i})"}],
            "revision": "Things fall down because Earth pulls them.",
        }
        for i in range(16)
    ]
    revisions.append({"prompt": [{"role": "user", "content": "x"}], "revision": "  "})  # dropped
    records = sft_records(revisions)
    assert len(records) == 16
    logs = []
    result = train_sft(
        str(tiny_model_dir),
        records,
        tmp_path / "sft",
        SFTConfig(learning_rate=5e-3, epochs=3, batch_size=8, max_length=128),
        on_log=logs.append,
    )
    assert result["steps"] == 6
    # every step's log reaches the cycle's progress and trackers, with its step
    assert [log["step"] for log in logs if "loss" in log] == [1, 2, 3, 4, 5, 6]
    assert result["loss_after"] < result["loss_before"] - 0.5, result
    assert (tmp_path / "sft" / "merged" / "model.safetensors").exists()


def test_ai_label_weight_sets_expected_multiplicity():
    rows = [{"pair_id": f"p{i}"} for i in range(400)]
    assert weighted_ai_rows(rows, 0.0) == []
    assert len(weighted_ai_rows(rows, 1.0)) == 400
    assert len(weighted_ai_rows(rows, 2.0)) == 800
    half = weighted_ai_rows(rows, 0.5)
    assert 150 < len(half) < 250 and half == weighted_ai_rows(rows, 0.5)  # deterministic
