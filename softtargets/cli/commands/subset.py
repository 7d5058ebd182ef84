"""``softtargets subset SRC DST (--keys FILE | --range A:B)``: a store of some of another's rows."""

from __future__ import annotations

import argparse
import os
import time

from ...sharing.combine import read_keys_file, subset_store
from ...text import plural
from .convert import add_layout_args, layout_kwargs, print_json


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "subset", help="copy the rows with given keys, or a row range, to a new store",
        description="Copy some rows of SRC to DST, keeping the source's row order: those whose keys are listed in "
        "FILE (one key per line; every key must exist), or rows A to B-1.",
    )
    p.add_argument("src", help="source store (path or fsspec URL)")
    p.add_argument("dst", help="new store (path or fsspec URL)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--keys", metavar="FILE", help="text file of sample keys, one per line")
    which.add_argument("--range", metavar="A:B", help="rows A (inclusive) to B (exclusive); either may be omitted")
    add_layout_args(p)
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.keys is not None:
        m = subset_store(args.src, args.dst, keys=read_keys_file(args.keys), keys_source=os.path.abspath(args.keys),
                         **layout_kwargs(args))
    else:
        m = subset_store(args.src, args.dst, row_range=args.range, **layout_kwargs(args))
    if args.json:
        return print_json(m, started, src=args.src, dst=args.dst, keys=args.keys, range=args.range)
    print(f"wrote {args.dst}: {plural(m.num_samples, 'sample')}, {m.layout}, {plural(len(m.shards), 'shard')}")
    return 0
