"""The `assistant` command line's parser: every command, flag and help text, and the config
built from the flags given (`config_from_args`). Each command names the function that runs it
(`set_defaults(func=...)`); the commands live in their own modules (app, data, retrain, versions).

`RUN_GROUPS` maps `run`'s flags onto config fields; their help comes from the config dataclasses.
Nothing heavy is imported here, so `assistant --help` answers at once.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from alignment.config import PRESETS
from alignment.tracking import NONE, TRACKERS
from assistant.cli.app import cmd_provision, cmd_run
from assistant.cli.data import cmd_compact, cmd_export, cmd_import
from assistant.cli.retrain import cmd_retrain
from assistant.cli.versions import cmd_prune, cmd_push, cmd_rollback, cmd_versions
from assistant.config import SECTIONS, AppConfig, ServeConfig, database_location
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
        ("--ray-address", "loop", "ray_address", "ADDR"),
        ("--cycle-gpus", "loop", "cycle_gpus", "N"),
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
        type=database_location,
        default=None,
        metavar="FILE_OR_URL",
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
    commands = {
        run: cmd_run,
        prov: cmd_provision,
        exp: cmd_export,
        imp: cmd_import,
        compact: cmd_compact,
        retrain: cmd_retrain,
        versions: cmd_versions,
        rollback: cmd_rollback,
        prune: cmd_prune,
        push: cmd_push,
    }
    for command, func in commands.items():
        command.set_defaults(func=func)
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
        choices=[*TRACKERS, NONE],
        metavar="TRACKER",
        help="also send every stage's training metrics to this tracker (tensorboard, wandb, "
        "mlflow, trackio, none; docs/alignment.md); local logs go to "
        "DATA_DIR/versions/runs/VERSION (repeatable)",
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
