"""Closed vocabularies on the wire: what a device sends holds no free text (contract.protocol.wire, .schema)."""
from __future__ import annotations

import re

import pytest

from contract.protocol import schema as s
from contract.protocol.errors import ErrorCode, ProtocolError
from contract.protocol.wire import (CHECKIN_REQUEST, METRIC_NAMES, METRICS, NONCE_REQUEST, PRIVACY,
                                    REGISTRATION_REQUEST, Conditions, DiscoveryBallot, EvalReport, FailureReport)
from contract.secagg.messages import SecAggKeys, SecAggReveal, SecAggShares
from contract.tasks.personal import PersonalEvalReport

SENTENCE = "user typed: meet me at the old mill at 5pm"
ELIGIBLE = {"charging": True, "idle": True, "unmetered": True, "battery": 0.9, "free_memory_mb": 4096,
            "num_examples": 50, "runtime_version": "1.0.0"}
# Every body (and query object) a device sends, as the server parses it.
FROM_DEVICES = {"CheckinRequest": CHECKIN_REQUEST, "EvalReport": EvalReport.SCHEMA,
                "FailureReport": FailureReport.SCHEMA, "DiscoveryBallot": DiscoveryBallot.SCHEMA,
                "NonceRequest": NONCE_REQUEST, "RegistrationRequest": REGISTRATION_REQUEST,
                "PersonalEvalReport": PersonalEvalReport.SCHEMA, "SecAggKeys": SecAggKeys.SCHEMA,
                "SecAggShares": SecAggShares.SCHEMA, "SecAggReveal": SecAggReveal.SCHEMA, "metrics": METRICS}


def refused(schema: s.Type, value, where: str = "") -> ProtocolError:
    with pytest.raises(ProtocolError) as e:
        schema.parse(value, where) if where else schema.parse(value)
    assert e.value.status == 400
    assert SENTENCE not in e.value.message and "old mill" not in e.value.message     # nothing echoed
    return e.value


def test_free_text_metric_names_are_refused_naming_the_field():
    assert METRICS.parse({"loss": 2.5, "tokens": 120, "batches": 3, "train_seconds": 1.5}, "metrics") == {
        "loss": 2.5, "tokens": 120.0, "batches": 3.0, "train_seconds": 1.5}
    for bad in ({SENTENCE: 1.0}, {"loss": 1.0, "note": 2.0}, {"Loss": 1.0}):
        e = refused(METRICS, bad, "metrics")
        assert e.code == ErrorCode.INVALID_FIELD and "'metrics'" in e.message
        assert "loss, tokens, batches, train_seconds" in e.message
    assert "'note'" in refused(METRICS, {"note": 1.0}, "metrics").message      # an identifier is named
    refused(METRICS, {"loss": -1.0}, "metrics")
    assert METRICS.schema()["propertyNames"] == {"enum": list(METRIC_NAMES)}


@pytest.mark.parametrize("where,body", [
    ("the body", {"population": "en", "conditions": ELIGIBLE, "note": SENTENCE}),
    ("conditions", {"population": "en", "conditions": {**ELIGIBLE, "note": SENTENCE}}),
    ("conditions", {"population": "en", "conditions": {**ELIGIBLE, SENTENCE: 1}}),
])
def test_unknown_fields_of_a_check_in_are_refused(where, body):
    e = refused(CHECKIN_REQUEST, body)
    assert e.code == ErrorCode.INVALID_FIELD and f"unknown field(s) in {where}" in e.message
    CHECKIN_REQUEST.parse({"population": "en", "conditions": ELIGIBLE})


def test_unknown_fields_of_every_report_are_refused():
    eval_body = {"model_version": 0, "top1_hits": 1, "top3_hits": 2, "positions": 3}
    assert EvalReport.from_json(eval_body).positions == 3
    refused(EvalReport.SCHEMA, {**eval_body, "comment": SENTENCE})
    refused(FailureReport.SCHEMA, {"reason": "error", "detail": SENTENCE})
    refused(FailureReport.SCHEMA, {"reason": SENTENCE})
    keys = {"enc_pk": "A" * 43, "mask_pk": "B" * 43, "commitment": "C" * 43}
    SecAggKeys.from_json(keys)
    refused(SecAggKeys.SCHEMA, {**keys, "note": SENTENCE})
    refused(SecAggReveal.SCHEMA, {"shares": [{"owner": 1, "kind": "self", "share": "A" * 88, "note": 1}]})
    refused(PersonalEvalReport.SCHEMA, {"model_version": 0, "counts": [], "note": SENTENCE})


@pytest.mark.parametrize("field,value", [("app_credential", SENTENCE), ("population", SENTENCE),
                                         ("population", "en " * 3)])
def test_free_strings_at_enrollment_are_refused(field, value):
    body = {"population": "en", "app_credential": "Zm9vYmFyYmF6cXV4LXRva2Vu",
            "attestation": {"statement": "AAAA", "signature": "BBBB"}}
    REGISTRATION_REQUEST.parse(body)
    e = refused(REGISTRATION_REQUEST, {**body, field: value})
    assert f"'{field}'" in e.message


def test_a_runtime_version_is_ascii_dotted_integers():
    assert Conditions.from_json(ELIGIBLE).version_tuple == (1, 0, 0, 0)
    for bad in ("١.٢", "1.0.0-beta", "1.0 " + SENTENCE, "1.2.3.4.5"):
        refused(Conditions.SCHEMA, {**ELIGIBLE, "runtime_version": bad}, "conditions")


def test_null_is_a_value_only_where_the_schema_says_so():
    refused(EvalReport.SCHEMA, {"model_version": 0, "top1_hits": 1, "top3_hits": 2, "positions": 3,
                                "loss_sum": None})                              # optional, not nullable
    e = refused(FailureReport.SCHEMA, {"reason": None})
    assert e.code == ErrorCode.MISSING_FIELD
    assert PRIVACY.parse({"epsilon": None, "delta": 1e-6, "accountant": "pld", "rounds": 3})["epsilon"] is None


def walk(t: s.Type):
    yield t
    for child in (getattr(t, "item", None), getattr(t, "inner", None), getattr(t, "value", None)):
        if isinstance(child, s.Type):
            yield from walk(child)
    for f in getattr(t, "fields", ()):
        yield from walk(f.type)


@pytest.mark.parametrize("name", sorted(FROM_DEVICES))
def test_every_string_a_device_sends_is_closed_or_a_bounded_pattern(name):
    """No object takes unknown keys, no map free names, no string free text. The one text a
    device sends by design is a discovery vote (a word prefix, counted only over min_devices)."""
    for t in walk(FROM_DEVICES[name]):
        if isinstance(t, s.Obj):
            assert t.schema()["additionalProperties"] is False, (name, t.name)
        if isinstance(t, s.Map):
            assert t.keys is not None, name
        if isinstance(t, s.Str):
            assert t.pattern is not None, (name, t)
            assert not re.fullmatch(t.pattern, SENTENCE) and not re.fullmatch(t.pattern, "a b"), (name, t.pattern)
