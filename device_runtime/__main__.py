"""`python -m device_runtime …`: run a device, show its participation log, add typed text.

    run     --server URL --data DIR [--population P] [--window 22:00-06:00] [--emulated]
    status  --data DIR
    add     --data DIR TEXT...          (what a keyboard app does as the user types)
    suggest --data DIR CONTEXT          (the latest installed app model's suggestions)
    fleet   ...                         (the emulated fleet, see device_runtime.fleet)

Errors name the flag or file at fault and exit with status 2.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path


def _window(value: str) -> tuple[dt.time, dt.time]:
    try:
        start, end = value.split("-")
        return dt.time.fromisoformat(start), dt.time.fromisoformat(end)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--window: expected HH:MM-HH:MM, got {value!r}")


def cmd_run(args) -> int:
    from device_runtime.conditions import EmulatedConditions, LinuxConditions
    from device_runtime.policy import TrainingPolicy
    from device_runtime.runtime import Device, DeviceSettings

    start, end = args.window
    policy = TrainingPolicy(window_start=start, window_end=end, min_battery=args.min_battery,
                            require_idle=not args.ignore_idle)
    conditions = (EmulatedConditions(dt.datetime.now) if args.emulated else LinuxConditions())
    device = Device(args.data, args.server, conditions, policy,
                    DeviceSettings(population=args.population,
                                   utc_offset_s=dt.datetime.now().astimezone().utcoffset().total_seconds()))
    print(f"device runtime: server {args.server}, data {args.data}, population {args.population}")
    try:
        steps = 0
        while args.max_steps is None or steps < args.max_steps:
            c = conditions.read()
            wait = device.step()
            steps += 1
            last = device.opstats.events(1)
            print(f"{dt.datetime.now():%H:%M:%S} conditions {c.as_checkin()} blockers "
                  f"{policy.blockers(c) or 'none'}; last event {last[0] if last else '-'}; "
                  f"next check-in in {wait:.0f} s", flush=True)
            if args.max_steps is not None and steps >= args.max_steps:
                break
            time.sleep(wait)
    except KeyboardInterrupt:
        pass
    finally:
        device.close()
    return 0


def cmd_status(args) -> int:
    from device_runtime.opstats import OpStats

    path = Path(args.data) / "opstats.db"
    if not path.is_file():
        print(f"error: --data: no participation log at {path}", file=sys.stderr)
        return 2
    log = OpStats(path)
    print(json.dumps({"summary": log.summary(), "last_events": log.events(args.last)}, indent=2))
    return 0


def cmd_add(args) -> int:
    from device_runtime.example_store import ExampleStore

    store = ExampleStore(Path(args.data) / "examples.db")
    for text in args.text:
        store.add(text)
    print(f"{store.count()} examples stored")
    return 0


def cmd_suggest(args) -> int:
    from device_runtime.predictor import Predictor

    manifests = sorted(Path(args.data).glob("app/*/app.manifest.json"),
                       key=lambda p: int(p.parent.name))
    if not manifests:
        print(f"error: --data: no app model installed under {args.data}/app", file=sys.stderr)
        return 2
    predictor = Predictor()
    predictor.install(manifests[-1])
    for word, p in predictor.suggest(args.context):
        print(f"{word}\t{p:.3f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m device_runtime", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run this host as a device")
    r.add_argument("--server", required=True, help="server URL, e.g. http://127.0.0.1:8080")
    r.add_argument("--data", required=True, help="the device's data directory")
    r.add_argument("--population", default="en-keyboard")
    r.add_argument("--window", type=_window, default=_window("22:00-06:00"),
                   help="local training window (default 22:00-06:00)")
    r.add_argument("--min-battery", type=float, default=0.5)
    r.add_argument("--ignore-idle", action="store_true", help="train even when the host is busy")
    r.add_argument("--emulated", action="store_true",
                   help="pretend to be charging, idle and on Wi-Fi (instead of reading the host)")
    r.add_argument("--max-steps", type=int, default=None, help="stop after this many check-ins")
    r.set_defaults(func=cmd_run)
    s = sub.add_parser("status", help="the participation log (opstats)")
    s.add_argument("--data", required=True)
    s.add_argument("--last", type=int, default=10)
    s.set_defaults(func=cmd_status)
    a = sub.add_parser("add", help="store typed text as training examples")
    a.add_argument("--data", required=True)
    a.add_argument("text", nargs="+")
    a.set_defaults(func=cmd_add)
    g = sub.add_parser("suggest", help="next-word suggestions from the installed app model")
    g.add_argument("--data", required=True)
    g.add_argument("context")
    g.set_defaults(func=cmd_suggest)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
