"""Fleet benchmark: how large a fleet this machine emulates, and how fast its rounds go.

`make bench-fleet` runs the real server (gunicorn, SQLite) and a fleet of
emulated phones — each a real device runtime with its own data directory —
through one simulated night, and writes `benchmarks/results/fleet.json`:

* `max_phones`: the fleet size run (default 10,000), if every phone ran
  without a runtime error and rounds completed;
* `phones_per_round`: mean reports per completed training round (goal 1,000,
  up to 1,300 selected);
* `wall_s_per_round`: mean real seconds from a training round's opening to
  its completion (selection, training on the phones, uploads, aggregation);
* `rounds_per_simulated_night`: training rounds completed per 8 simulated
  hours of the night (22:00–06:00 where the phones are; measured over the
  part of the night the time budget covers, and scaled to 8 hours).

The model is the TINY config (20k weights): this measures the system's
coordination at scale — check-ins, selection, 1,000 uploads per round,
aggregation — not on-device compute, which `make bench-device` measures for
the Gboard-size plan. The phones live in two neighbouring time zones so
that most of them are eligible at night, as a national keyboard population
would be. Wall time is bounded (`--max-wall-s`, default 12 minutes).
"""
from __future__ import annotations

import dataclasses
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks import RESULTS, add_config_flags, write_result
from contract.cli import ArgumentParser, parse

REPO = Path(__file__).resolve().parents[1]
NIGHT_START_UTC = 1_795_474_800.0   # Mon 2026-11-23 23:00 UTC (midnight in UTC+1)


@dataclasses.dataclass(frozen=True)
class FleetBench:
    phones: int = 10_000
    goal: int = 1_000
    clock_speed: float = 40.0
    max_wall_s: float = 720.0
    sim_hours: float = 8.0
    workers: int = 48
    trainers: int = 2
    seed: int = 0
    # DP-FTRL (0: no DP): the population trains under it with at least this many DP rounds between a
    # device's participations and at most `ftrl_participations` per `ftrl_horizon`; the result then says
    # what fraction of the check-ins that reached selection the rule turned away.
    ftrl_separation: int = 0
    ftrl_participations: int = 3
    ftrl_horizon: int = 100


def run(cfg: FleetBench, work: Path) -> dict:
    from deploy.server_process import ServerProcess, free_port, operator_token
    from emulation.deployment import enrollment, init_population, simulated_clock, write_server_config
    from emulation.fleet import FleetConfig, build_fleet, read_server_clock, shared_clock
    from emulation.models import tiny_model
    from emulation.report import format_summary, summarize
    from emulation.world import FleetMix
    from models.corpus import load_corpus
    from models.model import TINY

    corpus = load_corpus(vocab_size=TINY.vocab_size - 4)
    model = tiny_model(work / "model", corpus)
    mix = FleetMix(zones_h=(0.0, 1.0))

    def fleet_config(clock, url: str = "http://unused", config: Path | None = None) -> FleetConfig:
        return FleetConfig(url, work / "fleet", "en", clock, workers=cfg.workers,
                           trainers=cfg.trainers, mix=mix, persistent=False, seed=cfg.seed,
                           enrollment=enrollment(config, "en", now=clock.now) if config else None,
                           operator_token=operator_token(config) if config else None)

    t0 = time.monotonic()
    # Phones' stores first, on a clock frozen at the start of the night (it takes a while).
    build_fleet(fleet_config(shared_clock(NIGHT_START_UTC, 1e-9, time.time())), cfg.phones,
                corpus.train_texts).prepare()
    prepare_s = time.monotonic() - t0
    population = dict(goal=cfg.goal, min_round_size=5, over_selection=1.3, min_selected_fraction=0.5,
                      min_report_fraction=0.5, selection_window_s=1800.0, reporting_window_s=3600.0,
                      client_lr=0.5, client_max_examples=32, eval_every=0, publish_every=0,
                      eligibility={"min_separation_s": 3600.0})
    if cfg.ftrl_separation:
        population["dp"] = {"mechanism": "ftrl", "noise_multiplier": 0.5, "initial_clip": 0.5,
                            "min_separation_rounds": cfg.ftrl_separation,
                            "max_participations": cfg.ftrl_participations, "horizon_rounds": cfg.ftrl_horizon}
    config = write_server_config(work / "server", "en", **population,
                                 server=simulated_clock(NIGHT_START_UTC, cfg.clock_speed))
    init_population(config, model, "en")
    server = ServerProcess(config, free_port(), work / "server" / "server.log", workers=2, threads=16)
    try:
        server.start()
        fc = fleet_config(shared_clock(*read_server_clock(config)), server.url, config)
        fleet = build_fleet(fc, cfg.phones, corpus.train_texts)
        t1, sim0 = time.monotonic(), fc.clock.now()
        try:
            status = fleet.run(max_sim_s=cfg.sim_hours * 3600, max_wall_s=cfg.max_wall_s, poll_s=2.0)
        finally:
            fleet.close()
        summary = summarize(fleet, status, time.monotonic() - t1, sim0)
        ledger = server.operator_get("/v1/populations/en/privacy").json() if cfg.ftrl_separation else {}
    finally:
        server.kill()
    print(format_summary(summary))
    done = [r for r in summary["rounds"] if r["task"] == "train" and r["state"] == "completed"]
    if not done:
        raise SystemExit("no training round completed: nothing to report")
    night_h = summary["sim_hours"]
    return {
        "max_phones": cfg.phones if summary["runtime_errors"] == 0 else None,
        "phones_per_round": round(sum(r["reported"] for r in done) / len(done), 1),
        "wall_s_per_round": round(sum(r["closed_at"] - r["opened_at"] for r in done) / len(done)
                                  / cfg.clock_speed, 2),
        "rounds_per_simulated_night": round(len(done) / night_h * 8.0, 2),
        "model": "tiny", "goal": cfg.goal, "selected_per_round": round(
            sum(r["selected"] for r in done) / len(done), 1),
        "rounds_completed": len(done), "rounds_failed": sum(r["state"] == "failed" for r in summary["rounds"]),
        "simulated_hours": round(night_h, 2), "clock_speed": cfg.clock_speed,
        "fleet_wall_s": round(summary["wall_s"], 1), "prepare_s": round(prepare_s, 1),
        "checkins": summary["checkins"], "uploads": summary["uploads"],
        "runtime_errors": summary["runtime_errors"], "workers": cfg.workers, "trainers": cfg.trainers,
        "fleet_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "dp_ftrl": _participation(ledger) if cfg.ftrl_separation else None,
    }


def _participation(ledger: dict) -> dict:
    """What DP-FTRL's participation rule did: b, k, the check-ins it turned away of those it saw, ε."""
    part = ledger.get("participation") or {}
    checked = part.get("checked", 0)
    return {**part, "refused_fraction": part.get("refused", 0) / checked if checked else 0.0,
            "epsilon": (ledger.get("spent") or {}).get("epsilon"), "assumption": ledger.get("assumption")}


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    add_config_flags(p, FleetBench)
    p.add_argument("--work-dir", type=Path, help="default: a temporary directory (in /dev/shm if present)")
    p.add_argument("--out", type=Path, default=RESULTS / "fleet.json")
    args = vars(parse(p, argv))
    work_dir, out = args.pop("work_dir"), args.pop("out")
    cfg = FleetBench(**args)
    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    work = work_dir or Path(tempfile.mkdtemp(prefix="nightjar-fleet-", dir=base))
    try:
        result = run(cfg, work)
    finally:
        if work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    write_result(out, result)


if __name__ == "__main__":
    main()
