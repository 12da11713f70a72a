"""Personalize rounds through the server (Flask test client, every answer checked against /openapi.json):
scheduled after training rounds, reports checked and summed, no device's own figures stored, and the
published version offered with what a phone personalizes it with."""
from __future__ import annotations

import json

import numpy as np

from contract.model.metrics import Hits
from contract.tasks.personal import PersonalReport
from tests.server_fixtures import DeviceClient, break_finish
from tests.test_server_views import checked_server, train_one_round

N = 3
SPEC = {"epochs": 2, "lr": 0.1, "cache_weight": 0.3}


def personal_server(make_server, **settings):
    return checked_server(make_server, goal=N, over_selection=1.0, min_selected_fraction=1.0, min_report_fraction=1.0,
                          personalization=SPEC, personal_eval_every=1, **settings)


def report(env, device: DeviceClient, assignment: dict, counts) -> dict:
    return env.api.request("POST", assignment["report"]["url"], headers=device.headers,
                           json={"model_version": assignment["model_version"], "counts": counts})


def test_a_personalize_round_sums_the_reports_and_keeps_no_device_figure(make_server):
    env = personal_server(make_server)
    train_one_round(env, N)
    reports = [PersonalReport(Hits(10, 20, 100), Hits(15, 25, 100), False),
               PersonalReport(Hits(30, 40, 100), Hits(30, 40, 100), True),
               PersonalReport(Hits(50, 60, 100), Hits(40, 60, 100), False)]
    devices = [DeviceClient(env.api, "en", env.enrollment) for _ in range(N)]
    assignments = []
    for i, (d, r) in enumerate(zip(devices, reports)):
        a = d.checkin().body["assignment"]
        assignments.append(a)
        assert a["task"] == "personalize" and a["personalization"]["epochs"] == 2, a
        if i == 0:      # a malformed or inconsistent report is refused and changes nothing
            for bad in ([1, 2, 3], [-1] + r.vector().tolist()[1:], (r.vector() * 2).tolist()):
                reply = report(env, d, a, bad)
                assert reply.status == 400 and reply.body["error"] == "invalid_field", reply.body
        reply = report(env, d, a, r.vector().tolist())
        assert reply.status == 200 and reply.body["status"] == "accepted", reply.body
    again = report(env, devices[0], assignments[0], reports[0].vector().tolist())   # counted once only
    assert again.status == 200 and again.body["reason"] == "duplicate"
    detail = env.api.request("GET", "/v1/populations/en/rounds/2", headers=env.operator_headers).body
    assert detail["task"] == "personalize" and detail["state"] == "completed"
    p = detail["personalization"]
    assert p["devices"] == 3 and p["positions"] == 300
    assert p["global"]["top1"] == 0.3 and abs(p["personal"]["top1"] - 85 / 300) < 1e-12
    assert (p["helped"], p["hurt"], p["fell_back"]) == (1 / 3, 1 / 3, 1 / 3)
    assert sum(p["histogram"]["global"]) == 3 and p["fairness"]["global"]["users"] == 3
    assert all(d["metrics"] is None for d in detail["devices"])          # no device's own counts
    db = env.services.store.connection()
    (stored,) = db.execute("SELECT counts_json FROM personal_evals").fetchone()
    assert json.loads(stored) == np.sum([r.vector() for r in reports], axis=0).tolist()   # only the sum
    assert db.execute("SELECT COUNT(*) FROM sessions WHERE metrics_json IS NOT NULL AND round_id ="
                      " (SELECT id FROM rounds WHERE number = 2)").fetchone()[0] == 0
    d = DeviceClient(env.api, "en", env.enrollment)
    assert d.checkin().body["assignment"]["task"] == "train"             # then training goes on


def test_a_failed_personalize_round_is_tried_again(make_server):
    env = personal_server(make_server)
    train_one_round(env, N)
    d = DeviceClient(env.api, "en", env.enrollment)
    assert d.checkin().body["assignment"]["task"] == "personalize"
    env.clock.advance(400)                                               # past selection and deadline
    env.services.tick()
    rounds = env.api.request("GET", "/v1/populations/en/rounds", headers=env.operator_headers).body["rounds"]
    assert (rounds[0]["task"], rounds[0]["state"]) == ("personalize", "failed")
    d2 = DeviceClient(env.api, "en", env.enrollment)
    assert d2.checkin().body["assignment"]["task"] == "personalize"      # again, not after 1 more training round
    env.clock.advance(400)
    env.services.tick()
    d3 = DeviceClient(env.api, "en", env.enrollment)
    assert d3.checkin().body["assignment"]["task"] == "train"            # failed twice: training goes on


def test_the_config_refuses_a_bad_personalization_table(tmp_path):
    import pytest

    from server.config import ConfigError, load_config

    def config(table: str, extra: str = "") -> str:
        path = tmp_path / "server.toml"
        path.write_text(f'[populations.en]\ngoal = 5\n{extra}\n[populations.en.personalization]\n{table}\n')
        return path

    for table, message in (("cache_weight = 1.5", "cache_weight"), ("layers = 'all'", "unknown key"),
                           ("epochs = -1", "epochs")):
        with pytest.raises(ConfigError, match=message):
            load_config(config(table))
    path = tmp_path / "other.toml"
    path.write_text("[populations.en]\ngoal = 5\npersonal_eval_every = 3\n")
    with pytest.raises(ConfigError, match="personal_eval_every"):
        load_config(path)


def test_under_secure_aggregation_the_counts_travel_masked_and_only_their_sum_is_unmasked(make_server):
    """A personalize round of a secure population runs SecAgg+ like a training round: each device's
    vector reaches the server masked (it is not the device's counts), a plain one is refused, a
    device that drops after sharing is masked out, and the unmasked sum is exactly the survivors'."""
    from tests.test_secagg_server import KEYS_WINDOW_S, check_in, play, secure_server

    env = secure_server(make_server, checked=True, personalization=SPEC, personal_eval_every=1)
    env.api = env.transport                                              # every answer checked against the spec
    play(env, check_in(env), {})                                         # round 1: training
    phones = check_in(env)
    assert {p.assignment["task"] for p in phones} == {"personalize"}
    for p in phones:
        assert p.advertise().status == 200
    env.clock.advance(KEYS_WINDOW_S + 1)
    env.services.tick()
    for p in phones:
        assert p.share().status == 200
    env.clock.advance(61)
    env.services.tick()
    rng = np.random.default_rng(3)
    plain, sent = {}, []
    for i, p in enumerate(phones[:-2]):                                  # the last two never report
        positions = int(rng.integers(20, 200))
        g1, p1 = (int(x) for x in rng.integers(0, positions // 2, 2))
        counts = PersonalReport(Hits(g1, g1 + 5, positions), Hits(p1, p1 + 5, positions), bool(i % 3)).vector()
        p.secrets.receive(p.status().inbox)
        if i == 0:
            refused = report(env, p, p.assignment, counts.tolist())      # plain counts: refused, not stored
            assert refused.status == 400 and "masked" in refused.body["message"], refused.body
        masked = p.secrets.mask(counts.astype(np.uint32)).astype(np.int64)
        body = {"model_version": p.assignment["model_version"], "counts": masked.tolist(), "masked": True}
        reply = env.transport.request("POST", p.assignment["report"]["url"], headers=p.headers, json=body)
        assert reply.status == 200 and reply.body["status"] == "accepted", reply.body
        plain[i] = counts
        sent.append(masked)
        assert not np.array_equal(masked, counts)
    env.clock.advance(300)                                               # to the deadline
    env.services.tick()
    for p in phones[:-2]:
        if not p.status().done:                                          # until t of each have come
            assert p.reveal().status == 200
    env.services.tick()
    detail = env.api.request("GET", "/v1/populations/en/rounds/2", headers=env.operator_headers).body
    assert (detail["task"], detail["state"]) == ("personalize", "completed"), detail
    assert detail["secagg"]["survivors"] == len(plain) and detail["secagg"]["phase"] == "done"
    total = np.sum(list(plain.values()), axis=0)
    db = env.services.store.connection()
    (stored,) = db.execute("SELECT counts_json FROM personal_evals").fetchone()
    assert json.loads(stored) == total.tolist()                          # the survivors' sum, unmasked
    assert detail["personalization"]["devices"] == len(plain)
    assert detail["personalization"]["positions"] == int(total[4])
    assert not any(np.array_equal(np.asarray(s) % 2**32, total) for s in sent)


def test_a_personalize_finish_that_raises_fails_only_that_round_and_the_retry_completes(make_server, monkeypatch):
    env = personal_server(make_server)
    train_one_round(env, N)
    restore = break_finish(env, monkeypatch, "personalize")
    vector = PersonalReport(Hits(10, 20, 100), Hits(15, 25, 100), False).vector().tolist()
    for number, state, reason in ((2, "failed", "finish_error"), (3, "completed", None)):
        for d in [DeviceClient(env.api, "en", env.enrollment) for _ in range(N)]:
            a = d.checkin().body["assignment"]
            assert a["task"] == "personalize", a
            assert report(env, d, a, vector).body["status"] == "accepted"
        detail = env.api.request("GET", f"/v1/populations/en/rounds/{number}", headers=env.operator_headers).body
        assert (detail["state"], detail["reason"]) == (state, reason), detail
        restore()
