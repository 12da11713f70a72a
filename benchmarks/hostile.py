"""`make bench-hostile`: what one hostile phone can do to a population, and what slow clients do to the server.

The attacks (emulation.hostile): a phone with a genuine attestation and a
modified app, omniscient about the honest phones, attacks one round among
five honest ones through the real server — under secure aggregation (Σw ≡ 0,
Σw ≡ 1, codes off the grid, a wrong reveal, a reveal for the wrong
neighbour, the largest update the sum's plausibility checks let through) and
in plain rounds (a huge claimed weight, a huge norm, codes off the grid, a
full-norm update claiming one example); each with an honest round before, a
SIGKILL and restart after, and an honest round that must complete. Each row:
the server's answers by status, 5xx, how the round ended, whether the next
completed, and the model step it caused over the honest round's.

Beside the measured rows, the bound contract.secagg.plausible.largest_step
gives for the same round (the most a modified phone can move the mean after
the checks, over an honest round's step), and for the Gboard-size round.

Slow clients (benchmarks.slow_clients): stalled connections against
`server run`, honest check-ins' p99 and whether /healthz answered.
→ benchmarks/results/hostile.json.
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks import RESULTS, parse_config, write_result


@dataclasses.dataclass(frozen=True)
class HostileConfig:
    slow_connections: int = 200       # stalled connections of the slowloris drill


def bounds_rows() -> list[dict]:
    """largest_step for the drill's round and for a Gboard-size one (1,422,638 weights, C = 2.5, 8 bits)."""
    from contract.secagg.plausible import largest_step
    from contract.update.spec import UpdateSpec

    rows = []
    for name, size, reports in (("drill", 272, 6), ("gboard_size", 1_422_638, 100), ("gboard_size", 1_422_638, 1000)):
        for weighting, max_weight in (("examples", 100), ("uniform", 1)):
            spec = UpdateSpec(bits=8, clip_norm=2.5, weighting=weighting, max_weight=max_weight,
                              secure_aggregation=True, rotation=True).bind(size, "0" * 64, "bench/1", 1, reports)
            step = largest_step(spec, reports)
            rows.append({"round": name, "reports": reports, "weighting": weighting, "max_weight": spec.spec.weight_cap,
                         "largest_step": step.largest, "honest_step": step.honest, "ratio": step.ratio})
    return rows


def main() -> int:
    from emulation.hostile import drill_all

    cfg, flags = parse_config(HostileConfig, __doc__, {"skip_slow_clients": "only the attacks"})
    t0 = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="nightjar-hostile-"))
    try:
        attacks = drill_all(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    slow = None
    if not flags["skip_slow_clients"]:
        from benchmarks.slow_clients import slow_client_drill
        slow = slow_client_drill(stalled=cfg.slow_connections)
    result = {"config": dataclasses.asdict(cfg), "attacks": attacks, "largest_step_bound": bounds_rows(),
              "slow_clients": slow, "wall_s": round(time.monotonic() - t0, 1)}
    print(f"{'attack':<26}{'secure':>7}  {'outcome':<28}{'5xx':>4}  next  step ratio")
    for a in attacks:
        ratio = "—" if a["step_ratio"] is None else f"{a['step_ratio']:.2f}"
        print(f"{a['name']:<26}{str(a['secure_aggregation']):>7}  {a['round_outcome']:<28}{a['server_errors']:>4}  "
              f"{'yes' if a['next_round_completed'] else 'NO':<5} {ratio}")
    write_result(RESULTS / "hostile.json", result, show=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
