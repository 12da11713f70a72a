"""One command-line convention for every `python -m <package>` and benchmark.

A program is one `ArgumentParser` with subcommands, each bound to a function
of the parsed arguments (`set_defaults(func=...)`) that returns an exit status
(None: 0). `run` parses, dispatches and turns every usage error into one line
on stderr, `error: <message naming the flag or file>`, and exit status 2:

* argparse's own (an unknown flag, a missing one, a value of the wrong type):
  this module's `ArgumentParser` raises them as `UsageError` instead of
  printing its usage banner and exiting;
* a `UsageError` a command raises (a file that does not exist, flags that do
  not go together);
* the errors a program declares user-facing (`user_errors`: a corpus that
  cannot be read, a config that does not parse, an artifact that does not
  verify).

Anything else is a bug and keeps its traceback. Why one module: each package
had its own copy of the usage error and of the loop around argparse, and the
copies drifted (some printed argparse's banner and usage, some one line).
Imports only the standard library.

    parser = ArgumentParser(prog="python -m thing", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("go").set_defaults(func=cmd_go)
    sys.exit(run(parser, argv, user_errors=(ThingError,)))
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn


class UsageError(Exception):
    """A flag or file that cannot be used; the message names it. Exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors raise `UsageError` (its subcommands' parsers are of this class too)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None, *,
        user_errors: tuple[type[BaseException], ...] = (),
        validate: Callable[[argparse.Namespace], None] | None = None) -> int:
    """Parse `argv`, run the chosen command's `func(args)`; its exit status, or 2 after a usage error.

    `validate(args)`, if given, runs between parsing and the command: checks
    over several flags that argparse cannot express, raising `UsageError`.
    """
    try:
        args = parser.parse_args(argv)
        if validate is not None:
            validate(args)
        if getattr(args, "func", None) is None:
            raise UsageError("name a command")
        status = args.func(args)
    except (UsageError, *user_errors) as e:
        return report(e)
    return 0 if status is None else int(status)


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The parsed arguments of a program that goes on by itself (a benchmark); a usage error exits 2."""
    try:
        return parser.parse_args(argv)
    except UsageError as e:
        raise SystemExit(report(e)) from None


def report(error: BaseException) -> int:
    """Print `error` as one line on stderr; the exit status of a usage error (2)."""
    print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
    return 2


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse `type`: an integer >= `minimum` (the message names the flag: argparse adds it)."""
    def parse_int(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}")
        return value
    parse_int.__name__ = f"integer >= {minimum}"
    return parse_int


def positive_float(text: str) -> float:
    """An argparse `type`: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value
