"""`assistant` command line: parse, build a config, call one function.

Heavy libraries (vLLM, torch, gradio) are imported inside the commands, so `assistant --help`
answers at once.

  assistant run        start the page and API (default: embedded SmolLM2 on the CPU)
  assistant provision  make sure the embedded model checkpoint exists
  assistant export     write preference data (TRL, HH-RLHF, KTO, LMArena) or the users'
                       own replies (SFT) as JSONL or Parquet
  assistant import     seed the votes from a TRL or HH-RLHF preference dataset
  assistant retrain    one retrain-and-deploy cycle now (through the app if it runs)
  assistant versions   list versions with their gate figures
  assistant rollback   serve an earlier version
  assistant prune      delete old checkpoints (serving, previous and the newest N stay)
  assistant push       push a version (model) or the votes (dataset) to the Hugging Face Hub
  assistant compact    rewrite the database without what was deleted (the app does it when it
                       stops)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

from alignment.config import PRESETS
from assistant.config import SECTIONS, AppConfig, ConfigError, ServeConfig
from storage.export import FORMATS

# The `run` options that map straight onto a config field, in the groups `--help` shows:
# (flag, config section, field, metavar). Choices and defaults come from the config dataclasses.
RUN_GROUPS: dict[str, list[tuple[str, str, str, str]]] = {
    "model and engine": [
        ("--model", "engine", "model", "DIR|ORG/NAME"),
        ("--vllm-url", "engine", "vllm_url", "URL"),
        ("--engine-versions-dir", "engine", "versions_dir", "PATH"),
        ("--max-model-len", "engine", "max_model_len", "TOKENS"),
        ("--max-num-seqs", "engine", "max_num_seqs", "N"),
        ("--dtype", "engine", "dtype", "DTYPE"),
        ("--gpu-memory-utilization", "engine", "gpu_memory_utilization", "FRACTION"),
        ("--kv-cache-gib", "engine", "kv_cache_gib", "GIB"),
        ("--compile", "engine", "compile", "{auto,yes,no}"),
    ],
    "server": [
        ("--host", "serve", "host", "ADDRESS"),
        ("--port", "serve", "port", "PORT"),
        ("--max-backlog", "serve", "max_backlog", "TURNS"),
        ("--max-backlog-share", "serve", "max_backlog_share", "FRACTION"),
        ("--max-message-chars", "serve", "max_message_chars", "CHARS"),
        ("--system-prompt", "serve", "system_prompt", "TEXT"),
        ("--variant-share", "serve", "variant_share", "FRACTION"),
        ("--retention-days", "serve", "retention_days", "DAYS"),
        ("--session-days", "serve", "session_days", "DAYS"),
        ("--forwarded-allow-ips", "serve", "forwarded_allow_ips", "ADDRESSES"),
    ],
    "sampling (the two candidates)": [
        ("--temperature", "sampling", "temperature", "T"),
        ("--top-p", "sampling", "top_p", "P"),
        ("--max-new-tokens", "sampling", "max_new_tokens", "TOKENS"),
    ],
    "vote hygiene": [
        ("--reading-words-per-second", "serve", "reading_words_per_second", "WPS"),
        ("--max-votes-per-minute", "serve", "max_votes_per_minute", "N"),
        ("--max-votes-per-minute-per-address", "serve", "max_votes_per_minute_per_address", "N"),
        ("--max-votes-per-minute-total", "serve", "max_votes_per_minute_total", "N"),
        (
            "--max-sessions-per-minute-per-address",
            "serve",
            "max_sessions_per_minute_per_address",
            "N",
        ),
    ],
    "retrain loop": [
        ("--retrain-every-votes", "loop", "every_votes", "VOTES"),
        ("--retrain-every-minutes", "loop", "every_minutes", "MINUTES"),
        ("--retrain-poll-seconds", "loop", "poll_seconds", "SECONDS"),
        ("--max-vote-source-share", "loop", "max_source_share", "FRACTION"),
        ("--keep-versions", "loop", "keep_versions", "N"),
    ],
    "canary (users judge a new version first)": [
        ("--canary-share", "canary", "share", "FRACTION"),
        ("--canary-min-votes", "canary", "min_votes", "VOTES"),
        ("--canary-max-votes", "canary", "max_votes", "VOTES"),
    ],
    "Constitutional AI": [
        ("--cai-rounds", "cai", "rounds", "N"),
        ("--ai-label-weight", "cai", "ai_label_weight", "WEIGHT"),
    ],
}
RUN_OPTIONS = [(flag, sec, name) for group in RUN_GROUPS.values() for flag, sec, name, _ in group]
# The cycle's fields that have a flag: argparse dest -> the field (section.name, or a top-level
# field of alignment.config.CycleConfig). Given, a flag wins over both retrain files.
RETRAIN_FLAGS: dict[str, str] = {
    "sft": "sft.enabled",
    "report_to": "report_to",
    "retrain_budget_minutes": "budget_minutes",
}


def _field(cls: type, name: str):
    return next(f for f in fields(cls) if f.name == name)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help=_field(AppConfig, "data_dir").metadata["help"],
    )
    p.add_argument(
        "--db",
        type=Path,
        default=None,
        metavar="FILE",
        help=_field(AppConfig, "db_path").metadata["help"],
    )


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    parser = argparse.ArgumentParser(
        prog="assistant", description="A chat assistant that aligns itself from your votes."
    )
    try:
        installed = version("online-aligned-assistant")
    except PackageNotFoundError:  # run from a checkout without `pip install -e .`
        installed = "unknown"
    parser.add_argument("--version", action="version", version=f"assistant {installed}")
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser(
        "run",
        help="start the page and the JSON API",
        description="Start the page and the JSON API (and the embedded engine unless "
        "--vllm-url is given).",
        epilog="Admin actions (retrain, rollback, constitution edits, export) need the admin "
        "token: $ASSISTANT_ADMIN_TOKEN, or, when it is not set, a token generated on the first "
        "run, stored in DATA_DIR/secrets/admin-token and printed that once. Examples: "
        "`assistant run` (embedded SmolLM2 on the CPU); "
        "`assistant run --retrain-every-votes 30 --max-new-tokens 128`; "
        "`assistant run --vllm-url http://gpu-box:8000 --model /models/llama`.",
    )
    _add_common(run)
    run.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="YAML file with any of these settings (sections engine, serve, sampling, loop, cai, "
        "retrain; see examples/); flags given here override it",
    )
    groups = {title: run.add_argument_group(title) for title in RUN_GROUPS}
    for title, options in RUN_GROUPS.items():
        for flag, section, name, metavar in options:
            f = _field(SECTIONS[section], name)
            typ = {"int": int, "float": float}.get(str(f.type), str)
            repeatable = str(f.type).startswith("list")
            described = repeatable or f.default is None or "default" in f.metadata["help"]
            groups[title].add_argument(
                flag,
                dest=f"{section}.{name}",
                type=typ,
                default=None,
                action="append" if repeatable else "store",
                metavar=metavar,
                help=f.metadata["help"] + ("" if described else f" (default: {f.default})"),
            )
    groups["server"].add_argument(
        "--allowed-host",
        dest="allowed_hosts",
        action="append",
        default=[],
        metavar="NAME",
        help=_field(ServeConfig, "allowed_hosts").metadata["help"] + " (repeatable)",
    )
    groups["vote hygiene"].add_argument(
        "--single-user",
        action="store_true",
        help=_field(ServeConfig, "single_user").metadata["help"],
    )
    groups["Constitutional AI"].add_argument(
        "--constitution",
        type=Path,
        default=None,
        metavar="FILE",
        help="constitution JSON file (default: the shipped one)",
    )
    groups["Constitutional AI"].add_argument(
        "--sft",
        action="store_true",
        help="add an SFT stage to retrain cycles: on the replies users wrote (demonstrations) "
        "and the constitutional revisions",
    )
    groups["Constitutional AI"].add_argument(
        "--no-cai",
        action="store_true",
        help="do not run the background critique/revision and AI-judge worker",
    )
    _add_retrain_settings(groups["retrain loop"])
    groups["model and engine"].add_argument(
        "--vllm-arg",
        dest="vllm_args",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for the embedded `vllm serve` (repeatable), "
        "e.g. --vllm-arg=--enforce-eager",
    )

    prov = sub.add_parser("provision", help="provision the embedded model checkpoint (offline)")
    _add_common(prov)

    exp = sub.add_parser("export", help="export preference data for training")
    _add_common(exp)
    exp.add_argument(
        "--format",
        choices=list(FORMATS),
        default="trl",
        help="trl: conversational prompt/chosen/rejected; hh: HH-RLHF text; kto: TRL's "
        "unpaired prompt/completion/label, ties and both-bad included; arena: LMArena/FastChat "
        "battles between two versions (a canary's pairs); sft: the replies users wrote "
        "themselves, as TRL conversational SFT messages",
    )
    exp.add_argument(
        "--output", "-o", type=Path, required=True, help="output file: .jsonl or .parquet"
    )
    exp.add_argument(
        "--url",
        default="http://127.0.0.1:7860",
        help="running app to ask when the database is locked by it",
    )
    exp.add_argument(
        "--token",
        default=None,
        help="admin token for a running app (default: $ASSISTANT_ADMIN_TOKEN); exports "
        "contain users' conversations",
    )
    exp.add_argument(
        "--push",
        default=None,
        metavar="REPO",
        help="also upload the file with a dataset card to this Hugging Face Hub dataset repo "
        "(needs `hf auth login`; users' conversations: publish with their consent)",
    )
    exp.add_argument("--private", action="store_true", help="with --push: a private repo")
    push = sub.add_parser(
        "push",
        help="upload a version to the Hugging Face Hub, with a generated model card",
        description="Upload a version's checkpoint (an ordinary transformers checkpoint that "
        "`vllm serve` loads) with a model card: parent, votes trained on, the gate's figures. "
        "Needs the network and `hf auth login` (or HF_TOKEN).",
    )
    push.add_argument("version", help="version name, e.g. v0001")
    push.add_argument("--repo", required=True, metavar="NAME", help="Hub repo, e.g. you/my-model")
    push.add_argument("--private", action="store_true", help="create the repo private")
    retrain = sub.add_parser(
        "retrain", help="run one retrain-and-deploy cycle now (through the app if it runs)"
    )
    versions = sub.add_parser("versions", help="list model versions with status and metrics")
    rollback = sub.add_parser("rollback", help="serve an earlier version again")
    rollback.add_argument("version", help="version name, e.g. v0001")
    prune = sub.add_parser(
        "prune",
        help="delete old checkpoints: keeps serving, previous and the newest --keep versions",
    )
    prune.add_argument("--keep", type=int, default=3, help="newest versions to keep (default 3)")
    compact = sub.add_parser(
        "compact",
        help="rewrite the database file with only its live rows, while the app is stopped",
        description="Rewrite the database file with only its live rows, so that the text of "
        "deleted conversations is no longer in it (DuckDB's DELETE leaves it in the file). The "
        "app does this by itself when it stops, and when it starts after a crash.",
    )
    _add_common(compact)
    imp = sub.add_parser(
        "import",
        help="seed the votes from a preference dataset (TRL or HH-RLHF), while the app is stopped",
        description="Store each row of a preference dataset as a pair and a decisive vote for its "
        "chosen reply, from the source `import:NAME`, so the reward models train on it before "
        "users arrive. Reads JSON lines or Parquet in TRL's conversational or standard "
        "preference format (prompt/chosen/rejected, the prompt may be implicit) or HH-RLHF's "
        "text pairs. Every row is checked first: refused rows are listed, and then nothing is "
        "imported unless --skip-refused; the rest go in one transaction.",
    )
    _add_common(imp)
    imp.add_argument("file", type=Path, help="a .jsonl or .parquet file")
    imp.add_argument("--source", required=True, help="a name for where these votes come from")
    imp.add_argument(
        "--skip-refused", action="store_true", help="import the rows that pass, list the others"
    )
    for p in (retrain, versions, rollback, prune, push):
        _add_common(p)
        p.add_argument(
            "--url",
            default="http://127.0.0.1:7860",
            help="running app to ask when the database is locked by it",
        )
        p.add_argument(
            "--token",
            default=None,
            help="admin token for a running app (default: $ASSISTANT_ADMIN_TOKEN)",
        )
    retrain.add_argument(
        "--model",
        dest="engine.model",
        default=None,
        help="base checkpoint when no app is running (default: embedded)",
    )
    retrain.add_argument(
        "--single-user",
        action="store_true",
        help="without a running app: " + _field(ServeConfig, "single_user").metadata["help"],
    )
    _add_retrain_settings(retrain)
    return parser


def _add_retrain_settings(parser) -> None:
    """Cycle settings, shared by `run` (for its scheduler and admin triggers) and `retrain`."""
    parser.add_argument(
        "--retrain-preset",
        choices=list(PRESETS),
        default=None,
        help="cycle settings (fast: seconds on a tiny test model) (default: default)",
    )
    parser.add_argument(
        "--retrain-config",
        type=Path,
        default=None,
        metavar="FILE",
        help=_field(AppConfig, "retrain_config").metadata["help"],
    )
    parser.add_argument(
        "--report-to",
        action="append",
        default=None,
        choices=["tensorboard"],
        metavar="TRACKER",
        help="also send every stage's training metrics to this tracker (tensorboard); logs in "
        "DATA_DIR/versions/runs/VERSION/tensorboard (repeatable)",
    )
    parser.add_argument(
        "--retrain-budget-minutes",
        type=float,
        default=None,
        metavar="MINUTES",
        help="wall-clock budget of a retrain cycle (15): the reward models and PPO take the steps "
        "that fit on this machine; on a CPU without AVX-512 give it 50; 0: no budget",
    )


def config_from_args(args: argparse.Namespace) -> AppConfig:
    """The --config file if given (else the defaults), then every flag given over it."""
    if getattr(args, "config", None) is not None:
        from assistant.config_file import load_config_file

        config = load_config_file(args.config)
    else:
        config = AppConfig()
    if args.data_dir is not None:
        config.data_dir = args.data_dir
    if args.db is not None:
        config.db_path = args.db
    for key, value in vars(args).items():
        if "." in key and value is not None:
            section, name = key.split(".")
            setattr(getattr(config, section), name, value)
    if getattr(args, "constitution", None) is not None:
        config.cai.constitution = args.constitution
    if getattr(args, "single_user", False):
        config.serve.single_user = True
    if getattr(args, "no_cai", False):
        config.cai.enabled = False
    if getattr(args, "retrain_preset", None):
        config.retrain_preset = args.retrain_preset
    if getattr(args, "retrain_config", None) is not None:
        config.retrain_config = args.retrain_config
    for dest, entry in RETRAIN_FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None and value is not False:  # given (store_true left out: False)
            *sections, name = entry.split(".")
            target = config.retrain_flags
            for section in sections:
                target = target.setdefault(section, {})
            target[name] = value
    if getattr(args, "vllm_args", None):
        config.engine.extra_args = list(args.vllm_args)
    if getattr(args, "allowed_hosts", None):
        config.serve.allowed_hosts = list(args.allowed_hosts)
    return config


def cmd_export(args: argparse.Namespace, config: AppConfig) -> int:
    import json

    from storage import Store
    from storage.export import demonstration_records, preference_records, write_records

    if _app_holds_db(config):
        lines = _ask_app(args, "GET", "export", params={"format": args.format}).text.splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
    else:
        store = Store(config.database, read_only=True)
        try:
            records = (
                demonstration_records(store.demonstrations())
                if args.format == "sft"
                else preference_records(store.voted_pairs(), args.format)
            )
        finally:
            store.close()
    write_records(records, args.output)
    print(f"wrote {len(records)} records ({args.format}) to {args.output}")
    if args.push:
        import tempfile

        from assistant.hub import data_file_name, dataset_card, upload

        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            name = data_file_name(args.format, args.output.suffix)
            (folder / name).write_bytes(args.output.read_bytes())
            (folder / "README.md").write_text(dataset_card(len(records), args.format, name))
            print(f"pushed to {upload(folder, args.push, 'dataset', args.private)}")
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

    rows = _versions(args, config)["versions"]
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
        strip_server_paths(folder, [config.data_dir, config.database.parent, path])
        print(f"pushed {args.version} to {upload(folder, args.repo, 'model', args.private)}")
    return 0


def _app_holds_db(config: AppConfig) -> bool:
    """Whether a running app holds the database: then the CLI asks the app over HTTP."""
    from storage import DatabaseInUseError, Store

    try:
        Store(config.database, read_only=True).close()
    except DatabaseInUseError:
        return True
    return False


def _admin_token(args: argparse.Namespace) -> str:
    """$ASSISTANT_ADMIN_TOKEN, else the token `assistant run` stored in the data directory."""
    from assistant import environment
    from assistant.admin import stored_admin_token

    data_dir = config_from_args(args).data_dir
    return environment.admin_token() or stored_admin_token(data_dir) or ""


def _ask_app(
    args: argparse.Namespace,
    method: str,
    route: str,
    body: dict | None = None,
    params: dict | None = None,
):
    """The one way the CLI asks the running app (which holds the database): the admin token,
    the URL, and the app's refusals as errors the CLI prints."""
    import httpx

    print(f"the database is in use by the running app; asking it at {args.url}", file=sys.stderr)
    try:
        resp = httpx.request(
            method,
            f"{args.url.rstrip('/')}/api/{route}",
            json=body,
            params=params,
            headers=_app_headers(args),
            timeout=None,
        )
    except httpx.HTTPError as exc:
        raise ConfigError(
            f"the database is locked by another process and the app at "
            f"{args.url} did not answer ({exc}); pass --url"
        ) from exc
    _check_answer(resp)
    return resp


def _app_headers(args: argparse.Namespace) -> dict[str, str]:
    token = args.token or _admin_token(args)
    return {"Authorization": f"Bearer {token}"} if token else {}


def _check_answer(resp) -> None:
    """The app's refusal as an error the CLI prints."""
    if resp.status_code >= 400:
        resp.read()  # a streamed answer too
        try:
            error = resp.json().get("error", resp.text)
        except ValueError:  # not JSON: a proxy's page, say
            error = resp.text[:200]
        raise ConfigError(f"the app refused ({resp.status_code}): {error}")


def _call_app(args: argparse.Namespace, method: str, route: str, body: dict | None = None):
    return _ask_app(args, method, route, body).json()


def cmd_retrain(args: argparse.Namespace, config: AppConfig) -> int:
    import asyncio

    if _app_holds_db(config):
        if any(v is not None for v in (args.retrain_preset, args.retrain_config, args.report_to)):
            raise ConfigError(
                "the running app retrains with the settings it was started with "
                "(--retrain-preset, --retrain-config, --report-to or --config of `assistant run`); "
                "restart it "
                "with these, or stop it to retrain offline with them"
            )
        run_id = _call_app(args, "POST", "retrain")["run_id"]
        print(f"cycle {run_id} started; following its progress", file=sys.stderr)
        summary = _follow_cycle(args, run_id)
    else:
        from assistant.server import open_runtime

        runtime = open_runtime(config, on_progress=_show_progress)

        async def once():
            try:
                await runtime.start()
                return await runtime.loop.retrain()
            finally:
                await runtime.aclose()

        summary = asyncio.run(once())
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


def _show_progress(event: dict) -> None:
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
    elif stage in ("gate", "merge", "done", "failed") and len(event) > 2:
        print(
            f"\n[{stage}] "
            + ", ".join(f"{k}={v}" for k, v in event.items() if k not in ("time", "stage"))
        )


def _follow_cycle(args: argparse.Namespace, run_id: str) -> dict:
    """Follow a cycle the app runs through its progress stream (GET /api/retrain/ID/events),
    drawing the progress bar; returns its summary. A dropped stream is taken up again where it
    broke (Last-Event-ID)."""
    import httpx

    url = f"{args.url.rstrip('/')}/api/retrain/{run_id}/events"
    seen, drops = 0, 0
    while True:
        headers = {**_app_headers(args), "Last-Event-ID": str(seen)}
        try:
            # the app sends a comment at least every 15 s while the cycle runs
            with httpx.stream("GET", url, headers=headers, timeout=httpx.Timeout(60)) as resp:
                _check_answer(resp)
                for kind, n, data in _server_sent_events(resp.iter_lines()):
                    if kind == "result":
                        return data
                    seen, drops = n, 0
                    _show_progress(data)
            problem = "the stream ended before the cycle did"
        except httpx.HTTPError as exc:
            problem = str(exc) or type(exc).__name__
        drops += 1
        if drops > 3:
            raise ConfigError(
                f"lost the app's progress stream ({problem}); the cycle goes on: "
                f"GET /api/retrain/{run_id} says how it ends"
            )
        time.sleep(2)


def _server_sent_events(lines) -> Iterator[tuple[str, int, dict]]:
    """(event, id, JSON data) for each event in a text/event-stream, comments skipped."""
    kind, number, data = "message", 0, ""
    for line in lines:
        if not line:
            if data:
                yield kind, number, json.loads(data)
            kind, data = "message", ""
        elif not line.startswith(":"):
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                kind = value
            elif field == "id" and value.isdigit():
                number = int(value)
            elif field == "data":
                data += value


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


def _versions(args: argparse.Namespace, config: AppConfig) -> dict:
    """`{"serving", "versions"}`: from the running app when it holds the database (with server
    paths: the CLI sends the admin token), else from the file."""
    if _app_holds_db(config):
        return _call_app(args, "GET", "versions")
    from storage import Store

    store = Store(config.database, read_only=True)
    try:
        rows = store.model_versions()
    finally:
        store.close()
    serving = next((r["version"] for r in rows if r["status"] == "serving"), None)
    return {"serving": serving, "versions": rows}


def cmd_versions(args: argparse.Namespace, config: AppConfig) -> int:
    from alignment.stats import format_interval

    data = _versions(args, config)
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
    if _app_holds_db(config):
        result = _call_app(args, "POST", "rollback", {"version": args.version})
        print(f"serving {result['version']} (swap {result['swap_seconds']:.2f} s)")
        return 0
    from storage import Store

    store = Store(config.database)
    try:
        store.servable_path(args.version)  # refuses a rejected or pruned version
        store.set_serving(args.version, 0.0)
    finally:
        store.close()
    print(f"{args.version} will be served at the next start (no app is running)")
    return 0


def cmd_prune(args: argparse.Namespace, config: AppConfig) -> int:
    if _app_holds_db(config):
        result = _call_app(args, "POST", "prune", {"keep": args.keep})
    else:
        from alignment.pruning import prune
        from storage import Store

        store = Store(config.database)
        try:
            result = prune(store, config.data_dir / "versions", args.keep).as_dict()
        finally:
            store.close()
    print(
        f"pruned {len(result['pruned'])} version(s) {', '.join(result['pruned']) or ''}"
        f"(freed {result['freed_mb']} MB); kept {', '.join(result['kept'])}"
    )
    return 0


def cmd_compact(args: argparse.Namespace, config: AppConfig) -> int:
    from storage.compaction import compact

    before, after = compact(config.database)  # refused while the app holds the database
    print(f"compacted {config.database}: {before:,} -> {after:,} bytes")
    return 0


def cmd_import(args: argparse.Namespace, config: AppConfig) -> int:
    from storage import Store
    from storage.importing import parse_rows, read_rows

    if not args.file.is_file():
        raise ConfigError(f"{args.file}: no such file")
    pairs, refused = parse_rows(read_rows(args.file))
    for r in refused[:20]:
        print(f"row {r.row}: {r.reason}", file=sys.stderr)
    if len(refused) > 20:
        print(f"... and {len(refused) - 20} more refused rows", file=sys.stderr)
    if refused and not args.skip_refused:
        print(
            f"nothing imported: {len(refused)} of {len(pairs) + len(refused)} rows refused "
            "(fix them, or pass --skip-refused to import the others)",
            file=sys.stderr,
        )
        return 1
    store = Store(config.database)  # refused while the app holds the database
    try:
        n = store.import_preferences(pairs, args.source)
    finally:
        store.close()
    print(
        f"imported {n} preference pairs as votes from import:{args.source}"
        + (f" ({len(refused)} rows refused)" if refused else "")
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from storage import AppError

    try:
        config = config_from_args(args)
        if args.command in ("run", "retrain"):
            config.validate()  # once, before anything starts; the cycle's settings resolved
        if args.command == "run":
            from assistant.server import serve

            serve(config)
        elif args.command == "provision":
            from engine.provision import provision_embedded

            print(provision_embedded(config.data_dir))
        elif args.command == "export":
            return cmd_export(args, config)
        elif args.command == "prune":
            return cmd_prune(args, config)
        elif args.command == "retrain":
            return cmd_retrain(args, config)
        elif args.command == "versions":
            return cmd_versions(args, config)
        elif args.command == "rollback":
            return cmd_rollback(args, config)
        elif args.command == "push":
            return cmd_push(args, config)
        elif args.command == "compact":
            return cmd_compact(args, config)
        elif args.command == "import":
            return cmd_import(args, config)
    except AppError as exc:  # every error a user may be told about (storage.errors)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
