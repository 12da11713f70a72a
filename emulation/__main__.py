"""`python -m emulation fleet`: run an emulated fleet against a running server, print a summary.

    fleet --server URL --data DIR (--server-config FILE | --clock-start S --clock-speed X
          --clock-epoch E) [--phones 200] [--rounds N] [--published K] [--sim-hours H]
          [--unplug-fraction F] [--upload-failure-fraction F] [--network-error-rate F]
          [--slow-fraction F] [--summary-json FILE] ...

The server must run with the same simulated clock the fleet uses: pass the
server's config (`--server-config`, its `clock_start`, `clock_speed` and
`clock_epoch` keys are read) or the three values. Phones' users are training
clients of the federated Shakespeare corpus (`python -m models corpus`).
Errors name the flag or file at fault and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


class UsageError(Exception):
    """A flag or file that cannot be used; the message names it."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", required=True, help="server URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--data", required=True, type=Path, help="directory for the phones' data")
    p.add_argument("--population", default="en-keyboard")
    p.add_argument("--phones", type=int, default=200)
    p.add_argument("--server-config", type=Path,
                   help="read clock_start/clock_speed/clock_epoch, the operator token and the population's "
                        "enrollment file (from `server init`) from this server's config and state")
    p.add_argument("--enrollment", type=Path, help="the population's enrollment file (else: --server-config's)")
    p.add_argument("--operator-token", help="to read round analytics (else: --server-config's)")
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


def cmd_fleet(args: argparse.Namespace) -> int:
    from device_runtime.enrollment import Enrollment
    from emulation.deployment import enrollment, operator_token
    from emulation.fleet import FleetConfig, FleetStatus, build_fleet, read_server_clock, shared_clock
    from emulation.report import format_summary, summarize
    from emulation.world import Faults, FleetMix
    from models.corpus import load_corpus

    if args.server_config:
        if not args.server_config.is_file():
            raise UsageError(f"--server-config: no file at {args.server_config}")
        try:
            start, speed, epoch = read_server_clock(args.server_config)
        except ValueError as e:
            raise UsageError(f"--server-config: {e}") from None
    elif None not in (args.clock_start, args.clock_speed, args.clock_epoch):
        start, speed, epoch = args.clock_start, args.clock_speed, args.clock_epoch
    else:
        raise UsageError("give --server-config or all of --clock-start/--clock-speed/--clock-epoch")
    if args.phones < 1:
        raise UsageError("--phones must be >= 1")
    corpus = load_corpus()
    mix = FleetMix(zones_h=tuple(float(z) for z in args.zones.split(",")), slow_fraction=args.slow_fraction)
    faults = Faults(args.unplug_fraction, args.upload_failure_fraction, args.network_error_rate, args.seed)
    clock = shared_clock(start, speed, epoch)
    device_enrollment, token = None, args.operator_token
    if args.enrollment is not None:
        device_enrollment = Enrollment.from_file(args.enrollment, now=clock.now)
    elif args.server_config is not None:
        device_enrollment = enrollment(args.server_config, args.population, now=clock.now)
        token = token or operator_token(args.server_config)
    config = FleetConfig(args.server, args.data, args.population, clock, workers=args.workers,
                         trainers=args.trainers, mix=mix, faults=faults, seed=args.seed,
                         enrollment=device_enrollment, operator_token=token)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emulation", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fleet = sub.add_parser("fleet", help="run N emulated phones against a server")
    add_arguments(fleet)
    fleet.set_defaults(func=cmd_fleet)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
