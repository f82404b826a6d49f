"""`assistant retrain`: one cycle now, through the running app or on the database file, drawn
as progress bars and summed up in a few lines."""

from __future__ import annotations

import argparse
import sys

from assistant.cli.admin_client import admin_client
from assistant.config import AppConfig


def cmd_retrain(args: argparse.Namespace, config: AppConfig) -> int:
    config.validate()  # once, before anything starts; the cycle's settings resolved
    admin = admin_client(config, args.url, args.token)
    settings_given = any(
        v is not None for v in (args.retrain_preset, args.retrain_config, args.report_to)
    )
    summary = admin.retrain(show_progress, settings_given)
    print()
    keys = ("status", "version", "reason", "error", "swap_seconds", "cycle_seconds", "peak_rss_mb")
    for key in keys:
        if key in summary:
            print(f"{key}: {summary[key]}")
    if "reward" in summary:
        print(f"reward models: {_reward_line(summary['reward'])}")
    if (summary.get("budget") or {}).get("note"):
        print(f"budget: {summary['budget']['note']}")
    if "gate" in summary:
        print(f"gate: {summary['gate']['reason']}")
    if summary["status"] == "challenger":
        print(
            f"{summary['version']} passed the gate and is now the challenger: the users' votes "
            "on canary pairs promote or retire it (assistant versions, GET /api/canary)"
        )
    elif "canary" in summary:
        print(f"canary: {summary['canary']}")
    return 0 if summary["status"] in ("deployed", "rejected", "challenger") else 1


def show_progress(event: dict) -> None:
    """A cycle's progress line (`alignment.worker` writes them) on the terminal."""
    stage = event.get("stage")
    if stage == "reward_model" and "step" in event:
        member = event.get("member", 0)  # or "shared": the one they go on from
        label = f"reward model {member + 1}" if isinstance(member, int) else "reward models"
        _bar(label, event["step"], event.get("max_steps") or 1)
    elif stage == "ppo":
        _bar(
            "PPO",
            event["step"] + 1,
            event.get("max_steps") or event["step"] + 1,
            f"reward {event['reward_mean']:+.3f} KL {event['kl']:.3f}",
        )
    elif stage in ("waiting", "gate", "merge", "done", "failed") and len(event) > 2:
        print(
            f"\n[{stage}] "
            + ", ".join(f"{k}={v}" for k, v in event.items() if k not in ("time", "stage"))
        )


def _reward_line(r: dict) -> str:
    """The ensemble's check on the votes it never trained on, in one line."""
    line = f"{r.get('members', 1)} trained on {r['n_train']} votes"
    if r.get("verdict_pairs"):
        line += f" (and {r['verdict_pairs']} pairs from ties and both-bad votes)"
    if r.get("shared_steps"):
        line += f", each going on from one model trained {r['shared_steps']} steps on all of them"
    if r.get("heldout_accuracy") is None:
        return line + f", {r['n_heldout']} held out (too few to check)"
    members = ", ".join(f"{a:.2f}" for a in r.get("member_heldout_accuracy") or [])
    return (
        line
        + f"; agree with {r['heldout_accuracy']:.2f} of {r['n_heldout']} held-out votes"
        + (f" (each: {members})" if members else "")
    )


def _bar(label: str, done: int, total: int, note: str = "") -> None:
    width = 30
    filled = int(width * min(done, total) / max(total, 1))
    print(
        f"\r{label:13s} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {note}",
        end="",
        file=sys.stderr,
        flush=True,
    )
