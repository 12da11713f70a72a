"""`python -m server …`: create the state, serve, inspect, roll back, publish.

    init     --config C [--population P] --checkpoint CKPT [--vocab V] [--plan-dir D]
    run      --config C [--bind HOST:PORT] [--workers N] [--threads N]
    status   --config C [--population P] [--rounds 10]
    rollback --config C [--population P] [--to VERSION]
    revoke   --config C [--population P] --device PSEUDONYM
    publish  --config C          (run pending publish jobs now, in this process)

`run` serves `server.app:create_app` with gunicorn (server.worker: threaded
workers whose event loop reads each request whole before a thread serves it,
so slow clients cannot hold the threads, and whose own error answers are JSON
too; each worker process builds its own services after the fork; all round
state is in SQLite and files, so any number of workers may serve one
database). `init` and `run` create files mode 0600 and directories 0700 (umask
077) and narrow what is wider in the private state, with a warning, or refuse
to start where they cannot (server.keys.secure_server_state). Bad input ends with a
one-line message naming it and exit status 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from contract.cli import ArgumentParser, UsageError, run
from server.config import ConfigError, ServerConfig, load_config


def _population(config: ServerConfig, name: str | None) -> str:
    if name is None:
        if len(config.populations) != 1:
            raise ConfigError(f"--population: the config has {len(config.populations)} populations; "
                              "name one")
        return next(iter(config.populations))
    if name not in config.populations:
        raise ConfigError(f"--population: {name!r} is not in the config ({', '.join(config.populations)})")
    return name


def _private_start(config: ServerConfig) -> int:
    """Files this process creates are its user's alone (umask 077: databases, keys, partial sums,
    metrics), and what an earlier run left is narrowed to that (server.keys.secure_server_state).
    Returns the umask it replaced."""
    import os

    from server.keys import secure_server_state

    old = os.umask(0o077)
    try:
        secure_server_state(config)
    except BaseException:
        os.umask(old)
        raise
    return old


def cmd_init(args, config: ServerConfig) -> None:
    import os

    name = _population(config, args.population)
    old = _private_start(config)
    try:
        _init_population(config, name, args)
    finally:
        os.umask(old)              # an in-process caller (the tests) keeps its own


def _init_population(config: ServerConfig, name: str, args) -> None:
    from server.artifacts import ArtifactStore
    from server.keys import enrollment_material, operator_token
    from server.registration import register_population
    from server.store import open_store

    store = open_store(config.database, fsync=config.fsync)
    artifacts = ArtifactStore(config.artifact_dir, fsync=config.fsync)
    pop = register_population(store, artifacts, config.make_clock(), name, Path(args.checkpoint),
                              Path(args.vocab) if args.vocab else None,
                              Path(args.plan_dir) if args.plan_dir else None,
                              batch_size=config.population(name).client_batch_size)
    plan = f"plan {pop.plan.artifact_sha256[:12]}…" if pop.plan else "no plan (devices cannot train yet)"
    print(f"population {name!r}: version 0, {pop.layout.size:,} weights, {plan}; "
          f"database {config.database}")
    token_path = config.operator_token_path
    if config.operator_token is None:
        operator_token(token_path)
        print(f"operator token: in {token_path} (send it as 'Authorization: Bearer <token>')")
    enrollment = config.population(name).enrollment
    if enrollment.app_credential_sha256 is None or enrollment.issuer_public_key is None:
        material = enrollment_material(config.enrollment_path(name))
        print(f"enrollment: app credential and a development attestation issuer key pair (a stand-in for "
              f"Play Integrity) in {config.enrollment_path(name)}; the issuer's public key is "
              f"{material['issuer_public_key']}")


def cmd_run(args, config: ServerConfig) -> None:
    from gunicorn.app.base import BaseApplication

    bind = args.bind or config.bind
    workers = args.workers or config.workers
    threads = args.threads or config.threads
    _private_start(config)            # before any worker forks: a refusal is one message, exit 2
    metrics_dir = _fresh_metrics_dir(config)    # and before anything imports prometheus_client

    def child_exit(_server, worker):      # a dead worker's live gauges go (its counts stay)
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid, str(metrics_dir))

    class NightjarServer(BaseApplication):
        def load_config(self):
            for key, value in {"bind": bind, "workers": workers, "threads": threads,
                               "worker_class": "server.worker.RequestBufferingWorker",
                               "worker_connections": 2000,
                               "timeout": 120, "graceful_timeout": 10, "keepalive": 30,
                               "loglevel": args.log_level, "errorlog": "-", "accesslog": None,
                               "proc_name": f"nightjar-server-{config.replica}", "child_exit": child_exit,
                               # gunicorn's control socket is a fixed path under $HOME that every
                               # new instance takes over and a killed one leaves behind; unused here
                               "control_socket_disable": True}.items():
                self.cfg.set(key, value)

        def load(self):
            from server.app import create_app

            return create_app(args.config)

    print(f"serving on http://{bind} ({workers} worker(s) x {threads} threads)", flush=True)
    NightjarServer().run()


def _fresh_metrics_dir(config: ServerConfig) -> Path:
    """An empty directory for this server's Prometheus files (multiprocess mode: server.metrics).

    Set in the environment before any worker imports prometheus_client, so
    every worker writes its counts there and /metrics adds them all up.
    """
    import os
    import shutil

    path = config.state_dir / "prometheus" / f"replica-{config.replica}"   # replicas may share state_dir
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return path


def cmd_status(args, config: ServerConfig) -> None:
    from server.services import build_services

    services = build_services(config)
    name = _population(config, args.population)
    versions = services.versions.list(name, limit=5)
    from server import populations

    conn = services.store.connection()
    if not populations.exists(conn, name):
        raise ConfigError(f"population {name!r} is not initialised: run `python -m server init`")
    pop = populations.load_population(conn, name)
    print(f"population {name}: current version {pop.current_version}, published {pop.published_version}")
    ledger = services.privacy.summary(name, config.population(name))
    if ledger is not None:
        dp, spent, budget = ledger["dp"], ledger["spent"], ledger["budget"]
        line = (f"differential privacy: {dp['mechanism']}, noise multiplier {dp['noise_multiplier']:g}, "
                f"clip {ledger['clip']:.4g}, {ledger['rounds']} rounds recorded")
        if spent:
            eps = "∞ (no noise)" if spent["epsilon"] is None else f"{spent['epsilon']:.4g}"
            line += f"; spent ε = {eps} at δ = {spent['delta']:.3g} ({spent['accountant']})"
        if budget:
            line += f" of a budget of ε = {budget['epsilon']:g}"
        print(line)
        part = ledger.get("participation")
        if part:
            share = part["refused"] / part["checked"] if part["checked"] else 0.0
            print(f"DP-FTRL: no sampling assumption; at least b = {part['b']} DP rounds apart, at most "
                  f"k = {part['k']} per horizon of {part['horizon']} (tree restarts every {part['restart_every']}); "
                  f"{part['released']} released; the rule turned away {part['refused']} of {part['checked']} "
                  f"check-ins ({share:.1%})")
        else:
            print("DP-FedAvg: ε assumes each round samples the enrolled devices (Poisson)")
    personal = services.kinds["personalize"].latest(conn, name)
    if personal is not None:
        g, p, fg, fp = (personal["global"], personal["personal"], personal["fairness"]["global"],
                        personal["fairness"]["personal"])
        print(f"personalization (round {personal['round']}, version {personal['model_version']}, "
              f"{personal['devices']} devices): top-1 global {g['top1']:.2%} → personal {p['top1']:.2%}; "
              f"helped {personal['helped']:.0%}, hurt {personal['hurt']:.0%}, fell back {personal['fell_back']:.0%}; "
              f"worst decile (p10, from the histogram) {fg['p10']:.2%} → {fp['p10']:.2%}, below half the mean "
              f"{fg['below_half_mean']:.0%} → {fp['below_half_mean']:.0%}")
    for v in versions:
        ev = v.eval or {}
        spent = services.privacy.spent(name, v.version)
        eps = f"  ε {spent['epsilon'] if spent['epsilon'] is None else format(spent['epsilon'], '.4g')}" if spent else ""
        print(f"  v{v.version:<5} parent {v.parent!s:<5} round {v.round_number!s:<5} "
              f"top3 {ev.get('top3', float('nan')):.4f}  published {'yes' if v.published_at else 'no'}{eps}")
    print(f"{'round':>6} {'task':>5} {'state':>10} {'ver':>4} {'sel':>5} {'rep':>5} {'abort':>5} "
          f"{'fail':>5} {'drop':>5}  reason")
    for r in services.analytics.list(name, services.clock.now(), limit=args.rounds):
        counts = " ".join(f"{r[k]:>5}" for k in ("selected", "reported", "aborted", "failed", "dropped"))
        print(f"{r['round']:>6} {r['task']:>5} {r['state']:>10} {r['model_version']:>4} {counts}  "
              f"{r['reason'] or ''}")


def cmd_rollback(args, config: ServerConfig) -> None:
    from server.services import build_services

    name = _population(config, args.population)
    target = build_services(config).versions.rollback(name, args.to)
    print(f"population {name}: apps now get version {target.version}")


def cmd_revoke(args, config: ServerConfig) -> None:
    from server.services import build_services

    name = _population(config, args.population)
    changed = build_services(config).enrollment.revoke(name, args.device)
    print(f"population {name}: device {args.device} {'revoked' if changed else 'was already revoked'}")


def cmd_publish(args, config: ServerConfig) -> None:
    from server.services import build_services

    done = build_services(config).publisher.run_pending()
    print(f"{done} publish job(s) done")


def with_config(command: Callable[[argparse.Namespace, ServerConfig], None]) -> Callable[[argparse.Namespace], None]:
    """`command` run on the config `--config` names; a request the services refuse is a usage error."""
    def run_command(args: argparse.Namespace) -> None:
        from server.errors import ProtocolError

        try:
            command(args, load_config(args.config))
        except ProtocolError as e:
            raise UsageError(e.message) from None
    return run_command


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m server", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {"init": cmd_init, "run": cmd_run, "status": cmd_status, "rollback": cmd_rollback,
                "revoke": cmd_revoke, "publish": cmd_publish}
    parsers = {name: sub.add_parser(name) for name in commands}
    for name, p in parsers.items():
        p.add_argument("--config", required=True, help="TOML or JSON server config")
        p.set_defaults(func=with_config(commands[name]))
    for name in ("init", "status", "rollback", "revoke"):
        parsers[name].add_argument("--population", help="default: the config's only population")
    parsers["revoke"].add_argument("--device", required=True,
                                   help="the device's pseudonym, as operator views show it (p-...)")
    parsers["init"].add_argument("--checkpoint", required=True, help="initial model (safetensors)")
    parsers["init"].add_argument("--vocab", help="default: vocab.json beside the checkpoint or its run dir")
    parsers["init"].add_argument("--plan-dir", help="output of `python -m tflite_export plan`")
    parsers["run"].add_argument("--bind", help="HOST:PORT (default: the config's bind)")
    parsers["run"].add_argument("--workers", type=int)
    parsers["run"].add_argument("--threads", type=int)
    parsers["run"].add_argument("--log-level", default="warning")
    parsers["status"].add_argument("--rounds", type=int, default=10)
    parsers["rollback"].add_argument("--to", type=int, help="version (default: the one published before)")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # RegistrationError (server init's refusals) is a ValueError
    return run(build_parser(), argv, user_errors=(ConfigError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
