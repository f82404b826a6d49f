"""The admin tab in a real browser: sign-in refused with a wrong token, accepted with the right
one (as an HttpOnly cookie, never a Gradio value), retrain deploys, the version table updates."""

from __future__ import annotations

import httpx
import pytest

from harness.browser import CHROMIUM, CHROMIUM_ARGS

pytestmark = pytest.mark.browser


def test_admin_tab_retrain_needs_token_and_deploys(
    tiny_app_factory, tiny_model_dir, monkeypatch, tmp_path
):
    from playwright.sync_api import expect, sync_playwright

    monkeypatch.setenv("ASSISTANT_ADMIN_TOKEN", "page-token")
    app = tiny_app_factory("--model", str(tiny_model_dir), "--retrain-preset", "fast")
    for i in range(4):
        turn = httpx.post(app.url + "/api/chat", json={"message": f"hi {i}"}, timeout=120).json()
        httpx.post(app.url + "/api/vote", json={"pair_id": turn["pair_id"], "choice": "ab"[i % 2]})

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 1400})
        refused = []  # a Gradio route the page needs must not be among the closed ones
        page.on("response", lambda r: refused.append(r.url) if r.status == 403 else None)
        page.goto(app.url, wait_until="domcontentloaded")
        page.get_by_role("tab", name="Admin").click()
        page.get_by_role("button", name="Retrain now").click()
        expect(page.locator("#admin-result")).to_contain_text("sign in with the admin token")
        page.locator("#admin-token").fill("wrong")
        page.locator("#admin-sign-in").click()
        expect(page.locator("#admin-login-error")).to_contain_text("wrong admin token")
        page.goto(app.url, wait_until="domcontentloaded")
        page.get_by_role("tab", name="Admin").click()
        page.locator("#admin-token").fill("page-token")
        page.locator("#admin-sign-in").click()
        page.wait_for_url(app.url + "/")
        page.get_by_role("tab", name="Admin").click()
        expect(page.locator("#admin-signed-in")).to_contain_text("Signed in as admin")
        # the sign-in is an HttpOnly cookie: no script on the page can read it or the session
        assert "assistant_admin" not in page.evaluate("document.cookie")
        assert "assistant_session" not in page.evaluate("document.cookie")
        cookies = {c["name"]: c for c in page.context.cookies()}
        assert cookies["assistant_admin"]["httpOnly"] and "page-token" not in str(cookies)
        page.get_by_role("button", name="Retrain now").click()
        expect(page.locator("#admin-result")).to_contain_text(
            "Cycle deployed: v0001", timeout=180_000
        )
        expect(page.get_by_role("grid", name="Versions")).to_contain_text("v0001")
        page.screenshot(path=str(tmp_path / "admin.png"), full_page=True)
        assert not refused, refused
        page.get_by_role("tab", name="Chat").click()
        expect(page.locator("#model-version")).to_contain_text("v0001", timeout=10_000)
        browser.close()
    assert httpx.get(app.url + "/api/versions").json()["serving"] == "v0001"
    httpx.post(
        app.url + "/api/rollback",
        json={"version": "v0000"},
        headers={"Authorization": "Bearer page-token"},
        timeout=120,
    )
