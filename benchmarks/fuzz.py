"""`make fuzz`: schemathesis against the live server from its own /openapi.json.

Starts the real server (gunicorn, two workers) with a tiny model, enrolls a
few devices as phones do, and runs every schemathesis phase (examples,
coverage, fuzzing, stateful) over every operation, authenticated where an
operation says it needs to be (emulation.fuzz_hooks). Fails (exit 1) on any
5xx, any answer that does not match the document, a server that stops
answering, fewer than `min_cases` cases, or a run whose stateful phase never
followed the document's links from a registration through a check-in to an
upload. Writes benchmarks/results/fuzz.json.
"""
from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

from benchmarks import RESULTS, parse_config, write_result


@dataclasses.dataclass(frozen=True)
class FuzzConfig:
    max_examples: int = 800     # generated cases per operation and phase
    min_cases: int = 10_000     # the run fails with fewer
    seed: int = 0


def main() -> int:
    from emulation import fuzz
    from emulation.deployment import start_server
    from emulation.models import tiny_corpus, tiny_model

    config, paths = parse_config(FuzzConfig, __doc__, out=RESULTS / "fuzz.json")
    if (why := fuzz.available()) is not None:
        print(f"error: {why}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="nightjar-fuzz-") as tmp:
        root = Path(tmp)
        model = tiny_model(root / "model", tiny_corpus())
        with start_server(root / "server", model, **fuzz.FUZZ_POPULATION) as server:
            print(f"fuzzing {server.url}/openapi.json: up to {config.max_examples} cases per operation "
                  f"and phase, seed {config.seed}", flush=True)
            summary = fuzz.fuzz(server, "en", config.max_examples, root / "fuzz", seed=config.seed)
    result = {key: summary[key] for key in ("cases", "per_operation", "server_errors", "schema_violations",
                                            "stateful_transitions", "full_chains", "wall_s")}
    write_result(paths["out"], {**result, "max_examples": config.max_examples, "seed": config.seed},
                 show=False)
    problems = fuzz.passed(summary, config.min_cases)
    print(f"{summary['cases']} cases over {len(summary['per_operation'])} method-path pairs in "
          f"{summary['wall_s']:.0f} s: {summary['server_errors']} × 5xx, {summary['schema_violations']} "
          f"schema violations, {summary['stateful_transitions']} stateful transitions, "
          f"{summary['full_chains']} full register → check-in → upload chains")
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
