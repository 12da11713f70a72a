"""Benchmarks: `make bench` runs them all and writes benchmarks/results/*.json."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from contract.cli import ArgumentParser, parse

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(path: str | Path, result: dict, show: bool = True) -> Path:
    """Write a benchmark's figures as JSON and say where they went (and print them if `show`).

    Benchmarks that end with their own summary table pass show=False.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    if show:
        print(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return path


def same_setting(cfg, earlier: dict | None, ignore: tuple[str, ...] = ()) -> bool:
    """Whether `earlier` (a results file's "config") ran the same setting as the config dataclass
    `cfg`, apart from the fields in `ignore` (which rows to run). A field added since that file was
    written counts as equal when `cfg` keeps its default. Benchmarks that keep the rows of an earlier
    run use this to decide whether they may."""
    if not earlier:
        return False
    defaults = dataclasses.asdict(type(cfg)())
    return all(earlier.get(k, defaults[k]) == v for k, v in dataclasses.asdict(cfg).items() if k not in ignore)


def add_config_flags(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One `--field-name` flag per field of a benchmark's config dataclass, its default the field's."""
    defaults = config_cls()
    for f in dataclasses.fields(config_cls):
        value = getattr(defaults, f.name)
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(value), default=value)


def parse_config(config_cls: type, description: str, switches: dict[str, str] | None = None,
                 **paths: Path | None) -> tuple[object, dict]:
    """A benchmark's command line: one flag per config field, the path flags named in `paths`
    (name → default) and on/off `switches` (name → help). Returns the config and {name: value}; a bad
    flag ends the program with one line naming it and exit status 2 (contract.cli)."""
    parser = ArgumentParser(description=description.splitlines()[0])
    add_config_flags(parser, config_cls)
    for name, default in paths.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=Path, default=default)
    for name, text in (switches or {}).items():
        parser.add_argument(f"--{name.replace('_', '-')}", action="store_true", help=text)
    args = vars(parse(parser))
    chosen = {name: args.pop(name) for name in [*paths, *(switches or {})]}
    return config_cls(**args), chosen
