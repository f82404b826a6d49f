"""Runs docs/tutorial.md as written and times it: from `make run` to a first deployed version.

`assistant run` starts with the flags of the tutorial's `make run ARGS="..."` line, read from
docs/tutorial.md itself (so the two cannot drift apart), plus `--single-user`, which `make run`
adds. A scripted user then does what the tutorial tells a person to do, through the HTTP API
the page uses (`POST /api/session`, `/api/chat`, `/api/vote`): one question at a time on
varied topics, one new conversation each, and a vote for the reply that gets to the point
(`judge`: bench.smol_learning's `opening` preference first, then the tutorial's tie-break).
It never asks for a cycle: the scheduler starts one by itself at the tutorial's vote count. When
the page would say "A retrain starts shortly" the user stops and waits, as the tutorial says,
until the cycle has ended; while the new version is tried (every turn, `--canary-share 1`) it
chats and votes again until the votes promote or retire it. A cycle the gate rejects, or a
challenger the votes retire, is reported as such, and the user goes on to a second cycle within
`--max-minutes`.

Flags the script adds to the tutorial's, and why none changes the time of what a person does:
  --data-dir (a fresh temporary folder) and --port 0 (AppProcess): a first start, v0000 and no
      votes, on a free port;
  --model data/models/SmolLM2-135M-Instruct: the embedded model `make run` serves, from this
      checkout (the fresh folder has no copy; `make run` finds the same files in data/);
  --reading-words-per-second 0: the script votes as soon as both replies are in, where a person
      reads them first; the app would flag such votes as too fast and leave them out of
      training. Reading time is not slept but estimated, as a separate figure (below).
No rate-limit flag: one user, one turn at a time, stays far under the 30 votes a minute a
session may cast. The admin token (for `GET /metrics`: whether a cycle runs, how cycles ended)
is the one the app generates at its first start, as for a person.

Times are wall clock on this machine: the app's start until the engine is ready; the turns
until the cycle's vote count (machine time: the replies being generated, the requests); the
wait for the scheduler (it looks every 10 s); the cycle; the canary; the total to the first
deployed version. Polling adds at most a few seconds to each. A person also reads and types:
the estimate adds, per voted turn, both replies' words at 15 words a second (the app's own
floor: a faster vote is flagged; reading carefully takes longer) and 5 s to type a question.

Run: `.venv/bin/python -m bench.tutorial` (30-45 minutes on 2 cores; nothing else should run).
It prints a markdown table and one JSON line. `--data-dir DIR` keeps the app's folder (its
database, versions and logs) for a look afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from alignment.stats import format_interval
from bench.smol_learning import FAMILIES, SMOL, TOPICS, answers, first_sentence, prompts, words
from engine.hardware import cpu_has_bf16
from harness.app_process import AppProcess

REPO = Path(__file__).resolve().parents[1]
TUTORIAL = REPO / "docs/tutorial.md"
MAKE_RUN = re.compile(r'^make run ARGS="([^"]*)"', re.M)
MAKE_RUN_ADDS = ["--single-user"]  # the Makefile's SINGLE_USER default
SCRIPT_ADDS = ["--model", str(SMOL), "--reading-words-per-second", "0"]
READING_WPS = 15.0  # the app's default --reading-words-per-second: a faster vote is flagged
TYPING_S = 5.0  # a person typing a short question
CLEARLY_SOONER = 4  # words: a first sentence this much shorter gets to the point sooner
CYCLE_STATUSES = ("challenger", "deployed", "rejected", "failed", "refused")


def tutorial_args(path: Path = TUTORIAL) -> list[str]:
    """The flags of the tutorial's `make run ARGS="..."` line: what the person starts."""
    found = MAKE_RUN.findall(path.read_text())
    if len(found) != 1:
        raise SystemExit(f'{path} must have exactly one line starting `make run ARGS="..."`')
    return shlex.split(found[0])


def flag_value(args: list[str], flag: str) -> str:
    if flag not in args:
        raise SystemExit(f"the tutorial's make run line has no {flag}: the script needs its value")
    return args[args.index(flag) + 1]


def judge(a: str, b: str, topic: str) -> str:
    """The tutorial's voter. A reply that gets to the point (bench.smol_learning's `opening`:
    a first sentence of at most 12 words, in a reply that names the topic and has 12 words or
    more) beats one that does not. Otherwise a reply that answers beats one that does not;
    between two that answer, a first sentence clearly shorter (by `CLEARLY_SOONER` words) wins,
    else Tie; Both bad when neither answers. The tie-break is what a person told "pick the one
    that gets there sooner" does, and keeps Tie for replies alike: `opening` alone is decisive
    on about 0.4 of SmolLM2's pairs (bench/RESULTS.md), which would need 2.5 turns a vote."""
    liked = FAMILIES["opening"]
    la, lb = liked(a, topic), liked(b, topic)
    if la != lb:
        return "a" if la else "b"
    aa, ab = answers(a, topic), answers(b, topic)
    if aa != ab:
        return "a" if aa else "b"
    if not aa:
        return "both_bad"
    na, nb = len(words(first_sentence(a))), len(words(first_sentence(b)))
    if abs(na - nb) >= CLEARLY_SOONER:
        return "a" if na < nb else "b"
    return "tie"


@dataclass
class Phase:
    """Turns chatted and voted in one step of the tutorial, and its wall-clock time."""

    name: str
    started: float = field(default_factory=time.monotonic)
    seconds: float = 0.0  # machine time: the phase's wall clock
    turns: int = 0
    votes: Counter = field(default_factory=Counter)  # choice -> count
    words: int = 0  # in both replies of every voted turn
    detail: dict = field(default_factory=dict)

    @property
    def reading_s(self) -> float:
        """What a person adds: reading both replies at the app's floor, typing the question."""
        return self.words / READING_WPS + self.turns * TYPING_S

    def end(self) -> Phase:
        self.seconds = time.monotonic() - self.started
        return self

    def row(self) -> dict:
        return {
            "name": self.name,
            "seconds": round(self.seconds, 1),
            "reading_s": round(self.reading_s, 1),
            "turns": self.turns,
            "votes": dict(self.votes),
            "words": self.words,
            **self.detail,
        }


class TutorialUser:
    """One person on the page: one session, one question at a time, a vote on every turn."""

    def __init__(self, app: AppProcess, seed: int) -> None:
        self.app = app
        self.http = httpx.Client(base_url=app.url, timeout=600, headers=app.new_session())
        self.items = prompts(TOPICS, random.Random(seed))
        self.asked = 0
        self.decisive_since_cycle = 0  # what the scheduler counts: A or B since the last start

    def turn(self, phase: Phase) -> dict:
        message, topic = self.items[self.asked % len(self.items)]
        self.asked += 1
        chat = self._post("/api/chat", {"message": message})
        a, b = (c["text"] for c in chat["candidates"])
        choice = judge(a, b, topic)
        vote = self._post("/api/vote", {"pair_id": chat["pair_id"], "choice": choice})
        if vote.get("flagged"):
            raise RuntimeError(f"a vote was flagged ({vote['flagged']}): it would not count")
        phase.turns += 1
        phase.votes[choice] += 1
        phase.words += len(a.split()) + len(b.split())
        self.decisive_since_cycle += choice in ("a", "b")
        return vote

    def _post(self, path: str, body: dict) -> dict:
        """A request as the page makes it; busy (503) or over a limit (429): wait as told."""
        while True:
            r = self.http.post(path, json=body)
            if r.status_code not in (429, 503):
                r.raise_for_status()
                return r.json()
            time.sleep(float(r.headers.get("Retry-After", 5)))

    def get(self, path: str, admin: bool = False) -> httpx.Response:
        r = self.http.get(path, headers=self.app.admin_headers() if admin else None)
        r.raise_for_status()
        return r

    def cycles(self) -> Counter:
        """Cycles by status, from `GET /metrics` ("running" while one runs)."""
        out: Counter = Counter()
        for status, n in re.findall(
            r'^assistant_cycles_total\{status="(\w+)"\} (\S+)$',
            self.get("/metrics", True).text,
            re.M,
        ):
            out[status] = int(float(n))
        return out

    def canary(self) -> dict:
        return self.get("/api/canary").json()

    def versions(self) -> dict:
        return self.get("/api/versions").json()


class Clock:
    """The run's deadline (`--max-minutes` from the app's launch) and its elapsed time."""

    def __init__(self, minutes: float) -> None:
        self.t0 = time.monotonic()
        self.deadline = self.t0 + 60 * minutes

    def left(self) -> bool:
        return time.monotonic() < self.deadline

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


def chat_until_count(user: TutorialUser, every_votes: int, clock: Clock, n: int) -> Phase:
    """Chat and vote until the page would say "A retrain starts shortly"."""
    phase = Phase(f"turns until cycle {n}")
    while user.decisive_since_cycle < every_votes and clock.left():
        user.turn(phase)
    return phase.end()


def wait_for_cycle(user: TutorialUser, clock: Clock, before: Counter, n: int) -> tuple[Phase, ...]:
    """The wait for the scheduler to start cycle `n`, then the cycle itself, until it ends.
    `before`: the cycles by status before its turns (a cycle refused by the scheduler never
    runs; it only adds a row)."""
    known = {v["version"] for v in user.versions()["versions"]}
    pickup = Phase(f"scheduler starts cycle {n}")
    while clock.left():
        now = user.cycles()
        if now["running"] or now.total() > before.total():
            break
        time.sleep(1)
    pickup.end()
    user.decisive_since_cycle = 0  # votes from now on count toward the next cycle
    cycle = Phase(f"cycle {n}")
    outcome = None
    while clock.left():
        now = user.cycles()
        if not now["running"]:
            ended = [s for s in CYCLE_STATUSES if now[s] > before[s]]
            if ended:
                outcome = ended[0]
                break
        time.sleep(2)
    cycle.end()
    cycle.detail["status"] = outcome or "unfinished (--max-minutes)"
    new = [v for v in user.versions()["versions"] if v["version"] not in known]
    if new:
        version = max(new, key=lambda v: v["version"])  # v0001, v0002: one new per cycle
        m = version.get("manifest") or {}
        gate, reward = m.get("gate") or {}, m.get("reward") or {}
        cycle.detail |= {
            "version": version["version"],
            "rm_heldout": reward.get("heldout_accuracy"),
            "gate_win_rate": gate.get("win_rate"),
            "gate_interval": gate.get("interval"),
            "gate_comparisons": gate.get("comparisons"),
            "gate_kl": gate.get("kl"),
            "reason": gate.get("reason"),
            "budget": (m.get("budget") or {}).get("note"),
        }
    return pickup, cycle


def try_challenger(user: TutorialUser, clock: Clock, n: int) -> Phase:
    """Chat and vote while the challenger is tried, until the votes decide it."""
    phase = Phase(f"canary {n}")
    status = user.canary()
    while status["decision"] == "running" and clock.left():
        user.turn(phase)
        status = user.canary()
    if status["decision"] == "promoted":  # deployed once it serves everybody
        while user.versions()["serving"] != status["challenger"] and clock.left():
            time.sleep(1)
    phase.end()
    phase.detail |= {
        "decision": status["decision"] if status["decision"] != "running" else "unfinished",
        "challenger": status["challenger"],
        "canary_votes": status["votes"],
        "win_rate": status["win_rate"],
        "interval": status["interval"],
        "reason": status["reason"],
    }
    return phase


def run(max_minutes: float, seed: int, data_dir: Path) -> dict:
    args = tutorial_args()
    every_votes = int(flag_value(args, "--retrain-every-votes"))
    app_args = [*MAKE_RUN_ADDS, *args, *SCRIPT_ADDS]
    clock = Clock(max_minutes)
    app = AppProcess(app_args, data_dir).start()
    start = Phase("app start (engine ready)")
    start.started, start.seconds = clock.t0, clock.elapsed()
    phases, deployed, serving, error = [start], None, {"serving": None, "versions": []}, None
    try:
        user = TutorialUser(app, seed)
        for n in (1, 2):  # the first cycle, and a second if the first deployed nothing
            if not clock.left():
                break
            before = user.cycles()
            phases.append(chat_until_count(user, every_votes, clock, n))
            if not clock.left():
                break
            pickup, cycle = wait_for_cycle(user, clock, before, n)
            phases += [pickup, cycle]
            if cycle.detail["status"] == "deployed":  # deployed at the gate: no canary
                deployed = clock.elapsed()
                break
            if cycle.detail["status"] != "challenger":
                continue
            canary = try_challenger(user, clock, n)
            phases.append(canary)
            if canary.detail["decision"] == "promoted":
                deployed = clock.elapsed()
                break
        serving = user.versions()
    except Exception as exc:  # noqa: BLE001 - print what was measured, and why it stopped
        error = f"{type(exc).__name__}: {exc}"
        print(
            f"stopped: {error}; the app's log ends:\n{app.log.read_text()[-3000:]}", file=sys.stderr
        )
    finally:
        app.stop()
    return {
        "tutorial_args": args,
        "app_args": app_args,
        "phases": [p.row() for p in phases],
        "deployed_after_s": round(deployed, 1) if deployed is not None else None,
        "reading_s": round(sum(p.reading_s for p in phases), 1),
        "serving": serving["serving"],
        "ratings": {v["version"]: v.get("rating") for v in serving["versions"]},
        "max_minutes": max_minutes,
        "error": error,
        "machine": machine(),
    }


def machine() -> dict:
    model = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    return {
        "cpu": model.group(1) if model else None,
        "cores": os.cpu_count(),
        "bf16": cpu_has_bf16(),
        "commit": commit,
    }


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f}"


def table(result: dict) -> str:
    """The run as the tutorial's "How long it takes" table."""
    lines = [
        "| step | machine (min) | + a person reading (min, est.) | what happened |",
        "|---|---|---|---|",
    ]
    for p in result["phases"]:
        votes = p["votes"]
        said = (
            f"{p['turns']} turns: {votes.get('a', 0) + votes.get('b', 0)} A/B, "
            f"{votes.get('tie', 0)} tie, {votes.get('both_bad', 0)} both bad"
            if p["turns"]
            else ""
        )
        if "status" in p:
            said = p["status"] + (f" {p['version']}" if p.get("version") else "")
            if p.get("gate_win_rate") is not None:
                said += (
                    f"; reward models {p['rm_heldout'] or 0:.2f} on held-out votes; gate win rate "
                    f"{p['gate_win_rate']:.2f} {format_interval(p['gate_interval'])} on "
                    f"{p['gate_comparisons']}"
                )
            if p["status"] == "rejected" and p.get("reason"):
                said += f": {p['reason']}"
        if "decision" in p:
            if p.get("win_rate") is not None:
                said += f"; its win rate {p['win_rate']:.2f} {format_interval(p['interval'])}"
            said += f"; {p['decision']}: {p['reason']}"
        extra = minutes(p["reading_s"]) if p["reading_s"] else ""
        lines.append(f"| {p['name']} | {minutes(p['seconds'])} | {extra} | {said} |")
    done = result["deployed_after_s"]
    if result["error"]:
        lines.append(f"| **stopped by an error** | | | {result['error'].splitlines()[0]} |")
    if done is None:
        lines.append(f"| **no version deployed** within {result['max_minutes']:g} min | | | |")
    else:
        person = done + result["reading_s"]
        lines.append(
            f"| **total to {result['serving']} serving** | **{minutes(done)}** | "
            f"**{minutes(person)}** with reading | |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--max-minutes", type=float, default=45,
        help="stop after this long from the app's launch, deployed or not (default 45)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=1, help="the order of the questions")
    parser.add_argument(
        "--data-dir", type=Path, default=None,
        help="the app's data folder, kept afterwards (default: a temporary one, removed); "
        "it must not exist yet: the tutorial starts from v0000 and no votes",
    )  # fmt: skip
    args = parser.parse_args()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if args.data_dir is not None:
        if args.data_dir.exists():
            parser.error(f"{args.data_dir} exists: give a new folder")
        result = run(args.max_minutes, args.seed, args.data_dir)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = run(args.max_minutes, args.seed, Path(tmp))
    print(table(result), flush=True)
    print(json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    main()
