"""The canary in a real browser: the page never shows which reply is the challenger's before the
vote (and says so after it); the Admin tab shows the canary and retires it with its button."""

from __future__ import annotations

import httpx
import pytest

from harness.browser import CHROMIUM, CHROMIUM_ARGS

pytestmark = pytest.mark.browser
TOKEN = "canary-page-token"


def test_page_hides_the_challenger_until_the_vote_and_admin_retires_it(
    tiny_app_factory, tiny_model_dir, monkeypatch, tmp_path
):
    from playwright.sync_api import expect, sync_playwright

    monkeypatch.setenv("ASSISTANT_ADMIN_TOKEN", TOKEN)
    app = tiny_app_factory(
        "--model", str(tiny_model_dir), "--retrain-preset", "fast", "--canary-share", "1"
    )
    for i in range(4):
        turn = httpx.post(app.url + "/api/chat", json={"message": f"hi {i}"}, timeout=120).json()
        httpx.post(app.url + "/api/vote", json={"pair_id": turn["pair_id"], "choice": "ab"[i % 2]})
    admin = {"Authorization": f"Bearer {TOKEN}"}
    cycle = httpx.post(app.url + "/api/retrain?wait=true", headers=admin, timeout=600).json()
    assert cycle["status"] == "challenger", cycle
    challenger = cycle["version"]

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 1400})
        page.goto(app.url, wait_until="domcontentloaded")
        box = page.locator("#message textarea")
        box.fill("Which of you is new?")
        box.press("Enter")
        vote_a = page.get_by_role("button", name="A is better")
        expect(vote_a).to_be_enabled(timeout=120_000)
        # both replies are on the page, and nothing on it names the challenger
        assert challenger not in page.content()
        expect(page.locator("#model-version")).to_contain_text("v0000")
        vote_a.click()
        expect(page.locator("#status")).to_contain_text("Vote saved")
        expect(page.locator("#status")).to_contain_text("trial of a new version")
        expect(page.locator("#status")).to_contain_text(challenger)

        page.get_by_role("tab", name="Admin").click()
        page.locator("#admin-token").fill(TOKEN)
        page.locator("#admin-sign-in").click()
        page.wait_for_url(app.url + "/")
        page.get_by_role("tab", name="Admin").click()
        status = page.locator("#canary-status")
        expect(status).to_contain_text(f"{challenger} against v0000", timeout=10_000)
        expect(status).to_contain_text("running")
        page.get_by_role("button", name="Retire challenger").click()
        expect(page.locator("#admin-result")).to_contain_text(f"{challenger} retired")
        expect(status).to_contain_text("retired", timeout=10_000)
        page.screenshot(path=str(tmp_path / "canary.png"), full_page=True)
        browser.close()
    canary = httpx.get(app.url + "/api/canary").json()
    assert canary["decision"] == "retired" and "by an admin" in canary["reason"], canary
    versions = httpx.get(app.url + "/api/versions").json()
    assert versions["serving"] == "v0000", versions
