"""The admin token check shared by the API and the page.

Admin actions (retrain, rollback) need `ASSISTANT_ADMIN_TOKEN`; without it they are refused, while
chatting and voting stay open. The comparison is constant-time.
"""

from __future__ import annotations

import hmac
import os

DISABLED = (
    "admin actions are disabled: start the app with ASSISTANT_ADMIN_TOKEN set "
    "and send it as 'Authorization: Bearer <token>'"
)
WRONG = "missing or wrong admin token ('Authorization: Bearer <token>')"


def admin_error(given: str | None) -> tuple[int, str] | None:
    """None when `given` is the admin token; else (HTTP status, message)."""
    token = os.environ.get("ASSISTANT_ADMIN_TOKEN")
    if not token:
        return 403, DISABLED
    if not hmac.compare_digest((given or "").encode(), token.encode()):
        return 401, WRONG
    return None
