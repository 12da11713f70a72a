"""DP-FTRL on the server: plain server SGD at zero noise, the tree's noise for each release index (also after
a restart), the participation rule at selection, and the ledger's ε without a sampling assumption.

Rounds run through the Flask app (the fixture's population: goal 4, float32 updates, server SGD at lr 1)
with `[populations.en.dp] mechanism = "ftrl"`; the restart mid-horizon also through the real server
(gunicorn), SIGKILLed between two rounds.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from contract.dp.ftrl import TreeNoise
from privacy.ftrl import ftrl_spent
from server import create_app
from server.privacy import participation
from tests.server_fixtures import DeviceClient, FlaskTransport, device_test_client

FTRL = {"mechanism": "ftrl", "noise_multiplier": 0.0, "initial_clip": 0.5, "clipped_count_stddev": 0.0,
        "clip_learning_rate": 0.0, "min_separation_rounds": 2, "max_participations": 2, "horizon_rounds": 8}
LEDGER = {"epsilon": 1e9, "delta": 1e-5}       # a δ that does not move with the enrolled devices


def devices(env, n: int) -> list[DeviceClient]:
    transport = FlaskTransport(env.client)
    return [DeviceClient(transport, env.population, env.enrollment) for _ in range(n)]


def train_round(env, pool: list[DeviceClient], deltas: list[np.ndarray]) -> tuple[list[DeviceClient], list[str]]:
    """Check the pool in until the round has a device per delta; each uploads its delta. (selected, refused ids)"""
    chosen, refused = [], []
    for device in pool:
        if len(chosen) == len(deltas):
            break
        reply = device.checkin()
        assert reply.status == 200, reply.body
        if "assignment" in reply.body:
            chosen.append(device)
        else:
            refused.append(reply.body["rejection"]["reason"])
    assert len(chosen) == len(deltas), (len(chosen), refused)
    for device, delta in zip(chosen, deltas):
        assert device.upload(delta, 10).body["status"] == "accepted"
    return chosen, refused


def weights(env, version: int) -> np.ndarray:
    return env.services.versions.weights(env.services.versions.get(env.population, version))


def test_with_zero_noise_dp_ftrl_steps_as_plain_server_sgd_on_the_same_sums(make_server):
    env = make_server(dp=FTRL)
    pool = devices(env, 12)
    rng = np.random.default_rng(3)
    expected = env.flat.astype(np.float64)
    for version in (1, 2, 3):
        deltas = [rng.normal(0, 0.2, env.layout.size) for _ in range(4)]
        train_round(env, pool, deltas)
        clipped = [d * min(1.0, 0.5 / np.linalg.norm(d)) for d in deltas]
        expected = expected + np.sum(clipped, 0) / 4             # FTRL with linear losses = server SGD, lr 1
        np.testing.assert_allclose(weights(env, version), expected, atol=1e-6)
    spent = env.services.privacy.spent("en", 3)
    assert (spent["mechanism"], spent["assumption"]) == ("ftrl", "participation")
    assert spent["epsilon"] is None                                  # z = 0: no finite guarantee


def test_the_noise_is_the_trees_for_each_release_index_and_a_restart_continues_it(make_server):
    noisy = {**FTRL, "noise_multiplier": 0.5, "clipped_count_stddev": 100.0}
    env = make_server(dp=noisy)
    cfg = env.services.config.population("en")
    layout = participation(cfg)
    zeros = [np.zeros(env.layout.size)] * 4

    def check(pool, version):
        chosen, _ = train_round(env, pool, zeros)
        stddev = chosen[0].assignment["update"]["dp_stddev"]
        key = bytes.fromhex((env.root / "private" / "dp-ftrl.key").read_text().strip())
        unit = TreeNoise(key, layout.horizon, layout.restart_every, label="en").unit(version - 1, env.layout.size)
        np.testing.assert_allclose(weights(env, version) - weights(env, version - 1), stddev * unit / 4,
                                   rtol=1e-5, atol=1e-6)
        return stddev

    pool = devices(env, 16)
    assert check(pool, 1) > 0
    check(pool, 2)
    env.app = create_app(env.config, clock=env.clock, exporter=env.exporter)   # a restart: state from disk only
    env.services, env.client = env.app.extensions["nightjar"], device_test_client(env.app)
    pool = devices(env, 8)
    check(pool, 3)                                    # the index after the restart, and the same key
    indices = [e["dp_index"] for e in env.services.privacy.summary("en", cfg)["events"]]
    assert indices == [0, 1, 2]


def test_a_device_is_never_selected_within_b_dp_rounds_of_its_last_nor_over_k_per_horizon(make_server):
    env = make_server(dp={**FTRL, "min_separation_rounds": 3, "max_participations": 2, "horizon_rounds": 6},
                      goal=2, min_round_size=1, over_selection=1.0, min_selected_fraction=1.0)
    pool = devices(env, 6)
    history: dict[str, list[int]] = {}
    for index in range(6):
        chosen, refused = train_round(env, pool, [np.zeros(env.layout.size)] * 2)
        assert set(refused) <= {"participation_limit"}
        for device in chosen:
            history.setdefault(device.device_id, []).append(index)
    for rounds in history.values():
        assert all(b - a >= 3 for a, b in zip(rounds, rounds[1:])), rounds     # b apart
        assert len(rounds) <= 2                                                 # k per horizon
    ledger = env.services.privacy.summary("en", env.services.config.population("en"))
    assert ledger["participation"]["refused"] > 0 and ledger["participation"]["released"] == 6
    assert ledger["assumption"] == "participation"


def test_the_ledger_charges_the_tree_under_the_participation_rule_and_the_budget_refuses_the_next(make_server):
    noisy = {**FTRL, "noise_multiplier": 1.0, "clipped_count_stddev": 100.0}
    env = make_server(dp=noisy, dp_budget=LEDGER)
    cfg = env.services.config.population("en")
    layout = participation(cfg)
    z_values, count_stddev = cfg.dp.split(cfg.goal)
    want = [ftrl_spent(z_values, count_stddev, n, layout.horizon, layout.k, layout.b, LEDGER["delta"],
                       layout.restart_every).epsilon for n in (1, 2, 3)]
    pool = devices(env, 12)
    zeros = [np.zeros(env.layout.size)] * 4
    for _ in range(3):
        train_round(env, pool, zeros)
    got = [env.services.privacy.spent("en", v)["epsilon"] for v in (1, 2, 3)]
    assert got == pytest.approx(want, rel=1e-9)
    # b = 2: no device is in two of the first two rounds, so only the third can grow Δ (a second participation)
    assert want[0] == want[1] < want[2] < math.inf
    budget = make_server(dp=noisy, dp_budget={**LEDGER, "epsilon": (want[1] + want[2]) / 2})
    pool = devices(budget, 12)
    train_round(budget, pool, zeros)
    train_round(budget, pool, zeros)
    reply = pool[-1].checkin()
    assert reply.body["rejection"]["reason"] == "dp_budget_exhausted"


def test_status_and_the_health_page_show_the_mechanism_b_k_the_refusals_and_epsilon(make_server, tmp_path, capsys):
    import json

    from server.__main__ import main
    from tests.test_dashboard import BROWSER, sign_in

    env = make_server(dp={**FTRL, "noise_multiplier": 1.0, "clipped_count_stddev": 100.0,
                          "min_separation_rounds": 3, "horizon_rounds": 6}, dp_budget=LEDGER,
                      goal=2, min_round_size=1, over_selection=1.0, min_selected_fraction=1.0)
    pool = devices(env, 4)
    for _ in range(2):
        train_round(env, pool, [np.zeros(env.layout.size)] * 2)
    ledger = env.services.privacy.summary("en", env.services.config.population("en"))
    part = ledger["participation"]
    assert (part["b"], part["k"], part["horizon"], part["released"]) == (3, 2, 6, 2) and part["refused"] == 2
    config = tmp_path / "server.json"
    config.write_text(json.dumps(env.config))
    assert main(["status", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "b = 3 DP rounds apart, at most k = 2 per horizon of 6" in out
    assert "turned away 2 of " in out and f"ε = {ledger['spent']['epsilon']:.4g}" in out
    sign_in(env.client, env.services.operator_token)
    page = env.client.get("/dashboard/p/en/health", headers=BROWSER).get_data(as_text=True)
    assert "DP-FTRL" in page and "b = 3" in page and "k = 2" in page and "turned away 2 of" in page


def test_after_a_sigkill_mid_horizon_the_real_server_adds_the_noise_it_would_have_added(tmp_path):
    """The real server (gunicorn, SIGKILLed between two DP-FTRL rounds and restarted on the same state):
    every version's step is the tree's noise for its release index, the same key before and after."""
    from deploy.server_process import ServerProcess, free_port
    from emulation.deployment import enrollment
    from server.config import load_config
    from tests.server_fixtures import HttpTransport, init_small_population, served_version, write_small_config

    config = write_small_config(tmp_path, goal=4, over_selection=1.0, min_selected_fraction=1.0,
                                min_report_fraction=1.0)
    dp = {**FTRL, "noise_multiplier": 0.5, "clipped_count_stddev": 100.0}
    with config.open("a") as f:
        f.write("\n[populations.en.update]\nbits = 32\nclip_norm = 100.0\nmax_weight = 1000\n"
                + "\n[populations.en.dp]\n" + "".join(f'{k} = {v!r}\n'.replace("'", '"') for k, v in dp.items())
                + "\n[populations.en.dp_budget]\n" + "".join(f"{k} = {v}\n" for k, v in LEDGER.items()))
    initial = init_small_population(tmp_path, config)
    layout = participation(load_config(config).population("en"))
    server = ServerProcess(config, free_port(), tmp_path / "server.log")

    def dp_round(version: int, previous: np.ndarray) -> np.ndarray:
        pool = [DeviceClient(HttpTransport(server.url), "en", enrollment(config, "en")) for _ in range(4)]
        chosen, _ = train_round(None, pool, [np.zeros(initial.size)] * 4)
        stddev = chosen[0].assignment["update"]["dp_stddev"]
        _, flat = served_version(server, version)
        key = bytes.fromhex((tmp_path / "state" / "private" / "dp-ftrl.key").read_text().strip())
        unit = TreeNoise(key, layout.horizon, layout.restart_every, label="en").unit(version - 1, initial.size)
        assert stddev > 0
        np.testing.assert_allclose(flat - previous, stddev * unit / 4, rtol=1e-5, atol=1e-6)
        return flat

    try:
        server.start()
        flat = dp_round(1, initial)
        flat = dp_round(2, flat)
        key_before = (tmp_path / "state" / "private" / "dp-ftrl.key").read_bytes()
        server.kill()                                     # SIGKILL master and workers mid-horizon
        server.start()
        dp_round(3, flat)                                 # release index 2, the same key
        assert (tmp_path / "state" / "private" / "dp-ftrl.key").read_bytes() == key_before
    finally:
        server.kill()
