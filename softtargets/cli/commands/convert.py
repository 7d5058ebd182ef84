"""``softtargets convert SRC DST``: another layout, dtype, or a reduction of per-teacher logits."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from ...math.compact import DEFAULT_TEMPERATURES, CompactSpec
from ...sharing.convert import convert_store
from ...store.manifest import CONTENTS, DTYPES, LAYOUTS, Manifest
from ...text import plural
from ..storage import add_storage_args, storage_options


def add_layout_args(p: argparse.ArgumentParser) -> None:
    """Destination layout options shared by convert, merge and subset."""
    p.add_argument("--layout", choices=LAYOUTS, help="destination layout (default: from DST suffix: .wds/.tar -> wds)")
    p.add_argument("--sample-layout", choices=("block", "sample"), help="wds: rows per tar sample (default: source's)")
    p.add_argument("--shard-rows", type=int, help="rows per shard (default: the source's)")
    p.add_argument("--block-rows", type=int, help="rows per read unit (default: the source's)")
    p.add_argument("--compressor", choices=("none", "zstd", "blosc"), help="zarr codec (default: the source's)")
    p.add_argument("--drop-inputs", action="store_true", help="drop inputs packed beside the targets")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at DST")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    add_storage_args(p)


def progress(args: argparse.Namespace) -> bool | None:
    return False if args.no_progress else None


def print_json(m: Manifest, started: float, **paths: Any) -> int:
    """Print what convert, merge or subset wrote as one JSON object: ``paths``, the new store's facts, seconds."""
    seconds = time.perf_counter() - started
    print(json.dumps({**paths, "samples": m.num_samples, "shards": len(m.shards), "bytes": m.nbytes,
                      "layout": m.layout, "content": m.content, "dtype": m.dtype, "seconds": seconds,
                      "samples_per_s": m.num_samples / max(seconds, 1e-9)}, indent=1))
    return 0


def layout_kwargs(args: argparse.Namespace) -> dict:
    return {"layout": args.layout, "sample_layout": args.sample_layout, "shard_rows": args.shard_rows,
            "block_rows": args.block_rows, "compressor": args.compressor, "drop_inputs": args.drop_inputs,
            "overwrite": args.overwrite, "progress": progress(args), "storage_options": storage_options(args)}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert", help="copy a store to another layout/dtype, or reduce its teachers",
        description="Copy store SRC to DST shard by shard (memory does not grow with the store): change the layout "
        "(zarr <-> wds), the dtype, or reduce per-teacher logits to geometric-mean logits or arithmetic-mean "
        "log-probabilities at T0. Keys, labels, teachers, class names and the transfer set carry over; DST's "
        "manifest records the source and its manifest's sha256 in 'lineage'.",
    )
    p.add_argument("src", help="source store (path or fsspec URL)")
    p.add_argument("dst", help="new store (path or fsspec URL)")
    p.add_argument("--dtype", choices=DTYPES, help="storage dtype (default: the source's)")
    p.add_argument("--content", choices=CONTENTS, help="reduce per_teacher logits to geometric or arithmetic")
    p.add_argument("--temperature", type=float, help="T0 of an arithmetic reduction")
    p.add_argument("--overflow", choices=("error", "clip"), help="float16 values beyond +-65504 (default: source's)")
    p.add_argument("--compact", choices=("topk", "sampled"), help="write a compact content from the dense logits: "
                   "the top k with the tail's log-partition on a temperature grid, or k importance samples")
    p.add_argument("--k", type=int, default=32, help="--compact: ids per row (topk) or draws per row (sampled)")
    p.add_argument("--grid", type=_temperatures, metavar="T1,T2,...",
                   help="--compact: the temperatures stored (default 0.5,0.7,1,1.4,2,3,5,8,20)")
    p.add_argument("--proposal-temperature", type=float, default=1.0, help="--compact sampled: T0 of the draws")
    add_layout_args(p)
    p.set_defaults(run=run)
    return p


def _temperatures(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"temperatures are comma-separated numbers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    compact = None
    if args.compact:
        compact = CompactSpec(args.compact, k=args.k, proposal_temperature=args.proposal_temperature,
                              temperatures=tuple(args.grid) if args.grid else DEFAULT_TEMPERATURES)
    m = convert_store(args.src, args.dst, dtype=args.dtype, content=args.content, temperature=args.temperature,
                      overflow=args.overflow, compact=compact, **layout_kwargs(args))
    if args.json:
        return print_json(m, started, src=args.src, dst=args.dst)
    kind = f" {m.compact['kind']} ({m.compact['row_bytes']} bytes/row)" if m.compact else ""
    print(f"wrote {args.dst}: {plural(m.num_samples, 'sample')}, {m.layout}, {m.content}{kind}, {m.dtype}, "
          f"{plural(len(m.shards), 'shard')}, {plural(m.nbytes, 'byte')}")
    return 0
