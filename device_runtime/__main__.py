"""`python -m device_runtime …`: run a device, show its participation log, add typed text.

    run     --server URL --data DIR [--population P] [--window 22:00-06:00] [--emulated]
            [--max-steps N]
    status  --data DIR [--last N]
    add     --data DIR TEXT...          (what a keyboard app does as the user types)
    suggest --data DIR CONTEXT          (the latest installed app model's suggestions)

Errors name the flag or file at fault and exit with status 2 (contract.cli).
"""
from __future__ import annotations

import argparse
import datetime as dt
import itertools
import sys
import time
from pathlib import Path

from contract.cli import ArgumentParser, UsageError, at_least, run


def _window(value: str) -> tuple[dt.time, dt.time]:
    try:
        start, end = value.split("-")
        return dt.time.fromisoformat(start), dt.time.fromisoformat(end)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HH:MM-HH:MM, got {value!r}")


def _data_dir(value: str, must_exist: bool) -> Path:
    """`--data` as a directory, or an ArgumentTypeError naming what is wrong with it."""
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is not a directory")
    if must_exist and not path.is_dir():
        raise argparse.ArgumentTypeError(f"no device data directory at {value}")
    return path


def _server(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"expected an http(s):// URL, got {value!r}")
    return value


def cmd_run(args) -> int:
    from device_runtime.conditions import EmulatedConditions, LinuxConditions
    from device_runtime.policy import TrainingPolicy
    from device_runtime.runtime import Device, DeviceSettings

    start, end = args.window
    policy = TrainingPolicy(window_start=start, window_end=end, min_battery=args.min_battery,
                            require_idle=not args.ignore_idle)
    conditions = EmulatedConditions(dt.datetime.now) if args.emulated else LinuxConditions()
    offset = dt.datetime.now().astimezone().utcoffset()
    enrollment = None
    if args.enrollment is not None:
        from device_runtime.enrollment import Enrollment

        try:
            enrollment = Enrollment.from_file(args.enrollment)
        except (OSError, ValueError, KeyError) as e:
            raise UsageError(f"--enrollment: {args.enrollment} is not an enrollment file ({e})") from None
    device = Device(args.data, args.server, conditions, policy,
                    DeviceSettings(population=args.population,
                                   utc_offset_s=offset.total_seconds() if offset else 0.0),
                    enrollment=enrollment)
    if enrollment is None and not device.registered:
        device.close()
        raise UsageError(f"--enrollment: {args.data} holds no device identity yet, so the device must enroll;"
                         " pass the population's enrollment file")
    print(f"device runtime: server {args.server}, data {args.data}, population {args.population}",
          flush=True)
    try:
        steps = 0
        while args.max_steps is None or steps < args.max_steps:
            c = conditions.read()
            marker = device.opstats.events(1)
            wait = device.step()
            steps += 1
            new = list(itertools.takewhile(lambda e: marker[:1] != [e], device.opstats.events(20)))
            what = "; ".join(format_event(e, with_time=False) for e in reversed(new)) or "-"
            print(f"{dt.datetime.now():%H:%M:%S} {_conditions_line(c)} "
                  f"blockers: {', '.join(policy.blockers(c)) or 'none'} | {what} | "
                  f"next check-in in {wait:.0f} s", flush=True)
            if args.max_steps is not None and steps >= args.max_steps:
                break
            time.sleep(wait)
    except KeyboardInterrupt:
        pass
    finally:
        device.close()
    return 0


def _conditions_line(c) -> str:
    return (f"charging={'yes' if c.charging else 'no'} battery={c.battery:.0%} "
            f"idle={'yes' if c.idle else 'no'} unmetered={'yes' if c.unmetered else 'no'} "
            f"free={c.free_memory_mb} MiB")


def _fmt_time(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


_PHASES = ("download_s", "prepare_s", "train_s", "eval_s", "upload_s")
_HIDDEN = ("ts", "kind", "outcome", "session", "task", "round")


def format_event(event: dict, with_time: bool = True) -> str:
    """One participation-log event on one line: time, kind, outcome, then what matters of it."""
    parts = []
    if "task" in event:
        parts.append(f"{event['task']}" + (f" round {event['round']}" if event.get("round") else ""))
    if "reason" in event:
        parts.append(f"reason {event['reason']}")
    if "examples" in event:
        parts.append(f"{event['examples']} examples, {event.get('batches', 0)} batches")
    phases = [f"{k[:-2]} {event[k]:.3f} s" for k in _PHASES if k in event]
    if phases:
        parts.append(", ".join(phases))
    if "bytes_in" in event:
        parts.append(f"{_fmt_bytes(event['bytes_in'])} in, {_fmt_bytes(event.get('bytes_out', 0))} out")
    shown = set(_HIDDEN) | set(_PHASES) | {"reason", "examples", "batches", "bytes_in", "bytes_out"}
    parts += [f"{k}={v}" for k, v in event.items() if k not in shown]
    head = f"{_fmt_time(event['ts'])}  " if with_time else ""
    return f"{head}{event['kind']:<9} {event['outcome']:<12} {'; '.join(parts)}".rstrip()


def cmd_status(args) -> int:
    from device_runtime.example_store import ExampleStore
    from device_runtime.opstats import OpStats

    path, examples = args.data / "opstats.db", args.data / "examples.db"
    if not path.is_file() and not examples.is_file():
        raise UsageError(f"--data: {args.data} holds no device data (no opstats.db, no examples.db)")
    summary, events, last = {}, [], None
    if path.is_file():
        log = OpStats(path)
        try:
            summary, events, last = log.summary(), log.events(args.last), log.last_success()
        finally:
            log.close()
    print(f"participation log: {sum(summary.values())} events, last completed task "
          f"{_fmt_time(last) + ' UTC' if last is not None else 'never'}")
    if examples.is_file():
        store = ExampleStore(examples)
        print(f"examples stored: {store.count()}")
        store.close()
    apps = sorted(int(p.parent.name) for p in args.data.glob("app/*/app.manifest.json")
                  if p.parent.name.isdigit())
    print(f"app model installed: {f'version {apps[-1]}' if apps else 'none'}")
    if summary:
        print(f"\n{'kind':<9} {'outcome':<12} {'count':>6}")
        for key, n in summary.items():
            kind, outcome = key.split("/", 1)
            print(f"{kind:<9} {outcome:<12} {n:>6}")
        print(f"\nlast {len(events)} events, newest first (times UTC):")
        for event in events:
            print(format_event(event))
    return 0


def cmd_add(args) -> int:
    from device_runtime.example_store import ExampleStore

    store = ExampleStore(args.data / "examples.db")
    try:
        for text in args.text:
            store.add(text)
        print(f"{store.count()} examples stored")
    finally:
        store.close()
    return 0


def cmd_suggest(args) -> int:
    from device_runtime.predictor import Predictor

    predictor = Predictor()
    if predictor.install_latest(args.data / "app") is None:
        raise UsageError(f"--data: no app model installed under {args.data / 'app'}")
    for word, p in predictor.suggest(args.context):
        print(f"{word}\t{p:.3f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m device_runtime", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run this host as a device")
    r.add_argument("--server", required=True, type=_server,
                   help="server URL, e.g. http://127.0.0.1:8080")
    r.add_argument("--data", required=True, type=lambda v: _data_dir(v, must_exist=False),
                   help="the device's data directory (created if missing)")
    r.add_argument("--population", default="en-keyboard")
    r.add_argument("--window", type=_window, default=_window("22:00-06:00"),
                   help="local training window (default 22:00-06:00; equal ends: all day)")
    r.add_argument("--min-battery", type=float, default=0.5)
    r.add_argument("--ignore-idle", action="store_true", help="train even when the host is busy")
    r.add_argument("--emulated", action="store_true",
                   help="pretend to be charging, idle and on Wi-Fi (instead of reading the host)")
    r.add_argument("--max-steps", type=at_least(1), default=None, help="stop after this many check-ins")
    r.add_argument("--enrollment", type=Path, default=None,
                   help="the population's enrollment file from `python -m server init` (development: its app "
                        "credential, and the development attestation issuer standing in for Play Integrity)")
    r.set_defaults(func=cmd_run)
    s = sub.add_parser("status", help="the participation log (opstats)")
    s.add_argument("--data", required=True, type=lambda v: _data_dir(v, must_exist=True))
    s.add_argument("--last", type=at_least(1), default=10, help="events to list (default 10)")
    s.set_defaults(func=cmd_status)
    a = sub.add_parser("add", help="store typed text as training examples")
    a.add_argument("--data", required=True, type=lambda v: _data_dir(v, must_exist=False))
    a.add_argument("text", nargs="+")
    a.set_defaults(func=cmd_add)
    g = sub.add_parser("suggest", help="next-word suggestions from the installed app model")
    g.add_argument("--data", required=True, type=lambda v: _data_dir(v, must_exist=True))
    g.add_argument("context")
    g.set_defaults(func=cmd_suggest)
    return p


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
