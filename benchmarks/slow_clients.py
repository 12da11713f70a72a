"""Slow clients (slowloris) against the default deployment: `python -m server run` on loopback.

One address (127.0.0.1) opens `stalled` connections that each send an
upload's head announcing `Content-Length: 100000`, one byte of the body, and
stall.
While they are held open, `devices` honest devices, each from an address of
its own (127.0.0.2, ...: all of 127/8 is loopback), enroll (nonce,
attestation) and check in `checkins_per_device` times each, one after
another on a keep-alive connection; then /healthz is asked on a fresh
connection. Every request has a deadline (`timeout_s`): one that misses it
counts as not completed. At the end the stalled connections must all still be
open and unanswered, so the figures are those of a server that held them.

    python -m benchmarks.slow_clients [--stalled 200 --devices 20 --checkins-per-device 10]

prints `slow_client_drill`'s figures (the "slow_clients" part of
benchmarks/results/hostile.json) and the same honest load's p99 with no
stalled connection, for scale. Loopback only, every loop bounded, the server
stopped at the end; the machine's cores are shared, so latencies are noisy.
`slow_client_drill()` without a port starts such a deployment itself
(benchmarks/hostile.py calls it so).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from benchmarks.server import CONDITIONS, JSON_HEADERS, Conn
from contract.cli import ArgumentParser, at_least, parse

if TYPE_CHECKING:
    from deploy.server_process import ServerProcess

# An upload (its limit is 32 MiB, so the server waits for the rest of the body; a check-in announcing
# 100,000 bytes is over the 64 KiB JSON limit and is refused with 413 before its body is read).
STALL_HEAD = (b"POST /v1/sessions/0123456789abcdef/update?model_version=0&num_examples=1 HTTP/1.1\r\n"
              b"Host: 127.0.0.1\r\nContent-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n\x00")


class From(Conn):
    """A keep-alive connection from a chosen loopback address."""

    def __init__(self, port: int, address: str):
        super().__init__(port)
        self.address = address

    async def open(self) -> "From":
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port,
                                                                 local_addr=(self.address, 0))
        return self


async def _stall(port: int, n: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    held = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.1", 0))
        writer.write(STALL_HEAD)
        await writer.drain()
        held.append((reader, writer))
    return held


async def _still_stalled(held) -> int:
    """How many stalled connections are still open with no answer (the server neither dropped nor served them)."""
    async def one(reader) -> bool:
        try:
            await asyncio.wait_for(reader.read(1), timeout=0.05)
        except asyncio.TimeoutError:
            return True           # nothing to read: still waiting for the rest of the body
        return False              # an answer or EOF
    return sum(await asyncio.gather(*[one(r) for r, _ in held]))


async def _device(port: int, address: str, enrollment, population: str, checkins: int, timeout_s: float,
                  latencies: list[float]) -> int:
    """Enroll and check in `checkins` times; the number of check-ins answered 200."""
    done = 0
    conn = None
    try:
        conn = await asyncio.wait_for(From(port, address).open(), timeout_s)
        ask = lambda path, body, headers=JSON_HEADERS: asyncio.wait_for(   # noqa: E731
            conn.request("POST", path, json.dumps(body).encode(), headers), timeout_s)
        status, body = await ask("/v1/enrollment/nonces", {"population": population})
        assert status == 201, body
        attestation = enrollment.attester.attest(population, json.loads(body)["nonce"])
        status, body = await ask("/v1/devices", {"population": population, "attestation": attestation.to_json(),
                                                 "app_credential": enrollment.app_credential})
        assert status == 201, body
        auth = f"Authorization: {json.loads(body)['authorization']}\r\n{JSON_HEADERS}"
        for _ in range(checkins):
            started = time.perf_counter()
            status, body = await ask("/v1/checkin", {"population": population, "conditions": CONDITIONS}, auth)
            if status == 200:
                latencies.append(time.perf_counter() - started)
                done += 1
    except (OSError, AssertionError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
        pass
    finally:
        if conn is not None:
            conn.close()
    return done


async def _health(port: int, timeout_s: float) -> bool:
    conn = None
    try:
        conn = await asyncio.wait_for(Conn(port).open(), timeout_s)
        status, _ = await asyncio.wait_for(conn.request("GET", "/healthz"), timeout_s)
        return status == 200
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
        return False
    finally:
        if conn is not None:
            conn.close()


async def _drill(port, enrollment, population, stalled, devices, checkins, timeout_s) -> dict:
    held = await _stall(port, stalled)
    try:
        await asyncio.sleep(0.5)          # let the server take them all in
        latencies: list[float] = []
        done = await asyncio.gather(*[_device(port, f"127.0.0.{2 + i}", enrollment, population, checkins,
                                              timeout_s, latencies) for i in range(devices)])
        health = await _health(port, timeout_s)
        still = await _still_stalled(held)
    finally:
        for _, writer in held:
            writer.close()
    p99 = float(np.percentile(np.array(latencies) * 1e3, 99)) if latencies else None
    return {"stalled_connections": still, "honest_checkins": devices * checkins, "honest_completed": sum(done),
            "honest_p99_ms": p99, "health_answered": health}


def slow_client_drill(stalled: int = 200, devices: int = 20, checkins_per_device: int = 10,
                      timeout_s: float = 10.0, *, port: int | None = None, enrollment=None,
                      population: str = "en") -> dict:
    """The drill against the server on 127.0.0.1:`port`, whose devices enroll with `enrollment`
    (device_runtime.enrollment.Enrollment, e.g. emulation.deployment.enrollment(config, population));
    without a port, against a default deployment of its own (`default_deployment`), stopped after.

    → {"stalled_connections": those still held open and unanswered at the end, "honest_checkins",
    "honest_completed", "honest_p99_ms" (of the completed ones; None if none), "health_answered"}.
    """
    if port is None:
        with default_deployment() as (server, enrolled):
            return slow_client_drill(stalled, devices, checkins_per_device, timeout_s, port=server.port,
                                     enrollment=enrolled, population="en")
    return asyncio.run(_drill(port, enrollment, population, stalled, devices, checkins_per_device, timeout_s))


@contextlib.contextmanager
def default_deployment() -> Iterator[tuple["ServerProcess", object]]:
    """`python -m server run` with the default config (limits, workers, threads) and a small population
    "en" (`server init` with a small random model and no plan: check-ins are answered all the same),
    in a temporary directory: (the running server, what its devices enroll with)."""
    import subprocess
    import sys

    from contract.model.weights import WeightLayout, save_checkpoint
    from deploy.server_process import ServerProcess, free_port
    from emulation.deployment import enrollment
    from server.config import ServerConfig

    defaults = ServerConfig()
    with tempfile.TemporaryDirectory(prefix="nightjar-slow-") as tmp:
        root = Path(tmp)
        layout = WeightLayout([("embedding", (16, 8)), ("dense/kernel", (8, 16)), ("dense/bias", (16,))])
        save_checkpoint(root / "init.safetensors", layout,
                        np.random.default_rng(0).normal(0, 0.1, layout.size).astype(np.float32), {"round": 0})
        config = root / "server.json"
        config.write_text(json.dumps({
            "database": str(root / "state/nightjar.db"), "artifact_dir": str(root / "state/artifacts"),
            "state_dir": str(root / "state/private"),
            "populations": {"en": {"goal": 20, "selection_window_s": 3600.0, "reporting_window_s": 3600.0,
                                   "eval_every": 0, "eligibility": {"min_separation_s": 0.0}}}}))
        subprocess.run([sys.executable, "-m", "server", "init", "--config", str(config), "--checkpoint",
                        str(root / "init.safetensors")], check=True, cwd=Path(__file__).resolve().parents[1],
                       stdout=subprocess.DEVNULL)
        with ServerProcess(config, free_port(), root / "server.log", defaults.workers, defaults.threads) as server:
            yield server, enrollment(config, "en")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m benchmarks.slow_clients", description=__doc__.splitlines()[0])
    parser.add_argument("--stalled", type=at_least(0), default=200)
    parser.add_argument("--devices", type=at_least(1), default=20)
    parser.add_argument("--checkins-per-device", type=at_least(1), default=10)
    args = parse(parser, argv)
    with default_deployment() as (server, enrolled):
        print(f"server run on port {server.port} ({server.workers} workers x {server.threads} threads); "
              f"{args.stalled} stalled connections, {args.devices} devices x {args.checkins_per_device} "
              "check-ins", flush=True)
        drill = slow_client_drill(args.stalled, args.devices, args.checkins_per_device, port=server.port,
                                  enrollment=enrolled)
        print(json.dumps(drill, indent=2), flush=True)
        control = slow_client_drill(0, args.devices, args.checkins_per_device, port=server.port,
                                    enrollment=enrolled)
    p99 = "—" if control["honest_p99_ms"] is None else f"{control['honest_p99_ms']:.1f} ms"
    print(f"the same honest load with no stalled connection: p99 {p99}, "
          f"{control['honest_completed']}/{control['honest_checkins']} completed")
    return 0 if drill["honest_completed"] == drill["honest_checkins"] and drill["health_answered"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
