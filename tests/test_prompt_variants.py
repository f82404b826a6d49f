"""Prompt variants, the no-training baseline: the file is validated on load, a variant shapes
what the engine is sent, and through the running app the votes on variant pairs are counted
for the right arm and an admin can make the winner the default."""

from __future__ import annotations

import json

import httpx
import pytest

from assistant.prompt_variants import (
    VariantError,
    parse_variants,
    shipped_variants,
    variant_results,
)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"variants": []}, "at least one variant"),
        ({"variants": [{"name": "a"}, {"name": "a"}]}, "duplicate name"),
        ({"variants": [{"name": "a", "examples": [{"user": "q"}]}]}, "'examples' must be"),
        ({"variants": [{"name": "a", "sytem": "x"}]}, "unknown keys ['sytem']"),
        ({"default": "b", "variants": [{"name": "a"}]}, "'default' 'b' is not one"),
    ],
)
def test_a_malformed_variants_file_is_refused_naming_the_entry(body, message):
    with pytest.raises(VariantError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_variants(body)


def test_variants_shape_the_prompt_and_votes_count_for_the_right_arm():
    shipped = shipped_variants()
    assert {"plain", "helpful", "few_shot", "step_by_step"} <= set(shipped.by_name)
    talk = [{"role": "user", "content": "Why?"}]
    assert shipped.by_name["plain"].messages(talk, None) == talk
    assert shipped.by_name["plain"].messages(talk, "Be kind.")[0]["content"] == "Be kind."
    few = shipped.by_name["few_shot"].messages(talk, None)
    assert [m["role"] for m in few] == ["user", "assistant", "user", "assistant", "user"]
    assert few[-1] == talk[0]
    rows = [
        {"choice": "a", "version_a": "few_shot", "version_b": "plain"},
        {"choice": "b", "version_a": "plain", "version_b": "few_shot"},
        {"choice": "tie", "version_a": "few_shot", "version_b": "plain"},
        {"choice": "both_bad", "version_a": "few_shot", "version_b": "plain"},
    ]
    results = variant_results(rows)
    assert results["few_shot"]["wins"] == 2.5 and results["few_shot"]["comparisons"] == 3
    assert results["plain"]["wins"] == 0.5 and results["plain"]["win_rate"] == pytest.approx(1 / 6)
    low, high = results["few_shot"]["interval"]
    assert low < 2.5 / 3 < high
    assert results["few_shot"]["rating"]["score"] > results["plain"]["rating"]["score"]


def test_variant_pairs_through_the_app_and_the_admin_picks_the_default(tiny_app_factory):
    app = tiny_app_factory("--variant-share", "1")
    tally: dict[str, list[float]] = {}
    for i in range(10):
        turn = httpx.post(
            app.url + "/api/chat", json={"message": f"Tell me about rivers {i}"}, timeout=120
        ).json()
        choice = "ab"[i % 2] if i < 8 else "tie"
        vote = httpx.post(
            app.url + "/api/vote", json={"pair_id": turn["pair_id"], "choice": choice}
        ).json()
        arms = vote["variants"]  # revealed once voted, like the versions of a canary pair
        assert arms["a"] != arms["b"] and vote["versions"]["a"] == vote["versions"]["b"]
        for slot in "ab":
            won = 0.5 if choice == "tie" else float(choice == slot)
            tally.setdefault(arms[slot], []).append(won)
    status = httpx.get(app.url + "/api/prompt-variants").json()
    assert status["default"] == "plain" and status["share"] == 1.0
    counted = {v["name"]: v["results"] for v in status["variants"] if v["results"]}
    assert set(counted) == set(tally)
    for name, wins in tally.items():
        assert counted[name]["comparisons"] == len(wins)
        assert counted[name]["wins"] == pytest.approx(sum(wins))
    assert sum(r["comparisons"] for r in counted.values()) == 2 * 10

    url = app.url + "/api/prompt-variants/default"
    assert httpx.post(url, json={"name": "few_shot"}).status_code == 401
    assert httpx.post(url, json={"name": "nope"}, headers=app.admin_headers()).status_code == 422
    made = httpx.post(url, json={"name": "few_shot"}, headers=app.admin_headers())
    assert made.status_code == 200 and made.json()["default"] == "few_shot"
    bad = httpx.put(
        app.url + "/api/prompt-variants", json={"variants": []}, headers=app.admin_headers()
    )
    assert bad.status_code == 422 and "at least one variant" in bad.json()["error"]
    assert httpx.get(app.url + "/api/prompt-variants").json()["default"] == "few_shot"


def test_the_default_variant_is_what_every_ordinary_turn_is_sent(tiny_app_factory):
    app = tiny_app_factory()  # --variant-share 0: every pair uses the default for both replies
    made = httpx.post(
        app.url + "/api/prompt-variants/default",
        json={"name": "few_shot"},
        headers=app.admin_headers(),
    )
    assert made.status_code == 200
    turn = httpx.post(app.url + "/api/chat", json={"message": "Why rain?"}, timeout=120).json()
    vote = httpx.post(app.url + "/api/vote", json={"pair_id": turn["pair_id"], "choice": "a"})
    assert "variants" not in vote.json()  # the same variant on both sides: nothing to reveal
    record = json.loads(app.export().text.splitlines()[-1])
    assert record["prompt"][0] == {"role": "user", "content": "What is photosynthesis?"}
    assert record["prompt"][-1] == {"role": "user", "content": "Why rain?"}
