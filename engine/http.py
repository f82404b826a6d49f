"""HTTP clients for a vLLM server at `http(s)://host:port` or on a Unix socket (`unix:/path`).

The embedded engine listens on a Unix socket in a private (0700) directory: its development
endpoints (weight reload, pause, LoRA loading) are then reachable only by this user, not by every
local user as a loopback port would be. The app's engine client and the training worker's
rollouts both reach it through these two functions; an external server keeps its URL.
"""

from __future__ import annotations

import httpx

UNIX = "unix:"
_SOCKET_BASE = "http://engine"  # the Host of requests sent over the socket


def socket_url(path: str) -> str:
    return UNIX + path


def async_client(url: str, **kwargs) -> httpx.AsyncClient:
    """`kwargs` as for httpx.AsyncClient (timeout, limits)."""
    if url.startswith(UNIX):
        transport = httpx.AsyncHTTPTransport(
            uds=url[len(UNIX) :], limits=kwargs.pop("limits", httpx.Limits())
        )
        return httpx.AsyncClient(base_url=_SOCKET_BASE, transport=transport, **kwargs)
    return httpx.AsyncClient(base_url=url.rstrip("/"), **kwargs)


def client(url: str, **kwargs) -> httpx.Client:
    """A blocking client, for start-up checks and one-off calls."""
    if url.startswith(UNIX):
        transport = httpx.HTTPTransport(uds=url[len(UNIX) :])
        return httpx.Client(base_url=_SOCKET_BASE, transport=transport, **kwargs)
    return httpx.Client(base_url=url.rstrip("/"), **kwargs)
