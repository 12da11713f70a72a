"""Secure-aggregation benchmark: what SecAgg+ costs a phone and the server, for the Gboard model at 8 bits.

`make bench-secagg` writes `benchmarks/results/secagg.json`:

* **in process, 100 and 1000 devices per round**: every device runs the real
  cryptography of contract.secagg.masking on a Gboard-size update (1,422,638
  weights): advertise, share (Shamir, X25519, HKDF, AES-GCM), mask (AES-CTR
  keystreams of the full 256-bit secrets), reveal. The k-regular graph and t
  are the server's defaults (`default_degree`, `threshold`). The masked
  uploads are folded into two running sums: all devices (0% dropout) and all
  but 30% of them, dropped after sharing and before submitting, which is
  the costliest case for the server (every dropped device's pairwise masks
  must be rebuilt). The server's unmasking is timed for both and its result
  checked bit for bit against the plain sum of the same quantized updates.
  The two unmaskings are two rounds for the devices' reveal rule: each asks
  a fresh copy of the device's reveal state.
* **over HTTP, 100 devices**: the real server under gunicorn on loopback, 100
  enrolled devices checking in, every phase over the wire, 30% of them
  leaving after sharing; the round's new version is checked against the
  plain mean of the survivors' quantized updates. Bytes up and down are the
  request and response bodies each device sent and received in the phases.

Per-device CPU is thread CPU time of one device's calls; the server's unmask
time is wall time. Wire sizes in process are the compact JSON of the phase
messages (contract.secagg.messages) and the masked body.
"""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from benchmarks import RESULTS, parse_config, write_result

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"key_share_fraction_1000": 0.05, "unmask_s_1000_30pct": 60.0}


@dataclasses.dataclass(frozen=True)
class SecAggBenchConfig:
    rounds: str = "100,1000"     # devices per in-process round
    bits: int = 8
    dropout: float = 0.3         # the fraction that shares and then never submits
    http_devices: int = 100      # the over-HTTP round (0: skip it)
    workers: int = 2
    threads: int = 4
    seed: int = 0                # the synthetic updates (not the cryptography: that is the OS CSPRNG's)
    size: int = 0                # weights per in-process update (0: the Gboard model's)


def compact(message) -> int:
    """Bytes of a phase message as compact JSON."""
    return len(json.dumps(message.to_json(), separators=(",", ":")))


class Cpu:
    """Thread CPU milliseconds per phase, summed over calls, per device."""

    def __init__(self):
        self.ms: dict[str, list[float]] = {}

    def __call__(self, phase: str, fn, *args):
        t0 = time.thread_time()
        out = fn(*args)
        self.ms.setdefault(phase, []).append(1000 * (time.thread_time() - t0))
        return out

    def mean(self) -> dict[str, float]:
        return {p: round(float(np.mean(v)), 2) for p, v in self.ms.items()}


def gboard_size() -> tuple[int, str]:
    from models.model import GBOARD, weight_layout

    layout = weight_layout(GBOARD)
    return layout.size, layout.sha256


def plain_upload_bytes(bits: int, size: int, sha: str, delta: np.ndarray) -> int:
    """The same update's upload without secure aggregation: 8 bits, rotated, as under it."""
    from contract.update.pipeline import UpdatePipeline
    from contract.update.spec import UpdateSpec

    return len(UpdatePipeline(UpdateSpec(bits=bits, rotation=True).bind(size, sha, "bench/plain", 7)).encode(delta, 50, 1).body)


def inprocess(n: int, cfg: SecAggBenchConfig, size: int, sha: str) -> dict:
    """One round of n devices through every phase in this process (module docstring)."""
    from contract.update.pipeline import Contribution, UpdatePipeline, running_sum
    from contract.secagg.masking import DeviceSecAgg, Member, Neighbour, default_degree, neighbour_graph, threshold, unmask
    from contract.secagg.messages import SecAggKeys, SecAggReveal, SecAggShares, SecAggStatus
    from contract.update.spec import UpdateSpec

    spec = UpdateSpec(bits=cfg.bits, rotation=True, secure_aggregation=True).bind(size, sha, f"bench/{n}", 7, cohort_max=n)
    pipeline, domain = UpdatePipeline(spec), spec.fingerprint.encode()
    k = default_degree(n)
    t, graph = threshold(k), neighbour_graph(n, k)
    rng = np.random.default_rng(cfg.seed)
    dropped = set(rng.choice(np.arange(1, n + 1), int(round(cfg.dropout * n)), replace=False).tolist())
    cpu, up, down = Cpu(), {}, {}
    devices, ads = {}, {}
    for u in range(1, n + 1):
        devices[u] = cpu("advertise", DeviceSecAgg, domain)
        ads[u] = cpu("advertise", devices[u].advertise)
        up[u] = compact(SecAggKeys(ads[u]))
    sent = {}
    for u in tqdm(range(1, n + 1), desc=f"{n} devices: share", unit="device"):
        neighbours = [Neighbour(v, ads[v].enc_pk, ads[v].mask_pk) for v in sorted(graph[u])]
        down[u] = compact(SecAggStatus("shares", node=u, threshold=t, neighbours=tuple(neighbours)))
        sent[u] = cpu("share", devices[u].share, u, t, neighbours)
        up[u] += compact(SecAggShares(sent[u]))
    sums = {name: running_sum(pipeline) for name in ("masked_0", "masked_d", "plain_0", "plain_d")}
    encode_ms, masked_bytes = [], 0
    delta = None
    for u in tqdm(range(1, n + 1), desc=f"{n} devices: mask", unit="device"):
        delta = rng.normal(0, 2e-2, size).astype(np.float32)
        inbox = {v: sent[v][u] for v in graph[u]}
        down[u] += compact(SecAggStatus("masking", node=u, threshold=t, inbox=inbox))
        cpu("mask", devices[u].receive, inbox)
        plain = []

        def masker(ring, device=devices[u]):
            plain.append(ring.copy())
            return cpu("mask", device.mask, ring)

        t0 = time.thread_time()
        body = pipeline.encode(delta, int(rng.integers(1, 300)), int(rng.integers(1 << 30)), masker=masker).body
        encode_ms.append(1000 * (time.thread_time() - t0) - cpu.ms["mask"][-1])
        masked_bytes = len(body)
        masked = pipeline.accept(body, None)
        clear = Contribution(plain[0].astype(np.int64), 0, 0.0)
        for scenario in ("0", "d") if u not in dropped else ("0",):
            sums[f"masked_{scenario}"].add(masked)
            sums[f"plain_{scenario}"].add(clear)
    members = {u: Member(u, ads[u].mask_pk, ads[u].commitment, frozenset(graph[u])) for u in devices}
    unmask_s, reveal_up, reveal_down = {}, [], []
    for label, scenario, survivors in (("0", "0", set(devices)), (f"{cfg.dropout:g}", "d", set(devices) - dropped)):
        shares: dict[int, dict[int, bytes]] = {}
        for u in sorted(survivors):
            device = copy.copy(devices[u])          # a fresh reveal state: this is another round for it
            device.revealed = {}
            asked = (sorted(graph[u] & survivors), sorted(graph[u] - survivors))
            given = cpu("unmask", device.reveal, *asked)
            reveal_down.append(compact(SecAggStatus("unmasking", node=u, threshold=t, survivors=asked[0],
                                                    dropped=asked[1])))
            reveal_up.append(compact(SecAggReveal(given)))
            for owner, (_, share) in given.items():
                shares.setdefault(owner, {})[u] = share
        t0 = time.perf_counter()
        total = unmask(sums[f"masked_{scenario}"].total, members, survivors, shares, t, domain)
        unmask_s[label] = round(time.perf_counter() - t0, 2)
        exact = np.array_equal(pipeline.ring.reduce(total.astype(np.int64)), sums[f"plain_{scenario}"].total)
        print(f"{n} devices, {label} dropout: unmasked in {unmask_s[label]:.2f} s, "
              f"{'exactly the plain sum' if exact else 'NOT the plain sum'} of {len(survivors)} updates", flush=True)
        if not exact:
            raise AssertionError(f"{n} devices, dropout {label}: the unmasked sum differs from the plain sum")
    plain_bytes = plain_upload_bytes(cfg.bits, size, sha, delta)
    key_share_up = float(np.mean(list(up.values())) + np.mean(reveal_up))
    return {"k": k, "t": t, "modulus_bits": spec.modulus_bits, "device_cpu_ms": cpu.mean(),
            "encode_ms": round(float(np.mean(encode_ms)), 1),
            "upload_bytes": int(round(masked_bytes + key_share_up)), "masked_upload_bytes": masked_bytes,
            "key_share_upload_bytes": int(round(key_share_up)),
            "download_bytes": int(round(np.mean(list(down.values())) + np.mean(reveal_down))),
            "plain_upload_bytes": plain_bytes,
            "expansion": round((masked_bytes + key_share_up) / plain_bytes, 4),
            "expansion_bound": round(spec.modulus_bits / cfg.bits, 4),
            "key_share_fraction": round(key_share_up / masked_bytes, 4),
            "unmask_s": unmask_s, "completed_with_30pct_dropout": True}


# -- over HTTP ------------------------------------------------------------------------------


def http_setup(work: Path, cfg: SecAggBenchConfig) -> tuple[Path, np.ndarray]:
    """A server config with one secure-aggregation population, 70% of the selection its goal."""
    import subprocess
    import sys

    from contract.model.weights import save_checkpoint
    from models.model import GBOARD, weight_layout
    from server.config import RateLimits

    layout = weight_layout(GBOARD)
    flat = np.random.default_rng(0).normal(0, 0.05, layout.size).astype(np.float32)
    save_checkpoint(work / "init.safetensors", layout, flat, {"round": 0, "model_config": dataclasses.asdict(GBOARD)})
    goal = int(round((1 - cfg.dropout) * cfg.http_devices))
    population = {"goal": goal, "over_selection": cfg.http_devices / goal, "min_selected_fraction": 1.0,
                  "selection_window_s": 3600.0, "reporting_window_s": 3600.0, "eval_every": 0,
                  "server_optimizer": "sgd", "server_lr": 1.0, "eligibility": {"min_separation_s": 0.0},
                  "update": {"bits": cfg.bits}, "secure_aggregation": True,
                  "secagg": {"keys_window_s": 600.0, "shares_window_s": 600.0, "unmask_window_s": 600.0}}
    limits = {f.name: [1e9, 3600.0] for f in dataclasses.fields(RateLimits)}
    config = {"database": str(work / "state/nightjar.db"), "artifact_dir": str(work / "state/artifacts"),
              "state_dir": str(work / "state/private"), "tick_interval_s": 0.2, "aggregation_shards": cfg.threads,
              "populations": {"secagg": population}, "rate_limits": limits}
    path = work / "server.json"
    path.write_text(json.dumps(config))
    subprocess.run([sys.executable, "-m", "server", "init", "--config", str(path), "--population", "secagg",
                    "--checkpoint", str(work / "init.safetensors")], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return path, flat


class HttpDevice:
    """One device's phases over one keep-alive connection, counting the bodies it sends and receives."""

    def __init__(self, conn, auth: str, assignment: dict):
        from contract.update.pipeline import UpdatePipeline
        from contract.secagg.masking import DeviceSecAgg
        from contract.update.spec import RoundSpec

        self.conn, self.auth, self.assignment = conn, auth, assignment
        self.pipeline = UpdatePipeline(RoundSpec.from_json(assignment["update"]))
        self.secrets = DeviceSecAgg(self.pipeline.round_spec.fingerprint.encode())
        self.path = f"/v1/sessions/{assignment['session_id']}"
        self.up = self.down = 0
        self.plaintext: np.ndarray | None = None

    async def call(self, method: str, suffix: str, body: bytes = b"", kind: str = "application/json",
                   late: bool = False) -> dict:
        """The JSON answer; with `late`, a 409 wrong_phase (the phase ended meanwhile) is one too."""
        headers = f"Authorization: {self.auth}\r\nContent-Type: {kind}\r\n"
        try:
            status, answer = await self.conn.request(method, self.path + suffix, body, headers)
        except (ConnectionError, asyncio.IncompleteReadError):    # the server closed an idle keep-alive
            self.conn.close()
            self.conn = await type(self.conn)(self.conn.port).open()
            status, answer = await self.conn.request(method, self.path + suffix, body, headers)
        self.up, self.down = self.up + len(body), self.down + len(answer)
        if late and status == 409 and json.loads(answer)["error"] == "wrong_phase":
            return json.loads(answer)
        if status >= 300:
            raise AssertionError(f"{method} {suffix}: {status} {answer[:300]!r}")
        return json.loads(answer)

    async def wait(self, phase: str):
        from contract.secagg.messages import SecAggStatus

        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            status = SecAggStatus.from_json(await self.call("GET", "/secagg"))
            if status.phase == phase and not status.done:
                return status
            if status.phase == "done" and phase == "unmasking":
                return None                 # t shares of every secret came before this device's
            if status.phase in ("failed", "excluded"):
                raise AssertionError(f"the round's secure aggregation is {status.phase}")
            await asyncio.sleep(0.1)
        raise AssertionError(f"still not in phase {phase} after 600 s")

    async def send(self, phase: str, message, late: bool = False) -> None:
        await self.call("POST", f"/secagg/{phase}", json.dumps(message.to_json()).encode(), late=late)


async def http_round(port: int, auths: list[str], population: str, cfg: SecAggBenchConfig, operator: dict) -> dict:
    from contract.update.pipeline import Contribution, running_sum
    from contract.secagg.messages import SecAggKeys, SecAggReveal, SecAggShares
    from benchmarks.server import Conn, assign_all

    sessions = await assign_all(port, auths, population)
    devices = [HttpDevice(await Conn(port).open(), auth, a) for auth, _, a in sessions]
    rng = np.random.default_rng(cfg.seed)
    leaving = set(rng.choice(len(devices), len(devices) - int(round((1 - cfg.dropout) * len(devices))),
                             replace=False).tolist())
    phase_s: dict[str, float] = {}
    t0 = time.perf_counter()
    await asyncio.gather(*[d.send("keys", SecAggKeys(d.secrets.advertise())) for d in devices])
    phase_s["keys"] = time.perf_counter() - t0

    async def share(d):
        s = await d.wait("shares")
        await d.send("shares", SecAggShares(d.secrets.share(s.node, s.threshold, list(s.neighbours))))

    async def submit(d):
        s = await d.wait("masking")
        d.secrets.receive(s.inbox)
        seed = int(d.assignment["hyperparameters"]["seed"])
        delta = np.random.default_rng(seed).normal(0, 2e-2, d.pipeline.round_spec.size).astype(np.float32)
        d.plaintext = d.pipeline.plaintext(delta, 40, seed)
        body = d.pipeline.encode(delta, 40, seed, masker=d.secrets.mask).body
        reply = await d.call("POST", f"/update?model_version={d.assignment['model_version']}", body, "application/octet-stream")
        assert reply["status"] == "accepted", reply

    async def reveal(d):
        s = await d.wait("unmasking")
        if s is None:
            return
        # the round completes once every secret has t shares: a reveal after that is answered 409
        await d.send("reveal", SecAggReveal(d.secrets.reveal(list(s.survivors), list(s.dropped))), late=True)

    survivors = [d for i, d in enumerate(devices) if i not in leaving]
    for phase, fn, who in (("shares", share, devices), ("masking", submit, survivors), ("unmasking", reveal, survivors)):
        t0 = time.perf_counter()
        await asyncio.gather(*[fn(d) for d in who])
        phase_s[phase] = time.perf_counter() - t0
    t0 = time.perf_counter()
    probe = await Conn(port).open()
    headers = "".join(f"{k}: {v}\r\n" for k, v in operator.items())
    while True:
        _, answer = await probe.request("GET", f"/v1/populations/{population}/rounds/1", b"", headers)
        info = json.loads(answer)
        if info["state"] != "reporting" or time.perf_counter() - t0 > 600:
            break
        await asyncio.sleep(0.05)
    phase_s["until_completed"] = time.perf_counter() - t0
    probe.close()
    for d in devices:
        d.conn.close()
    plain = running_sum(survivors[0].pipeline)
    for d in survivors:
        plain.add(Contribution(d.plaintext.astype(np.int64), 0, 0.0))
    return {"info": info, "phase_s": phase_s, "pipeline": survivors[0].pipeline, "plain": plain,
            "survivors": len(survivors), "up": [d.up for d in survivors], "down": [d.down for d in survivors]}


def over_http(cfg: SecAggBenchConfig) -> dict:
    import requests

    from benchmarks.server import register
    from contract.model.weights import load_checkpoint
    from emulation.deployment import enrollment
    from deploy.server_process import ServerProcess, free_port

    with tempfile.TemporaryDirectory(prefix="nightjar-secagg-") as tmp:
        work = Path(tmp)
        config, flat = http_setup(work, cfg)
        with ServerProcess(config, free_port(), work / "server.log", cfg.workers, cfg.threads) as server:
            auths = asyncio.run(register(server.port, cfg.http_devices, {"secagg": enrollment(config, "secagg")},
                                         ("secagg",), parallel=10))["secagg"]
            r = asyncio.run(http_round(server.port, auths, "secagg", cfg, server.operator_headers))
            info = r["info"]
            assert info["state"] == "completed", info
            base = f"http://127.0.0.1:{server.port}"
            newest = requests.get(f"{base}/v1/populations/secagg/versions", headers=server.operator_headers,
                                  timeout=30).json()["versions"][0]
            blob = requests.get(f"{base}/v1/artifacts/{newest['checkpoint_sha256']}",
                                headers=server.operator_headers, timeout=60).content
            (work / "v1.safetensors").write_bytes(blob)
            _, got, _ = load_checkpoint(work / "v1.safetensors")
    mean = r["pipeline"].finalize_masked(r["plain"].total, r["survivors"])
    error = float(np.max(np.abs(got - (flat + mean))))      # sgd at lr 1: weights + mean
    print(f"over HTTP: {info['secagg']}, version 1 within {error:.1e} of init + the survivors' plain mean", flush=True)
    assert error < 1e-6, error
    return {"devices": cfg.http_devices, "k": info["secagg"]["k"], "t": info["secagg"]["t"],
            "survivors": r["survivors"], "completed_with_30pct_dropout": info["state"] == "completed",
            "phase_s": {p: round(s, 2) for p, s in r["phase_s"].items()},
            "upload_bytes": int(np.mean(r["up"])), "download_bytes": int(np.mean(r["down"])),
            "max_abs_error": error}


def table(report: dict) -> str:
    """The figures as a Markdown table (the benchmark's summary, and benchmarks/REPORT.md's)."""
    label = f"{report['dropout']:g}"
    lines = ["| devices | k | t | m | CPU per device: advertise / share / mask / reveal | upload | expansion (bound m/b) "
             "| keys + shares + reveals | download | unmask, 0% / 30% dropout |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n, r in report["rounds"].items():
        c = r["device_cpu_ms"]
        lines.append(f"| {int(n):,} | {r['k']} | {r['t']} | {r['modulus_bits']} | {c['advertise']:.1f} / {c['share']:.0f} / "
                     f"{c['mask']:.0f} / {c['unmask']:.1f} ms | {r['upload_bytes'] / 1e6:.3f} MB | {r['expansion']:.3f}x "
                     f"({r['expansion_bound']:.3f}x) | {100 * r['key_share_fraction']:.2f}% of the masked upload | "
                     f"{r['download_bytes'] / 1e3:.1f} kB | {r['unmask_s']['0']:.1f} s / {r['unmask_s'][label]:.1f} s |")
    if "http" in report:
        h = report["http"]
        phases = ", ".join(f"{p} {v:.1f} s" for p, v in h["phase_s"].items())
        lines.append(f"\nOver HTTP (gunicorn on loopback), {h['devices']} devices, k = {h['k']}, t = {h['t']}, "
                     f"{h['survivors']} submitting: {'completed' if h['completed_with_30pct_dropout'] else 'FAILED'}, "
                     f"the new version within {h['max_abs_error']:.0e} of the survivors' plain mean; phases {phases}; "
                     f"{h['upload_bytes'] / 1e6:.3f} MB up and {h['download_bytes'] / 1e3:.1f} kB down per device.")
    return "\n".join(lines)


def main() -> int:
    cfg, _ = parse_config(SecAggBenchConfig, __doc__)
    start = time.monotonic()
    size, sha = gboard_size()
    size = cfg.size or size
    report = {"model": "gboard", "bits": cfg.bits, "size": size, "dropout": cfg.dropout, "rounds": {}}
    for n in (int(x) for x in cfg.rounds.split(",")):
        report["rounds"][str(n)] = inprocess(n, cfg, size, sha)
    if cfg.http_devices:
        report["http"] = over_http(cfg)
    report["targets"] = TARGETS
    report["wall_s"] = round(time.monotonic() - start, 1)
    write_result(RESULTS / "secagg.json", report, show=False)
    print("\n" + table(report))
    print(f"wall {report['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
