"""A deployment on this machine: a server config, the population initialised, the server running.

The end-to-end tests, the benchmarks and `make demo` all build their world
from these, so the demo runs what the tests check. Everything is real: the
server is `python -m server run` (gunicorn, deploy.server_process) with
SQLite and an artifact folder, initialised with a model and its plan that
emulation.models made. TensorFlow-free: the model half is emulation.models.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from deploy.server_process import ServerProcess, free_port

if TYPE_CHECKING:
    from emulation.models import Model

REPO = Path(__file__).resolve().parents[1]


# Every emulated phone talks to the server from one address (127.0.0.1), so the per-address limits
# that would stop a flood from one address are raised for these deployments; the per-device limits
# stay the defaults (server.config.RateLimits).
SHARED_ADDRESS_LIMITS = {f"{action}_per_address": [1e9, 3600.0]
                         for action in ("nonce", "register", "checkin", "upload", "artifact")}


def write_server_config(root: Path, population: str = "en", **settings) -> Path:
    """A server.toml with one population; `settings` override the population keys
    (`eligibility` and `update` are tables of their own, `server` holds top-level keys)."""
    pop = {"goal": 1, "min_round_size": 1, "over_selection": 1.0, "min_selected_fraction": 1.0,
           "min_report_fraction": 1.0, "selection_window_s": 30.0, "reporting_window_s": 300.0, "eval_every": 0,
           "publish_every": 0, "server_optimizer": "sgd", "server_lr": 1.0, "client_lr": 0.5,
           "client_epochs": 1, "client_batch_size": 16}
    eligibility = {"min_separation_s": 0.0, "min_free_memory_mb": 0}
    eligibility.update(settings.pop("eligibility", {}))
    update = settings.pop("update", None)
    server = {"rate_limits": SHARED_ADDRESS_LIMITS, **settings.pop("server", {})}
    pop.update(settings)
    lines = ['database = "state/nightjar.db"', 'artifact_dir = "state/artifacts"',
             'state_dir = "state/private"', "tick_interval_s = 0.2"]
    lines += [f"{k} = {_toml(v)}" for k, v in server.items()]
    lines += ["", f"[populations.{population}]"] + [f"{k} = {_toml(v)}" for k, v in pop.items()]
    lines += ["", f"[populations.{population}.eligibility]"]
    lines += [f"{k} = {_toml(v)}" for k, v in eligibility.items()]
    if update is not None:   # contract.update.spec.UpdateSpec fields; default: the server's
        lines += ["", f"[populations.{population}.update]"]
        lines += [f"{k} = {_toml(v)}" for k, v in dict(update).items()]
    root.mkdir(parents=True, exist_ok=True)
    path = root / "server.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + "}"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return repr(v)


def start_server(root: Path, model: "Model", population: str = "en", workers: int = 2,
                 threads: int = 4, **settings) -> ServerProcess:
    """Init the population from `model` and start the real server; the caller stops it."""
    config = write_server_config(root, population, **settings)
    init_population(config, model, population)
    return ServerProcess(config, free_port(), root / "server.log", workers, threads).start()


def init_population(config: Path, model: "Model", population: str = "en") -> None:
    """`python -m server init`: the population's version 0 is `model`."""
    done = subprocess.run([sys.executable, "-m", "server", "init", "--config", str(config),
                           "--population", population, "--checkpoint", str(model.checkpoint),
                           "--vocab", str(model.vocab), "--plan-dir", str(model.plan_dir)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"server init failed: {done.stderr[-3000:]}")


def simulated_clock(start: float, speed: float) -> dict:
    """Server config keys for a simulated clock starting now at `start`, `speed` × real time."""
    import time

    return {"clock_start": start, "clock_speed": speed, "clock_epoch": time.time()}


def enrollment(config: Path, population: str, now=None):
    """What a phone of `population` enrolls with: the app credential and the development issuer's
    key (device_runtime.enrollment), read from the state `server init` wrote."""
    import time

    from device_runtime.enrollment import Enrollment
    from server.config import load_config

    return Enrollment.from_file(load_config(config).enrollment_path(population), now=now or time.time)
