"""`python -m emulation …`: the world around the product, from the command line.

    fleet       --server URL --data DIR (--server-config FILE | --clock-start S --clock-speed X
                --clock-epoch E) [--phones 200] [--rounds N] [--published K] [--sim-hours H]
                [--unplug-fraction F] [--upload-failure-fraction F] [--network-error-rate F]
                [--slow-fraction F] [--seed N] [--summary-json FILE] ...
    tiny-model  --out DIR       (the tests' synthetic model, vocabulary and plan: `make cluster` deploys it)
    personalize --checkpoint CKPT [--epochs 1] [--lr 0.05] [--cache-weight 0.1] [--personal-layers L]
                [--max-users N] [--plot PNG] [--json FILE]

`fleet` runs N emulated phones against a running server, which must run
with the same simulated clock the fleet uses: pass the server's config
(`--server-config`, its `clock_start`, `clock_speed` and `clock_epoch` keys
are read) or the three values. Phones' users are training clients of the
federated Shakespeare corpus (`python -m models corpus`). `personalize` has
every held-out user's phone personalize a checkpoint, offline, with the
phone's own LiteRT plan and code (models.personalize). Errors name the flag
or file at fault and exit with status 2 (contract.cli).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from contract.cli import ArgumentParser, UsageError, at_least, run

if TYPE_CHECKING:
    from emulation.fleet import FleetConfig
    from emulation.world import Faults


def add_fleet_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", required=True, help="server URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--data", required=True, type=Path, help="directory for the phones' data")
    p.add_argument("--population", default="en-keyboard")
    p.add_argument("--phones", type=at_least(1), default=200)
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
    p.add_argument("--workers", type=at_least(1), default=32, help="phones awake at once (threads)")
    p.add_argument("--trainers", type=at_least(1), default=2, help="phones training at once (interpreters)")
    p.add_argument("--zones", default="-8,-5,0,1,5.5,9", help="UTC offsets (hours) of the phones")
    p.add_argument("--unplug-fraction", type=float, default=0.0,
                   help="fault: fraction of training tasks whose phone is unplugged mid-training")
    p.add_argument("--upload-failure-fraction", type=float, default=0.0,
                   help="fault: fraction of uploads whose first attempt is lost")
    p.add_argument("--network-error-rate", type=float, default=0.0,
                   help="fault: fraction of all requests failing with a connection error")
    p.add_argument("--slow-fraction", type=float, default=0.0,
                   help="fault: fraction of phones that finish after every deadline")
    p.add_argument("--seed", type=int, default=0, help="the fleet's draws (profiles, faults)")
    p.add_argument("--summary-json", type=Path, help="also write the summary here")


def faults(args: argparse.Namespace) -> "Faults":
    """The faults the flags ask for (no others: nothing here tampers with uploads)."""
    from emulation.world import Faults

    return Faults(unplug_fraction=args.unplug_fraction, upload_failure_fraction=args.upload_failure_fraction,
                  network_error_rate=args.network_error_rate, seed=args.seed)


def server_clock(args: argparse.Namespace) -> tuple[float, float, float]:
    """(start, speed, epoch) of the server's simulated clock, from its config or the three flags."""
    from emulation.fleet import read_server_clock

    if args.server_config:
        if not args.server_config.is_file():
            raise UsageError(f"--server-config: no file at {args.server_config}")
        try:
            return read_server_clock(args.server_config)
        except ValueError as e:
            raise UsageError(f"--server-config: {e}") from None
    if None in (args.clock_start, args.clock_speed, args.clock_epoch):
        raise UsageError("give --server-config or all of --clock-start/--clock-speed/--clock-epoch")
    return args.clock_start, args.clock_speed, args.clock_epoch


def fleet_config(args: argparse.Namespace) -> "FleetConfig":
    """The `FleetConfig` the flags describe (emulation.fleet)."""
    from deploy.server_process import operator_token
    from device_runtime.enrollment import Enrollment
    from emulation.deployment import enrollment
    from emulation.fleet import FleetConfig, shared_clock
    from emulation.world import FleetMix

    clock = shared_clock(*server_clock(args))
    device_enrollment, token = None, args.operator_token
    if args.enrollment is not None:
        device_enrollment = Enrollment.from_file(args.enrollment, now=clock.now)
    elif args.server_config is not None:
        device_enrollment = enrollment(args.server_config, args.population, now=clock.now)
        token = token or operator_token(args.server_config)
    mix = FleetMix(zones_h=tuple(float(z) for z in args.zones.split(",")), slow_fraction=args.slow_fraction)
    return FleetConfig(args.server, args.data, args.population, clock, workers=args.workers,
                       trainers=args.trainers, mix=mix, faults=faults(args), seed=args.seed,
                       enrollment=device_enrollment, operator_token=token)


def cmd_fleet(args: argparse.Namespace) -> int:
    from emulation.fleet import FleetStatus, build_fleet
    from emulation.report import format_summary, summarize
    from models.corpus import load_corpus

    config = fleet_config(args)
    fleet = build_fleet(config, args.phones, load_corpus().train_texts)
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


def cmd_tiny_model(args: argparse.Namespace) -> None:
    """The tests' TINY model on synthetic plays: what `python -m server init` takes (`make cluster`)."""
    from emulation.models import tiny_corpus, tiny_model

    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out: {args.out} exists and is not a directory")
    model = tiny_model(args.out, tiny_corpus())
    print(f"--checkpoint {model.checkpoint} --vocab {model.vocab} --plan-dir {model.plan_dir}")


def cmd_personalize(args: argparse.Namespace) -> None:
    """Every held-out user personalizes `--checkpoint` as its phone would (models.personalize)."""
    import tempfile

    from contract.tasks.personal import PersonalSpec
    from models.cli_common import load_corpus_for, model_config, read_checkpoint
    from models.personalize import evaluate_users, plot, report
    from tflite_export import export_plan
    from tflite_export.reader import load_plan

    config = model_config(args.config)
    flat = read_checkpoint(args.checkpoint, config)
    corpus = load_corpus_for(args, config)
    try:
        spec = PersonalSpec(args.epochs, args.lr, args.cache_weight).validate()
    except ValueError as e:
        raise UsageError(f"--epochs/--lr/--cache-weight: {e}") from None
    layers = tuple(n for n in (args.personal_layers or "").split(",") if n) or None
    with tempfile.TemporaryDirectory() as scratch:
        try:
            manifest = export_plan(config.with_vocab(len(corpus.vocab)), flat, corpus.vocab, Path(scratch) / "plan",
                                   personal_layers=layers)
        except ValueError as e:
            raise UsageError(f"--personal-layers: {e}") from None
        users = dict(list(sorted(corpus.heldout.items()))[:args.max_users or None])
        rows = evaluate_users(load_plan(manifest), flat, users, spec)
    r = report(rows)
    if args.plot:
        plot(rows, Path(args.plot))
    g, q = r["global"], r["personal"]
    print(f"{r['users']} held-out users: mean top-1 global {g['top1']:.2%} → personal {q['top1']:.2%} "
          f"({r['relative_gain']:+.1%}); helped {r['helped']:.0%}, hurt {r['hurt']:.0%}, fell back "
          f"{r['fell_back']:.0%}\nworst decile (p10) {g['p10']:.2%} → {q['p10']:.2%}; median {g['median']:.2%} → "
          f"{q['median']:.2%}; below half the mean {g['below_half_mean']:.0%} → {q['below_half_mean']:.0%}")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))


def add_personalize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="the global model")
    p.add_argument("--epochs", type=at_least(0), default=1, help="fine-tuning passes (0: the cache only)")
    p.add_argument("--lr", type=float, default=0.05, help="fine-tuning learning rate")
    p.add_argument("--cache-weight", type=float, default=0.1, help="the word cache's share (0: none)")
    p.add_argument("--personal-layers", default=None, help="comma-separated weights to fine-tune (default: all)")
    p.add_argument("--max-users", type=at_least(0), default=0, help="only the first N held-out users (0: all)")
    p.add_argument("--plot", default=None, help="write the per-user top-1 CDFs to this PNG")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m emulation", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fleet = sub.add_parser("fleet", help="run N emulated phones against a server")
    add_fleet_arguments(fleet)
    fleet.set_defaults(func=cmd_fleet)
    tiny = sub.add_parser("tiny-model", help="write the tests' tiny model, its vocabulary and training plan")
    tiny.add_argument("--out", required=True, type=Path, help="directory to write them to")
    tiny.set_defaults(func=cmd_tiny_model)
    from models.cli_common import common_flags

    personal = sub.add_parser("personalize", parents=[common_flags()],
                              help="personalization and fairness on the held-out users (as their phones would)")
    add_personalize_arguments(personal)
    personal.set_defaults(func=cmd_personalize)
    return parser


def main(argv: list[str] | None = None) -> int:
    from models.corpus import CorpusError

    return run(build_parser(), argv, user_errors=(CorpusError,))


if __name__ == "__main__":
    sys.exit(main())
