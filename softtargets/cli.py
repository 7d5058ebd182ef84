"""The ``softtargets`` command line: one subcommand per module in :mod:`softtargets.commands`.

Each command module defines ``add_parser(subparsers) -> argparse.ArgumentParser`` whose
parser has ``set_defaults(run=callable(args) -> int)``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

COMMANDS = ("precompute", "train", "inspect", "verify", "convert", "merge", "subset")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softtargets", description="Offline soft targets for knowledge distillation."
    )
    parser.add_argument("--version", action="version", version=f"softtargets {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f".commands.{name}", __package__)
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.commands.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, ImportError) as e:
        print(f"softtargets {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
