"""Child processes that die with the app: an engine or a training worker is never left orphaned
holding memory, a port, or a half-written version folder after the app is gone."""

from __future__ import annotations

import signal
import sys


def die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the parent dies, even by kill -9 (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
