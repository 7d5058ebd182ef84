"""``softtargets merge A B ... DST``: concatenate stores over disjoint parts of a transfer set."""

from __future__ import annotations

import argparse
import time

from ...sharing.combine import merge_stores
from ...text import plural
from .convert import add_layout_args, layout_kwargs, print_json


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "merge", help="concatenate stores with the same teachers, classes and content",
        description="Concatenate stores (rows in the order given) into DST. They must agree in teachers (names and "
        "sha256), classes, content, dtype and temperature, and hold disjoint keys (checked in bounded memory).",
    )
    p.add_argument("stores", nargs="+", metavar="STORE", help="two or more source stores, then DST (the new store)")
    p.add_argument("--tmpdir", help="where the key-overlap check spills hashes (16 bytes a row)")
    add_layout_args(p)
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if len(args.stores) < 3:
        raise ValueError("merge takes two or more source stores and a destination: merge A B ... DST")
    *srcs, dst = args.stores
    m = merge_stores(srcs, dst, tmpdir=args.tmpdir, **layout_kwargs(args))
    if args.json:
        return print_json(m, started, sources=srcs, dst=dst)
    print(f"wrote {dst}: {plural(m.num_samples, 'sample')} from {plural(len(srcs), 'store')}, {m.layout}, "
          f"{plural(len(m.shards), 'shard')}")
    return 0
