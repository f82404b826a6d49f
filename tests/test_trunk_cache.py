"""The reward models' shared frozen bottom (`alignment/trunk_cache.py`): with LoRA on the top
blocks only, the blocks below run once per conversation for every member, epoch and scoring
pass, and nothing a model computes changes."""

from __future__ import annotations

import json

import pytest
import torch

import alignment.reward_model.train as reward_train
from alignment.config import RewardConfig
from alignment.reward_model import RewardScorer, pool_scores, train_reward_model
from alignment.trunk_cache import TrunkCache
from tests.test_reward_model import synthetic_preferences


def two_member_scorer(model_dir: str, trunk: TrunkCache | None) -> RewardScorer:
    """A reward model with two LoRA members on the top block (randomly initialised, so that
    they score differently), reading `last+mean`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "right"
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    base.config.pad_token_id = tokenizer.pad_token_id
    lora = LoraConfig(
        task_type="SEQ_CLS",
        init_lora_weights=False,
        **reward_train.lora_targets(base, top=1),
    )
    model = get_peft_model(base, lora, adapter_name="m0")
    model.add_adapter("m1", lora)
    pool_scores(model, "last+mean")
    if trunk is not None:
        trunk.install(model)
    return RewardScorer(model, tokenizer, ["m0", "m1"], precision="fp32", trunk=trunk)


def conversations(n: int) -> list[list[dict[str, str]]]:
    return [
        [
            {"role": "user", "content": f"Question {i}?"},
            {"role": "assistant", "content": "Plants convert sunlight into energy. " * (1 + i % 3)},
        ]
        for i in range(n)
    ]


def test_scores_through_the_shared_bottom_are_the_scores_without_it(tiny_model_dir):
    convs = conversations(10)  # three reply lengths: right-padded batches
    plain = two_member_scorer(str(tiny_model_dir), None).member_scores(convs)
    trunk = TrunkCache(bottom=1)
    cached = two_member_scorer(str(tiny_model_dir), trunk)
    cached.keep_trunk = True
    first = cached.member_scores(convs)
    assert (trunk.computed, trunk.reused) == (10, 10)  # member m0 ran the bottom, m1 read it
    again = cached.member_scores(convs)
    assert (trunk.computed, trunk.reused) == (10, 30)  # nothing ran twice
    assert not torch.allclose(plain[0], plain[1])  # the members differ...
    torch.testing.assert_close(first, plain, rtol=1e-5, atol=1e-5)  # ...and nothing else
    torch.testing.assert_close(again, plain, rtol=1e-5, atol=1e-5)


def test_a_scorer_forgets_each_batch_once_every_member_has_read_it(tiny_model_dir):
    trunk = TrunkCache(bottom=1)
    scorer = two_member_scorer(str(tiny_model_dir), trunk)
    scorer.member_scores(conversations(20))
    assert trunk.states == {} and trunk.computed == 20 and trunk.reused == 20


def test_a_left_padded_batch_runs_the_blocks_as_usual(tiny_model_dir):
    trunk = TrunkCache(bottom=1)
    scorer = two_member_scorer(str(tiny_model_dir), trunk)
    scorer.tokenizer.padding_side = "left"
    scorer.keep_trunk = True
    scorer.member_scores(conversations(6))
    assert (trunk.computed, trunk.reused, trunk.states) == (0, 0, {})


def test_members_train_on_one_bottom_pass_and_learn_what_they_learned_without_it(
    tiny_model_dir, tmp_path, monkeypatch
):
    """Two members on the top block, going on from one model on every vote: every
    conversation's bottom runs once (without the cache: for each of the three models' epochs),
    and every logged loss is the uncached one."""
    config = RewardConfig(
        learning_rate=3e-3, epochs=3, batch_size=8, max_length=256, ensemble=2, lora_layers=1
    )  # fmt: skip
    records = synthetic_preferences(40)
    made: list[TrunkCache | None] = []

    def recording(base_model: str, config: RewardConfig) -> TrunkCache | None:
        made.append(frozen_trunk(base_model, config))
        return made[-1]

    frozen_trunk = reward_train.frozen_trunk
    losses = {}
    for name in ("uncached", "cached"):
        if name == "uncached":
            monkeypatch.setattr(reward_train, "frozen_trunk", lambda *a: None)
        else:
            monkeypatch.setattr(reward_train, "frozen_trunk", recording)
        logs: list[dict] = []
        result = train_reward_model(
            str(tiny_model_dir), records, tmp_path / name, config, logs.append
        )
        losses[name] = [entry["loss"] for entry in logs if "loss" in entry]
        assert result.steps == 8 and result.shared_steps == 15  # `warm_start` 0.5
        assert result.heldout_accuracy is not None
    assert losses["cached"] == pytest.approx(losses["uncached"], rel=1e-4, abs=1e-5)
    (trunk,) = made
    distinct = 2 * 40  # prompt + chosen and prompt + rejected, every record
    assert 0 < trunk.computed <= distinct and trunk.reused > 2 * distinct
    ensemble = json.loads((tmp_path / "cached" / "ensemble.json").read_text())
    assert ensemble["frozen_bottom"] == 1
    assert json.loads((tmp_path / "uncached" / "ensemble.json").read_text())["frozen_bottom"] == 0
