"""Typed text never leaves the phone: everything the server receives, checked.

A fleet runs through a recording reverse proxy in front of the real server
(the server is untouched), with evaluation rounds and unplugged phones so
that every kind of report is sent. Then, for every request the server
received:

* no sequence of three or more consecutive words of any phone's example
  store appears in it — path, query string, headers and body, read as text
  (JSON punctuation does not separate words here, so a phrase split across
  fields would be caught too);
* an upload body is a safetensors file holding exactly the one tensor the
  protocol names (`delta`, float32, [model size]), no metadata, nothing else;
* every other body is JSON (or empty).
"""
from __future__ import annotations

import json
import re
import struct
from urllib.parse import unquote_plus

import numpy as np
import pytest
from safetensors.numpy import load as load_tensors

from emulation.world import Faults
from models.corpus import load_corpus
from models.model import TINY
from contract.text import words
from emulation.deployment import simulated_clock, start_server, tiny_model
from tests.e2e import FLEET_POPULATION, NIGHT_UTC, run_fleet
from tests.recording_proxy import Recorded, RecordingProxy

pytestmark = [pytest.mark.slow, pytest.mark.corpus]
UPLOAD = re.compile(r"^/v1/sessions/[^/?]+/update(\?|$)")


def trigrams(text: str) -> set[tuple[str, str, str]]:
    w = words(text)
    return set(zip(w, w[1:], w[2:]))


def as_text(r: Recorded) -> str:
    """Everything of a request that is not an upload's tensor bytes, as one text."""
    body = "" if UPLOAD.match(r.target) else r.body.decode("utf-8")
    return " ".join([unquote_plus(r.target), *r.headers.values(), body])


def leaks(requests: list[Recorded], private: set) -> list[tuple[str, tuple]]:
    return [(r.target, g) for r in requests for g in trigrams(as_text(r)) & private]


def check_upload(body: bytes, size: int) -> None:
    """Exactly one tensor `delta` float32 [size]: header, then its bytes, nothing more."""
    (header_len,) = struct.unpack("<Q", body[:8])
    header = json.loads(body[8:8 + header_len])
    assert set(header) == {"delta"}, header.keys()          # no __metadata__, no other tensor
    assert header["delta"]["dtype"] == "F32" and header["delta"]["shape"] == [size]
    assert len(body) == 8 + header_len + 4 * size
    tensors = load_tensors(body)
    assert list(tensors) == ["delta"] and tensors["delta"].dtype == np.float32
    assert np.isfinite(tensors["delta"]).all()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    root = tmp_path_factory.mktemp("privacy")
    corpus = load_corpus(vocab_size=TINY.vocab_size - 4)
    model = tiny_model(root / "model", corpus)
    server = start_server(root / "server", model, **{**FLEET_POPULATION, "eval_every": 2},
                          server=simulated_clock(NIGHT_UTC, 240.0))
    try:
        with RecordingProxy(server.url) as proxy:
            run = run_fleet(root / "fleet", server, corpus, phones=20, rounds=3, url=proxy.url,
                            faults=Faults(unplug_fraction=0.2))
        stores = [corpus.train_texts[p.profile.client_id] for p in run.fleet.phones]
        yield proxy.requests, stores, model, run
    finally:
        server.kill()


def test_every_kind_of_report_was_recorded(recorded):
    requests, _, _, run = recorded
    assert run.summary["runtime_errors"] == 0, run.fleet.errors
    paths = [r.target for r in requests if r.method == "POST"]
    for kind in ("/v1/devices", "/v1/checkin", "/update", "/eval", "/failure"):
        assert any(kind in p for p in paths), f"no {kind} request recorded"


def test_no_three_consecutive_typed_words_reach_the_server(recorded):
    requests, stores, _, _ = recorded
    private = set().union(*(trigrams(t) for store in stores for t in store))
    assert len(private) > 1_000   # the check has something to find
    assert leaks(requests, private) == []


def test_the_check_would_catch_a_leak(recorded):
    requests, stores, _, _ = recorded
    sentence = next(t for t in stores[0] if len(words(t)) >= 3)
    private = trigrams(sentence)
    leaked = Recorded("POST", "/v1/checkin", {}, json.dumps({"conditions": {"note": sentence}}).encode())
    assert leaks([leaked], private)
    in_query = Recorded("POST", "/v1/sessions/s-1/update?metrics=" + sentence.replace(" ", "+"), {}, b"")
    assert leaks([in_query], private)


def test_uploads_hold_only_the_named_tensor_and_other_bodies_are_json(recorded):
    requests, _, model, _ = recorded
    uploads = [r for r in requests if UPLOAD.match(r.target)]
    assert uploads
    for r in uploads:
        check_upload(r.body, model.flat.size)
    for r in requests:
        if not UPLOAD.match(r.target) and r.body:
            json.loads(r.body.decode("utf-8"))
