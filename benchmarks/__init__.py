"""Benchmarks: `make bench` runs them all and writes benchmarks/results/*.json."""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(path: str | Path, result: dict) -> Path:
    """Write a benchmark's figures as JSON, print them, and say where they went."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return path
