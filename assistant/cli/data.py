"""`assistant export`, `import` and `compact`: the votes out (to a file, or the Hub) and in, and
the database file rewritten without what was deleted."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from assistant.cli.admin_client import admin_client
from assistant.config import AppConfig, ConfigError


def cmd_export(args: argparse.Namespace, config: AppConfig) -> int:
    from storage.export import write_records

    records = admin_client(config, args.url, args.token).export(args.format)
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


def cmd_compact(args: argparse.Namespace, config: AppConfig) -> int:
    from storage.compaction import compact

    if config.on_postgres:
        print(
            "compact rewrites a DuckDB file; on Postgres deleted rows leave through VACUUM "
            "(docs/deployment.md, 'Deleting on Postgres')",
            file=sys.stderr,
        )
        return 2
    before, after = compact(config.database)  # refused while the app holds the database
    print(f"compacted {config.database}: {before:,} -> {after:,} bytes")
    return 0
