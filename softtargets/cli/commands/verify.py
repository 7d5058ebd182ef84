"""``softtargets verify URL``: check a store's manifest, every file's checksum, rows and keys."""

from __future__ import annotations

import argparse
import sys

from ...sharing.verify import format_report, to_json, verify_store
from ...text import plural
from ..storage import add_storage_args, storage_options


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "verify", help="check a store end to end; exit 1 naming every bad file",
        description="Check a store's manifest (schema, format version, shard table), every data file's path (the "
        "layout's own, inside the store: a path out of it is named, never read), size and sha256, every shard's "
        "rows, and that keys are unique; lists ALL problems, each with the file at fault. "
        "Memory stays at about two shards whatever the store's size. Exit status 0 when sound, 1 when not.",
    )
    p.add_argument("url", help="store path or fsspec URL (file://, http(s)://, s3://, ...)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--tmpdir", default=None, help="where the key-uniqueness check spills hashes (16 bytes a row)")
    p.add_argument("--key-memory", type=float, default=64, metavar="MIB",
                   help="memory for the key-uniqueness check before it spills to --tmpdir (default 64 MiB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_storage_args(p)
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    report = verify_store(args.url, progress=False if args.no_progress else None, tmpdir=args.tmpdir,
                          key_memory=int(args.key_memory * 2**20), storage_options=storage_options(args))
    print(to_json(report) if args.json else format_report(report))
    if not report.ok and args.json:
        problems, files = plural(len(report.problems), "problem"), plural(len(report.bad_files), "file")
        print(f"softtargets verify: {problems} in {files}", file=sys.stderr)
    return 0 if report.ok else 1
