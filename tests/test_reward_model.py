"""Reward model training (TRL RewardTrainer + LoRA) on the tiny model, with a learnable signal."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file

from alignment.config import RewardConfig
from alignment.precision import attention_implementation, train_device
from alignment.reward_model import RewardScorer, split_heldout, train_reward_model


def synthetic_preferences(n: int, seed: int = 0) -> list[dict]:
    """The voter always prefers the short plant answer over the long spacetime one."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"Question {i}: {rng.choice(['why', 'how'])}?"}]
        good = "Plants convert sunlight into energy."
        bad = "Gravity is the curvature of spacetime caused by mass-energy " * 2
        records.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": good}],
                "rejected": [{"role": "assistant", "content": bad}],
            }
        )
    return records


def test_heldout_split_is_deterministic_and_disjoint():
    records = synthetic_preferences(50)
    train, heldout = split_heldout(records, 0.2)
    assert (train, heldout) == split_heldout(records, 0.2)
    assert len(train) + len(heldout) == 50 and 0 < len(heldout) < 25
    assert not [r for r in heldout if r in train]


def test_reward_model_learns_preference_lora_moves_base_frozen(tiny_model_dir, tmp_path):
    from safetensors import safe_open

    records = synthetic_preferences(40)
    logs: list[dict] = []
    config = RewardConfig(
        learning_rate=5e-3, epochs=3, batch_size=8, heldout_fraction=0.25, max_length=256,
        ensemble=2,
    )  # fmt: skip
    result = train_reward_model(
        str(tiny_model_dir), records, tmp_path / "rm", config, on_log=logs.append
    )
    losses = [entry["loss"] for entry in logs if "loss" in entry and entry["member"] == 0]
    assert len(losses) == result.steps >= 6
    assert losses[-1] < losses[0]  # Bradley-Terry loss goes down on the votes
    assert result.heldout_accuracy == pytest.approx(1.0)
    assert result.heldout_loss < 0.69  # better than chance (ln 2)
    assert result.members == 2 and result.member_heldout_accuracy == [1.0, 1.0]

    # Each member's adapter holds LoRA matrices and its trained score head; the members saw
    # different bootstrap resamples, so they differ; the base is untouched.
    adapters = [
        load_file(str(tmp_path / "rm" / f"member-{i}" / "adapter_model.safetensors"))
        for i in range(2)
    ]
    adapter = adapters[0]
    assert any("lora_A" in k for k in adapter) and any("score" in k for k in adapter)
    assert any(not torch.equal(adapter[k], adapters[1][k]) for k in adapter)
    base = {}
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
        for k in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            base[k] = f.get_tensor(k)
    scorer = RewardScorer.load(str(tiny_model_dir), str(tmp_path / "rm"))
    for name, param in scorer.model.base_model.model.model.named_parameters():
        key = f"model.{name}".replace(".base_layer", "")
        if key in base and "lora" not in name:
            assert torch.equal(param.detach().cpu().to(base[key].dtype), base[key]), name

    # Reloaded from disk, the model still ranks the preferred reply higher on new prompts.
    fresh = synthetic_preferences(4, seed=99)
    r_w = scorer.member_scores([r["prompt"] + r["chosen"] for r in fresh])  # (K, 4)
    r_l = scorer.member_scores([r["prompt"] + r["rejected"] for r in fresh])
    assert r_w.shape == (2, 4) and bool((r_w > r_l).all())  # every member agrees
    # members are on one scale (mean 0, std 1 over the voted replies), and the conservative
    # score is their mean minus their spread
    conservative = scorer.score([r["prompt"] + r["chosen"] for r in fresh])
    torch.testing.assert_close(conservative, r_w.mean(0) - r_w.std(0))


def test_no_decisive_votes_is_a_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="no decisive votes"):
        train_reward_model(str(tiny_model_dir), [], tmp_path / "rm", RewardConfig())


def test_gradient_checkpointing_changes_the_speed_not_the_result(tiny_model_dir, tmp_path):
    """TRL turns checkpointing on by default; the cycle turns it off (1.4x faster on SmolLM2,
    bench/RESULTS.md). Same seed, same data: every logged loss is the same either way, so the
    learning results measured with it on still hold."""
    losses = {}
    for on in (True, False):
        logs: list[dict] = []
        config = RewardConfig(
            learning_rate=3e-3, epochs=2, batch_size=8, max_length=256, ensemble=1,
            gradient_checkpointing=on,
        )  # fmt: skip
        train_reward_model(
            str(tiny_model_dir), synthetic_preferences(24), tmp_path / str(on), config,
            on_log=logs.append,
        )  # fmt: skip
        losses[on] = [entry["loss"] for entry in logs if "loss" in entry]
    assert len(losses[True]) >= 4
    assert losses[False] == pytest.approx(losses[True], rel=1e-5, abs=1e-6)


def test_eager_attention_changes_the_speed_not_the_result(tiny_model_dir, tmp_path):
    """On the CPU 'auto' trains and scores with eager attention (a SmolLM2 LoRA step 1.2x
    faster than torch's fused kernel, bench/RESULTS.md). The kernels compute the same softmax
    attention: same seed, same data, the logged losses agree to bf16 rounding."""
    losses = {}
    for attention in ("sdpa", "auto"):
        logs: list[dict] = []
        config = RewardConfig(
            learning_rate=3e-3, epochs=2, batch_size=8, max_length=256, ensemble=1,
            attention=attention,
        )  # fmt: skip
        out = tmp_path / attention
        train_reward_model(
            str(tiny_model_dir), synthetic_preferences(24), out, config, on_log=logs.append
        )
        losses[attention] = [entry["loss"] for entry in logs if "loss" in entry]
        scorer = RewardScorer.load(str(tiny_model_dir), str(out), attention=attention)
        expected = attention_implementation(attention, train_device())  # eager on a CPU
        assert scorer.model.config._attn_implementation == expected
    assert len(losses["auto"]) >= 4
    assert losses["auto"] == pytest.approx(losses["sdpa"], rel=2e-2)


@pytest.mark.parametrize("resample", ["bootstrap", "all", "subsample"])
def test_members_train_on_a_resample_a_subsample_or_every_vote(resample, monkeypatch, tmp_path):
    """`reward.bootstrap`: each member's own resample (some votes twice, about a third left out)
    or every training vote, the members differing by seed only; `reward.subsample`: each its own
    share of the votes, none twice."""
    import alignment.reward_model.train as rm
    from alignment.reward_model.train import MemberResult

    class Seen(Exception):
        pass

    seen: list[tuple[list, int]] = []

    def fake_member(base, data, out, config, seed, relay, start_from=None, **budget):
        if out.name == "shared":  # `warm_start`'s model on every vote, before the members
            assert data == train
            return MemberResult(0.0, 1, 1, 1, None)
        assert start_from == tmp_path / "shared"  # each member goes on from it
        seen.append((data, seed))
        if len(seen) == config.ensemble:
            raise Seen
        return MemberResult(0.0, 1, 1, 1, None)

    monkeypatch.setattr(rm, "_train_member", fake_member)
    records = synthetic_preferences(60)
    for i, r in enumerate(records):
        r["rejected"] = [{"role": "assistant", "content": f"long answer {i}"}]  # distinct pairs
    train, _ = split_heldout(records, 0.2)
    config = {
        "bootstrap": RewardConfig(),
        "all": RewardConfig(bootstrap=False),
        "subsample": RewardConfig(subsample=0.8),
    }[resample]
    with pytest.raises(Seen):
        train_reward_model("unused", records, tmp_path, config)
    assert [seed for _, seed in seen] == [0, 1, 2]
    keys = [[str(r["rejected"]) for r in data] for data, _ in seen]
    if resample == "bootstrap":
        assert all(len(set(k)) < len(train) for k in keys)
        assert len({frozenset(k) for k in keys}) == 3
    elif resample == "subsample":
        assert all(len(k) == len(set(k)) == round(0.8 * len(train)) for k in keys)
        assert len({frozenset(k) for k in keys}) == 3
    else:
        assert all(data == train for data, _ in seen)


def test_a_subsample_is_a_share(tmp_path):
    with pytest.raises(ValueError, match="reward.subsample must be a share"):
        train_reward_model("unused", synthetic_preferences(10), tmp_path, RewardConfig(subsample=2))


@pytest.mark.parametrize("pooling", ["mean", "last+mean"])
def test_pooled_head_reads_the_whole_conversation(pooling, tiny_model_dir, tmp_path):
    """`reward.pooling`: the saved ensemble remembers it, and the reloaded scorer's score is the
    head's per-token scores averaged over the conversation (plus the last token's own score for
    `last+mean`), whatever the padding of the batch; it still learns the preference."""
    config = RewardConfig(
        learning_rate=5e-3, epochs=3, batch_size=8, max_length=256, ensemble=1, pooling=pooling,
        heldout_fraction=0.25,
    )  # fmt: skip
    result = train_reward_model(
        str(tiny_model_dir), synthetic_preferences(40), tmp_path / "rm", config
    )
    assert result.heldout_accuracy == pytest.approx(1.0)
    scorer = RewardScorer.load(str(tiny_model_dir), str(tmp_path / "rm"))
    scorer.scale = None  # raw head scores, to compare with the ones computed by hand
    fresh = synthetic_preferences(2, seed=7)
    conversations = [
        fresh[0]["prompt"] + fresh[0]["chosen"],
        fresh[1]["prompt"] + fresh[1]["rejected"],
    ]
    batched = scorer.member_scores(conversations)[0]  # one batch: the shorter one is padded
    model = scorer.model.base_model.model
    for conversation, score in zip(conversations, batched, strict=True):
        text = scorer.tokenizer.apply_chat_template(conversation, tokenize=False)
        ids = scorer.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            hidden = model.model(input_ids=ids).last_hidden_state  # (1, T, H)
            per_token = model.score.modules_to_save[scorer.adapters[0]](hidden)[0, :, 0].float()
        expected = per_token.mean() + (per_token[-1] if pooling == "last+mean" else 0.0)
        torch.testing.assert_close(score, expected, rtol=2e-2, atol=2e-2)


def test_unknown_pooling_is_a_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="reward.pooling"):
        train_reward_model(
            str(tiny_model_dir), synthetic_preferences(8), tmp_path / "rm",
            RewardConfig(pooling="max"),
        )  # fmt: skip


def test_members_warm_started_from_one_model_on_every_vote(tiny_model_dir, tmp_path):
    """`reward.warm_start`: one model trains on every vote for its share of the steps, and each
    member goes on from it (its adapter and head) on its own resample for the rest: each
    member's first loss is already the shared model's last, not a fresh head's ln 2."""
    records = synthetic_preferences(40)
    logs: list[dict] = []
    config = RewardConfig(
        learning_rate=5e-3, epochs=2, batch_size=8, heldout_fraction=0.25, max_length=256,
        ensemble=2, warm_start=0.5,
    )  # fmt: skip
    result = train_reward_model(
        str(tiny_model_dir), records, tmp_path / "rm", config, on_log=logs.append
    )
    shared = [e["loss"] for e in logs if "loss" in e and e["member"] == "shared"]
    first = [next(e["loss"] for e in logs if "loss" in e and e["member"] == m) for m in (0, 1)]
    # the shared model: 0.5 x 2 epochs x 2 members = 2 epochs of 4 steps; each member 1 epoch
    assert result.shared_steps == len(shared) == 8 and result.steps == 4
    assert shared[-1] < 0.5 < shared[0]  # the shared model learned the voter's taste
    assert all(loss < 0.5 for loss in first)  # members start where it ended
    assert result.heldout_accuracy == pytest.approx(1.0)
    assert not (tmp_path / "rm" / "shared").exists()  # spent once the members are trained
    with pytest.raises(ValueError, match="warm_start"):
        train_reward_model("unused", records, tmp_path / "x", RewardConfig(warm_start=1.0))
