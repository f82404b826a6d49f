"""`assistant` command line: parse, build a config, call one function.

Heavy libraries (vLLM, torch, gradio) are imported inside the commands, so `assistant --help`
answers at once.

  assistant run        start the page and API (default: embedded SmolLM2 on the CPU)
  assistant provision  make sure the embedded model checkpoint exists
  assistant export     write preference data (TRL or HH-RLHF format) as JSONL or Parquet
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from assistant.config import AppConfig, ConfigError, EngineConfig, SamplingConfig, ServeConfig

# (flag, config section, field) for every option that maps straight onto a config field.
RUN_OPTIONS = [
    ("--model", "engine", "model"),
    ("--vllm-url", "engine", "vllm_url"),
    ("--max-model-len", "engine", "max_model_len"),
    ("--max-num-seqs", "engine", "max_num_seqs"),
    ("--dtype", "engine", "dtype"),
    ("--gpu-memory-utilization", "engine", "gpu_memory_utilization"),
    ("--kv-cache-gib", "engine", "kv_cache_gib"),
    ("--compile", "engine", "compile"),
    ("--host", "serve", "host"),
    ("--port", "serve", "port"),
    ("--max-backlog", "serve", "max_backlog"),
    ("--max-message-chars", "serve", "max_message_chars"),
    ("--system-prompt", "serve", "system_prompt"),
    ("--temperature", "sampling", "temperature"),
    ("--top-p", "sampling", "top_p"),
    ("--max-new-tokens", "sampling", "max_new_tokens"),
]
SECTIONS = {"engine": EngineConfig, "serve": ServeConfig, "sampling": SamplingConfig}


def _field(cls: type, name: str):
    return next(f for f in fields(cls) if f.name == name)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir", type=Path, default=None, help=_field(AppConfig, "data_dir").metadata["help"]
    )
    p.add_argument(
        "--db", type=Path, default=None, help=_field(AppConfig, "db_path").metadata["help"]
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="assistant", description="A chat assistant that aligns itself from your votes."
    )
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="start the page and the JSON API")
    _add_common(run)
    for flag, section, name in RUN_OPTIONS:
        f = _field(SECTIONS[section], name)
        typ = {"int": int, "float": float}.get(str(f.type), str)
        run.add_argument(
            flag,
            dest=f"{section}.{name}",
            type=typ,
            default=None,
            metavar=name.upper(),
            help=f"{f.metadata['help']} (default: {f.default})",
        )
    run.add_argument(
        "--retrain-preset",
        choices=["default", "fast"],
        default="default",
        help="settings of retrain cycles (fast: seconds on a tiny test model)",
    )
    run.add_argument(
        "--vllm-arg",
        dest="vllm_args",
        action="append",
        default=[],
        help="extra argument for the embedded `vllm serve` (repeatable), "
        "e.g. --vllm-arg=--enforce-eager",
    )

    prov = sub.add_parser("provision", help="provision the embedded model checkpoint (offline)")
    _add_common(prov)

    exp = sub.add_parser("export", help="export preference data for training")
    _add_common(exp)
    exp.add_argument(
        "--format",
        choices=["trl", "hh"],
        default="trl",
        help="trl: conversational prompt/chosen/rejected; hh: HH-RLHF text",
    )
    exp.add_argument(
        "--output", "-o", type=Path, required=True, help="output file: .jsonl or .parquet"
    )
    exp.add_argument(
        "--url",
        default="http://127.0.0.1:7860",
        help="running app to ask when the database is locked by it",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> AppConfig:
    config = AppConfig()
    if args.data_dir is not None:
        config.data_dir = args.data_dir
    config.db_path = args.db
    for key, value in vars(args).items():
        if "." in key and value is not None:
            section, name = key.split(".")
            setattr(getattr(config, section), name, value)
    if getattr(args, "retrain_preset", None):
        config.retrain_preset = args.retrain_preset
    if getattr(args, "vllm_args", None):
        config.engine.extra_args = list(args.vllm_args)
    return config


def cmd_export(args: argparse.Namespace, config: AppConfig) -> int:
    from storage import Store, StoreError
    from storage.export import preference_records, write_records

    try:
        store = Store(config.database, read_only=True)
    except StoreError as exc:
        if "in use" not in str(exc):
            raise
        records = _export_via_app(args.url, args.format)
    else:
        try:
            records = preference_records(store.voted_pairs(), args.format)
        finally:
            store.close()
    write_records(records, args.output)
    print(f"wrote {len(records)} preference pairs ({args.format}) to {args.output}")
    return 0


def _export_via_app(url: str, fmt: str) -> list[dict]:
    import json

    import httpx

    print(f"the database is in use by the running app; asking it at {url}", file=sys.stderr)
    try:
        resp = httpx.get(f"{url.rstrip('/')}/api/export", params={"format": fmt}, timeout=120)
        resp.raise_for_status()
    except httpx.HTTPError as exc:
        raise ConfigError(
            f"the database is locked by another process and the app at {url} "
            f"did not answer ({exc}); pass --url of the running app"
        ) from exc
    return [json.loads(line) for line in resp.text.splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    config = config_from_args(args)
    from assistant.engine import EngineError
    from assistant.provision import ProvisionError
    from storage import StoreError

    try:
        if args.command == "run":
            from assistant.server import serve

            serve(config)
        elif args.command == "provision":
            from assistant.provision import provision_embedded

            print(provision_embedded(config.data_dir))
        elif args.command == "export":
            return cmd_export(args, config)
    except (ConfigError, StoreError, ProvisionError, EngineError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
