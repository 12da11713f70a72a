"""One hostile phone under secure aggregation, through the real server (issue 30).

A phone with a genuine attestation and a modified app (emulation.hostile: it
also knows the honest phones' weights and updates) attacks one round among
five honest phones; before it an honest round, after it a SIGKILL and restart
and another honest round. Whatever it sends: no 5xx anywhere, the attacked
round fails with the right reason or completes with exactly the unmasked sum
of what the survivors masked, the restart changes nothing recorded, and the
next round completes.
"""
from __future__ import annotations

import pytest

from emulation.hostile import SECURE_ATTACKS, run_attack, start

pytestmark = pytest.mark.slow
FAILS = {"sum_weight_zero": "implausible_sum", "sum_weight_one": "implausible_sum",
         "codes_off_grid": "implausible_sum"}


@pytest.fixture(scope="module")
def drill(tmp_path_factory):
    found = start(tmp_path_factory.mktemp("hostile"), secure=True)
    try:
        yield found
    finally:
        found.server.kill()


@pytest.mark.parametrize("attack", SECURE_ATTACKS)
def test_one_hostile_phone_cannot_stop_or_take_over_a_secure_population(drill, attack):
    row = run_attack(drill, attack, secure=True)
    assert row["server_errors"] == 0, row
    assert row["restart_changed_nothing"] and row["next_round_completed"], row
    if attack in FAILS:
        assert row["round_outcome"] == f"failed: {FAILS[attack]}" and row["step_ratio"] is None, row
    else:
        assert row["round_outcome"] == "completed" and row["exact_sum"], row
    if attack == "wrong_reveal":                       # corrected, and its device named in the analytics
        assert row["wrong_revealers_named"] == 1, row
    if attack == "wrong_neighbour_reveal":             # refused at the door, the round done without it
        assert row["answers"].get("422", 0) >= 1, row


def test_a_finish_that_raises_fails_only_its_round(make_server, monkeypatch):
    """Fault injection: an exception inside each task kind's finish step fails that round alone
    (finish_error), and the population's next round of that kind completes."""
    import numpy as np

    from tests.server_fixtures import DeviceClient, FlaskTransport, break_finish

    env = make_server(eval_every=1, goal=2, min_round_size=1, over_selection=1.0, min_selected_fraction=1.0)
    transport = FlaskTransport(env.client)
    devices = [DeviceClient(transport, env.population, env.enrollment) for _ in range(2)]

    def play(task):
        for d in devices:
            assert "assignment" in d.checkin().body
            assert d.assignment["task"] == task, d.assignment["task"]
        for d in devices:
            reply = d.upload(np.zeros(env.layout.size), 10) if task == "train" else d.evaluate(1, 2, 5)
            assert reply.status == 200
        return env.client.get(f"/v1/populations/en/rounds/{d.assignment['round']}",
                              headers=env.operator_headers).json

    for task in ("train", "eval"):
        restore = break_finish(env, monkeypatch, task)
        failed = play(task)
        assert (failed["state"], failed["reason"]) == ("failed", "finish_error"), failed
        restore()
        assert play(task)["state"] == "completed"
