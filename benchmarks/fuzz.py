"""`make fuzz`: schemathesis against the live server from its own /openapi.json.

Starts the real server (gunicorn, two workers) with a tiny model, enrolls a
few devices as phones do, and runs schemathesis with every check
(`--checks all`: conformance of statuses, content types, headers and bodies,
positive data accepted, negative data refused, missing headers, methods,
authentication) in every phase (examples, coverage, fuzzing, stateful) over
every operation, authenticated where an operation says it needs to be
(emulation.fuzz_hooks). Fails (exit 1) on any failed check — a 5xx among
them —, a server that stops answering, fewer than `min_cases` cases, or a run
whose stateful phase never followed the document's links from a registration
through a check-in to an upload. The server is stopped however the run ends
(`fuzz_server`), so nothing is left running. Writes benchmarks/results/fuzz.json.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from benchmarks import RESULTS, parse_config, write_result


@dataclasses.dataclass(frozen=True)
class FuzzConfig:
    max_examples: int = 800     # generated cases per operation and phase
    min_cases: int = 10_000     # the run fails with fewer
    seed: int = 0


@contextlib.contextmanager
def fuzz_server(root: Path) -> Iterator:
    """The real server with a tiny model and the fuzz population, stopped (its whole process group)
    on the way out. start_server has already started it: it is not entered again (that started a
    second server and left the first running)."""
    from emulation import fuzz
    from emulation.deployment import start_server
    from emulation.models import tiny_corpus, tiny_model

    model = tiny_model(root / "model", tiny_corpus())
    server = start_server(root / "server", model, **fuzz.FUZZ_POPULATION)
    try:
        yield server
    finally:
        server.kill()


def main() -> int:
    from emulation import fuzz

    config, paths = parse_config(FuzzConfig, __doc__, out=RESULTS / "fuzz.json")
    if (why := fuzz.available()) is not None:
        print(f"error: {why}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="nightjar-fuzz-") as tmp:
        root = Path(tmp)
        with fuzz_server(root) as server:
            print(f"fuzzing {server.url}/openapi.json with checks {fuzz.CHECKS}: up to {config.max_examples} "
                  f"cases per operation and phase, seed {config.seed}", flush=True)
            summary = fuzz.fuzz(server, "en", config.max_examples, root / "fuzz", seed=config.seed)
    result = {key: summary[key] for key in ("cases", "per_operation", "server_errors", "schema_violations",
                                            "failed_checks", "checks", "phases", "stateful_transitions",
                                            "full_chains", "wall_s")}
    write_result(paths["out"], {**result, "max_examples": config.max_examples, "seed": config.seed},
                 show=False)
    problems = fuzz.passed(summary, config.min_cases)
    print(f"{summary['cases']} cases over {len(summary['per_operation'])} method-path pairs in "
          f"{summary['wall_s']:.0f} s, phases {', '.join(summary['phases'])}, {len(summary['checks'])} checks: "
          f"{summary['failed_checks']} failed checks, {summary['server_errors']} × 5xx, "
          f"{summary['schema_violations']} schema violations, {summary['stateful_transitions']} stateful "
          f"transitions, {summary['full_chains']} full register → check-in → upload chains")
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
