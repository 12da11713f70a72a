"""Recompute every vector with an implementation's function table and report what differs.

An implementation is a module with `FUNCTIONS`: {name: callable(input dict) → output dict}
(contract.vectors.reference is the Python phone's and server's). A case whose
function the module does not have is skipped, not failed: a phone port need
not implement the server's side. Any exception is a mismatch.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path

from contract.vectors import DIRECTORY, FORMAT
from contract.vectors.codec import compare


@dataclasses.dataclass
class Result:
    passed: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)     # function → cases skipped
    failures: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures and self.passed > 0


def load_functions(module: str) -> Mapping[str, Callable[[dict], dict]]:
    """`module`'s function table; ValueError naming the module if it has none."""
    try:
        functions = importlib.import_module(module).FUNCTIONS
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--impl: {module} is not a module with a FUNCTIONS table ({e})") from None
    return functions


def files(directory: Path = DIRECTORY) -> list[Path]:
    return sorted(Path(directory).glob("*.json"))


def check(functions: Mapping[str, Callable[[dict], dict]], directory: Path = DIRECTORY,
          only: str | None = None) -> Result:
    """Every case of every vector file (or of file `only`) through `functions`."""
    result = Result()
    for path in files(directory):
        if only is not None and path.stem != only:
            continue
        document = json.loads(path.read_text(encoding="utf-8"))
        if document.get("format") != FORMAT:
            result.failures.append(f"{path.name}: not a {FORMAT} file")
            continue
        for item in document["cases"]:
            _run(functions, path.stem, item, result)
    return result


def _run(functions: Mapping[str, Callable[[dict], dict]], file: str, item: dict, result: Result) -> None:
    name, function = f"{file}: {item['name']}", item["function"]
    if function not in functions:
        result.skipped[function] = result.skipped.get(function, 0) + 1
        return
    try:
        actual = functions[function](json.loads(json.dumps(item["input"])))    # a copy: impls may mutate
    except Exception as e:  # a crash on a vector is a mismatch, reported with where it happened
        where = traceback.extract_tb(e.__traceback__)[-1]
        result.failures.append(f"{name} ({function}): raised {type(e).__name__}: {e} "
                               f"[{Path(where.filename).name}:{where.lineno}]")
        return
    differences = compare(item["output"], actual, item.get("tolerance"))
    if differences:
        result.failures.append(f"{name} ({function}): " + "; ".join(differences[:4]))
    else:
        result.passed += 1
