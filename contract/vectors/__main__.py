"""`python -m contract.vectors check [--impl MODULE]` and `python -m contract.vectors generate`.

check: recompute every vector with an implementation's function table
(default: contract.vectors.reference, the Python phone and server) and list
each mismatch; exit 2 if there is one (or nothing ran). generate: rewrite the
vector files from the fixed inputs (only for a deliberate wire change).
"""
from __future__ import annotations

import sys
from pathlib import Path

from contract.cli import ArgumentParser, UsageError, run


def cmd_check(args) -> int:
    from contract.vectors.check import check, load_functions

    try:
        functions = load_functions(args.impl)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.file is not None and not (args.dir / f"{args.file}.json").is_file():
        raise UsageError(f"--file: no vector file {args.file}.json in {args.dir}")
    result = check(functions, args.dir, args.file)
    for failure in result.failures:
        print(f"MISMATCH {failure}")
    skipped = sum(result.skipped.values())
    print(f"{result.passed} vectors passed, {len(result.failures)} failed, {skipped} skipped"
          + (f" (not implemented: {', '.join(sorted(result.skipped))})" if skipped else "") + f" [{args.impl}]")
    return 0 if result.ok else 2


def cmd_generate(args) -> int:
    from contract.vectors.generate import write

    for path in write(args.dir):
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from contract.vectors import DIRECTORY

    parser = ArgumentParser(prog="python -m contract.vectors", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    checking = sub.add_parser("check", help="recompute every vector with an implementation")
    checking.add_argument("--impl", default="contract.vectors.reference",
                          help="a module with a FUNCTIONS table (default: the Python implementation)")
    checking.add_argument("--file", default=None, help="only this vector file (its name without .json)")
    checking.set_defaults(func=cmd_check)
    generating = sub.add_parser("generate", help="rewrite the vector files (a deliberate wire change)")
    generating.set_defaults(func=cmd_generate)
    for p in (checking, generating):
        p.add_argument("--dir", type=Path, default=DIRECTORY, help="where the vector files are")
    return run(parser, argv, validate=_validate)


def _validate(args) -> None:
    if not args.dir.is_dir():
        raise UsageError(f"--dir: no directory {args.dir}")


if __name__ == "__main__":
    sys.exit(main())
