"""Who is looking at the page: their session and address tag, and whether they signed in as
admin, read from the request's cookies. The page is handed one `PageAuth` and never handles
cookies, tokens or keys itself (and the `ui` package imports nothing from `assistant`).
"""

from __future__ import annotations

from assistant.admin import ADMIN_COOKIE, SignIns
from assistant.sessions import SESSION_COOKIE, SessionKeys


def _cookie(request, name: str) -> str | None:
    cookies = getattr(request, "cookies", None) or {}
    return cookies.get(name) if hasattr(cookies, "get") else None


class PageAuth:
    def __init__(self, sessions: SessionKeys, sign_ins: SignIns) -> None:
        self.sessions = sessions
        self.sign_ins = sign_ins

    def visitor(self, request) -> dict[str, str | None]:
        """The page's session (the server's HttpOnly cookie, never an id the browser makes up)
        and its client tag, as the chat service's keyword arguments."""
        cookie = _cookie(request, SESSION_COOKIE)
        client = getattr(request, "client", None)
        return {
            "session_id": self.sessions.owner(cookie),  # its hash: the id stays in the cookie
            "client": self.sessions.client_tag(getattr(client, "host", None)),
        }

    def admin_problem(self, request) -> str | None:
        """None when the visitor is signed in as admin; else why not, in words."""
        return self.sign_ins.problem(_cookie(request, ADMIN_COOKIE))
