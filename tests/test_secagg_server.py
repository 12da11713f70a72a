"""Secure aggregation through the server's phases (Flask test client, manual clock): exact sums with
devices leaving at every phase, rounds that fail cleanly, and malformed messages refused."""
from __future__ import annotations

import numpy as np
import pytest

from contract.update.pipeline import Contribution, running_sum
from contract.secagg.messages import SecAggKeys, SecAggReveal, SecAggShares
from tests.secagg_fixtures import SecAggPhone
from tests.server_fixtures import FlaskTransport
from tests.test_server_views import CheckedTransport, OpenAPIChecker

N = 12
KEYS_WINDOW_S = 30.0
PHASES = ("keys", "shares", "masking", "unmasking")


def secure_server(make_server, checked: bool = False, **overrides):
    settings = dict(goal=N, over_selection=1.0, min_selected_fraction=1.0, min_round_size=3,
                    min_report_fraction=0.25, secure_aggregation=True, selection_window_s=60.0,
                    reporting_window_s=300.0, update={"bits": 8, "clip_norm": 2.5, "max_weight": 100},
                    secagg={"keys_window_s": KEYS_WINDOW_S, "shares_window_s": 60.0, "unmask_window_s": 120.0})
    settings.update(overrides)
    env = make_server(**settings)
    env.checker = OpenAPIChecker(env.app)
    env.transport = CheckedTransport(env.client, env.checker) if checked else FlaskTransport(env.client)
    return env


def check_in(env, n: int = N) -> list[SecAggPhone]:
    phones = [SecAggPhone(env.transport, "en", env.enrollment) for _ in range(n)]
    for p in phones:
        assert "assignment" in p.checkin().body
    return phones


def spy_unmask(env) -> list:
    """Record what the server's unmasking returns (the survivors' plaintext sum)."""
    seen, real = [], env.services.secagg.unmask

    def unmask(tx, rnd, masked_sum):
        out = real(tx, rnd, masked_sum)
        seen.append(out)
        return out

    env.services.secagg.unmask = unmask
    return seen


def play(env, phones, drop: dict[str, set[int]], rng=None) -> list[SecAggPhone]:
    """Every phase, phones listed in drop[phase] vanishing before it; returns those that uploaded."""
    rng = rng or np.random.default_rng(0)
    alive = lambda phase: [p for i, p in enumerate(phones) if i not in set().union(  # noqa: E731
        *(drop.get(q, set()) for q in PHASES[:PHASES.index(phase) + 1]))]
    for p in alive("keys"):
        assert p.advertise().status == 200
    env.clock.advance(KEYS_WINDOW_S + 1)
    env.services.tick()
    for p in alive("shares"):
        if p.status().phase == "shares":
            assert p.share().status == 200
    env.clock.advance(61)
    env.services.tick()
    uploaded = []
    for p in alive("masking"):
        if p.status().phase == "masking":
            delta = rng.normal(0, 2e-2, env.layout.size).astype(np.float32)
            reply = p.masked_upload(delta, int(rng.integers(1, 100)))
            assert reply.status == 200 and reply.body["status"] == "accepted", reply.body
            uploaded.append(p)
    if len(uploaded) < len(alive("shares")):
        env.clock.advance(300)                   # to the report deadline: the rest will not come
    env.services.tick()
    revealed = [p for p in alive("unmasking") if p in uploaded and p.status().phase == "unmasking"]
    for p in revealed:
        assert p.reveal().status == 200
    if len(revealed) < len(uploaded):        # the server waits for every survivor's reveal, or the window
        env.services.tick()
        assert round_info(env)["state"] == "reporting"
        env.clock.advance(121)
    env.services.tick()
    return uploaded


def round_info(env, number: int = 1) -> dict:
    return env.client.get(f"/v1/populations/en/rounds/{number}", headers=env.operator_headers).json


def version_weights(env, version: int) -> np.ndarray:
    parent = env.services.versions.get("en", version)
    return env.services.versions.weights(parent)


@pytest.mark.parametrize("drop", [{}, {"keys": {0}, "shares": {1}, "masking": {2}, "unmasking": {3}},
                                  {"keys": {0}}, {"shares": {1, 2}}, {"masking": {3, 4, 5}},
                                  {"unmasking": {6, 7, 8}}],
                         ids=["none", "one-at-every-phase", "keys", "shares", "masking", "unmasking"])
def test_the_new_version_is_built_from_exactly_the_survivors_sum(make_server, drop):
    env = secure_server(make_server, checked=True)             # every answer checked against /openapi.json
    seen = spy_unmask(env)
    phones = check_in(env)
    uploaded = play(env, phones, drop)
    info = round_info(env)
    assert (info["state"], info["reported"], info["result_version"]) == ("completed", len(uploaded), 1), info
    pipeline = phones[0].pipeline()
    plain = running_sum(pipeline)
    for p in uploaded:
        plain.add(Contribution(p.plaintext.astype(np.int64), 0, 0.0))
    got, survivors = seen[0]
    np.testing.assert_array_equal(pipeline.ring.reduce(got.astype(np.int64)), plain.total)   # bit for bit
    assert survivors == len(uploaded)
    mean = pipeline.finalize_masked(plain.total, len(uploaded))
    np.testing.assert_allclose(version_weights(env, 1) - env.flat, mean, atol=1e-7)   # sgd, lr 1
    assert not env.services.store.connection().execute("SELECT COUNT(*) FROM secagg_shares").fetchone()[0]
    assert {t for (_, t, status) in env.checker.seen if "/secagg" in t and status < 300} == {
        path for path in env.checker.doc["paths"] if "/secagg" in path}


def test_fewer_than_t_shares_fail_the_round_cleanly_and_it_is_retried(make_server):
    env = secure_server(make_server)
    phones = check_in(env)
    drop = {"unmasking": set(range(N))}          # nobody reveals
    play(env, phones, drop)
    env.clock.advance(121)
    env.services.tick()
    info = round_info(env)
    assert (info["state"], info["reason"], info["result_version"]) == ("failed", "unmask_incomplete", None)
    versions = env.client.get("/v1/populations/en/versions", headers=env.operator_headers).json["versions"]
    assert [v["version"] for v in versions] == [0]
    again = SecAggPhone(env.transport, "en", env.enrollment).checkin().body["assignment"]
    assert (again["round"], again["model_version"]) == (2, 0)


def test_a_tampered_reveal_fails_the_round_and_publishes_nothing(make_server):
    env = secure_server(make_server)
    phones = check_in(env)
    real = SecAggPhone.reveal

    def tampered(self):
        status = self.status()
        shares = self.secrets.reveal(list(status.survivors), list(status.dropped))
        shares = {o: (kind, bytes(len(v) - 1) + b"\x05") for o, (kind, v) in shares.items()}
        return self.send("reveal", SecAggReveal(shares))

    SecAggPhone.reveal = tampered
    try:
        play(env, phones, {})
    finally:
        SecAggPhone.reveal = real
    info = round_info(env)
    assert (info["state"], info["reason"], info["result_version"]) == ("failed", "unmask_failed", None), info


def test_malformed_or_replayed_secagg_messages_are_4xx_and_change_nothing(make_server):
    env = secure_server(make_server)
    phones = check_in(env)
    p = phones[0]
    bad_keys = [{"enc_pk": "x", "mask_pk": "y", "commitment": "z"},
                {**SecAggKeys(p.secrets.advertise()).to_json(), "extra": 1},
                {"enc_pk": SecAggKeys(p.secrets.advertise()).to_json()["enc_pk"]}]
    for body in bad_keys:
        reply = env.transport.request("POST", p._path("/keys"), headers=p.headers, json=body)
        assert 400 <= reply.status < 500 and set(reply.body) == {"error", "message"}, reply.body
    same = SecAggKeys(p.secrets.advertise()).to_json()
    same["mask_pk"] = same["enc_pk"]
    assert env.transport.request("POST", p._path("/keys"), headers=p.headers, json=same).status == 422
    assert p.advertise().status == 200
    other = SecAggKeys(phones[1].secrets.advertise()).to_json()
    assert env.transport.request("POST", p._path("/keys"), headers=p.headers, json=other).status == 409
    # an upload before the masking phase, and shares before the shares phase
    assert p.upload(body=b"x" * 100, num_examples=None).body["error"] == "wrong_phase"
    assert env.transport.request("POST", p._path("/shares"), headers=p.headers,
                                 json={"shares": []}).body["error"] == "wrong_phase"
    for q in phones[1:]:
        assert q.advertise().status == 200          # the last one's keys end the phase
    status = p.status()
    good = SecAggShares(p.secrets.share(status.node, status.threshold, list(status.neighbours))).to_json()
    for body in ({"shares": good["shares"][:-1]}, {"shares": [{**good["shares"][0], "to": 999}] + good["shares"][1:]},
                 {"shares": [{**good["shares"][0], "ciphertext": "AAAA"}] + good["shares"][1:]}):
        reply = env.transport.request("POST", p._path("/shares"), headers=p.headers, json=body)
        assert 400 <= reply.status < 500, reply.body
    assert env.services.store.connection().execute("SELECT COUNT(*) FROM secagg_shares").fetchone()[0] == 0
    for q in phones:
        assert q.share().status == 200
    env.clock.advance(61)
    env.services.tick()
    q = phones[1]
    q.secrets.receive(q.status().inbox)
    pipeline, seed = q.pipeline(), int(q.assignment["hyperparameters"]["seed"])
    body = pipeline.encode(np.zeros(env.layout.size, np.float32), 5, seed, masker=q.secrets.mask).body
    from contract.update.stages import _load
    from safetensors.numpy import save
    tensors, meta = _load(body)
    wrong_modulus = save(tensors, metadata={**meta, "modulus_bits": str(int(meta["modulus_bits"]) + 1)})
    short = save({**tensors, "masked": tensors["masked"][:-1]}, metadata=meta)
    replayed = save(tensors, metadata={**meta, "spec": "0" * 64})
    for body_ in (wrong_modulus, short, replayed, body[:-10]):
        reply = q.upload(body=body_, num_examples=None)
        assert reply.status == 422, reply.body
    assert q.upload(body=body, num_examples=5).status == 400            # the weight is not sent in clear
    assert round_info(env)["reported"] == 0
    assert q.upload(body=body, num_examples=None).body["status"] == "accepted"
    assert round_info(env)["reported"] == 1
