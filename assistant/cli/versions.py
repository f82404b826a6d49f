"""`assistant versions`, `rollback`, `prune` and `push`: the model versions, through the running
app or on the database file (`admin_client` picks)."""

from __future__ import annotations

import argparse
from pathlib import Path

from assistant.cli.admin_client import admin_client
from assistant.config import AppConfig


def cmd_versions(args: argparse.Namespace, config: AppConfig) -> int:
    from alignment.stats import format_interval

    data = admin_client(config, args.url, args.token).versions()
    print(f"{'version':8s} {'status':9s} {'parent':8s} {'created':20s} metrics")
    for v in data["versions"]:
        m = v.get("manifest") or {}
        gate = m.get("gate") or {}
        acc = (m.get("reward") or {}).get("heldout_accuracy")
        metrics = (
            f"win={_rate(gate.get('win_rate'))} {format_interval(gate.get('interval'))} "
            f"n={gate.get('comparisons')} kl={_rate(gate.get('kl'))} rm_acc={_rate(acc)}"
            if gate
            else m.get("model", "")
        )
        print(
            f"{v['version']:8s} {v['status']:9s} {v['parent'] or '-':8s} "
            f"{v['created_at'][:19]:20s} {metrics}"
        )
    return 0


def _rate(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def cmd_rollback(args: argparse.Namespace, config: AppConfig) -> int:
    done = admin_client(config, args.url, args.token).rollback(args.version)
    if done.swap_seconds is None:
        print(f"{done.version} will be served at the next start (no app is running)")
    else:
        print(f"serving {done.version} (swap {done.swap_seconds:.2f} s)")
    return 0


def cmd_prune(args: argparse.Namespace, config: AppConfig) -> int:
    result = admin_client(config, args.url, args.token).prune(args.keep)
    print(
        f"pruned {len(result['pruned'])} version(s) {', '.join(result['pruned']) or ''}"
        f"(freed {result['freed_mb']} MB); kept {', '.join(result['kept'])}"
    )
    return 0


def cmd_push(args: argparse.Namespace, config: AppConfig) -> int:
    """A version folder plus a generated card, uploaded as a model repo."""
    import shutil
    import tempfile

    from assistant.hub import (
        HubError,
        base_model,
        model_card,
        public_name,
        strip_server_paths,
        upload,
    )

    rows = admin_client(config, args.url, args.token).versions()["versions"]
    version = next((r for r in rows if r["version"] == args.version), None)
    if version is None:
        raise HubError(f"no version {args.version!r}: see `assistant versions`")
    path = Path(version.get("path") or "")
    if not (path / "config.json").exists():
        raise HubError(f"{args.version}'s weights are not on disk (pruned?): nothing to push")
    base, license = base_model(rows, version, config.engine.model)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / args.version
        shutil.copytree(path, folder, symlinks=False)
        (folder / "README.md").write_text(model_card(version, public_name(base), license))
        local = [] if config.on_postgres else [config.database.parent]
        strip_server_paths(folder, [config.data_dir, *local, path])
        print(f"pushed {args.version} to {upload(folder, args.repo, 'model', args.private)}")
    return 0
