"""`python -m device_runtime fleet`: run an emulated fleet against a server, print a summary.

The server must run with the same simulated clock the fleet uses: pass the
server's config (`--server-config`, its `clock_start`, `clock_speed` and
`clock_epoch` keys are read) or the three values. Phones' users are training
clients of the federated Shakespeare corpus (`python -m models corpus`).
"""
from __future__ import annotations

import argparse
import collections
import json
import time
import tomllib
from pathlib import Path

from device_runtime.fleet import Fleet, FleetConfig, FleetStatus, build_fleet, shared_clock
from device_runtime.fleet_world import Faults, FleetMix


def totals(fleet: Fleet) -> collections.Counter:
    out: collections.Counter = collections.Counter()
    for counts in fleet.hourly.values():
        out.update(counts)
    return out


def summarize(fleet: Fleet, status: FleetStatus, wall_s: float, sim_start: float) -> dict:
    """The run in numbers: what the phones did, what the server decided, what was injected."""
    t = totals(fleet)

    def by_reason(prefix: str) -> dict[str, int]:
        return {k.split(":", 1)[1]: n for k, n in t.items() if k.startswith(prefix)}

    rounds = sorted(status.rounds, key=lambda r: r["round"])
    return {
        "phones": len(fleet.phones), "wall_s": wall_s,
        "sim_start": sim_start, "sim_end": status.sim_now, "sim_hours": (status.sim_now - sim_start) / 3600,
        "wakes": fleet.wakes,
        "checkins": t["checkin/assigned"] + t["checkin/rejected"] + t["checkin/error"],
        "assigned": t["checkin/assigned"], "rejected": t["checkin/rejected"],
        "checkin_errors": t["checkin/error"],
        "not_eligible_locally": t["policy/not_eligible"],
        "tasks_completed": t["train/completed"], "tasks_discarded": t["train/discarded"],
        "tasks_interrupted": by_reason("train/interrupted:"), "task_errors": by_reason("train/error:"),
        "eval_tasks": sum(n for k, n in t.items() if k.startswith("eval/")),
        "uploads": len(fleet.uploads),
        "faults_injected": dict(fleet.faults.injected),
        "runtime_errors": len(fleet.errors),
        "rounds": [{k: r[k] for k in ("round", "task", "state", "reason", "model_version",
                                      "result_version", "selected", "reported", "aborted", "failed",
                                      "dropped", "opened_at", "closed_at")} for r in rounds],
        "train_rounds_completed": status.train_completed,
        "published_versions": status.published,
        "phones_with_app_model": sum(p.app_version is not None for p in fleet.phones),
    }


def format_rounds(rounds: list[dict]) -> str:
    lines = [f"{'round':>5} {'task':>5} {'state':>9} {'version':>9} {'selected':>8} {'reported':>8} "
             f"{'aborted':>7} {'failed':>6} {'dropped':>7}  sim time (UTC)"]
    for r in rounds:
        ver = (f"{r['model_version']}→{r['result_version']}" if r.get("result_version") is not None
               else f"{r['model_version']}")
        when = time.strftime("%a %H:%M", time.gmtime(r["opened_at"]))
        lines.append(f"{r['round']:>5} {r['task']:>5} {r['state']:>9} {ver:>9} {r['selected']:>8} "
                     f"{r['reported']:>8} {r['aborted']:>7} {r['failed']:>6} {r['dropped']:>7}  {when}"
                     + (f"  ({r['reason']})" if r.get("reason") else ""))
    return "\n".join(lines)


def format_summary(s: dict) -> str:
    hours = s["sim_hours"]
    interrupted = ", ".join(f"{k} {n}" for k, n in sorted(s["tasks_interrupted"].items())) or "none"
    faults = ", ".join(f"{k.replace('_', ' ')} {n}" for k, n in s["faults_injected"].items() if n) or "none"
    start = time.strftime("%a %H:%M", time.gmtime(s["sim_start"]))
    end = time.strftime("%a %H:%M", time.gmtime(s["sim_end"]))
    return "\n".join([
        format_rounds(s["rounds"]), "",
        f"fleet: {s['phones']} phones; simulated {start} → {end} UTC ({hours:.1f} h) in "
        f"{s['wall_s']:.0f} s of wall time",
        f"phones: {s['checkins']} check-ins ({s['assigned']} assigned, {s['rejected']} rejected), "
        f"{s['not_eligible_locally']} wake-ups not eligible (policy: window, charger, Wi-Fi, idle)",
        f"training tasks: {s['tasks_completed']} accepted, {s['tasks_discarded']} not needed (late or "
        f"round full), interrupted: {interrupted}, errors: {sum(s['task_errors'].values())}; "
        f"{s['eval_tasks']} evaluation tasks",
        f"faults injected: {faults}; runtime errors: {s['runtime_errors']}",
        f"rounds: {s['train_rounds_completed']} training rounds completed; published versions: "
        f"{s['published_versions'] or 'none'}; {s['phones_with_app_model']} phones hold a published app model",
    ])


def clock_settings(path: Path) -> tuple[float, float, float]:
    """(start, speed, epoch) from a server config (TOML or JSON)."""
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    try:
        return float(data["clock_start"]), float(data.get("clock_speed", 1.0)), float(data["clock_epoch"])
    except KeyError as e:
        raise SystemExit(f"error: --server-config: {path} has no {e.args[0]} (a fleet needs the "
                         "server on a simulated clock)") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", required=True, help="server URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--data", required=True, type=Path, help="directory for the phones' data")
    p.add_argument("--population", default="en-keyboard")
    p.add_argument("--phones", type=int, default=200)
    p.add_argument("--server-config", type=Path, help="read clock_start/clock_speed/clock_epoch here")
    p.add_argument("--clock-start", type=float, help="simulated time at --clock-epoch (Unix s)")
    p.add_argument("--clock-speed", type=float, help="simulated seconds per real second")
    p.add_argument("--clock-epoch", type=float, help="real time (Unix s) the simulated clock started")
    p.add_argument("--rounds", type=int, help="stop after this many completed training rounds")
    p.add_argument("--published", type=int, default=0, help="... and this many published versions")
    p.add_argument("--sim-hours", type=float, default=float("inf"), help="stop after this simulated time")
    p.add_argument("--max-wall-s", type=float, default=float("inf"), help="stop after this real time")
    p.add_argument("--workers", type=int, default=32, help="phones awake at once (threads)")
    p.add_argument("--trainers", type=int, default=2, help="phones training at once (interpreters)")
    p.add_argument("--zones", default="-8,-5,0,1,5.5,9", help="UTC offsets (hours) of the phones")
    p.add_argument("--unplug-fraction", type=float, default=0.0,
                   help="fault: fraction of training tasks whose phone is unplugged mid-training")
    p.add_argument("--upload-failure-fraction", type=float, default=0.0,
                   help="fault: fraction of uploads whose first attempt is lost")
    p.add_argument("--network-error-rate", type=float, default=0.0,
                   help="fault: fraction of all requests failing with a connection error")
    p.add_argument("--slow-fraction", type=float, default=0.0,
                   help="fault: fraction of phones that finish after every deadline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--summary-json", type=Path, help="also write the summary here")


def main(args: argparse.Namespace) -> int:
    from models.corpus import load_corpus

    if args.server_config:
        start, speed, epoch = clock_settings(args.server_config)
    elif None not in (args.clock_start, args.clock_speed, args.clock_epoch):
        start, speed, epoch = args.clock_start, args.clock_speed, args.clock_epoch
    else:
        raise SystemExit("error: give --server-config or all of --clock-start/--clock-speed/--clock-epoch")
    corpus = load_corpus()
    mix = FleetMix(zones_h=tuple(float(z) for z in args.zones.split(",")), slow_fraction=args.slow_fraction)
    faults = Faults(args.unplug_fraction, args.upload_failure_fraction, args.network_error_rate, args.seed)
    config = FleetConfig(args.server, args.data, args.population, shared_clock(start, speed, epoch),
                         workers=args.workers, trainers=args.trainers, mix=mix, faults=faults,
                         seed=args.seed)
    fleet = build_fleet(config, args.phones, corpus.train_texts)
    t0, sim_start = time.monotonic(), config.clock.now()

    def done(s: FleetStatus) -> bool:
        return (args.rounds is not None and s.train_completed >= args.rounds
                and len(s.published) >= args.published)

    try:
        status = fleet.run(done, max_sim_s=args.sim_hours * 3600, max_wall_s=args.max_wall_s,
                           progress_total=args.rounds)
    finally:
        fleet.close()
    summary = summarize(fleet, status, time.monotonic() - t0, sim_start)
    print(format_summary(summary))
    if args.summary_json:
        args.summary_json.write_text(json.dumps(summary, indent=2))
    return 1 if fleet.errors else 0
