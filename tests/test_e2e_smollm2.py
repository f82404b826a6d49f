"""End to end on the real product: `assistant run` with the embedded SmolLM2 on its own engine.

One app process is shared by this module: an HTTP round trip, then a real headless browser.
"""

from __future__ import annotations

import os
import re

import duckdb
import httpx
import pytest

from harness.browser import CHROMIUM, CHROMIUM_ARGS

pytestmark = pytest.mark.slow


def test_http_round_trip_vote_is_in_duckdb_after_shutdown(smol_app):
    resp = httpx.post(
        smol_app.url + "/api/chat",
        json={"message": "Explain gravity to a 5-year-old."},
        timeout=300,
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    texts = [c["text"] for c in body["candidates"]]
    assert all(len(t.split()) >= 3 for t in texts), texts  # real words from a real model
    voted = httpx.post(
        smol_app.url + "/api/vote", json={"pair_id": body["pair_id"], "choice": "a"}, timeout=30
    )
    assert voted.status_code == 200
    smol_app.stop()
    con = duckdb.connect(str(smol_app.db), read_only=True)
    row = con.execute(
        "SELECT v.choice, c.text, c.model_version FROM votes v "
        "JOIN candidates c ON c.pair_id = v.pair_id AND c.slot = 'a' WHERE v.pair_id = ?",
        [body["pair_id"]],
    ).fetchone()
    con.close()
    assert row == ("a", texts[0], "v0000")
    smol_app.start(timeout=600)  # the browser test below uses the same app again


@pytest.mark.browser
def test_browser_chat_stream_and_vote(smol_app, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    assert os.path.exists(CHROMIUM), "install Debian's chromium (make test does)"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(smol_app.url, wait_until="domcontentloaded")
        expect(page.locator("#model-version")).to_contain_text("v0000")
        vote_a = page.get_by_role("button", name="A is better")
        expect(vote_a).to_be_disabled()

        box = page.locator("#message textarea")
        box.fill("<b>Name</b> three colors.")
        box.press("Enter")
        # The user's HTML is shown as text, never rendered as a <b> element.
        # Shown as soon as it is sent, not with the first tokens (seconds away on a slow CPU).
        history = page.locator("#history")
        expect(history).to_contain_text("<b>Name</b> three colors.", timeout=15_000)
        assert page.locator("#history b", has_text="Name").count() == 0

        expect(vote_a).to_be_enabled(timeout=240_000)  # enabled once both replies are complete
        reply_a = page.locator("#reply-a").inner_text().strip()
        reply_b = page.locator("#reply-b").inner_text().strip()
        assert reply_a and reply_b
        page.screenshot(path=str(tmp_path / "before-vote.png"), full_page=True)
        page.wait_for_timeout(7000)  # read both replies, as a person would (48 tokens each)
        vote_a.click()
        expect(page.locator("#status")).to_contain_text("Vote saved: A is better", timeout=30_000)
        expect(vote_a).to_be_disabled()
        # The chosen reply continues the conversation in the history.
        # The history renders the reply's markdown again: its line breaks may come out as a
        # space, a break or nothing ("Four:\nThe four" showed as "Four:The four"), so any
        # whitespace between the characters of its first 40.
        start = re.sub(r"\s+", "", reply_a)[:40]
        expect(page.locator("#history")).to_contain_text(
            re.compile(r"\s*".join(re.escape(ch) for ch in start))
        )
        browser.close()

    # A vote cast at reading pace is kept for training (a too-fast one would be flagged).
    votes = smol_app.export("trl").text
    assert "three colors" in votes
