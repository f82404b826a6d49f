"""The canary's interval and decision rule, the Bradley-Terry ratings and the reward-hacking
monitors, against values computed by hand."""

from __future__ import annotations

import math

import pytest

from alignment.canary import CanaryVotes, count_canary_votes, decide
from alignment.monitors import annotate, distinct_2, reply_monitors, warnings
from alignment.ratings import comparisons, fit, ratings
from alignment.stats import wilson_interval


def test_four_straight_losses_put_the_upper_bound_under_a_half():
    # 0 of n: the Wilson upper bound is z^2 / (n + z^2); 3.8415 / 7.8415 at n = 4, over 0.5 at 3
    assert wilson_interval(0, 4)[1] == pytest.approx(0.48990, abs=1e-4)
    assert wilson_interval(0, 3)[1] > 0.5


def test_ties_count_half_and_both_bad_is_left_out():
    votes = CanaryVotes(challenger=6, serving=2, tie=2, both_bad=5)
    assert votes.comparisons == 10
    assert votes.win_rate == pytest.approx(0.7)
    assert votes.interval == wilson_interval(7, 10)


def test_votes_are_counted_by_the_version_that_wrote_the_chosen_reply():
    rows = [
        {"choice": "a", "version_a": "v1", "version_b": "v0"},  # challenger
        {"choice": "b", "version_a": "v1", "version_b": "v0"},  # serving
        {"choice": "b", "version_a": "v0", "version_b": "v1"},  # challenger
        {"choice": "tie", "version_a": "v0", "version_b": "v1"},
        {"choice": "both_bad", "version_a": "v1", "version_b": "v0"},
        {"choice": "a", "version_a": "v2", "version_b": "v0"},  # another pair of versions
    ]
    assert count_canary_votes(rows, "v1", "v0") == CanaryVotes(2, 1, 1, 1)


def test_decision_rule():
    assert decide(CanaryVotes(), 30, 200).decision is None
    # four straight losses: upper bound 0.49 < 0.5, retired without waiting for min_votes
    assert decide(CanaryVotes(serving=4), 30, 200).decision == "retired"
    assert decide(CanaryVotes(serving=3), 30, 200).decision is None
    # 10 of 10 is clear (lower bound 0.72) but promotion waits for min_votes
    waiting = decide(CanaryVotes(challenger=10), 30, 200)
    assert waiting.decision is None and "waits for 30" in waiting.reason
    # 21 of 30: Wilson lower bound 0.521 > 0.5
    assert decide(CanaryVotes(challenger=21, serving=9), 30, 200).decision == "promoted"
    assert decide(CanaryVotes(challenger=20, serving=10), 30, 200).decision is None
    capped = decide(CanaryVotes(challenger=100, serving=100), 30, 200)
    assert capped.decision == "retired" and "cap" in capped.reason
    assert decide(CanaryVotes(challenger=100, serving=100), 30, 0).decision is None


def test_bradley_terry_two_versions_by_hand():
    # v1 beats v0 3 times of 4; the prior adds half a virtual tie: v1 3.25, v0 1.25 of 4.5, so
    # the maximum-likelihood strength ratio is 3.25 / 1.25 = 2.6.
    rows = [{"choice": "a", "version_a": "v1", "version_b": "v0"}] * 3 + [
        {"choice": "b", "version_a": "v1", "version_b": "v0"}
    ]
    logs = fit(comparisons(rows))
    assert logs["v1"] - logs["v0"] == pytest.approx(math.log(2.6), abs=1e-6)
    rated = ratings(rows, bootstrap=50)
    assert rated["v0"]["score"] == 1000.0  # the anchor
    assert rated["v1"]["score"] == pytest.approx(1000 + 400 * math.log10(2.6), abs=0.1)
    assert rated["v1"]["votes"] == 4
    lo, hi = rated["v1"]["interval"]
    assert lo <= rated["v1"]["score"] <= hi


def test_same_version_pairs_and_both_bad_give_no_rating():
    rows = [
        {"choice": "a", "version_a": "v0", "version_b": "v0"},
        {"choice": "both_bad", "version_a": "v1", "version_b": "v0"},
    ]
    assert ratings(rows) == {}


def test_reply_monitors_by_hand():
    replies = [
        {"text": "the cat sat", "finish_reason": "stop"},  # bigrams: the cat, cat sat
        {"text": "the cat ran far", "finish_reason": "length"},  # the cat, cat ran, ran far
    ]
    m = reply_monitors(replies)
    assert m == {"replies": 2, "mean_words": 3.5, "cut_off_share": 0.5, "distinct_2": 0.8}
    assert distinct_2(["word"]) is None


def _version(name, parent, words, cut, d2, deploy=True, human=None, interval=None, n=20):
    return {
        "version": name,
        "parent": parent,
        "manifest": {"gate": {"deploy": deploy, "win_rate": 0.9}},
        "monitors": {"replies": n, "mean_words": words, "cut_off_share": cut, "distinct_2": d2,
                     "human_win_rate": human, "human_interval": interval},
    }  # fmt: skip


def test_warnings_when_the_reward_model_and_the_users_part_ways_or_replies_drift():
    v0 = _version("v0000", None, 20, 0.1, 0.9)
    fine = _version("v0001", "v0000", 24, 0.15, 0.85, human=0.6, interval=[0.52, 0.7])
    assert warnings(fine, v0) == []
    hacked = _version("v0002", "v0000", 40, 0.5, 0.5, human=0.3, interval=[0.2, 0.45])
    said = " | ".join(warnings(hacked, v0))
    assert "reward model said better" in said and "users said worse" in said
    assert "100% longer" in said and "cut off" in said and "less varied" in said
    few = _version("v0003", "v0000", 40, 0.5, 0.5, n=5)  # too few replies to judge drift
    assert warnings(few, v0) == []


def test_annotate_rates_versions_from_canary_votes():
    versions = [
        {"version": "v0000", "parent": None, "manifest": {}},
        {"version": "v0001", "parent": "v0000", "manifest": {"gate": {"deploy": True}}},
    ]
    votes = [{"choice": "a", "version_a": "v0001", "version_b": "v0000"}] * 6 + [
        {"choice": "tie", "version_a": "v0000", "version_b": "v0001"}
    ] * 2
    canaries = [{"challenger": "v0001", "serving": "v0000"}]
    out = {v["version"]: v for v in annotate(versions, votes, [], canaries)}
    assert out["v0001"]["monitors"]["human_win_rate"] == pytest.approx(7 / 8)
    assert out["v0001"]["monitors"]["human_comparisons"] == 8
    assert out["v0000"]["monitors"]["human_win_rate"] is None
    assert out["v0001"]["rating"]["score"] > out["v0000"]["rating"]["score"] == 1000.0


def test_a_decided_canarys_verdict_counts_the_votes_until_its_decision():
    """Votes on a retired challenger's leftover pairs, cast after the users' decision, do not
    turn the monitors' verdict (and the "users said worse" warning) around."""
    from datetime import datetime, timedelta, timezone

    decided = datetime(2026, 11, 27, 12, tzinfo=timezone.utc)
    versions = [
        {"version": "v0000", "parent": None, "manifest": {}},
        {"version": "v0001", "parent": "v0000", "manifest": {"gate": {"deploy": True}}},
    ]
    before = [{"choice": "b", "version_a": "v0001", "version_b": "v0000",
               "voted_at": decided - timedelta(seconds=10)}] * 4  # fmt: skip
    after = [{"choice": "a", "version_a": "v0001", "version_b": "v0000",
              "voted_at": decided + timedelta(seconds=1)}] * 4  # fmt: skip
    canaries = [{"challenger": "v0001", "serving": "v0000", "decided_at": decided}]
    out = {v["version"]: v for v in annotate(versions, before + after, [], canaries)}
    monitors = out["v0001"]["monitors"]
    assert monitors["human_win_rate"] == 0 and monitors["human_comparisons"] == 4
    assert any("users said worse" in w for w in out["v0001"]["warnings"])
    running = [{"challenger": "v0001", "serving": "v0000", "decided_at": None}]
    out = {v["version"]: v for v in annotate(versions, before + after, [], running)}
    assert out["v0001"]["monitors"]["human_comparisons"] == 8
