"""The page's "write the reply you wanted": through a real browser against the running app, a
written reply takes the pair's place, continues the conversation and lands in the `sft` export."""

from __future__ import annotations

import json

import pytest

from harness.browser import CHROMIUM, CHROMIUM_ARGS


@pytest.mark.browser
def test_the_page_takes_a_reply_the_user_wrote(tiny_app):
    from playwright.sync_api import expect, sync_playwright

    mine = "Water boils at 100 degrees Celsius at sea level."
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(tiny_app.url, wait_until="domcontentloaded")
        use_mine = page.get_by_role("button", name="Use my reply")
        box = page.locator("#message textarea")
        box.fill("When does water boil?")
        box.press("Enter")
        expect(page.get_by_role("button", name="A is better")).to_be_enabled(timeout=120_000)
        page.get_by_text("Both bad? Write the reply you wanted").click()
        page.locator("#demonstration textarea").fill(mine)
        expect(use_mine).to_be_enabled()
        use_mine.click()
        expect(page.locator("#status")).to_contain_text("your reply continues the conversation")
        expect(page.locator("#history")).to_contain_text(mine)
        expect(page.locator("#demonstration textarea")).to_have_value("")
        expect(use_mine).to_be_disabled()
        browser.close()
    exported = [json.loads(line) for line in tiny_app.export("sft").text.splitlines()]
    assert any(r["messages"][-1] == {"role": "assistant", "content": mine} for r in exported)
