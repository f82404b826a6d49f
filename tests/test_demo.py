"""`make demo` as a newcomer runs it: it must show a gain, or say plainly that it did not."""

from __future__ import annotations

import subprocess
import sys

import pytest

from harness.app_process import REPO

pytestmark = pytest.mark.cycle  # a whole retrain cycle: make test-fast leaves it out


def test_the_demo_shows_the_loop_learning_or_says_it_did_not(tmp_path):
    demo = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.demo",
            "--exit",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path / "demo"),
        ],  # fmt: skip
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    out = demo.stdout
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "simulated users who like cheerful replies are voting" in out
    assert "decisive votes; v0's replies are liked" in out
    shown = [line for line in out.splitlines() if "is serving: liked" in line]
    said_not = [line for line in out.splitlines() if "no gain shown" in line]
    assert shown or said_not, out
    if shown:
        assert "(a gain)" in shown[0] or "(no gain)" in shown[0]
