"""python -m deploy: the multi-replica deployment on one machine (PostgreSQL, nginx, N replicas).

    up      --dir D --config BASE [--replicas 3] [--port 8080] [--checkpoint C --vocab V --plan-dir P]
    down    --dir D
    status  --dir D

`up` starts PostgreSQL in D/postgres (Debian's binaries), writes one config
per replica (D/replica-<i>.json: the base config on the shared database),
runs `server init` once if a model is given (`make cluster` gives the tests'
tiny one, from `python -m emulation tiny-model`), starts the replicas and
nginx, and returns, leaving them running; `down` stops them. Errors name the
flag or file at fault and exit with status 2 (contract.cli).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from contract.cli import ArgumentParser, UsageError, at_least, run
from deploy.cluster import Cluster, stop_recorded
from deploy.nginx import NginxUnavailable
from deploy.postgres import PostgresUnavailable


def cmd_up(args) -> None:
    if (args.dir / "cluster.json").exists():
        raise UsageError(f"--dir: {args.dir} already has a running deployment "
                         f"(python -m deploy down --dir {args.dir})")
    if not args.config.is_file():
        raise UsageError(f"--config: no such file {args.config}")
    for flag in ("checkpoint", "vocab", "plan_dir"):
        path = getattr(args, flag)
        if path is not None and not path.exists():
            raise UsageError(f"--{flag.replace('_', '-')}: no such file or directory {path}")
    cluster = Cluster(args.dir, args.config, args.replicas, args.port, workers=args.workers).prepare()
    if args.checkpoint:
        command = [sys.executable, "-m", "server", "init", "--config", str(cluster.config(0)),
                   "--checkpoint", str(args.checkpoint)]
        command += ["--vocab", str(args.vocab)] if args.vocab else []
        command += ["--plan-dir", str(args.plan_dir)] if args.plan_dir else []
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            cluster.pg.stop()
            raise UsageError(f"server init failed: {done.stderr.strip()[-2000:]}")
        print(done.stdout.strip())
    cluster.start()
    print(f"{len(cluster.ports)} replicas on ports {', '.join(map(str, cluster.ports))} behind nginx at {cluster.url}")
    print(f"database {cluster.database_url}; logs in {args.dir}; stop with: python -m deploy down --dir {args.dir}")


def cmd_down(args) -> None:
    if not stop_recorded(args.dir):
        raise UsageError(f"--dir: no running deployment in {args.dir}")
    print(f"stopped the deployment in {args.dir}")


def cmd_status(args) -> None:
    path = args.dir / "cluster.json"
    if not path.exists():
        raise UsageError(f"--dir: no running deployment in {args.dir}")
    import requests
    state = json.loads(path.read_text())
    for i, r in enumerate(state["replicas"]):
        try:
            ok = requests.get(f"http://127.0.0.1:{r['port']}/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            ok = False
        print(f"replica {i}: port {r['port']} pid {r['pid']} {'up' if ok else 'DOWN'}")
    print(f"load balancer {state['url']}, database {state['database']}")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m deploy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {"up": cmd_up, "down": cmd_down, "status": cmd_status}
    parsers = {name: sub.add_parser(name) for name in commands}
    for name, p in parsers.items():
        p.add_argument("--dir", type=Path, required=True, help="the deployment's directory")
        p.set_defaults(func=commands[name])
    up = parsers["up"]
    up.add_argument("--config", type=Path, required=True, help="base server config (TOML or JSON)")
    up.add_argument("--replicas", type=at_least(1), default=3)
    up.add_argument("--port", type=int, default=8080, help="nginx's port")
    up.add_argument("--workers", type=at_least(1), default=1, help="gunicorn workers per replica")
    up.add_argument("--checkpoint", type=Path, help="init the population with this model (`server init`)")
    up.add_argument("--vocab", type=Path)
    up.add_argument("--plan-dir", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv, user_errors=(PostgresUnavailable, NginxUnavailable))


if __name__ == "__main__":
    sys.exit(main())
