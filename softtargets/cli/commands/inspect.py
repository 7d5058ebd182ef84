"""``softtargets inspect URL``: what a store holds, and statistics of its targets."""

from __future__ import annotations

import argparse
import json

from ...sharing.inspect import DEFAULT_TEMPERATURES, format_report, inspect_store, plot_report, require_matplotlib
from ..storage import add_storage_args, storage_options


def _temperatures(text: str) -> list[float]:
    try:
        out = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"temperatures are comma-separated numbers, got {text!r}") from None
    if not out or min(out) <= 0:
        raise argparse.ArgumentTypeError(f"temperatures must be > 0, got {text!r}")
    return out



def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "inspect", help="describe a store and the statistics of its targets",
        description="Describe a store (samples, classes, content, teachers and fingerprints, dtype, layout, size, "
        "transfer set, provenance, lineage) and, streaming it shard by shard, each teacher's and the ensemble's "
        "accuracy on the labels, the teachers' agreement, mean target entropy at several temperatures and top-1 "
        "confidence.",
    )
    p.add_argument("url", help="store path or fsspec URL (file://, http(s)://, s3://, ...)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--plot", metavar="PNG", help="draw entropy vs temperature and a top-1 confidence histogram "
                   "(needs matplotlib: pip install 'softtargets[plot]')")
    p.add_argument("--limit", type=int, metavar="N", help="statistics over the first N rows only (faster)")
    p.add_argument("--temperatures", type=_temperatures, default=list(DEFAULT_TEMPERATURES), metavar="T1,T2,...",
                   help=f"temperatures for the entropy table (default {','.join(map(str, DEFAULT_TEMPERATURES))})")
    p.add_argument("--no-stats", action="store_true", help="the manifest's facts only; read no rows")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_storage_args(p)
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    if args.plot:
        if args.no_stats:
            raise ValueError("--plot draws target statistics: drop --no-stats")
        require_matplotlib()  # fail before reading the store
    report = inspect_store(args.url, stats=not args.no_stats, limit=args.limit, temperatures=args.temperatures,
                           progress=False if args.no_progress else None, storage_options=storage_options(args))
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    if args.plot:
        plot_report(report, args.plot)
        if not args.json:
            print(f"plot written to {args.plot}")
    return 0
