"""Debian's chromium as the browser tests and the screenshot script drive it through Playwright
(Playwright's own browser download cannot work offline; `make test` installs chromium)."""

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
