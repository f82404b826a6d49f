"""`POST /admin/login` and `POST /admin/logout`: the page's admin sign-in, outside Gradio.

A plain HTML form posts the token here once; the answer is an HttpOnly, SameSite=Strict cookie
(`assistant.admin.admin_cookie`) and a redirect back to the page. The token never enters Gradio's
component state, run history or deep links, and no script on the page can read the cookie.
"""

from __future__ import annotations

import html
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from assistant.admin import ADMIN_COOKIE, ADMIN_COOKIE_MAX_AGE_S, admin_cookie, admin_error
from assistant.sessions import SessionKeys

MAX_FORM_BYTES = 4096


def build_admin_login_router(sessions: SessionKeys) -> APIRouter:
    router = APIRouter(prefix="/admin")

    @router.post("/login")
    async def login(request: Request):
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                return HTMLResponse("<p>form too large</p>", status_code=413)
        given = (parse_qs(body.decode(errors="replace")).get("token") or [""])[0]
        if (problem := admin_error(given)) is not None:
            return HTMLResponse(
                f"<p id='admin-login-error'>{html.escape(problem.public())}</p>"
                "<p><a href='../'>Back to the page</a></p>",
                status_code=problem.status,
            )
        answer = RedirectResponse("../", status_code=303)
        answer.set_cookie(
            ADMIN_COOKIE,
            admin_cookie(sessions),
            max_age=ADMIN_COOKIE_MAX_AGE_S,
            httponly=True,
            samesite="strict",
        )
        return answer

    @router.post("/logout")
    async def logout():
        answer = RedirectResponse("../", status_code=303)
        answer.delete_cookie(ADMIN_COOKIE, httponly=True, samesite="strict")
        return answer

    return router
