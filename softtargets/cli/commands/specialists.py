"""``softtargets specialists plan STORE --specialists M --size S``: confusable class subsets for specialists."""

from __future__ import annotations

import argparse
import json

from ...sharing.specialists_plan import plan_specialists


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "specialists", help="plan specialists: confusable class subsets from a store's generalist",
        description="Generalist + specialists (Hinton et al. 2015, section 5).",
    )
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    plan = sub.add_parser(
        "plan", help="cluster the covariance of the generalist's predictions into M subsets of S classes",
        description="Read the store's generalist predictions (its ensemble at T=1) shard by shard, accumulate their "
        "covariance, cluster its columns (online K-means, or spectral) into M subsets of S classes, and print "
        "them as JSON with each subset's confusability and share of the rows.",
    )
    plan.add_argument("store", help="a finished store (path or fsspec URL)")
    plan.add_argument("--specialists", "-m", type=int, required=True, metavar="M", help="number of subsets")
    plan.add_argument("--size", "-s", type=int, required=True, metavar="S", help="classes per subset")
    plan.add_argument("--method", choices=("kmeans", "spectral"), default="kmeans",
                      help="clustering of the covariance's columns (default: kmeans, the paper's online K-means)")
    plan.add_argument("--rule", choices=("geometric", "arithmetic"), default="geometric",
                      help="how the store's teachers form the generalist (default: geometric)")
    plan.add_argument("--seed", type=int, default=0, help="clustering seed (default 0)")
    plan.add_argument("--out", "-o", metavar="FILE", help="also write the JSON to FILE")
    plan.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    result = plan_specialists(args.store, specialists=args.specialists, size=args.size, method=args.method,
                              rule=args.rule, seed=args.seed, out=args.out)
    print(json.dumps(result, indent=1))
    return 0
