"""Eligibility criteria and the parsing of what devices report."""
from __future__ import annotations

import pytest

from contract.protocol.errors import ErrorCode, ProtocolError
from contract.protocol.wire import Conditions
from server.config import EligibilityConfig
from server.policy import Context, build_policy, parse_version
from tests.server_fixtures import ELIGIBLE


def conditions(**changes):
    return Conditions.from_json({**ELIGIBLE, **changes})


def test_default_policy_is_gboards_idle_charging_unmetered_2gb():
    policy = build_policy(EligibilityConfig())
    now = Context(now=10_000.0)
    assert policy.select(conditions(), now)
    assert policy.failures(conditions(charging=False, idle=False, unmetered=False, free_memory_mb=1024),
                           now) == ["charging", "idle", "unmetered", "min_free_memory_mb"]
    assert policy.failures(conditions(num_examples=0), now) == ["min_num_examples"]


def test_separation_battery_and_runtime_version_range():
    policy = build_policy(EligibilityConfig(min_battery=0.5, min_separation_s=100,
                                            min_runtime_version="1.2", max_runtime_version="2.0.5"))
    ok = {"runtime_version": "1.5"}
    assert policy.failures(conditions(battery=0.4, **ok), Context(1000.0)) == ["min_battery"]
    recent = Context(1000.0, last_participation_at=950.0)
    assert policy.failures(conditions(**ok), recent) == ["min_separation"]
    assert policy.wait_s(Context(1000.0, last_participation_at=950.0)) == 50.0
    assert policy.select(conditions(**ok), Context(1000.0, last_participation_at=900.0))
    for version, ok in [("1.1.9", False), ("1.2", True), ("1.2.0", True), ("1.10.0", True), ("2.0.5", True),
                        ("2.0.5.1", False), ("2.0.6", False)]:
        assert policy.select(conditions(runtime_version=version), Context(0.0)) == ok, version


def test_a_permissive_policy_has_no_criteria():
    policy = build_policy(EligibilityConfig(require_charging=False, require_idle=False,
                                            require_unmetered=False, min_free_memory_mb=0,
                                            min_examples=0, min_separation_s=0))
    assert policy.criteria == ()
    assert policy.select(conditions(charging=False, num_examples=0), Context(0.0))


@pytest.mark.parametrize("change", [
    {"charging": 1}, {"idle": "yes"}, {"battery": 1.5}, {"battery": float("nan")}, {"battery": True},
    {"free_memory_mb": -1}, {"free_memory_mb": 2.5}, {"num_examples": 2**80},
    {"runtime_version": "v1"}, {"runtime_version": "1..2"}, {"runtime_version": 12},
    {"charging": None},
])
def test_bad_conditions_are_bad_requests(change):
    with pytest.raises(ProtocolError) as e:
        conditions(**change)
    assert e.value.status == 400 and e.value.code in (ErrorCode.INVALID_FIELD, ErrorCode.MISSING_FIELD)


def test_missing_condition_is_named():
    data = dict(ELIGIBLE)
    del data["unmetered"]
    with pytest.raises(ProtocolError, match="conditions.unmetered") as e:
        Conditions.from_json(data)
    assert e.value.code == ErrorCode.MISSING_FIELD
    with pytest.raises(ProtocolError):
        Conditions.from_json([1, 2])
    assert parse_version("3.0.1") == parse_version("3.0.1.0") == (3, 0, 1, 0)
