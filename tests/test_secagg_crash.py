"""A server killed (SIGKILL, master and workers) half-way through each phase of secure aggregation
restarts into the same phase, and the round completes with exactly the sum of the updates it accepted
(keys, shares, uploads and reveals received before the kill all count; none twice)."""
from __future__ import annotations

import numpy as np
import pytest
import requests

from contract.update.pipeline import running_sum, Contribution
from emulation.deployment import enrollment, write_server_config
from deploy.server_process import ServerProcess, free_port
from tests.device_world import server_weights
from tests.secagg_fixtures import SecAggPhone
from tests.server_fixtures import HttpTransport, init_small_population

pytestmark = pytest.mark.slow
PHASES = ("keys", "shares", "masking", "unmasking")
N = 6


def secure_config(root):
    return write_server_config(root, goal=N, min_round_size=3, over_selection=1.0, min_selected_fraction=1.0,
                               min_report_fraction=0.5, selection_window_s=120.0, reporting_window_s=600.0,
                               secure_aggregation=True, update={"bits": 8, "clip_norm": 2.5, "max_weight": 100},
                               secagg={"keys_window_s": 60.0, "shares_window_s": 60.0, "unmask_window_s": 120.0},
                               server={"aggregation_shards": 2})


def rounds(server) -> list[dict]:
    return server.operator_get("/v1/populations/en/rounds").json()["rounds"]


@pytest.mark.parametrize("phase", PHASES)
def test_a_server_killed_in_any_phase_completes_exactly_or_fails_cleanly(tmp_path, phase):
    config = secure_config(tmp_path)
    initial = init_small_population(tmp_path, config)
    server = ServerProcess(config, free_port(), tmp_path / "server.log").start()
    try:
        phones = [SecAggPhone(HttpTransport(server.url), "en", enrollment(config, "en")) for _ in range(N)]
        for p in phones:
            assert "assignment" in p.checkin().body
        rng = np.random.default_rng(1)
        deltas = [rng.normal(0, 2e-2, 272).astype(np.float32) for _ in phones]

        def step(name, act, done_before_kill=N // 2):
            for i, p in enumerate(phones):
                if i == done_before_kill and phase == name:
                    server.kill()                           # SIGKILL mid-phase
                    server.start()
                act(i, p)

        step("keys", lambda i, p: p.advertise())
        step("shares", lambda i, p: p.status().phase == "shares" and p.share())
        step("masking", lambda i, p: p.status().phase == "masking" and p.masked_upload(deltas[i], 10 + i))
        step("unmasking", lambda i, p: p.status().phase == "unmasking" and p.reveal(), done_before_kill=2)
        first = rounds(server)[-1]
        # The windows are long enough that the restart costs no phase: the round must complete (a
        # restart after a window passed instead fails the round or goes on with those who answered).
        assert (first["state"], first["result_version"]) == ("completed", 1), first
        detail = server.operator_get("/v1/populations/en/rounds/1").json()
        accepted = {d["session_id"] for d in detail["devices"] if d["outcome"] == "accepted"}
        pipeline = phones[0].pipeline()
        plain = running_sum(pipeline)
        for p in phones:
            if p.assignment["session_id"] in accepted:
                plain.add(Contribution(p.plaintext.astype(np.int64), 0, 0.0))
        assert plain.updates == len(accepted) == detail["reported"] >= 3
        versions = server.operator_get("/v1/populations/en/versions").json()["versions"]
        got = server_weights(server, versions[0]["checkpoint_sha256"], tmp_path) - initial
        np.testing.assert_allclose(got, pipeline.finalize_masked(plain.total, plain.updates), atol=2e-7)
        assert requests.get(server.url + "/healthz", timeout=10).status_code == 200
    finally:
        server.kill()
