"""Style-controlled judging (`alignment.style_control`): the fit on synthetic votes whose truth is
known (length alone decides; the version alone decides; a better version hidden by its shorter
replies), then the figures where users and admins see them: the ratings and canary figures in
`GET /api/versions` and `GET /api/canary`, the Admin tab and the bench helper. Pure math and an
in-process app around the fake engine; no vLLM."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from alignment.canary import style_controlled, with_style
from alignment.monitors import annotate
from alignment.ratings import ratings, style_controlled_scores
from alignment.style_control import (
    STYLE_FEATURES,
    fit,
    judge,
    judge_all,
    style_counts,
    style_difference,
)


def words(n: int) -> str:
    return " ".join(["word"] * n)


def vote(winner_is_a: bool | None, va: str, vb: str, na: int, nb: int) -> dict:
    choice = "tie" if winner_is_a is None else "a" if winner_is_a else "b"
    return {"choice": choice, "version_a": va, "version_b": vb,
            "text_a": words(na), "text_b": words(nb)}  # fmt: skip


def length_decides(n: int, seed: int, obeys: float = 0.9, longer_share: float = 0.8) -> list:
    """v1 writes the longer reply in `longer_share` of the pairs; the voter picks the longer
    reply with probability `obeys`, whichever version wrote it (slots at random)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        long_, short = rng.randint(40, 120), rng.randint(10, 39)
        n1, n0 = (long_, short) if rng.random() < longer_share else (short, long_)
        v1_in_a = rng.random() < 0.5
        na, nb = (n1, n0) if v1_in_a else (n0, n1)
        a_wins = (na > nb) == (rng.random() < obeys)
        rows.append(vote(a_wins, *(("v1", "v0") if v1_in_a else ("v0", "v1")), na, nb))
    return rows


def version_decides(n: int, seed: int, p_v1: float = 0.75) -> list:
    """Both replies of every pair equally long; the voter picks v1's with probability p_v1."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = rng.randint(20, 80)
        v1_in_a = rng.random() < 0.5
        v1_wins = rng.random() < p_v1
        versions = ("v1", "v0") if v1_in_a else ("v0", "v1")
        rows.append(vote(v1_wins == v1_in_a, *versions, length, length))
    return rows


# --- the features ---------------------------------------------------------------------------


def test_style_counts_words_and_markdown_elements():
    text = (
        "# Title\n\nSome **bold** words and __more__.\n\n## Steps\n- one\n- two\n1. three\n"
        "```python\n# not a header\n- not a list item\n```\n"
    )
    counted = dict(zip(("words", "headers", "list_items", "bold", "code_blocks"),
                       style_counts(text), strict=True))  # fmt: skip
    assert counted == {"words": 26, "headers": 2, "list_items": 3, "bold": 2, "code_blocks": 1}
    assert style_counts("") == (0, 0, 0, 0, 0)


def test_style_difference_is_lmarenas_normalised_difference_and_which_is_longer():
    diff = dict(zip(STYLE_FEATURES, style_difference((30, 0, 3, 1, 0), (10, 0, 0, 1, 0)),
                    strict=True))  # fmt: skip
    assert diff["longer"] == 1.0
    assert diff["words"] == pytest.approx(20 / 41)  # (a - b) / (a + b + 1)
    assert diff["headers"] == 0.0 and diff["bold"] == 0.0
    assert diff["list_items"] == pytest.approx(3 / 4)
    assert style_difference((5, 0, 0, 0, 0), (5, 0, 0, 0, 0))[0] == 0.0


# --- the fit on known truths -------------------------------------------------------------------


def test_when_the_longer_reply_wins_whatever_the_version_the_gain_disappears():
    """v1 writes longer in 80 % of pairs and the voters pick the longer reply 90 % of the time:
    v1's raw win rate is high, its style-controlled one near 0.5, and the note says so."""
    controlled = []
    for seed in range(5):
        judged = judge(length_decides(400, seed), "v1", "v0")
        assert judged.win_rate > 0.7 and judged.interval[0] > 0.6
        assert abs(judged.win_rate_style_controlled - 0.5) < 0.12, judged
        assert "disappears under style control" in judged.note
        assert judged.style["coefficients"]["longer"] > 1.0  # length pulls, and is credited
        controlled.append(judged.win_rate_style_controlled)
    assert abs(statistics.mean(controlled) - 0.5) < 0.05


def test_when_the_longer_reply_always_wins_the_votes_cannot_credit_the_version():
    """Deterministic: the longer reply wins every vote (separable data; the ridge keeps the
    fit finite). The controlled interval takes in 0.5, far below the raw win rate."""
    pool = [(80, 40), (60, 30), (90, 50), (70, 35), (100, 60)]
    rows = []
    for i in range(100):
        long_, short = pool[i % 5]
        n1, n0 = (short, long_) if (i // 5) % 5 == 0 else (long_, short)  # v1 longer in 80 %
        rows.append(vote(n1 > n0 if i % 2 else n0 > n1,
                         *(("v1", "v0") if i % 2 else ("v0", "v1")),
                         *((n1, n0) if i % 2 else (n0, n1))))  # fmt: skip
    judged = judge(rows, "v1", "v0")
    assert judged.win_rate == pytest.approx(0.8)
    lo, hi = judged.interval_style_controlled
    assert lo < 0.5 < hi
    assert judged.win_rate_style_controlled < judged.win_rate - 0.1
    assert "disappears" in judged.note
    assert all(math.isfinite(b) for b in judged.style["coefficients"].values())


def test_when_v1_wins_at_equal_length_both_figures_favour_it():
    for seed in range(3):
        judged = judge(version_decides(120, seed), "v1", "v0")
        assert judged.win_rate > 0.65 and judged.win_rate_style_controlled > 0.65
        assert judged.interval_style_controlled[0] > 0.5
        assert judged.win_rate_style_controlled == pytest.approx(judged.win_rate, abs=0.03)
        assert judged.note is None


def test_a_better_version_with_shorter_replies_gains_under_style_control():
    """v1 is better at equal style (logit +1) but writes the shorter reply in 80 % of pairs,
    and the voters like length (logit +2 for the longer): the raw votes hide v1's strength."""
    rng = random.Random(3)
    rows = []
    for _ in range(600):
        long_, short = rng.randint(40, 120), rng.randint(10, 39)
        n1, n0 = (short, long_) if rng.random() < 0.8 else (long_, short)
        v1_in_a = rng.random() < 0.5
        na, nb = (n1, n0) if v1_in_a else (n0, n1)
        logit = (1.0 if v1_in_a else -1.0) + (2.0 if na > nb else -2.0)
        a_wins = rng.random() < 1 / (1 + math.exp(-logit))
        rows.append(vote(a_wins, *(("v1", "v0") if v1_in_a else ("v0", "v1")), na, nb))
    judged = judge(rows, "v1", "v0")
    assert judged.win_rate < 0.5
    assert judged.win_rate_style_controlled > 0.65  # sigmoid(1) = 0.73
    assert judged.interval_style_controlled[0] > 0.5
    assert "appears under style control" in judged.note


def test_ties_count_half_both_bad_is_left_out_and_tiny_samples_stay_finite():
    ties = [vote(None, "v1", "v0", 30, 10), vote(None, "v0", "v1", 10, 30)]
    judged = judge([*ties, {**ties[0], "choice": "both_bad"}], "v1", "v0")
    assert judged.comparisons == 2 and judged.win_rate == 0.5
    assert judged.win_rate_style_controlled == pytest.approx(0.5, abs=1e-9)
    one = judge([vote(True, "v1", "v0", 12, 12)], "v1", "v0")
    assert 0.5 < one.win_rate_style_controlled < 1 and one.interval_style_controlled[0] < 0.5
    assert fit([vote(True, "v0", "v0", 12, 3)]) is None  # no two versions compared


def test_the_fit_is_deterministic_and_fast():
    import time

    rows = length_decides(2000, 7) + [
        {**r, "version_b": "v2"} for r in version_decides(500, 8) if r["version_b"] == "v0"
    ]
    started = time.perf_counter()
    first = judge_all(rows)
    assert time.perf_counter() - started < 2.0
    assert judge_all(rows) == first
    assert [(p["version"], p["against"]) for p in first["pairs"]] == [("v1", "v0"), ("v2", "v1")]


def test_style_controlled_scores_sit_beside_the_ratings():
    """At equal lengths the style-controlled score is the rating's within a few points (its
    ridge is about the ratings' prior); when length decides, it falls back towards v0's."""
    equal = version_decides(200, 1)
    rated, controlled = ratings(equal), style_controlled_scores(equal, "v0")
    assert controlled["v0"]["score_style_controlled"] == 1000.0
    assert controlled["v1"]["score_style_controlled"] == pytest.approx(rated["v1"]["score"], abs=10)
    lo, hi = controlled["v1"]["interval_style_controlled"]
    assert lo < controlled["v1"]["score_style_controlled"] < hi
    longer = length_decides(400, 2)
    raw_score = ratings(longer)["v1"]["score"]
    assert raw_score > 1100
    assert style_controlled_scores(longer, "v0")["v1"]["score_style_controlled"] < 1060


# --- the canary and the monitors --------------------------------------------------------------


def test_the_canary_shows_the_style_controlled_win_rate_on_its_counted_votes():
    from alignment.canary import count_canary_votes

    # half the votes from one session: with a source's share capped at 0.25, the style fit
    # reads the same votes the canary counts
    rows = [{**r, "session_id": "solo" if i % 2 else f"s{i}", "client": None}
            for i, r in enumerate(length_decides(200, 4))]  # fmt: skip
    judged = style_controlled(rows, "v1", "v0")
    assert judged.comparisons == 200 and judged.win_rate > 0.6 and judged.note is not None
    capped = style_controlled(rows, "v1", "v0", max_share=0.25)
    counted = count_canary_votes(rows, "v1", "v0", max_share=0.25)
    assert counted.over_share > 0 and capped.comparisons == counted.comparisons
    assert capped.win_rate == pytest.approx(counted.win_rate)
    reason = with_style("the challenger won 74% of 200 comparisons", judged)
    assert reason.startswith("the challenger won") and "disappears under style control" in reason
    plain = style_controlled(version_decides(60, 1), "v1", "v0")
    assert "at equal length and markdown" in with_style("won", plain)
    assert style_controlled([], "v1", "v0") is None
    assert with_style("no votes", None) == "no votes"


def test_annotate_gives_ratings_and_canary_figures_both_ways_and_warns():
    versions = [
        {"version": "v0", "parent": None, "manifest": {}},
        {"version": "v1", "parent": "v0", "manifest": {"gate": {"deploy": True}}},
    ]
    canaries = [{"challenger": "v1", "serving": "v0"}]
    out = {v["version"]: v for v in annotate(versions, length_decides(300, 5), [], canaries)}
    rating, monitors = out["v1"]["rating"], out["v1"]["monitors"]
    assert {"score", "interval", "votes", "score_style_controlled",
            "interval_style_controlled"} <= set(rating)  # fmt: skip
    assert rating["score_style_controlled"] < rating["score"]
    assert monitors["human_win_rate"] > 0.7
    assert abs(monitors["human_win_rate_style_controlled"] - 0.5) < 0.12
    lo, hi = monitors["human_interval_style_controlled"]
    assert lo < 0.5 < hi
    assert any("disappears under style control" in w for w in out["v1"]["warnings"])
    assert out["v0"]["monitors"]["human_win_rate_style_controlled"] is None


# --- where people see it -----------------------------------------------------------------------


def test_the_api_gives_both_figures(tmp_path):
    """`GET /api/versions` ratings and monitors and `GET /api/canary` carry the style-controlled
    figures beside the raw ones, from votes in the app's own store."""
    from harness.in_process import in_process_app
    from storage.store import CandidateRecord

    named = {"v0": "v0000", "v1": "v0001"}

    with in_process_app(tmp_path / "data") as client:
        store = client.app.state.runtime.store
        (tmp_path / "adapter").mkdir()
        store.start_canary("v0001", "v0000", str(tmp_path / "adapter"), 0.5,
                           {"path": str(tmp_path / "v0001")})  # fmt: skip
        for i, row in enumerate(length_decides(60, 6)):
            cid = store.create_conversation()
            a, b = (
                CandidateRecord(slot, row[f"text_{slot}"], named[row[f"version_{slot}"]],
                                {"seed": i}, 3, 4, "stop", 1.0)
                for slot in ("a", "b")
            )  # fmt: skip
            pair = store.record_pair(cid, "hi", [{"role": "user", "content": "hi"}], "v0000", i,
                                     (a, b))  # fmt: skip
            store.record_vote(pair.pair_id, row["choice"])
        versions = client.get("/api/versions").json()["versions"]
        canary = client.get("/api/canary").json()
    v1 = {v["version"]: v for v in versions}["v0001"]
    assert v1["rating"]["score"] > 1000
    assert "score_style_controlled" in v1["rating"]
    assert len(v1["rating"]["interval_style_controlled"]) == 2
    assert v1["monitors"]["human_win_rate"] > 0.6
    assert v1["monitors"]["human_win_rate_style_controlled"] < v1["monitors"]["human_win_rate"]
    assert canary["challenger"] == "v0001" and canary["decision"] == "running"
    assert canary["win_rate"] == v1["monitors"]["human_win_rate"]
    assert canary["win_rate_style_controlled"] < canary["win_rate"]
    assert len(canary["interval_style_controlled"]) == 2
    assert set(canary["style"]["coefficients"]) == set(STYLE_FEATURES)
    assert "style_note" in canary


def test_the_admin_tab_shows_both_numbers():
    from ui.admin_tab import VERSION_COLUMNS, _versions_frame, canary_line

    version = {
        "version": "v0001", "status": "challenger", "parent": "v0000",
        "created_at": "2026-01-01T00:00:00", "manifest": {},
        "rating": {"score": 1100.0, "interval": [1050.0, 1150.0], "votes": 40,
                   "score_style_controlled": 1010.0, "interval_style_controlled": [950.0, 1070.0]},
        "monitors": {"human_win_rate": 0.7, "human_interval": [0.55, 0.82],
                     "human_comparisons": 40, "human_win_rate_style_controlled": 0.52,
                     "human_interval_style_controlled": [0.38, 0.66]},
    }  # fmt: skip
    row = dict(zip(VERSION_COLUMNS, _versions_frame([version]).iloc[0], strict=True))
    assert row["users' rating"].startswith("1100 [1050, 1150]")
    assert row["users' rating (style-controlled)"] == "1010 [950, 1070]"
    assert row["users' win rate"].startswith("0.70 [0.55, 0.82]")
    assert row["users' win rate (style-controlled)"] == "0.52 [0.38, 0.66]"
    status = {
        "challenger": "v0001", "serving": "v0000", "share": 0.5, "decision": "running",
        "votes": {"challenger": 28, "serving": 12, "tie": 0, "both_bad": 0},
        "reason": "not decided yet", "win_rate": 0.7, "interval": [0.55, 0.82],
        "win_rate_style_controlled": 0.52, "interval_style_controlled": [0.38, 0.66],
        "style_note": "the gain disappears under style control",
    }  # fmt: skip
    line = canary_line(status)
    assert (
        "0.70 [0.55, 0.82]" in line and "style-controlled" in line and "0.52 [0.38, 0.66]" in line
    )
    assert "disappears" in line


def test_the_bench_helper_reports_both_for_a_set_of_votes(tmp_path):
    import json

    from bench.style_control import arena_rows, markdown, report

    rows = length_decides(300, 9)
    result = report(rows)
    (pair,) = result["pairs"]
    assert pair["version"] == "v1" and pair["against"] == "v0"
    assert pair["win_rate"] > 0.7 and abs(pair["win_rate_style_controlled"] - 0.5) < 0.12
    table = markdown(result)
    assert "| v1 | v0 | 300 |" in table and "disappears" in table and "longer" in table
    battles = tmp_path / "battles.jsonl"
    winner = {"a": "model_a", "b": "model_b", "tie": "tie"}
    battles.write_text("\n".join(json.dumps({
        "model_a": r["version_a"], "model_b": r["version_b"], "winner": winner[r["choice"]],
        "conversation_a": [{"role": "user", "content": "q"},
                           {"role": "assistant", "content": r["text_a"]}],
        "conversation_b": [{"role": "user", "content": "q"},
                           {"role": "assistant", "content": r["text_b"]}],
    }) for r in rows))  # fmt: skip
    assert report(arena_rows(battles)) == result


def test_a_canary_verdict_is_recorded_with_what_style_control_says(tmp_path):
    """The real canary service on a real store around the fake engine: the serving version's
    (longer) replies win four straight votes, the challenger is retired on the raw votes, and
    the recorded reason also gives the style-controlled figure."""
    import asyncio

    from alignment.config import CanaryConfig
    from assistant.canary_service import CanaryService
    from harness.fake_engine import FakeEngine
    from storage import Store
    from storage.store import CandidateRecord

    store = Store(tmp_path / "db.duckdb")
    store.ensure_base_version("v0000", str(tmp_path / "base"), {})
    for name in ("v0001", "adapter"):
        (tmp_path / name).mkdir()
    store.start_canary("v0001", "v0000", str(tmp_path / "adapter"), 0.5, {"path": str(tmp_path)})
    for i in range(4):
        pair = store.record_pair(
            store.create_conversation(), "hi", [{"role": "user", "content": "hi"}], "v0000", i,
            (CandidateRecord("a", words(10), "v0001", {"seed": i}, 3, 10, "stop", 1.0),
             CandidateRecord("b", words(40), "v0000", {"seed": i}, 3, 40, "stop", 1.0)),
        )  # fmt: skip
        store.record_vote(pair.pair_id, "b")

    async def decide() -> dict:
        canary = CanaryService(store, FakeEngine(), CanaryConfig(min_votes=30), asyncio.Lock())
        await canary.resume()
        await canary.vote_cast({"a": "v0001", "b": "v0000"})
        await canary._concluding
        return await canary.status()

    status = asyncio.run(decide())
    assert status["decision"] == "retired" and status["win_rate"] == 0.0
    assert "the users prefer the serving version" in status["reason"]
    assert "at equal length and markdown" in status["reason"]
    assert status["win_rate_style_controlled"] > status["win_rate"]
    store.close()
