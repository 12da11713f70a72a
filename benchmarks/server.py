"""Server benchmark: the real server under gunicorn on loopback against emulated devices.

`make bench-server` writes `benchmarks/results/server.json`:

* check-ins per second and p99 latency with 100 and 1000 devices checking in
  concurrently (each device its own keep-alive connection, every device
  eligible: the first goal x 1.3 get assignments, the rest round_full
  rejections with a retry window — the normal mix of a large population);
* updates ingested per second for the Gboard-size model (1,422,638 weights)
  over one 1000-report round per update spec — float32 (5.7 MB per upload)
  and 8 bits (1.43 MB), encoded by contract.update.pipeline as a phone encodes them —
  the last report completing the round (the exact integer sum, the server
  optimizer, a new version), which is then checked against the pipeline's
  own mean of the same bodies;
* the server's peak memory (RSS of the gunicorn master and workers) during it;
* the ceiling: the same upload bodies decoded, checked and folded into the
  running sum in this process, without HTTP, persistence or SQLite, and the
  ratio HTTP ingest / ceiling.

The load generator is asyncio with raw HTTP/1.1 (one coroutine per device), so
the client side costs little CPU next to the server it measures. Everything
runs on 127.0.0.1, every loop is bounded, and the server is stopped at the end.
The machine's 2 cores are shared by server and clients: figures are noisy.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from benchmarks import RESULTS, write_result
from contract.cli import ArgumentParser, parse
from contract.protocol import version as protocol

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class BenchConfig:
    workers: int = 2
    threads: int = 8
    concurrency: tuple[int, ...] = (100, 1000)
    checkins_per_device: int = 10
    reports: int = 1000
    upload_concurrency: int = 8
    distinct_bodies: int = 4


class Conn:
    """One keep-alive HTTP/1.1 connection (enough of the protocol for this server's answers)."""

    def __init__(self, port: int):
        self.port = port
        self.reader = self.writer = None

    async def open(self) -> "Conn":
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: str = "") -> tuple[int, bytes]:
        """One request as a phone sends it (its protocol version included); (status, body)."""
        head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
                f"{protocol.HEADER}: {protocol.CURRENT}\r\n{headers}\r\n").encode()
        self.writer.write(head)
        if body:
            self.writer.write(body)
        await self.writer.drain()
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


JSON_HEADERS = "Content-Type: application/json\r\n"


async def register(port: int, n: int, enrollment, populations: tuple[str, ...],
                   parallel: int = 50) -> dict[str, list[str]]:
    """n devices enrolled in each population as phones do (nonce, attestation) → Authorization values."""
    out: dict[str, list[str]] = {p: [] for p in populations}

    async def worker(population: str, count: int):
        conn = await Conn(port).open()
        for _ in range(count):
            status, body = await conn.request("POST", "/v1/enrollment/nonces",
                                              json.dumps({"population": population}).encode(), JSON_HEADERS)
            assert status == 201, body
            attestation = enrollment[population].attester.attest(population, json.loads(body)["nonce"])
            request = {"population": population, "app_credential": enrollment[population].app_credential,
                       "attestation": attestation.to_json()}
            status, body = await conn.request("POST", "/v1/devices", json.dumps(request).encode(), JSON_HEADERS)
            assert status == 201, body
            out[population].append(json.loads(body)["authorization"])
        conn.close()

    await asyncio.gather(*[worker(pop, n // parallel + (i < n % parallel))
                           for pop in populations for i in range(parallel)])
    return out


CONDITIONS = {"charging": True, "idle": True, "unmetered": True, "battery": 0.9, "free_memory_mb": 4096,
              "num_examples": 100, "runtime_version": "1.0.0"}


async def checkin_load(port: int, auths: list[str], population: str, per_device: int) -> dict:
    body = json.dumps({"population": population, "conditions": CONDITIONS}).encode()
    conns = await asyncio.gather(*[Conn(port).open() for _ in auths])
    latencies: list[float] = []
    kinds = {"assignment": 0, "rejection": 0}
    start_gate = asyncio.Event()

    async def device(conn: Conn, auth: str):
        await start_gate.wait()
        for _ in range(per_device):
            t = time.perf_counter()
            status, answer = await conn.request("POST", "/v1/checkin", body,
                                                f"Authorization: {auth}\r\n{JSON_HEADERS}")
            latencies.append(time.perf_counter() - t)
            assert status == 200, answer
            kinds[next(iter(json.loads(answer)))] += 1

    tasks = [asyncio.create_task(device(c, a)) for c, a in zip(conns, auths)]
    t0 = time.perf_counter()
    start_gate.set()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    for c in conns:
        c.close()
    lat = np.array(latencies) * 1000
    return {"per_s": len(latencies) / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "requests": len(latencies), **kinds}


async def assign_all(port: int, auths: list[str], population: str) -> list[tuple[str, str, dict]]:
    """Check every device in to the population's open round: (auth, session id, assignment)."""
    body = json.dumps({"population": population, "conditions": CONDITIONS}).encode()
    sessions = []

    async def worker(chunk):
        conn = await Conn(port).open()
        for auth in chunk:
            status, answer = await conn.request("POST", "/v1/checkin", body,
                                                f"Authorization: {auth}\r\n{JSON_HEADERS}")
            reply = json.loads(answer)
            assert status == 200 and "assignment" in reply, answer
            sessions.append((auth, reply["assignment"]["session_id"], reply["assignment"]))
        conn.close()

    await asyncio.gather(*[worker(auths[i::20]) for i in range(20)])
    return sessions


async def ingest_load(port: int, sessions: list[tuple[str, str]], bodies: list[tuple[bytes, int]],
                      parallel: int, accepted_at: list[float] | None = None) -> dict:
    """Every session's upload; a 5xx or a dropped connection (a replica killed behind the load
    balancer) is retried as a phone would. `accepted_at` collects the times of the acceptances."""
    queue = list(enumerate(sessions))
    statuses: dict[str, int] = {}

    async def worker():
        conn = await Conn(port).open()
        while queue:
            i, (auth, sid) = queue.pop()
            body, weight = bodies[i % len(bodies)]
            status, answer = 0, b"{}"
            for _ in range(50):
                try:
                    status, answer = await conn.request(
                        "POST", f"/v1/sessions/{sid}/update?model_version=0&num_examples={weight}", body,
                        f"Authorization: {auth}\r\nContent-Type: application/octet-stream\r\n")
                except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                    conn.close()
                    conn = await Conn(port).open()
                    continue
                if status < 500:
                    break
                await asyncio.sleep(0.2)
            key = json.loads(answer).get("status", f"http {status}") if status < 500 else f"http {status}"
            statuses[key] = statuses.get(key, 0) + 1
            if key == "accepted" and accepted_at is not None:
                accepted_at.append(time.perf_counter())
        conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(parallel)])
    elapsed = time.perf_counter() - t0
    return {"per_s": statuses.get("accepted", 0) / elapsed, "elapsed_s": elapsed, "statuses": statuses}


def inprocess_ceiling(pipeline, bodies: list[tuple[bytes, int]], n: int) -> float:
    from contract.update.pipeline import IntegerSum

    total = IntegerSum(pipeline.count)
    t0 = time.perf_counter()
    for i in range(n):
        body, weight = bodies[i % len(bodies)]
        total.add(pipeline.accept(body, weight))
    return n / (time.perf_counter() - t0)


class PeakRSS(threading.Thread):
    """Samples the summed RSS of a process and its children every 20 ms."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process(pid)
        self.peak = 0
        self.stop_event = threading.Event()

    def run(self):
        import psutil

        while not self.stop_event.wait(0.02):
            try:
                procs = [self.proc] + self.proc.children(recursive=True)
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                continue

    def stop(self) -> float:
        self.stop_event.set()
        self.join()
        return self.peak / 2**20


SPECS = {"f32": {"bits": 32}, "q8": {"bits": 8}}   # the ingest populations' update specs


def write_setup(work: Path, cfg: BenchConfig, database: str | None = None) -> tuple[Path, int]:
    """The benchmark's config (its SQLite file, or `database`) with its populations initialised."""
    path, size, populations = write_config(work, cfg, database)
    init_populations(path, populations, work / "init.safetensors")
    return path, size


def write_config(work: Path, cfg: BenchConfig, database: str | None = None) -> tuple[Path, int, list[str]]:
    from contract.model.weights import save_checkpoint
    from models.model import GBOARD, weight_layout
    from server.config import RateLimits

    layout = weight_layout(GBOARD)
    flat = np.random.default_rng(0).normal(0, 0.05, layout.size).astype(np.float32)
    save_checkpoint(work / "init.safetensors", layout, flat, {"round": 0,
                                                             "model_config": dataclasses.asdict(GBOARD)})
    common = {"selection_window_s": 3600.0, "reporting_window_s": 3600.0, "eval_every": 0,
              "server_optimizer": "sgdm", "server_lr": 1.0}
    # One address and 1,000 devices checking in 10 times in seconds: the limits would throttle the load.
    limits = {f.name: [1e9, 3600.0] for f in dataclasses.fields(RateLimits)}
    populations = {"checkin": {"goal": 100, **common, "eligibility": {"min_separation_s": 0.0}}}
    for name, spec in SPECS.items():
        populations[f"ingest-{name}"] = {"goal": cfg.reports, "over_selection": 1.0, **common,
                                         "eligibility": {"min_separation_s": 0.0}, "update": spec}
    config = {"database": database or str(work / "state/nightjar.db"), "artifact_dir": str(work / "state/artifacts"),
              "state_dir": str(work / "state/private"), "tick_interval_s": 1.0,
              "aggregation_shards": cfg.threads, "populations": populations, "rate_limits": limits}
    path = work / "server.json"
    path.write_text(json.dumps(config))
    return path, layout.size, list(populations)


def init_populations(config: Path, populations: list[str], checkpoint: Path) -> None:
    for population in populations:
        subprocess.run([sys.executable, "-m", "server", "init", "--config", str(config),
                        "--population", population, "--checkpoint", str(checkpoint)],
                       check=True, cwd=REPO, stdout=subprocess.DEVNULL)


def encoded_bodies(assignment: dict, size: int, count: int) -> tuple[object, list[tuple[bytes, int]]]:
    """`count` phone-like updates encoded with the round's spec: (pipeline, [(body, weight)])."""
    from contract.update.pipeline import UpdatePipeline
    from contract.update.spec import RoundSpec

    pipeline = UpdatePipeline(RoundSpec.from_json(assignment["update"]))
    rng = np.random.default_rng(1)
    bodies = []
    for i in range(count):
        encoded = pipeline.encode(rng.normal(0, 1e-3, size).astype(np.float32), 1 + 13 * i, seed=i)
        bodies.append((encoded.body, encoded.weight))
    return pipeline, bodies


def check_aggregate(port: int, work: Path, population: str, pipeline, bodies: list[tuple[bytes, int]],
                    reports: int, operator_headers: dict) -> float:
    """The round's new version must be init + the pipeline's mean of exactly the bodies sent."""
    import requests

    from contract.update.pipeline import aggregate
    from contract.model.weights import load_checkpoint

    base = f"http://127.0.0.1:{port}/v1/populations/{population}"
    newest = requests.get(f"{base}/versions", headers=operator_headers, timeout=30).json()["versions"][0]
    assert newest["version"] == 1, newest
    ckpt = requests.get(f"http://127.0.0.1:{port}/v1/artifacts/{newest['checkpoint_sha256']}",
                        headers=operator_headers, timeout=60)
    (work / "v1.safetensors").write_bytes(ckpt.content)
    _, got, _ = load_checkpoint(work / "v1.safetensors")
    _, initial, _ = load_checkpoint(work / "init.safetensors")
    mean = aggregate(pipeline, [bodies[i % len(bodies)] for i in range(reports)])
    # sgdm's first step at lr 1 from a zero accumulator is weights + mean
    error = float(np.max(np.abs(got - (initial + mean))))
    print(f"aggregate check ({population}): max |error| {error:.2e} over {len(got):,} weights", flush=True)
    assert error < 1e-6, error
    return error


def ingest(server, work: Path, auths: list[str], size: int, cfg: BenchConfig, name: str) -> dict:
    """One 1000-report round of the `ingest-<name>` population over HTTP, checked; its figures."""
    population = f"ingest-{name}"
    port = server.port
    sessions = asyncio.run(assign_all(port, auths[:cfg.reports], population))
    pipeline, bodies = encoded_bodies(sessions[0][2], size, cfg.distinct_bodies)
    sampler = PeakRSS(server.proc.pid)
    sampler.start()
    result = asyncio.run(ingest_load(port, [(a, s) for a, s, _ in sessions], bodies, cfg.upload_concurrency))
    peak_mb = sampler.stop()
    print(f"ingest {name}: {result['per_s']:.1f} updates/s ({result['statuses']}), "
          f"{len(bodies[0][0]) / 1e6:.2f} MB each, peak RSS {peak_mb:.0f} MB", flush=True)
    assert result["statuses"].get("accepted") == cfg.reports, result
    check_aggregate(port, work, population, pipeline, bodies, cfg.reports, server.operator_headers)
    ceiling = inprocess_ceiling(pipeline, bodies, min(cfg.reports, 200))
    return {"per_s": result["per_s"], "ceiling_per_s": ceiling, "peak_rss_mb": peak_mb,
            "upload_bytes": len(bodies[0][0])}


def serve_and_measure(cfg: BenchConfig, specs: tuple[str, ...] = tuple(SPECS),
                      checkins: bool = True) -> dict:
    """Start the server on a fresh state, run the check-in loads (optional) and an ingest round per spec."""
    from emulation.deployment import enrollment
    from deploy.server_process import ServerProcess, free_port

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 8192)), hard))
    out: dict = {"checkin": {}, "ingest": {}}
    with tempfile.TemporaryDirectory(prefix="nightjar-bench-") as tmp:
        work = Path(tmp)
        config, size = write_setup(work, cfg)
        server = ServerProcess(config, free_port(), work / "server.log", cfg.workers, cfg.threads)
        with server:
            port = server.port
            names = (("checkin",) if checkins else ()) + tuple(f"ingest-{name}" for name in specs)
            enrolled = asyncio.run(register(port, max(max(cfg.concurrency), cfg.reports),
                                            {p: enrollment(config, p) for p in names}, names))
            for n in cfg.concurrency if checkins else ():
                r = out["checkin"][n] = asyncio.run(checkin_load(port, enrolled["checkin"][:n], "checkin",
                                                                 cfg.checkins_per_device))
                print(f"check-in x{n}: {r['per_s']:.0f}/s, p50 {r['p50_ms']:.1f} ms, "
                      f"p99 {r['p99_ms']:.1f} ms ({r['assignment']} assignments)", flush=True)
            for name in specs:
                out["ingest"][name] = ingest(server, work, enrolled[f"ingest-{name}"], size, cfg, name)
    return out


def run(cfg: BenchConfig) -> dict:
    measured = serve_and_measure(cfg)
    checkins, ingested = measured["checkin"], measured["ingest"]
    return {
        "checkin_per_s": {str(n): round(r["per_s"], 1) for n, r in checkins.items()},
        "checkin_p99_ms": {str(n): round(r["p99_ms"], 2) for n, r in checkins.items()},
        "ingest_updates_per_s": round(ingested["f32"]["per_s"], 2),
        "ingest_updates_per_s_q8": round(ingested["q8"]["per_s"], 2),
        "inprocess_updates_per_s": round(ingested["f32"]["ceiling_per_s"], 2),
        "inprocess_updates_per_s_q8": round(ingested["q8"]["ceiling_per_s"], 2),
        "ingest_ratio": round(ingested["f32"]["per_s"] / ingested["f32"]["ceiling_per_s"], 4),
        "upload_bytes": {k: v["upload_bytes"] for k, v in ingested.items()},
        "peak_rss_mb_1000_reports": round(max(v["peak_rss_mb"] for v in ingested.values()), 1),
        "workers": cfg.workers,
    }, measured


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=BenchConfig.workers)
    parser.add_argument("--threads", type=int, default=BenchConfig.threads)
    parser.add_argument("--reports", type=int, default=BenchConfig.reports,
                        help="updates in each ingest round")
    parser.add_argument("--out", default=str(RESULTS / "server.json"))
    args = parse(parser, argv)
    cfg = BenchConfig(workers=args.workers, threads=args.threads, reports=args.reports)
    start = time.monotonic()
    result, details = run(cfg)
    write_result(args.out, result)
    print(f"p50 ms: {({n: round(r['p50_ms'], 2) for n, r in details['checkin'].items()})}; "
          f"wall {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
