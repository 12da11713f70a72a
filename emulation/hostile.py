"""A hostile phone among honest ones, through the real server: the drills of issue 30, for its test and benchmark.

The hostile phone has a genuine attestation and a modified app: it speaks the
protocol (device_runtime's client and contract.secagg's crypto) but may send
anything the wire format allows. It is also omniscient — it knows the honest
phones' weights and updates — so each drill measures the worst a single phone
can do. A drill runs on one real server (`python -m server run`, SQLite) with
a small random model and, per attack: an honest round (the step an honest
round takes), the attacked round, a SIGKILL and restart, and an honest round
that must complete. What it reports is `benchmarks/results/hostile.json`'s
`attacks` format: the server's answers by status, its 5xx count, how the
attacked round ended, whether the next completed, and the model step the
attacked round caused over the honest round's (None where it failed).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import requests

from contract.model.weights import WeightLayout, load_checkpoint, save_checkpoint
from contract.protocol.wire import Conditions
from contract.secagg.masking import KEY, SELF, DeviceSecAgg
from contract.secagg.messages import SecAggKeys, SecAggReveal, SecAggShares
from contract.secagg.plausible import bounds
from contract.update.pipeline import UpdatePipeline
from deploy.server_process import ServerProcess, free_port
from device_runtime.client import ServerClient
from device_runtime.errors import DeviceError
from device_runtime.transport import RetryPolicy, Transport
from emulation.deployment import REPO, enrollment, write_server_config

LAYOUT = WeightLayout([("embedding", (16, 8)), ("dense/kernel", (8, 16)), ("dense/bias", (16,))])
SECURE_ATTACKS = ("sum_weight_zero", "sum_weight_one", "codes_off_grid", "wrong_reveal",
                  "wrong_neighbour_reveal", "largest_plausible")
PLAIN_ATTACKS = ("huge_weight", "huge_norm", "codes_off_grid", "full_norm_one_example")
ELIGIBLE = Conditions(True, True, True, 0.9, 4096, 50, "1.0.0")
PHONES, WEIGHTS = 6, (40, 60, 80, 100, 100)          # the honest phones' example counts (W = 100)


class RecordingTransport(Transport):
    """The device transport, counting the server's answers by status (no retries: every answer counts)."""

    def __init__(self, url: str, answers: collections.Counter):
        super().__init__(url, retry=RetryPolicy(attempts=1, timeout_s=60.0))
        self.answers = answers

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        resp = super().request(method, path, **kwargs)
        self.answers[str(resp.status_code)] += 1
        return resp


class Phone:
    """One phone through a secure round, phase by phase; `tamper` hooks let the hostile one misbehave."""

    def __init__(self, url: str, config: Path, answers: collections.Counter):
        self.client = ServerClient(RecordingTransport(url, answers))
        self.client.authenticate(*self.client.register("en", enrollment(config, "en")))
        self.assignment = self.secrets = self.plaintext = None

    def checkin(self) -> None:
        self.assignment = self.client.checkin("en", ELIGIBLE)
        self.secrets = DeviceSecAgg(self.assignment.update.fingerprint.encode()) if self.assignment.update \
            and self.assignment.update.spec.secure_aggregation else None

    def pipeline(self) -> UpdatePipeline:
        return UpdatePipeline(self.assignment.update)

    def advertise(self) -> None:
        self.client.secagg_send(self.assignment, "keys", SecAggKeys(self.secrets.advertise()))

    def share(self) -> None:
        status = self.client.secagg_status(self.assignment)
        self.client.secagg_send(self.assignment, "shares", SecAggShares(
            self.secrets.share(status.node, status.threshold, list(status.neighbours))))

    def upload(self, delta: np.ndarray, examples: int, tamper: Callable | None = None) -> None:
        self.secrets.receive(self.client.secagg_status(self.assignment).inbox)

        def masker(ring: np.ndarray) -> np.ndarray:
            self.plaintext = (tamper(ring) if tamper else ring).astype(np.uint32)
            return self.secrets.mask(self.plaintext)
        self.client.upload(self.assignment, delta, examples, {}, masker)

    def reveal(self, tamper: Callable | None = None) -> None:
        status = self.client.secagg_status(self.assignment)
        if status.phase != "unmasking" or status.done:
            return
        shares = self.secrets.reveal(list(status.survivors), list(status.dropped))
        self.client.secagg_send(self.assignment, "reveal", SecAggReveal(tamper(shares) if tamper else shares))


@dataclasses.dataclass
class Drill:
    """The server, its phones, and what the drill saw."""

    root: Path
    config: Path
    server: ServerProcess
    phones: list[Phone]
    answers: collections.Counter
    rng: np.random.Generator

    def rounds(self) -> list[dict]:
        return self.server.operator_get("/v1/populations/en/rounds").json()["rounds"]

    def weights(self) -> np.ndarray:
        versions = self.server.operator_get("/v1/populations/en/versions").json()["versions"]
        sha = versions[0]["checkpoint_sha256"]
        data = requests.get(f"{self.server.url}/v1/artifacts/{sha}", headers=self.server.operator_headers,
                            timeout=30).content
        path = self.root / "checkpoint.safetensors"
        path.write_bytes(data)
        return load_checkpoint(path)[1]

    def wait_closed(self, number: int, timeout_s: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [r for r in self.rounds() if r["round"] == number]
            if found and found[0]["state"] in ("completed", "failed"):
                return found[0]
            time.sleep(0.2)
        raise TimeoutError(f"round {number} did not close in {timeout_s} s")

    def restart(self) -> None:
        self.server.kill()
        self.server.start()


def start(root: Path, secure: bool = True) -> Drill:
    """A fresh server with a small random model and PHONES enrolled phones (the caller stops it)."""
    settings = dict(goal=PHONES, min_round_size=3, over_selection=1.0, min_selected_fraction=1.0,
                    min_report_fraction=0.5, selection_window_s=120.0, reporting_window_s=600.0,
                    update={"bits": 8, "clip_norm": 2.5, "max_weight": 100})
    if secure:
        settings.update(secure_aggregation=True,
                        secagg={"keys_window_s": 60.0, "shares_window_s": 60.0, "unmask_window_s": 4.0})
    config = write_server_config(root, **settings)
    checkpoint = root / "init.safetensors"
    save_checkpoint(checkpoint, LAYOUT, np.random.default_rng(0).normal(0, 0.1, LAYOUT.size).astype(np.float32),
                    {"round": 0})
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "server", "init", "--config", str(config), "--checkpoint",
                           str(checkpoint)], cwd=REPO, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"server init failed: {done.stderr[-2000:]}")
    server = ServerProcess(config, free_port(), root / "server.log").start()
    answers: collections.Counter = collections.Counter()
    phones = [Phone(server.url, config, answers) for _ in range(PHONES)]
    return Drill(root, config, server, phones, answers, np.random.default_rng(1))


# -- secure rounds ------------------------------------------------------------------------------------


def _upload_tamper(attack: str, drill: Drill, hostile: Phone, honest: list[Phone]) -> Callable | None:
    """What the hostile phone does to its ring of integers before masking (None: nothing)."""
    spec = hostile.assignment.update
    count, modulus = hostile.pipeline().count, 1 << spec.modulus_bits
    levels = 2 ** (spec.spec.bits - 1) - 1
    honest_weight = sum(int(p.plaintext[count]) for p in honest)

    def weight(target: int) -> Callable:
        def tamper(ring):
            ring = ring.astype(np.int64)
            ring[count] = (target - honest_weight) % 2**32
            return ring
        return tamper

    def off_grid(ring):
        ring = ring.astype(np.int64)
        ring[:count] = (ring[:count] + 40 * levels) % modulus
        return ring

    def largest(ring):
        """Claim one example and fill the whole norm the sum check allows, in a direction of its choosing."""
        ring = ring.astype(np.int64)
        others = np.sum([p.plaintext[:count].astype(np.int64) - levels for p in honest], axis=0)
        limit = bounds(spec, len(honest) + 1).norm(honest_weight + 1) / spec.grid_step
        budget = max(0.0, limit - float(np.linalg.norm(others)) - 1.0)
        direction = np.where(drill.rng.random(count) < 0.5, -1.0, 1.0)
        ring[:count] = np.clip(np.floor(direction * budget / np.sqrt(count)), -levels, levels) + levels
        ring[count] = 1
        return ring

    return {"sum_weight_zero": weight(0), "sum_weight_one": weight(1), "codes_off_grid": off_grid,
            "largest_plausible": largest}.get(attack)


def _reveal_tamper(attack: str) -> Callable | None:
    def wrong(shares):
        return {o: (kind, bytes(np.random.default_rng(o).integers(0, 256, len(s), dtype=np.uint8)))
                for o, (kind, s) in shares.items()}

    def misdirected(shares):
        owner = sorted(shares)[0]
        kind, share = shares[owner]
        return {**shares, owner: (KEY if kind == SELF else SELF, share)}

    return {"wrong_reveal": wrong, "wrong_neighbour_reveal": misdirected}.get(attack)


def secure_round(drill: Drill, attack: str | None = None) -> tuple[dict, np.ndarray]:
    """One round under secure aggregation, phone 0 hostile with `attack` (None: honest too): the round's
    analytics once closed, and the sum of the plaintexts the phones masked."""
    hostile, honest = drill.phones[0], drill.phones[1:]
    for p in drill.phones:
        p.checkin()
    number = drill.phones[0].assignment.round
    for step in (Phone.advertise, Phone.share):
        for p in drill.phones:
            step(p)
    deltas = [drill.rng.normal(0, 0.2, LAYOUT.size) for _ in drill.phones]
    for p, delta, examples in zip(honest, deltas[1:], WEIGHTS):
        p.upload(delta, examples)
    try:
        hostile.upload(deltas[0], 100, _upload_tamper(attack, drill, hostile, honest) if attack else None)
    except DeviceError:
        pass                                     # a refusal is an answer: the drill counts it
    for p in drill.phones:
        try:
            p.reveal(_reveal_tamper(attack) if p is hostile and attack else None)
        except DeviceError:
            pass
    total = np.sum([p.plaintext.astype(np.int64) for p in drill.phones if p.plaintext is not None], axis=0)
    return drill.wait_closed(number), total


# -- plain rounds ---------------------------------------------------------------------------------------


def _plain_body(attack: str, phone: Phone, delta: np.ndarray) -> tuple[bytes, int]:
    """(body, claimed examples) of the hostile phone in a plain round: an honest encoding of 100 examples'
    update, then a claim it does not match or a tensor changed (safetensors: the metadata kept)."""
    import tempfile

    from safetensors import safe_open
    from safetensors.numpy import save

    encoded = phone.pipeline().encode(delta, 100, int(phone.assignment.hyperparameters["seed"]))
    if attack == "huge_weight":
        return encoded.body, 10**6
    if attack == "full_norm_one_example":
        return encoded.body, 1
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as file:
        file.write(encoded.body)
        file.flush()
        with safe_open(file.name, "numpy") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    if attack == "huge_norm":
        tensors["scales"] = tensors["scales"] * np.float32(2.0 ** 20)
    else:                                        # codes_off_grid: every packed byte past the grid's top
        tensors["codes"] = np.full_like(tensors["codes"], 0xFF)
    return save(tensors, metadata=meta), 100


def plain_round(drill: Drill, attack: str | None = None) -> tuple[dict, None]:
    """One plain round, phone 0 hostile with `attack`, the rest honest. A hostile upload the server refuses
    is followed by the failure report its phone would send, so the round closes on the others' reports."""
    for p in drill.phones:
        p.checkin()
    hostile, number = drill.phones[0], drill.phones[0].assignment.round
    deltas = [drill.rng.normal(0, 0.2, LAYOUT.size) for _ in drill.phones]
    for p, delta, examples in zip(drill.phones[1:], deltas[1:], WEIGHTS):
        p.client.upload(p.assignment, delta, examples, {})
    if attack is None:
        hostile.client.upload(hostile.assignment, deltas[0], 100, {})
        return drill.wait_closed(number), None
    body, claimed = _plain_body(attack, hostile, deltas[0])
    resp = hostile.client.transport.request(
        "POST", hostile.assignment.report_url, data=body, headers={"Content-Type": "application/octet-stream"},
        params={"model_version": hostile.assignment.model_version, "num_examples": claimed})
    if resp.status_code != 200:
        hostile.client.report_failure(hostile.assignment, "error")
    return drill.wait_closed(number), None


# -- the drill ------------------------------------------------------------------------------------------


def run_attack(drill: Drill, attack: str, secure: bool) -> dict:
    """Honest round, attacked round, SIGKILL + restart, honest round: the attack's row of hostile.json."""
    play = secure_round if secure else plain_round
    before = drill.answers.copy()
    start = drill.weights()
    play(drill)
    honest = drill.weights()
    attacked, total = play(drill, attack)
    after = drill.weights()
    detail = drill.server.operator_get(f"/v1/populations/en/rounds/{attacked['round']}").json()
    exact = None
    if total is not None and attacked["state"] == "completed":     # the unmasked sum, bit for bit?
        pipeline = drill.phones[0].pipeline()
        mean = pipeline.finalize_masked(pipeline.ring.reduce(total), detail["reported"])
        exact = bool(np.allclose(after - honest, mean, atol=1e-6))
    record = [r for r in drill.rounds() if r["round"] == attacked["round"]][0]
    drill.restart()
    again = [r for r in drill.rounds() if r["round"] == attacked["round"]][0]
    following, _ = play(drill)
    answers = drill.answers - before
    completed = attacked["state"] == "completed"
    return {"name": attack, "secure_aggregation": secure, "answers": dict(sorted(answers.items())),
            "server_errors": sum(n for status, n in answers.items() if status.startswith("5")),
            "round_outcome": "completed" if completed else f"failed: {attacked['reason']}",
            "restart_changed_nothing": record == again, "next_round_completed": following["state"] == "completed",
            "exact_sum": exact, "wrong_revealers_named": len((detail.get("secagg") or {}).get("wrong_revealers", [])),
            "step_ratio": float(np.linalg.norm(after - honest) / np.linalg.norm(honest - start)) if completed
            else None}


def drill_all(root: Path) -> list[dict]:
    """Every attack, secure then plain, each on its own server (stopped on return)."""
    rows = []
    for secure, attacks in ((True, SECURE_ATTACKS), (False, PLAIN_ATTACKS)):
        drill = start(root / ("secure" if secure else "plain"), secure)
        try:
            rows += [run_attack(drill, attack, secure) for attack in attacks]
        finally:
            drill.server.kill()
    return rows

