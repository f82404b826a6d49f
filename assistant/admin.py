"""The admin token check shared by the API and the page, and the page's admin sign-ins.

Admin actions (retrain, rollback) need `ASSISTANT_ADMIN_TOKEN`. When `assistant run` starts
without it, it uses the token stored in DATA_DIR/secrets/admin-token (generated on the first run,
readable only by the user); the start that generates it prints it, as Jupyter prints its token, so
the Admin tab works at once, and later starts print only where it is stored (a token printed on
every start ends up in every log the output goes to). The CLI reads the same file. On Postgres,
where several app processes share one database, the generated token is kept in the database
(the first process to start puts it there) and written to each data directory: every process
accepts the same one. A token set in the environment is used and never printed. The comparison is
constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path
from typing import Protocol

from assistant import environment
from storage import AppError
from storage.shared_records import SharedRecords

DISABLED = (
    "admin actions are disabled: start the app with ASSISTANT_ADMIN_TOKEN set "
    "and send it as 'Authorization: Bearer <token>'"
)
WRONG = "missing or wrong admin token ('Authorization: Bearer <token>')"


TOKEN_FILE = Path("secrets") / "admin-token"


def stored_admin_token(data_dir: Path) -> str | None:
    try:
        return (data_dir / TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None


def ensure_admin_token(
    data_dir: Path, shared: SharedRecords | None = None
) -> tuple[Path, bool] | None:
    """With ASSISTANT_ADMIN_TOKEN unset, make the stored token (created private on the first
    run) this process's admin token; return its file and whether it was generated now, for the
    caller to say so; else None. Set, it is used as it is; set to an empty value, admin actions
    are off.

    `shared`: the store, on Postgres only. The token is then the one in the database, put
    there by the first process to start (its data directory's token if it had one, else a new
    one), so that every process behind the load balancer accepts it; it is written to this
    data directory too, where the CLI reads it. "Generated now" only for the process that
    created it, so one start prints it, not every process's first."""
    if environment.admin_token_chosen():
        return None
    path = data_dir / TOKEN_FILE
    stored = stored_admin_token(data_dir)
    offered = stored or secrets.token_urlsafe(24)
    token = offered if shared is None else shared.shared_key("admin_token", lambda: offered)
    if token != stored:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
    environment.use_admin_token(stored_admin_token(data_dir) or "")
    return path, stored is None and token == offered


class AdminError(AppError):
    """An admin action without the admin token (401), or with admin actions off (403)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def admin_error(given: str | None) -> AdminError | None:
    """None when `given` is the admin token; else the error to raise or show."""
    token = environment.admin_token()
    if not token:
        return AdminError(DISABLED, 403)
    if not hmac.compare_digest((given or "").encode(), token.encode()):
        return AdminError(WRONG, 401)
    return None


# --- the page's admin sign-in -------------------------------------------------------------------
# The page never holds the token: it is posted once to /admin/login (a plain form, outside
# Gradio), which answers with an HttpOnly cookie holding a random sign-in id. The server keeps the
# live ids in memory: signing out deletes the id, so a copy of the cookie is dead too; ids expire;
# a restart (which a changed ASSISTANT_ADMIN_TOKEN needs) signs every admin out. On Postgres the
# processes sharing the database keep them there instead (`SharedSignIns`), under a hash keyed
# by the admin token: a changed token ends them all just the same.

ADMIN_COOKIE = "assistant_admin"
ADMIN_COOKIE_MAX_AGE_S = 12 * 3600
MAX_LIVE_SIGN_INS = 1000  # each needs the token; the oldest goes first beyond this
NOT_SIGNED_IN = "sign in with the admin token first (Admin tab)"


class SignIns(Protocol):
    """What the login routes and the page ask of the live admin sign-ins."""

    def issue(self, now: float | None = None) -> str: ...

    def revoke(self, cookie: str | None) -> None: ...

    def problem(self, cookie: str | None, now: float | None = None) -> str | None: ...

    def __len__(self) -> int: ...


class AdminSignIns:
    """The live admin sign-ins of this process: id -> when it was issued, oldest first."""

    def __init__(self, max_age_s: float = ADMIN_COOKIE_MAX_AGE_S) -> None:
        self.max_age_s = max_age_s
        self._issued: dict[str, float] = {}

    def issue(self, now: float | None = None) -> str:
        """A new sign-in id, the admin cookie's value (call only after checking the token)."""
        now = time.monotonic() if now is None else now
        self._forget_expired(now)
        while len(self._issued) >= MAX_LIVE_SIGN_INS:
            del self._issued[next(iter(self._issued))]
        sign_in = secrets.token_urlsafe(24)
        self._issued[sign_in] = now
        return sign_in

    def revoke(self, cookie: str | None) -> None:
        """Sign out: this cookie, and every copy of it, is refused from now on."""
        self._issued.pop(cookie or "", None)

    def problem(self, cookie: str | None, now: float | None = None) -> str | None:
        """None when the cookie is a live sign-in; else why not, in words. Any string is looked
        up as it is (a cookie is never parsed or compared byte-wise here)."""
        if not environment.admin_token():
            return DISABLED
        self._forget_expired(time.monotonic() if now is None else now)
        if not isinstance(cookie, str) or cookie not in self._issued:
            return NOT_SIGNED_IN
        return None

    def _forget_expired(self, now: float) -> None:
        while self._issued:
            oldest, issued = next(iter(self._issued.items()))
            if now - issued <= self.max_age_s:
                break
            del self._issued[oldest]

    def __len__(self) -> int:
        return len(self._issued)


class SharedSignIns:
    """The live admin sign-ins of every app process on one Postgres database, kept there: a
    sign-in made on one process is accepted by all of them, and a sign-out on any of them ends
    it everywhere (a load balancer may send each request to another process). The database
    holds only a hash of each id (the cookie is a bearer token), keyed by the admin token, so
    that changing the token ends the sign-ins made with the old one, as a restart does in
    memory. Times are wall-clock seconds: the processes share no monotonic clock."""

    def __init__(self, store: SharedRecords, max_age_s: float = ADMIN_COOKIE_MAX_AGE_S) -> None:
        self.max_age_s = max_age_s
        self._store = store

    def issue(self, now: float | None = None) -> str:
        """A new sign-in id, the admin cookie's value (call only after checking the token)."""
        now = time.time() if now is None else now
        self._store.forget_sign_ins_before(now - self.max_age_s)
        sign_in = secrets.token_urlsafe(24)
        self._store.add_sign_in(_sign_in_hash(sign_in), now, keep=MAX_LIVE_SIGN_INS)
        return sign_in

    def revoke(self, cookie: str | None) -> None:
        """Sign out on every process: this cookie, and every copy of it, is refused from now on."""
        if cookie:
            self._store.revoke_sign_in(_sign_in_hash(cookie))

    def problem(self, cookie: str | None, now: float | None = None) -> str | None:
        """None when the cookie is a live sign-in; else why not, in words."""
        if not environment.admin_token():
            return DISABLED
        if not isinstance(cookie, str) or not cookie:
            return NOT_SIGNED_IN
        issued = self._store.sign_in_issued_at(_sign_in_hash(cookie))
        now = time.time() if now is None else now
        if issued is None or now - issued > self.max_age_s:
            return NOT_SIGNED_IN
        return None

    def __len__(self) -> int:
        return self._store.sign_in_count()


def _sign_in_hash(sign_in: str) -> str:
    """What the database keeps of a sign-in id: its HMAC-SHA256 under the admin token, in hex
    (any string hashes, a cookie's odd characters included)."""
    key = environment.admin_token().encode()
    return hmac.new(key, sign_in.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


# --- the OpenAI-compatible route ----------------------------------------------------------------

OPENAI_OFF = (
    "the OpenAI-compatible route is off: start the app with ASSISTANT_OPENAI_API_KEY set and send "
    "it as the API key"
)


def openai_key_error(header: str | None) -> tuple[int, str] | None:
    """None when the `Authorization` header carries ASSISTANT_OPENAI_API_KEY; else (status,
    message). A key of its own: tools that call the model never hold the admin token."""
    key = environment.openai_api_key()
    if not key:
        return 403, OPENAI_OFF
    given = header[len("Bearer ") :] if header and header.startswith("Bearer ") else ""
    if not hmac.compare_digest(given.encode(), key.encode()):
        return 401, "missing or wrong API key ('Authorization: Bearer <key>')"
    return None
