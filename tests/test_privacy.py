"""Typed text never leaves the phone: everything the server receives, checked.

A fleet runs through a recording reverse proxy in front of the real server
(the server is untouched), with evaluation rounds and unplugged phones so
that every kind of report is sent. Then, for every request the server
received:

* no sequence of three or more consecutive words of any phone's example
  store appears in it — path, query string, headers and body, read as text
  (JSON punctuation does not separate words here, so a phrase split across
  fields would be caught too);
* an upload body is a safetensors file holding exactly what the round's
  update spec names (8-bit codes and their scales, and the format's three
  metadata strings), nothing else;
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
from contract.update.hadamard import padded_size
from contract.update.packing import packed_bytes
from contract.update.pipeline import FORMAT
from contract.update.spec import RoundSpec
from models.corpus import load_corpus
from models.model import TINY
from contract.model.text import words
from emulation.deployment import simulated_clock, start_server
from emulation.models import tiny_model
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


def check_upload(body: bytes, spec: RoundSpec) -> None:
    """Exactly what the round's 8-bit spec names: the packed codes and the scales, the format's
    three metadata strings, nothing more (contract.update.pipeline)."""
    (header_len,) = struct.unpack("<Q", body[:8])
    header = json.loads(body[8:8 + header_len])
    assert set(header) == {"__metadata__", "codes", "scales"}, header.keys()
    assert header["__metadata__"] == {"format": FORMAT, "bits": "8", "spec": spec.fingerprint}
    padded = padded_size(spec.size, spec.spec.block_size)
    assert header["codes"]["dtype"] == "U8" and header["codes"]["shape"] == [packed_bytes(padded, 8)]
    assert header["scales"]["dtype"] == "F32" and header["scales"]["shape"] == [padded // spec.spec.block_size]
    assert len(body) == 8 + header_len + packed_bytes(padded, 8) + 4 * (padded // spec.spec.block_size)
    tensors = load_tensors(body)
    assert np.isfinite(tensors["scales"]).all() and (tensors["codes"] <= 254).all()


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


def test_uploads_hold_only_the_encoded_update_and_other_bodies_are_json(recorded):
    requests, _, model, run = recorded
    specs = {s.fingerprint: s for s in (RoundSpec.from_json(d["update"]) for d in run.details if d["update"])}
    uploads = [r for r in requests if UPLOAD.match(r.target)]
    assert uploads
    for r in uploads:
        meta = json.loads(r.body[8:8 + struct.unpack("<Q", r.body[:8])[0]])["__metadata__"]
        check_upload(r.body, specs[meta["spec"]])
    for r in requests:
        if not UPLOAD.match(r.target) and r.body:
            json.loads(r.body.decode("utf-8"))
