"""``python -m pipelines.textlm``: small transformer LMs trained on the running Python's standard library teach a
smaller one through softtargets' sequence stores.

Writes into ``--out`` (default ``runs/textlm``): ``tokenizer.json``, ``teachers/``, ``stores/``, ``results.json``,
``results.md`` and ``ppl_vs_bytes.png``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from pipelines.finish import finish


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipelines.textlm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/textlm"), help="run directory (default: runs/textlm)")
    p.add_argument("--quick", action="store_true", help="the tiny variant: seconds")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    from . import pipeline, report
    from .config import config

    args.out.mkdir(parents=True, exist_ok=True)
    results = pipeline.run(config(args.quick), args.out)
    results["command"] = {"quick": args.quick, "out": str(args.out)}
    return finish(results, args.out, started, report.write_all)


if __name__ == "__main__":
    raise SystemExit(main())
