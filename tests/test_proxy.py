"""Behind the documented reverse proxy, the per-address controls count the real client.

A real nginx (Debian's; `make test` installs it) runs the `location` block of
docs/deployment.md, as written there, in front of `assistant run --forwarded-allow-ips
127.0.0.1`. Clients connect to it from different loopback addresses (127.0.0.2, 127.0.0.3: all of
127.0.0.0/8 is this machine) and send made-up `X-Forwarded-For` headers, which the block must
replace with the address they really come from.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.proxy

REPO = Path(__file__).resolve().parents[1]
DOCUMENTED_UPSTREAM = "http://127.0.0.1:7860"


def documented_location_block() -> str:
    """The nginx block docs/deployment.md tells operators to use, verbatim."""
    text = (REPO / "docs" / "deployment.md").read_text()
    blocks = re.findall(r"```nginx\n(.*?)```", text, re.S)
    assert len(blocks) == 1, "docs/deployment.md should have one nginx block"
    assert DOCUMENTED_UPSTREAM in blocks[0]
    return blocks[0]


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.fixture
def nginx_in_front(tmp_path) -> Iterator:
    """Start nginx with the documented block proxying to an app's port; yields a function that
    takes the app's port and returns nginx's URL. Stopped after the test."""
    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if binary is None:
        pytest.fail("nginx is not installed: run `make test`, which installs Debian's nginx")
    procs: list[subprocess.Popen] = []

    def start(app_port: int) -> str:
        port = _free_port()
        prefix = tmp_path / "nginx"
        prefix.mkdir()
        location = documented_location_block().replace(
            DOCUMENTED_UPSTREAM, f"http://127.0.0.1:{app_port}"
        )
        temp = "\n".join(
            f"    {kind}_temp_path {prefix / kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (prefix / "nginx.conf").write_text(
            f"daemon off;\nmaster_process off;\npid {prefix / 'nginx.pid'};\n"
            f"error_log {prefix / 'error.log'} warn;\nevents {{}}\n"
            f"http {{\n    access_log off;\n{temp}\n"
            f"    server {{\n        listen 127.0.0.1:{port};\n{location}\n    }}\n}}\n"
        )
        proc = subprocess.Popen(
            [binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", "stderr"],
            stdout=subprocess.DEVNULL,
            stderr=open(prefix / "stderr.log", "wb"),  # noqa: SIM115 - closed with the process
        )
        procs.append(proc)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {(prefix / 'stderr.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return f"http://127.0.0.1:{port}"
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("nginx did not start listening in 30 s")

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _from(address: str) -> httpx.Client:
    """A client connecting from `address`: to the app, someone else."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=120)


def test_behind_the_documented_proxy_limits_count_the_real_client(tiny_app_factory, nginx_in_front):
    app = tiny_app_factory(
        "--forwarded-allow-ips", "127.0.0.1",
        "--max-votes-per-minute-per-address", "2",
        "--max-sessions-per-minute-per-address", "2",
    )  # fmt: skip
    proxy = nginx_in_front(app.port)
    alice, bob, local = _from("127.0.0.2"), _from("127.0.0.3"), _from("127.0.0.4")
    try:
        turns = [alice.post(proxy + "/api/chat", json={"message": "hi"}) for _ in range(5)]
        assert all(t.status_code == 200 for t in turns), turns[0].text  # the API, proxied
        pairs = [t.json()["pair_id"] for t in turns]

        def vote(client: httpx.Client, url: str, pair: str, spoofed: str) -> httpx.Response:
            return client.post(
                url + "/api/vote",
                json={"pair_id": pair, "choice": "a"},
                headers={"X-Forwarded-For": spoofed},
            )

        # alice makes up a new address for every vote: the proxy tells the app her own
        assert vote(alice, proxy, pairs[0], "10.1.1.1").status_code == 200
        assert vote(alice, proxy, pairs[1], "10.1.1.2").status_code == 200
        refused = vote(alice, proxy, pairs[2], "10.1.1.3")
        assert refused.status_code == 429, refused.text
        assert "from this address: at most 2 a minute" in refused.json()["error"]
        # bob, behind the same proxy, is someone else (not one address for everybody)
        assert vote(bob, proxy, pairs[2], "127.0.0.2").status_code == 200
        # past the proxy, straight to the app, a header naming alice is not believed
        assert vote(local, app.url, pairs[3], "127.0.0.2").status_code == 200

        # sessions issued per address: alice's third in a minute is refused, made-up header
        # or not; the page then serves her without a new session; bob still gets his
        for spoofed in ("10.1.1.4", "10.1.1.5"):
            issued = alice.post(proxy + "/api/session", headers={"X-Forwarded-For": spoofed})
            assert issued.status_code == 200, issued.text
        refused = alice.post(proxy + "/api/session", headers={"X-Forwarded-For": "10.1.1.6"})
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
        assert "too many new sessions from this address" in refused.json()["error"]
        alice.cookies.clear()  # a visit without the sessions she was issued
        page = alice.get(proxy + "/")
        assert page.status_code == 200 and "set-cookie" not in page.headers
        assert "assistant_session=" in bob.get(proxy + "/").headers["set-cookie"]
        assert bob.post(proxy + "/api/session").status_code == 200
    finally:
        for client in (alice, bob, local):
            client.close()
