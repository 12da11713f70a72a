"""Model replacement by emulated phones against the real server, through the real protocol.

Four of twenty phones (20%, so that some report within a few rounds) are attackers (emulation.attackers): enrolled,
eligible and following the protocol, but training on backdoor sentences
with many more steps than the round asks and boosting what they send. Without
defences a round with an attacker moves the model many times further than a
clean round; with the clip and the uniform weight (and zeroing, which the clip
leaves nothing to do here), a round with an attacker moves the model no more
than the clean ones do.
"""
from __future__ import annotations

import numpy as np
import pytest

from emulation.attackers import FleetAttack
from emulation.deployment import simulated_clock, start_server
from emulation.models import tiny_corpus, tiny_model
from tests.device_world import server_weights
from tests.e2e import FLEET_POPULATION, NIGHT_UTC, run_fleet

pytestmark = pytest.mark.slow
ATTACK = FleetAttack(fraction=0.2, boost=5.0, repeat=40, target="hall")
PLAIN_SGD = dict(FLEET_POPULATION, server_optimizer="sgd", server_lr=1.0)   # no momentum to carry a round over
OPEN = dict(PLAIN_SGD, update={"bits": 32, "clip_norm": 1e6, "max_weight": 10**6})
DEFENDED = dict(PLAIN_SGD, update={"bits": 8, "clip_norm": 0.5, "weighting": "uniform", "zeroing": 3.0})


def moves_by_round(root, population: dict) -> tuple[dict[int, float], set[int], list[dict]]:
    """How far each round moved the model, the rounds an attacker's update was accepted in, the rounds."""
    corpus = tiny_corpus()
    model = tiny_model(root / "model", corpus)
    server = start_server(root / "server", model, **population, server=simulated_clock(NIGHT_UTC, 240.0))
    try:
        run = run_fleet(root / "fleet", server, corpus, phones=20, rounds=8, max_wall_s=300, attack=ATTACK)
        assert run.summary["runtime_errors"] == 0
        bad = {p.profile.index for p in run.fleet.phones if p.attack}
        accepted = {u.round for u in run.fleet.uploads if u.phone in bad and u.status == "accepted"}
        versions = sorted(server.operator_get("/v1/populations/en/versions").json()["versions"],
                          key=lambda v: v["version"])
        weights = {v["version"]: server_weights(server, v["checkpoint_sha256"], root) for v in versions}
        moved = {v["round"]: float(np.linalg.norm(weights[v["version"]] - weights[v["parent"]]))
                 for v in versions if v["parent"] is not None}
        return moved, accepted & set(moved), run.details
    finally:
        server.kill()


def test_an_attacker_phone_moves_the_model_only_without_the_defences(tmp_path):
    assert len(ATTACK.attackers(20, 0)) == 4
    open_moved, open_attacked, _ = moves_by_round(tmp_path / "open", OPEN)
    moved, attacked, _ = moves_by_round(tmp_path / "defended", DEFENDED)
    assert open_attacked and attacked, "no attacker reported in eight rounds"
    # without defences a round with an attacker moves the model many times further than with them
    assert max(open_moved[r] for r in open_attacked) > 5 * max(moved[r] for r in attacked), (open_moved, moved)
    # with them, a round with an attacker moves it no further than the clean rounds do
    clean = [m for r, m in moved.items() if r not in attacked]
    assert max(moved[r] for r in attacked) <= 1.5 * max(clean), (moved, attacked)
