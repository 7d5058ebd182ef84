"""``softtargets precompute CONFIG.toml``: stage one from a TOML config.

Config (relative paths are relative to the config file; its folder is appended to
``sys.path`` so factories next to it import)::

    batch_size = 256            # optional run settings (these are the defaults)
    num_workers = 2             # DataLoader workers per shard runner
    device = "auto"             # "auto" | "cpu" | "cuda" | "cuda:1"
    autocast = "none"           # "none" | "bf16" | "fp16" (CUDA only)
    nonfinite = "error"         # "error" | "uniform"

    [output]                    # url required; the rest as in create_targets
    url = "targets.zarr"
    content = "per_teacher"     # "per_teacher" | "geometric" | "arithmetic" (needs temperature = T0)
    dtype = "float16"
    shard_rows = 65536          # optional; also the unit of work and of resume
    # layout, temperature, block_rows, compressor, overflow, class_names, pack_inputs

    [transfer_set]              # one of factory (returns a map-style dataset) or webdataset (URLs)
    factory = "my_data:make_dataset"
    kwargs = { split = "train" }
    # webdataset = "shards/train-{000000..000099}.tar"

    [views]                     # optional: the teachers run on count augmented views of every sample
    count = 16
    augment = "softtargets.math.augment:RandomView"   # a factory, called with kwargs: fn(x, rng) -> (x_view, params)
    kwargs = { scale = [0.5, 1.0], flip = 0.5 }
    seed = 0                    # the store seed of the views' generators

    [cluster]                   # optional: default in this process, a dask LocalCluster when there are several GPUs
    scheduler = "tcp://10.0.0.1:8786"   # or "local": in this process; "dask": a LocalCluster
    workers = 2                 # LocalCluster workers (default: one per GPU)
    retries = 3
    ship_weights = false        # true: send the teachers' weights from here to every worker (no shared filesystem)
    preflight = true            # check every worker (imports, weights, transfer set, output) before any shard runs

    [storage]                   # optional: fsspec storage options of the output (also --storage-option KEY=VALUE)
    client_kwargs = { endpoint_url = "http://10.0.0.2:9000" }
    # key = "...", secret = "..."   (or AWS_* variables on the driver; they reach the workers with the job)

    [[teachers]]                # one table per teacher: specs of softtargets.precompute.teachers.load_teacher
    name = "resnet50_a"
    factory = "my_models:resnet50"
    kwargs = { num_classes = 1000 }
    weights = "weights/resnet50_a.safetensors"
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from ...importing import import_object
from ...store.manifest import MANIFEST_NAME
from ...text import plural
from ..config import config_schema, read_toml, resolve_path, validate_config
from ..storage import add_storage_args, storage_options

SCHEMA = "precompute-config"  # schemas/precompute-config.schema.json: every key, its type and range
TABLES = {"output", "transfer_set", "cluster", "storage", "teachers"}
RUN_KEYS = set(config_schema(SCHEMA)["properties"]) - TABLES
TEACHER_PATHS = ("weights", "torchscript", "exported")


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Keyword arguments of :func:`softtargets.precompute.precompute` from a TOML config file.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not TOML, or not valid against ``schemas/precompute-config.schema.json`` (names the key).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config {path} not found")
    top = read_toml(path)
    validate_config(top, SCHEMA, path)
    base = path.resolve().parent
    output = dict(top["output"])
    cluster = top.get("cluster", {})
    transfer = dict(top["transfer_set"])
    if "webdataset" in transfer:
        urls = transfer["webdataset"]
        one = isinstance(urls, str)
        transfer["webdataset"] = resolve_path(urls, base) if one else [resolve_path(u, base) for u in urls]
    specs = []
    for t in top["teachers"]:
        spec = dict(t)
        for key in TEACHER_PATHS:
            if isinstance(spec.get(key), str):
                spec[key] = resolve_path(spec[key], base)
        specs.append(spec)
    kwargs: dict[str, Any] = {k: top[k] for k in RUN_KEYS if k in top}
    if kwargs.get("autocast") in ("none", ""):
        kwargs["autocast"] = None
    kwargs.update({k: v for k, v in output.items() if k != "url"})
    kwargs.update(cluster)
    if top.get("storage"):
        kwargs["storage_options"] = dict(top["storage"])
    kwargs.update(teachers=specs, dataset=transfer, out=resolve_path(output["url"], base))
    if str(base) not in sys.path:
        sys.path.append(str(base))
    if "views" in top:  # [views]: count, augment = "module:factory" (called with kwargs), seed
        views = top["views"]
        factory = import_object(views["augment"], "views augment factory")
        kwargs.update(views=views["count"], augment=factory(**views.get("kwargs", {})), seed=views.get("seed", 0))
    return kwargs


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{nbytes} B"
        nbytes /= 1024
    return ""


def _finished(url: str, options: dict[str, Any] | None = None) -> bool:
    """Whether ``url`` holds a finished store (its manifest is written); leftover run markers beside it are
    removed, as a finished run removes them."""
    from ...store.base import MARKER_DIR, PENDING_NAME
    from ...store.files import join, url_to_fs

    fs, root = url_to_fs(url, **(options or {}))
    if not fs.exists(join(root, MANIFEST_NAME)):
        return False
    for rel in (MARKER_DIR, PENDING_NAME):
        if fs.exists(join(root, rel)):
            fs.rm(join(root, rel), recursive=True)
    return True


class _Rows:
    """A precompute ``on_rows`` callback: the rows computed in this run, summed."""

    def __init__(self) -> None:
        self.rows = 0

    def __call__(self, rows: int) -> None:
        self.rows += rows


def _summary(m: Any, url: str, computed: int, seconds: float) -> dict[str, Any]:
    """What ``precompute --json`` prints: the store, its size and shape, and this run's rows, seconds, samples/s."""
    return {"url": url, "samples": m.num_samples, "shards": m.num_shards, "rows_computed": computed,
            "seconds": seconds, "samples_per_s": computed / seconds, "bytes": m.nbytes, "layout": m.layout,
            "content": m.content, "logits_shape": list(m.logits_shape), "dtype": m.dtype, "nothing_to_do": False}


def run(args: argparse.Namespace) -> int:
    from ...precompute import precompute

    logger = logging.getLogger("softtargets")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if args.quiet else logging.INFO)
    kwargs = load_config(args.config)
    if args.scheduler is not None:
        kwargs["scheduler"] = args.scheduler
    if args.workers is not None:
        kwargs["workers"] = args.workers
    if kwargs.get("scheduler") == "":
        kwargs["scheduler"] = None
    if args.ship_weights:
        kwargs["ship_weights"] = True
    kwargs["storage_options"] = storage_options(args, kwargs.get("storage_options"))
    if args.resume and _finished(kwargs["out"], kwargs["storage_options"]):
        if args.json:
            print(json.dumps({"url": kwargs["out"], "nothing_to_do": True, "rows_computed": 0}, indent=1))
            return 0
        print(f"precompute: {kwargs['out']} is already complete; nothing to resume")
        return 0
    started, computed = time.perf_counter(), _Rows()
    try:
        manifest = precompute(**kwargs, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
                              on_rows=computed)
    except FileExistsError as e:
        flags = [flag for flag, given in (("--resume", args.resume), ("--overwrite", args.overwrite)) if not given]
        raise FileExistsError(f"{e} (command line: {' or '.join(flags)})" if flags else str(e)) from None
    seconds = time.perf_counter() - started
    m = manifest
    if args.json:
        print(json.dumps(_summary(m, kwargs["out"], computed.rows, seconds), indent=1))
        return 0
    rate = f"{computed.rows / seconds:,.0f} samples/s"
    if computed.rows != m.num_samples:
        rate += f" over the {plural(computed.rows, 'sample')} computed in this run"
    shape = "x".join(map(str, m.logits_shape))
    print(f"precompute: {plural(m.num_samples, 'sample')} in {plural(m.num_shards, 'shard')}, {seconds:.1f} s "
          f"({rate}); {_size(m.nbytes)} at {kwargs['out']} "
          f"({m.layout}, {m.content} logits {shape} {m.dtype})")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "precompute", help="run a teacher ensemble over a transfer set and write a target store",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="TOML config file (format above)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue an unfinished store; keep verified shards")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing store")
    parser.add_argument("--scheduler", help="'local' (this process, no dask), 'dask' (a dask LocalCluster) or a "
                                            "scheduler address tcp://HOST:PORT (default: the config's, else "
                                            "'local' with at most one GPU, 'dask' with several)")
    parser.add_argument("--workers", type=int, help="LocalCluster workers (default: one per GPU, one on CPU)")
    parser.add_argument("--ship-weights", action="store_true",
                        help="send the teachers' weights from this machine to every dask worker (dask's scatter with "
                             "broadcast), for workers that cannot read the weight files")
    add_storage_args(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar or messages, only the summary")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.set_defaults(run=run)
    return parser
