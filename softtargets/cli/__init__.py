"""The ``softtargets`` command line: one subcommand per module in :mod:`softtargets.cli.commands`.

Each command module defines ``add_parser(subparsers) -> argparse.ArgumentParser`` whose
parser has ``set_defaults(run=callable(args) -> int)``.

An error ends the command with exit status 2 and one line on stderr naming the problem and, where
there is one, the fix. ``--debug`` (or ``SOFTTARGETS_DEBUG=1``) lets the exception propagate with its
traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from .._version import __version__

COMMANDS = ("precompute", "train", "inspect", "verify", "convert", "merge", "subset", "specialists")
DEBUG_ENV = "SOFTTARGETS_DEBUG"
_DEBUG_HELP = f"on an error, raise it with its traceback instead of one line (also {DEBUG_ENV}=1)"
# Raised with a message meant for the user (the package's checks, I/O, user code's argument errors).
_USER_ERRORS = (ValueError, OSError, RuntimeError, ImportError, TypeError, LookupError)
# Third-party exceptions (by class name) -> what to tell the user.
_KNOWN_ERRORS = {
    "NoCredentialsError": "no S3 credentials found ({exc}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                          "or AWS_PROFILE, or pass the store's storage options",
    "PartialCredentialsError": "incomplete S3 credentials ({exc}); set both AWS_ACCESS_KEY_ID and "
                               "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE",
    "EndpointConnectionError": "cannot reach the object store ({exc}); check AWS_ENDPOINT_URL and the network",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softtargets", description="Offline soft targets for knowledge distillation."
    )
    parser.add_argument("--version", action="version", version=f"softtargets {__version__}")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f".commands.{name}", __package__)
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.commands.{name}":
                raise
            continue
        command = module.add_parser(sub)
        # SUPPRESS: without the flag here, the value given before the command stands.
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    return parser


def _debug(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def _one_line(text: str) -> str:
    """``text`` as one line: a DataLoader worker's re-raised error keeps its original message (the last line
    of the worker's traceback); other line breaks become ``"; "``."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if any(line.startswith("Original Traceback") for line in lines):
        lines = lines[-1:]
        head, sep, rest = lines[0].partition(": ")
        if sep and head.isidentifier():  # "TypeError: message" -> "message"
            lines = [rest]
    return "; ".join(lines)


def error_message(exc: BaseException) -> str:
    """The one line ``softtargets`` prints for ``exc``: its message, with the exception type where the message
    alone would not say what went wrong."""
    known = _KNOWN_ERRORS.get(type(exc).__name__)
    if known is not None:
        return _one_line(known.format(exc=exc))
    if isinstance(exc, KeyError):  # str(KeyError("x")) is just "'x'"
        text = f"KeyError: no key {exc.args[0]!r}" if exc.args else "KeyError"
    else:
        text = str(exc) or type(exc).__name__
        if not isinstance(exc, _USER_ERRORS) or isinstance(exc, NotImplementedError):
            text = f"{type(exc).__name__}: {text} (unexpected: rerun with --debug for the traceback)"
    return _one_line(text)


def _hints(exc: BaseException, args: argparse.Namespace) -> str:
    """What to add to ``exc``'s message on the command line: the flags for the keywords a refusal names
    (``resume=True``, ``overwrite=True``) that were not given; the fix for a full disk."""
    text = str(exc)
    if isinstance(exc, FileExistsError) and "(command line:" not in text:
        flags = [f"--{k}" for k in ("resume", "overwrite") if f"{k}=True" in text and not getattr(args, k, True)]
        return f" (command line: {' or '.join(flags)})" if flags else ""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC and "elsewhere" not in text:
        return "; free space on that disk or write the store elsewhere"
    return ""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if _debug(args):
        return int(args.run(args) or 0)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every error is one line; --debug shows the traceback
        print(f"softtargets {args.command}: error: {error_message(e)}{_hints(e, args)}", file=sys.stderr)
        return 2

