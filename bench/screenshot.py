"""The README's screenshot, reproducible: the real app on the embedded SmolLM2, one question,
both replies complete, the vote buttons live; saved to docs/page.png.

Run: `.venv/bin/python -m bench.screenshot` (needs Debian's chromium, as the browser tests do).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from harness.app_process import MANY_USERS_ON_ONE_ADDRESS, AppProcess
from harness.browser import CHROMIUM, CHROMIUM_ARGS

REPO = Path(__file__).resolve().parents[1]
QUESTION = "What should I pack for a day of hiking?"


def main() -> None:
    from playwright.sync_api import expect, sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        app = AppProcess(
            ["--model", str(REPO / "data/models/SmolLM2-135M-Instruct"),
             "--max-new-tokens", "96", *MANY_USERS_ON_ONE_ADDRESS],
            Path(tmp),
        ).start(timeout=900)  # fmt: skip
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(app.url, wait_until="domcontentloaded")
                box = page.locator("#message textarea")
                box.fill(QUESTION)
                box.press("Enter")
                expect(page.get_by_role("button", name="A is better")).to_be_enabled(
                    timeout=300_000
                )
                out = REPO / "docs" / "page.png"
                page.screenshot(path=str(out), full_page=True)
                browser.close()
            print(f"wrote {out}")
        finally:
            app.stop()


if __name__ == "__main__":
    main()
