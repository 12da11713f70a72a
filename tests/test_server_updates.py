"""What the server does with encoded updates: bounded influence, malformed bodies, valid JSON.

Servers here run the default 8-bit spec (clip 2.5; a small cap, 20, so the
numbers are easy to follow) on the small test layout, over Flask's test
client with a manual clock (tests/conftest.py).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from contract.update.pipeline import FORMAT, UpdatePipeline, aggregate
from contract.update.spec import RoundSpec
from tests.server_fixtures import DeviceClient, FlaskTransport

QUANTIZED = {"bits": 8, "rotation": True, "clip_norm": 2.5, "max_weight": 20}
HONEST = [(np.random.default_rng(i).normal(0, 0.05, 272).astype(np.float32), n)
          for i, n in enumerate((5, 12, 20))]


def new_version(env) -> np.ndarray:
    svc = env.services
    return np.array(svc.versions.weights(svc.versions.get(env.population, 1)), np.float64)


def state_of(env) -> tuple:
    conn = env.services.store.connection()
    return tuple(tuple(map(tuple, conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()))
                 for t in ("rounds", "sessions", "partials", "versions"))


def honest_round(make_server, last=None):
    """Three honest devices upload; then the fourth, `last(device) -> reply`, if given; the round
    closes at its deadline (goal 4, 3 reports are enough). Returns (env, the new version, reply)."""
    env = make_server(goal=4, over_selection=1.0, min_report_fraction=0.75, update=QUANTIZED)
    api = FlaskTransport(env.client)
    devices = [DeviceClient(api, "en", env.enrollment) for _ in range(4)]
    for d in devices:
        assert "assignment" in d.checkin().body
    for d, (delta, n) in zip(devices, HONEST):
        assert d.upload(delta, n).body["status"] == "accepted"
    reply = last(devices[3]) if last else None
    env.clock.advance(400)
    env.services.tick()
    return env, new_version(env) - env.flat, reply, devices


def crafted(device, *, codes=None, scales=None) -> bytes:
    """An 8-bit body with this round's metadata and chosen codes/scales (an attacker's own encoder)."""
    spec = RoundSpec.from_json(device.assignment["update"])
    pipeline = UpdatePipeline(spec)
    blocks = pipeline.count // spec.spec.block_size
    codes = np.full(pipeline.count, 127 + 127, np.uint8) if codes is None else codes
    scales = np.full(blocks, 2.0 ** pipeline.stages[-1].max_exponent, np.float32) if scales is None else scales
    return st_save({"codes": codes, "scales": scales},
                   metadata={"format": FORMAT, "bits": "8", "spec": spec.fingerprint})


def test_no_device_moves_a_round_more_than_an_honest_device_with_max_weight_could(make_server):
    base_env, base, _, _ = honest_round(make_server)                     # the three honest alone
    honest_mean = base
    sum_w = sum(n for _, n in HONEST)
    W, C = QUANTIZED["max_weight"], QUANTIZED["clip_norm"]
    # The most an accepted fourth update (weight <= W, norm <= C) can move the mean:
    # w·|y − m| / (Σw + w) <= W·(C + |m|) / (Σw + W).
    most = W * (C + np.linalg.norm(honest_mean)) / (sum_w + W)

    direction = -honest_mean / np.linalg.norm(honest_mean)
    attacks = {
        "claims 10^6 examples": lambda d: d.upload(body=d.encode(HONEST[0][0], 1)[0], num_examples=10**6),
        "a delta of norm 10^6": lambda d: d.upload(body=crafted(d)),
        "values off the grid": lambda d: d.upload(body=crafted(d, codes=np.full(UpdatePipeline(
            RoundSpec.from_json(d.assignment["update"])).count, 255, np.uint8))),
        "the strongest honest device": lambda d: d.upload((direction * 1e6).astype(np.float32), 10**6),
    }
    moved = {}
    for name, attack in attacks.items():
        env, version, reply, _ = honest_round(make_server, attack)
        moved[name] = float(np.linalg.norm(version - base))
        if name != "the strongest honest device":
            assert reply.status == 422, (name, reply.body)
    print({k: round(v, 5) for k, v in moved.items()}, "bound", round(most, 5))
    assert moved["claims 10^6 examples"] == moved["a delta of norm 10^6"] == moved["values off the grid"] == 0
    assert 0.9 * most < moved["the strongest honest device"] <= most * (1 + 1e-6)


def test_every_malformed_encoded_update_is_a_4xx_and_changes_nothing(make_server):
    env = make_server(update=QUANTIZED)
    api = FlaskTransport(env.client)
    dev, other_round = DeviceClient(api, "en", env.enrollment), None
    dev.checkin()
    good, weight = dev.encode(HONEST[0][0], 5)
    tensors = st_load(good)
    meta = {"format": FORMAT, "bits": "8", "spec": dev.assignment["update"]["fingerprint"]}
    spec = RoundSpec.from_json(dev.assignment["update"])
    other_round = RoundSpec(spec.spec, spec.size, spec.layout_sha256, "en/2", spec.rotation_seed)

    def body(codes=tensors["codes"], scales=tensors["scales"], **metadata) -> bytes:
        return st_save({"codes": codes, "scales": scales}, metadata={**meta, **metadata})

    def scale(value: float) -> np.ndarray:
        s = tensors["scales"].copy()
        s[0] = value
        return s

    cases = {
        "wrong width": (body(bits="4"), "wrong_width"),
        "codes one byte short": (body(codes=tensors["codes"][:-1]), "wrong_length"),
        "codes one byte long": (body(codes=np.append(tensors["codes"], np.uint8(127))), "wrong_length"),
        "codes not bytes": (body(codes=tensors["codes"].astype(np.int64)), "malformed_update"),
        "truncated packing": (good[:len(good) - 100], "malformed_update"),
        "one scale missing": (body(scales=tensors["scales"][:-1]), "wrong_length"),
        "scale NaN": (body(scales=scale(np.nan)), "bad_scale"),
        "scale Inf": (body(scales=scale(np.inf)), "bad_scale"),
        "scale negative": (body(scales=scale(-tensors["scales"][0])), "bad_scale"),
        "scale zero": (body(scales=scale(0.0)), "bad_scale"),
        "scale not a power of two": (body(scales=scale(tensors["scales"][0] * 1.5)), "bad_scale"),
        "scale above the grid": (body(scales=scale(2.0 ** 10)), "bad_scale"),
        "spec of another round": (body(spec=other_round.fingerprint), "wrong_spec"),
        "no format": (st_save({"codes": tensors["codes"], "scales": tensors["scales"]}), "malformed_update"),
        "an extra tensor": (st_save({**tensors, "delta": np.zeros(3, np.float32)}, metadata=meta),
                            "malformed_update"),
    }
    before = state_of(env)
    for name, (data, code) in cases.items():
        reply = dev.upload(body=data, num_examples=weight)
        assert (reply.status, reply.body["error"]) == (422, code), (name, reply.body)
        assert state_of(env) == before, f"{name} changed the stored state"
    assert dev.upload(body=good, num_examples=weight).body["status"] == "accepted"   # the good one still is


def test_the_server_sums_exactly_what_the_devices_encoded(make_server):
    env, moved, _, devices = honest_round(make_server)
    pipeline = devices[0].pipeline()
    expected = aggregate(pipeline, [d.encode(delta, n) for d, (delta, n) in zip(devices, HONEST)])
    np.testing.assert_allclose(moved, expected, atol=1e-7)
    exact = sum(n * d.astype(np.float64) for d, n in HONEST) / sum(n for _, n in HONEST)
    assert np.linalg.norm(moved - exact) / np.linalg.norm(exact) < 0.02       # 8 bits, rotated
    detail = env.services.analytics.detail("en", 1, env.clock.now())
    assert detail["update"]["bits"] == 8 and detail["bytes_in"] == sum(
        len(d.encode(delta, n)[0]) for d, (delta, n) in zip(devices, HONEST))


def strict_json(text: bytes):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_no_response_holds_nan_or_infinity(make_server):
    env = make_server()
    env.services.store.connection().execute(
        "UPDATE versions SET train_json = ?, eval_json = ? WHERE version = 0",
        ('{"loss": NaN, "norm": Infinity}', '{"top1": -Infinity, "top3": 0.5, "positions": 3}'))
    for path in ("/openapi.json", "/v1/populations/en/rounds", "/v1/populations/en/versions"):
        r = env.client.get(path, headers=env.operator_headers)
        assert r.status_code == 200
        data = strict_json(r.get_data())
    assert data["versions"][0]["train"] == {"loss": None, "norm": None}


@pytest.mark.parametrize("path", ["/v1/populations/en/rounds/{n}", "/v1/populations/en/app-model/{n}"])
@pytest.mark.parametrize("n", [2**53, 2**53 + 1, 2**63, 2**64, 10**40, -1])
def test_no_path_integer_makes_a_5xx(client, path, n):
    r = client.get(path.format(n=n))
    assert 400 <= r.status_code < 500 and set(r.get_json()) == {"error", "message"}


def test_a_client_written_from_the_openapi_document_alone_is_accepted(make_server):
    """An encoder written from the document's words (no contract code): pad, per-block power-of-two
    scales, rounding to -L..L, codes + L, the metadata it names. The server takes it as it would a
    phone's, and decodes exactly what the document says the body means."""
    from server.openapi import openapi_document

    doc = openapi_document()
    upload = doc["paths"]["/v1/sessions/{session_id}/update"]["post"]
    assert "codes" in upload["description"] and "layout" in upload["description"]
    params = {p["name"]: p for p in upload["parameters"]}
    assert params["num_examples"]["schema"]["maximum"] == 2**31
    assert "application/octet-stream" in upload["requestBody"]["content"]
    env = make_server(goal=1, over_selection=1.0, update={"bits": 8, "clip_norm": 2.5, "max_weight": 20})
    dev = DeviceClient(FlaskTransport(env.client), "en", env.enrollment)
    a = dev.checkin().body["assignment"]
    spec = a["update"]
    n, block, L = spec["size"], spec["block_size"], 2 ** (spec["bits"] - 1) - 1
    delta = np.random.default_rng(9).normal(0, 0.01, n)
    weight = min(15, spec["max_weight"])
    y = delta * min(1, spec["clip_norm"] / np.linalg.norm(delta)) * weight / spec["max_weight"]
    padded = np.zeros(-(-n // block) * block)
    padded[:n] = y
    blocks = padded.reshape(-1, block)
    exponents = np.ceil(np.log2(np.abs(blocks).max(1) / L)).astype(int)
    q = np.round(blocks / np.ldexp(1.0, exponents)[:, None]).astype(np.int64)   # any rounding is valid
    body = st_save({"codes": (q.reshape(-1) + L).astype(np.uint8),
                    "scales": np.ldexp(np.ones(len(exponents), np.float32), exponents)},
                   metadata={"format": "nightjar-update-1", "bits": str(spec["bits"]),
                             "spec": spec["fingerprint"]})
    reply = dev.upload(body=body, num_examples=weight)
    assert reply.body["status"] == "accepted", reply.body
    decoded = (q * np.ldexp(1.0, exponents)[:, None]).reshape(-1)[:n] * spec["max_weight"] / weight
    np.testing.assert_allclose(new_version(env) - env.flat, decoded, atol=1e-7)
