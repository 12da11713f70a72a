"""Writes the vector files: fixed inputs (contract.vectors.cases_*), outputs from the reference table.

Run once per wire change (`python -m contract.vectors generate`) and commit
the files: tests/test_vectors.py fails while the files on disk differ from
what this produces, so a change to the wire is a deliberate change to the
vectors (and, if a phone could not follow it, to the protocol version).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from contract.protocol.version import CURRENT
from contract.vectors import DIRECTORY, FORMAT
from contract.vectors.cases_pipeline import plausible_file, reports_file, update_file
from contract.vectors.cases_secagg import primitives_file, round_file
from contract.vectors.cases_update import encoding_file, packing_file, random_file, round_spec_file, stages_file
from contract.vectors.codec import dumps

BUILDERS: dict[str, Callable[[], dict]] = {
    "encoding": encoding_file,
    "round_spec": round_spec_file,
    "random": random_file,
    "stages": stages_file,
    "packing": packing_file,
    "update": update_file,
    "plausible": plausible_file,
    "reports": reports_file,
    "secagg_primitives": primitives_file,
    "secagg_round": lambda: round_file(3),
    "secagg_round_dropout": lambda: round_file(4, dropped=(4,)),
}


def build(name: str) -> dict:
    """One vector file's content, computed now."""
    content = BUILDERS[name]()
    return {"format": FORMAT, "protocol": CURRENT, "name": name, **content}


def write(directory: Path = DIRECTORY, names: list[str] | None = None) -> list[Path]:
    """(Re)write the vector files; the paths written."""
    out = []
    for name in names or list(BUILDERS):
        path = Path(directory) / f"{name}.json"
        path.write_text(dumps(build(name)) + "\n", encoding="utf-8")
        out.append(path)
    return out


def stale(directory: Path = DIRECTORY) -> list[str]:
    """The vector files whose content on disk is not what the generator produces now."""
    out = []
    for name in BUILDERS:
        path = Path(directory) / f"{name}.json"
        if not path.is_file() or json.loads(path.read_text(encoding="utf-8")) != json.loads(dumps(build(name))):
            out.append(name)
    return out
