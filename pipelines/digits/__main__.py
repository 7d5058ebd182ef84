"""``python -m pipelines.digits``: Hinton et al. (2015) §3 on scikit-learn digits, through softtargets' stores.

Writes into ``--out`` (default ``runs/digits``): ``teachers/teacher-<seed>.pt`` (state dicts),
``stores/`` (the two target stores), ``results.json``, ``results.md`` and ``test_error_vs_T.png``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from pipelines.finish import finish

from .config import DEFAULT_CONFIG, load_config


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipelines.digits", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=None,
                   help=f"TOML merged over the defaults ({DEFAULT_CONFIG.name} beside this module)")
    p.add_argument("--out", type=Path, default=Path("runs/digits"), help="run directory (default: runs/digits)")
    p.add_argument("--layout", choices=("zarr", "wds"), default="zarr", help="target store layout (default: zarr)")
    p.add_argument("--quick", action="store_true", help="the tiny variant (quick.toml over the config): seconds")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars (stage headers are still printed)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    cfg = load_config(args.config, quick=args.quick)
    from . import pipeline, report  # after the config is checked: these import torch

    args.out.mkdir(parents=True, exist_ok=True)
    results = pipeline.run(cfg, args.out, layout=args.layout, progress=not args.no_progress)
    results["command"] = {"quick": args.quick, "layout": args.layout, "config": str(args.config or DEFAULT_CONFIG),
                          "out": str(args.out)}
    return finish(results, args.out, started, report.write_all)


if __name__ == "__main__":
    raise SystemExit(main())
