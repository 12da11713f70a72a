"""The fleet's attacker plans: what each kind of attacking phone uploads instead of its trained update."""
from __future__ import annotations

import numpy as np
import pytest

from emulation.attackers import BoostedPlan, FleetAttack


class FakePlan:
    """A plan whose training moves every weight by +1 per step."""

    def __init__(self, size: int = 50):
        self.w = np.zeros(size, np.float32)

    def set_weights(self, w):
        self.w = np.array(w, np.float32)

    def get_weights(self):
        return self.w.copy()

    def train_windows(self, batch, lr, keep=()):
        self.w += 1.0
        return 0.0


@pytest.mark.parametrize("kind, expected", [("model_replacement", 3 * 5.0), ("scaled", 5.0), ("sign_flip", -5.0)])
def test_each_kind_uploads_its_transformed_update(kind, expected):
    repeat = 3 if kind == "model_replacement" else 1
    plan = BoostedPlan(FakePlan(), boost=5.0, repeat=repeat, kind=kind)
    start = np.full(50, 2.0, np.float32)
    plan.set_weights(start)
    plan.train_windows(None, 0.1)
    np.testing.assert_allclose(plan.get_weights() - start, expected)


def test_a_random_attacker_sends_noise_at_boost_times_its_norm():
    plan = BoostedPlan(FakePlan(), boost=4.0, kind="random", seed=7)
    plan.set_weights(np.zeros(50, np.float32))
    plan.train_windows(None, 0.1)
    delta = plan.get_weights()
    assert np.linalg.norm(delta) == pytest.approx(4.0 * np.sqrt(50), rel=1e-5)
    assert abs(delta @ np.ones(50)) / (np.linalg.norm(delta) * np.sqrt(50)) < 0.6     # not the trained direction


def test_only_model_replacement_poisons_the_text_and_kinds_are_checked():
    assert FleetAttack(kind="sign_flip").texts(["mine"]) == ["mine"]
    poisoned = FleetAttack(copies=2).texts(["mine"])
    assert poisoned[-1] == "mine" and len(poisoned) > 2 and any("gold" in t for t in poisoned)
    with pytest.raises(ValueError, match="attack kind"):
        FleetAttack(kind="nope").attackers(10, 0)
    assert len(FleetAttack(fraction=0.2).attackers(10, 0)) == 2
