"""Ties and both-bad votes as accepted-over-refused pairs across prompts (`alignment.verdicts`)."""

from __future__ import annotations

import pytest

from alignment.config import RewardConfig
from alignment.reward_model import split_heldout, train_reward_model
from alignment.verdicts import cross_prompt_pairs, implicit
from storage.export import verdict_records


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def said(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def decisive(i: int) -> dict:
    return {"prompt": user(f"q{i}"), "chosen": said(f"won {i}"), "rejected": said(f"lost {i}")}


def verdicts(refused: int, accepted: int) -> list[dict]:
    return [
        {"prompt": user(f"r{i}"), "reply": f"refused {i}", "accepted": False}
        for i in range(refused)
    ] + [
        {"prompt": user(f"a{i}"), "reply": f"stood {i}", "accepted": True} for i in range(accepted)
    ]


def test_ties_are_accepted_both_bad_refused_decisive_votes_left_out():
    rows = [
        {"prompt": user("x"), "choice": "a", "text_a": "1", "text_b": "2"},
        {"prompt": user("y"), "choice": "tie", "text_a": "3", "text_b": "4"},
        {"prompt": user("z"), "choice": "both_bad", "text_a": "5", "text_b": "6"},
    ]
    assert verdict_records(rows) == [
        {"prompt": user("y"), "reply": "3", "accepted": True},
        {"prompt": user("y"), "reply": "4", "accepted": True},
        {"prompt": user("z"), "reply": "5", "accepted": False},
        {"prompt": user("z"), "reply": "6", "accepted": False},
    ]


def test_refused_replies_lose_to_accepted_ones_and_decisive_winners_once_each():
    pairs = cross_prompt_pairs([decisive(0), decisive(1)], verdicts(3, 1), 5.0, seed=0)
    assert len(pairs) == 3  # every refused reply once: no more pairs than refused replies
    rejected = sorted(p["rejected"][-1]["content"] for p in pairs)
    assert rejected == ["refused 0", "refused 1", "refused 2"]
    chosen = {p["chosen"][-1]["content"] for p in pairs}
    assert chosen == {"stood 0", "won 0", "won 1"}  # accepted replies and decisive winners
    assert all("lost" not in str(p) for p in pairs)  # a loser was less good, not refused
    for p in pairs:  # whole conversations: each side keeps its own prompt
        assert p["rejected"][0]["content"] == "r" + p["rejected"][-1]["content"].split()[-1]


def test_at_most_the_share_per_decisive_vote_and_none_from_held_out_prompts():
    two = [decisive(0), decisive(1)]
    assert len(cross_prompt_pairs(two, verdicts(10, 4), 1.5, seed=0)) == 3
    assert cross_prompt_pairs(two, verdicts(10, 4), 0.0, seed=0) == []
    assert cross_prompt_pairs(two, verdicts(0, 4), 1.0, seed=0) == []  # nothing refused
    held = cross_prompt_pairs(two, verdicts(3, 0), 5.0, seed=0, exclude_prompts=[user("r1")])
    assert sorted(p["rejected"][-1]["content"] for p in held) == ["refused 0", "refused 2"]


def test_an_explicit_prompt_folds_into_both_sides():
    record = decisive(3)
    assert implicit(record) == {
        "chosen": user("q3") + said("won 3"),
        "rejected": user("q3") + said("lost 3"),
    }
    assert implicit(implicit(record)) == implicit(record)


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_members_train_on_the_verdict_pairs_too(share, monkeypatch, tmp_path):
    """The pairs join the training votes (each member resamples both); the held-out votes'
    prompts give none, and the held-out check stays on decisive votes."""
    import alignment.reward_model.train as rm

    class Seen(Exception):
        pass

    def fake_member(base, data, out, config, seed, relay, **budget):
        raise Seen(data)

    monkeypatch.setattr(rm, "_train_member", fake_member)
    records = [decisive(i) for i in range(20)]
    train, heldout = split_heldout(records, 0.2)
    refused = [{"prompt": r["prompt"], "reply": "nope", "accepted": False} for r in records]
    config = RewardConfig(ensemble=1, verdict_pairs=share)
    with pytest.raises(Seen) as seen:
        train_reward_model("unused", records, tmp_path, config, verdicts=refused)
    (data,) = seen.value.args
    extra = [r for r in data if "prompt" not in r]
    assert len(data) == len(train) + len(extra)
    assert len(extra) == (len(train) if share else 0)
    held_prompts = {str(r["prompt"]) for r in heldout}
    assert not any(str(r["rejected"][:-1]) in held_prompts for r in extra)
