"""``python -m pipelines.digits_views``: replayed views against clean targets and online distillation on digits.

Writes into ``--out`` (default ``runs/digits_views``): ``stores/`` (the clean store and one views store per V),
``results.json``, ``results.md`` and ``test_error_vs_views.png``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.digits.config import merge, read_toml
from pipelines.finish import finish

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "config.toml"
QUICK_CONFIG = HERE / "quick.toml"


def load_config(path: str | Path | None = None, quick: bool = False) -> dict[str, Any]:
    """Defaults, then ``path``, then ``quick.toml``; an unknown key is refused naming the file."""
    cfg = read_toml(DEFAULT_CONFIG)
    if path is not None:
        cfg = merge(cfg, read_toml(path), str(path))
    if quick:
        cfg = merge(cfg, read_toml(QUICK_CONFIG), str(QUICK_CONFIG))
    if cfg["student"]["epochs"] < max(cfg["store"]["views"]) and not quick:
        print(f"note: {cfg['student']['epochs']} student epochs see fewer than the {max(cfg['store']['views'])} views")
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.digits_views", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=None, help="TOML merged over config.toml")
    p.add_argument("--out", type=Path, default=Path("runs/digits_views"), help="run directory")
    p.add_argument("--layout", choices=("zarr", "wds"), default="zarr", help="target store layout")
    p.add_argument("--quick", action="store_true", help="the tiny variant (quick.toml over the config): seconds")
    args = p.parse_args(argv)
    started = time.perf_counter()
    cfg = load_config(args.config, quick=args.quick)
    from . import pipeline, report  # after the config is read: these import torch

    args.out.mkdir(parents=True, exist_ok=True)
    results = pipeline.run(cfg, args.out, layout=args.layout)
    results["command"] = {"quick": args.quick, "layout": args.layout, "out": str(args.out)}
    return finish(results, args.out, started, report.write_all)


if __name__ == "__main__":
    raise SystemExit(main())
