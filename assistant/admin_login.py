"""`POST /admin/login` and `POST /admin/logout`: the page's admin sign-in, outside Gradio.

A plain HTML form posts the token here once; the answer is an HttpOnly, SameSite=Strict cookie
holding a sign-in id (`assistant.admin.SignIns`), `Secure` when the page was reached over
HTTPS, and a redirect back to the page. The token never enters Gradio's component state, run
history or deep links, and no script on the page can read the cookie. Signing out forgets the id
on the server. Wrong tokens are throttled per address and in total, before the token is compared.
"""

from __future__ import annotations

import html
import time
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from assistant.admin import (
    ADMIN_COOKIE,
    ADMIN_COOKIE_MAX_AGE_S,
    AdminError,
    SignIns,
    admin_error,
)
from assistant.limits import SlidingWindow

MAX_FORM_BYTES = 4096
# Wrong tokens a minute: per address (a person mistyping gets a few tries), and from everybody
# together (many addresses guessing at once). A right token is never counted.
WRONG_PER_ADDRESS = 5
WRONG_TOTAL = 30


def _page(message: str, status: int, headers: dict | None = None) -> HTMLResponse:
    return HTMLResponse(
        f"<p id='admin-login-error'>{html.escape(message)}</p>"
        "<p><a href='../'>Back to the page</a></p>",
        status_code=status,
        headers=headers,
    )


def build_admin_login_router(sign_ins: SignIns) -> APIRouter:
    router = APIRouter(prefix="/admin")
    wrong = {"address": SlidingWindow(WRONG_PER_ADDRESS), "total": SlidingWindow(WRONG_TOTAL)}

    def _cookie_options(request: Request) -> dict:
        # Behind a TLS proxy the scheme is the forwarded one (uvicorn's trusted proxy headers).
        secure = request.url.scheme == "https"
        return {"httponly": True, "samesite": "strict", "secure": secure}

    @router.post("/login")
    async def login(request: Request):
        now = time.monotonic()
        keys = {"address": request.client.host if request.client else "", "total": "all"}
        for kind, key in keys.items():
            if (retry := wrong[kind].retry_after(key, now)) is not None:
                return _page(
                    f"too many wrong admin tokens; try again in {retry} s",
                    429,
                    {"Retry-After": str(retry)},
                )
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                return HTMLResponse("<p>form too large</p>", status_code=413)
        given = (parse_qs(body.decode(errors="replace")).get("token") or [""])[0]
        problem: AdminError | None = admin_error(given)
        if problem is not None:
            if problem.status == 401:
                for kind, key in keys.items():
                    wrong[kind].record(key, now)
            return _page(problem.public(), problem.status)
        answer = RedirectResponse("../", status_code=303)
        answer.set_cookie(
            ADMIN_COOKIE,
            sign_ins.issue(),
            max_age=ADMIN_COOKIE_MAX_AGE_S,
            **_cookie_options(request),
        )
        return answer

    @router.post("/logout")
    async def logout(request: Request):
        sign_ins.revoke(request.cookies.get(ADMIN_COOKIE))
        answer = RedirectResponse("../", status_code=303)
        answer.delete_cookie(ADMIN_COOKIE, **_cookie_options(request))
        return answer

    return router
