"""Secure aggregation with real phones: the runtime, LiteRT, the real server, phones leaving at every
phase, and what the server could see.

Thirty emulated phones run three rounds of secure aggregation through the
recording proxy; 10% of the sessions vanish after advertising keys, after
sending shares, after training and before revealing. The test side keeps
every phone's plaintext integers (what `DeviceSecAgg.mask` was given) and
checks that each new version was built from exactly the survivors' sum, that
no request body holds a plaintext, and that nothing on the server's disk
(its files and its database) does either.
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path

import numpy as np
import pytest

from contract.update.packing import pack_uint
from contract.update.pipeline import UpdatePipeline
from contract.secagg.masking import DeviceSecAgg
from contract.update.spec import RoundSpec
from emulation.deployment import simulated_clock, start_server
from emulation.models import tiny_corpus, tiny_model
from emulation.world import Faults
from tests.device_world import server_weights
from tests.e2e import FLEET_POPULATION, NIGHT_UTC, run_fleet
from tests.recording_proxy import RecordingProxy

pytestmark = pytest.mark.slow
UPLOAD = re.compile(r"^/v1/sessions/([^/?]+)/update(\?|$)")
# Windows in simulated time at 240x: 5 minutes for the last keys are 1.25 s of wall time.
SECURE = dict(FLEET_POPULATION, goal=8, over_selection=1.25, min_selected_fraction=1.0, secure_aggregation=True,
              secagg={"keys_window_s": 300.0, "shares_window_s": 600.0, "unmask_window_s": 900.0})
DROPS = Faults(drop_after_keys=0.1, drop_after_shares=0.1, drop_after_training=0.1, drop_before_unmask=0.1, seed=3)


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("secagg-fleet")
    corpus = tiny_corpus()
    model = tiny_model(root / "model", corpus)
    server = start_server(root / "server", model, **SECURE, server=simulated_clock(NIGHT_UTC, 240.0))
    try:
        with recorded_plaintexts() as masked_from, RecordingProxy(server.url) as proxy:
            run = run_fleet(root / "fleet", server, corpus, phones=30, rounds=3, url=proxy.url,
                            max_wall_s=300, faults=DROPS)
        yield server, run, proxy.requests, masked_from, root
    finally:
        server.kill()


@contextlib.contextmanager
def recorded_plaintexts():
    """masked_key(masked words) → the plaintext each phone gave `DeviceSecAgg.mask`, while inside."""
    masked_from: dict[tuple, np.ndarray] = {}
    real_mask = DeviceSecAgg.mask

    def recording_mask(self, ring):
        out = real_mask(self, ring)
        masked_from[masked_key(out)] = ring.copy()
        return out

    DeviceSecAgg.mask = recording_mask
    try:
        yield masked_from
    finally:
        DeviceSecAgg.mask = real_mask


def test_rounds_complete_with_phones_leaving_at_every_phase(secure_run):
    server, run, _, _, _ = secure_run
    injected = run.fleet.faults.injected
    assert all(injected[k] > 0 for k in ("drop_after_keys", "drop_after_shares", "drop_after_training",
                                         "drop_before_unmask")), injected
    completed = [d for d in run.details if d["state"] == "completed"]
    assert len(completed) >= 3 and run.summary["runtime_errors"] == 0
    for d in completed:
        s = d["secagg"]
        assert s["phase"] == "done" and s["survivors"] == d["reported"] <= s["shared"] <= s["members"]
    assert any(d["secagg"]["survivors"] < d["secagg"]["members"] for d in completed)   # someone left


def masked_key(words: np.ndarray) -> tuple:
    """What identifies a masked vector before and after its reduction to the ring (m >= 8 bits):
    the masked weight (modulo 2^32 either way) and the low bytes of the first words."""
    return int(words[-1]), bytes((words[:64] & 0xFF).astype(np.uint8))


def plaintexts_by_session(requests, masked_from, details) -> dict[str, np.ndarray]:
    specs = {d["round"]: RoundSpec.from_json(d["update"]) for d in details}
    session_round = {dev["session_id"]: d["round"] for d in details for dev in d["devices"]}
    out = {}
    for r in requests:
        m = UPLOAD.match(r.target)
        if m and m.group(1) in session_round:
            pipeline = UpdatePipeline(specs[session_round[m.group(1)]])
            ring = pipeline.accept(r.body, None).units.astype(np.uint32)
            out[m.group(1)] = masked_from[masked_key(ring)]
    return out


def test_each_version_is_built_from_exactly_the_survivors_plaintext_sum(secure_run):
    server, run, requests, masked_from, root = secure_run
    plain = plaintexts_by_session(requests, masked_from, run.details)
    for d in (d for d in run.details if d["state"] == "completed"):
        pipeline = UpdatePipeline(RoundSpec.from_json(d["update"]))
        accepted = [dev["session_id"] for dev in d["devices"] if dev["outcome"] == "accepted"]
        ring = np.zeros(pipeline.vector_size, np.int64)
        for sid in accepted:
            pipeline.fold(ring, plain[sid].astype(np.int64))
        mean = pipeline.finalize_masked(ring, len(accepted))
        versions = {v["version"]: v for v in run.status.versions}
        new, parent = versions[d["result_version"]], versions[d["model_version"]]
        got = server_weights(server, new["checkpoint_sha256"], root) - \
            server_weights(server, parent["checkpoint_sha256"], root)
        np.testing.assert_allclose(got, mean, atol=2e-7)           # sgd at lr 1: the mean itself


def windows(plaintext: np.ndarray, modulus_bits: int) -> list[bytes]:
    """Byte strings that would betray a plaintext: 48-byte runs of it as packed m-bit values (an
    unmasked upload), uint32 words and int64 integers (a running sum of one)."""
    body = plaintext[:-1]
    forms = [pack_uint(body, modulus_bits).tobytes(), body.astype("<u4").tobytes(), body.astype("<i8").tobytes()]
    return [f[i:i + 48] for f in forms for i in (len(f) // 3, len(f) // 2, 2 * len(f) // 3)]


def found_in(blobs, needles: list[bytes]) -> list[str]:
    return [name for name, data in blobs for n in needles if n in data]


def server_files(root: Path):
    for path in sorted((root / "server").rglob("*")):
        if path.is_file():
            yield str(path), path.read_bytes()


def test_no_request_and_nothing_on_the_servers_disk_holds_a_plaintext(secure_run):
    server, run, requests, masked_from, root = secure_run
    plain = plaintexts_by_session(requests, masked_from, run.details)
    m = {d["round"]: RoundSpec.from_json(d["update"]).modulus_bits for d in run.details}
    session_round = {dev["session_id"]: d["round"] for d in run.details for dev in d["devices"]}
    needles = [w for sid, p in plain.items() for w in windows(p, m[session_round[sid]])]
    assert len(plain) >= 20 and needles
    bodies = [(r.target, r.body) for r in requests]
    assert found_in(bodies, needles) == []
    server.kill()                           # the database and the files as a crash would leave them
    assert found_in(server_files(root), needles) == []
    assert found_in([("a file holding one", b"x" + pack_uint(next(iter(plain.values()))[:-1], m[1]).tobytes())],
                    needles)                # the search would find one
