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

The package: `parser` (flags, help, config from flags), `admin_client` (the database file, or the
running app that holds it), and the commands by group: `app` (run, provision), `data` (export,
import, compact), `retrain`, `versions` (versions, rollback, prune, push).
"""

from __future__ import annotations

import sys

from assistant.cli.parser import RETRAIN_FLAGS, RUN_OPTIONS, build_parser, config_from_args

__all__ = ["RETRAIN_FLAGS", "RUN_OPTIONS", "build_parser", "config_from_args", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:  # no command given
        parser.print_help()
        return 0
    from storage import AppError

    try:
        return args.func(args, config_from_args(args))
    except AppError as exc:  # every error a user may be told about (storage.errors)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
