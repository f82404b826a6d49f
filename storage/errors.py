"""The one base of every error a caller may be told about, in every layer.

Storage, the chat service, the engine client and the sessions raise subclasses; each carries the
HTTP status the edge answers with, the message a caller may read, and when a retry can work.
The API maps them in one exception handler, the page shows `public()`, the CLI prints it; none
of them enumerates the classes. It lives in the bottom package so that every layer can import it
(storage imports nothing above itself); the status is a number, not an HTTP answer.
"""

from __future__ import annotations


class AppError(Exception):
    status: int = 500
    retry_after_s: int | None = None
    # What a caller without server access may read; None: the message itself. Subclasses whose
    # message names server things (paths, the engine's URL) set it and `log_detail`.
    public_message: str | None = None
    log_detail: bool = False

    def public(self) -> str:
        return self.public_message or str(self)
