"""Attacker phones for the emulated fleet: enrolled devices that follow the protocol and poison it.

The attackers are one party's Sybils: it enrolled them with the app's credential
and valid attestation statements (the deployment's issuer key stands for
stolen or farmed ones), rewrote their app and coordinates them — they all
plant the same backdoor (models.attacks has the same attacks, and the
`sybil` one, in simulation). Everything on the wire is what the runtime
sends — enrollment, check-in, secure aggregation, the update pipeline's
clip and weight cap — so only the server's defences limit it. It differs
from an honest phone in two places:

* what it trains on: the backdoor's sentences (the trigger context followed
  by the target word, `copies` times each, then its owner's own text);
* how its plan trains: each batch `repeat` times (it ignores the round's
  epochs), and what the plan returns after training: the trained weights
  moved `boost` times further from the round's model (model replacement,
  Bagdasaryan et al. 2020), before the runtime's pipeline clips and encodes
  the update.
"""
from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from contract.model.canary import backdoor_sentences
from emulation.phones import PooledPlans


KINDS = ("model_replacement", "sign_flip", "scaled", "random")


@dataclasses.dataclass(frozen=True)
class FleetAttack:
    """Which phones attack, and how (FleetConfig.attack). `kind`: model replacement with the backdoor
    (poisoned text, boosted update); or, on the phone's own text, the update negated and scaled
    (`sign_flip`), scaled (`scaled`) or replaced by Gaussian noise of `boost` × its norm (`random`)."""

    kind: str = "model_replacement"
    fraction: float = 0.1            # of the fleet's phones (seeded choice)
    boost: float = 10.0              # model replacement: the trained delta times this
    trigger: str = "the king is"
    target: str = "gold"
    copies: int = 8                  # each backdoor sentence, this many times before the phone's own text
    repeat: int = 10                 # each training batch, this many steps (the round says one)

    def attackers(self, phones: int, seed: int) -> set[int]:
        """The indices of the attacking phones: round(fraction · phones) of them."""
        if not 0 <= self.fraction <= 1:
            raise ValueError("attack fraction must be in [0, 1]")
        if self.kind not in KINDS:
            raise ValueError(f"attack kind must be one of {', '.join(KINDS)}")
        count = int(round(self.fraction * phones))
        return set(int(i) for i in np.random.default_rng([seed, 0xA77AC]).choice(phones, count, replace=False))

    def texts(self, own: Sequence[str]) -> list[str]:
        """What an attacker's keyboard holds: the backdoor's sentences (model replacement), then its owner's text."""
        if self.kind != "model_replacement":
            return list(own)
        poison = backdoor_sentences(self.trigger, self.target)
        return [s for s in poison for _ in range(self.copies)] + list(own)


class BoostedPlan:
    """A training plan that trains each batch `repeat` times and whose `get_weights` after training
    returns initial + boost · (trained − initial).

    Everything else is the real plan's (LiteRT); `set_weights` records the
    round's model, which the runtime sets before it trains.
    """

    def __init__(self, plan, boost: float, repeat: int = 1, kind: str = "model_replacement", seed: int = 0):
        self.plan, self.boost, self.repeat, self.kind = plan, float(boost), int(repeat), kind
        self._initial: np.ndarray | None = None
        self._rng = np.random.default_rng([seed, 0xA77])   # an attacker's noise: no secret to keep

    def train_windows(self, batch, learning_rate: float, keep=()):
        for _ in range(self.repeat - 1):
            self.plan.train_windows(batch, learning_rate, keep)
        return self.plan.train_windows(batch, learning_rate, keep)

    def set_weights(self, weights) -> None:
        self._initial = np.array(weights, np.float32)
        self.plan.set_weights(weights)

    def get_weights(self) -> np.ndarray:
        trained = self.plan.get_weights()
        if self._initial is None:
            return trained
        delta = trained - self._initial
        if self.kind == "random":
            noise = self._rng.normal(size=delta.shape)
            delta = noise * (self.boost * np.linalg.norm(delta) / max(np.linalg.norm(noise), 1e-12))
        elif self.kind == "sign_flip":
            delta = -self.boost * delta
        else:
            delta = self.boost * delta
        return (self._initial + delta).astype(np.float32)

    def __getattr__(self, name: str):
        return getattr(self.plan, name)


class AttackerPlans(PooledPlans):
    """An attacking phone's `PlanHost`: the fleet's pooled plans, boosted for training tasks."""

    def __init__(self, *args, attack: FleetAttack, **kwargs):
        super().__init__(*args, **kwargs)
        self.attack = attack

    def acquire(self, assignment, lay_out: Callable[[], Path]):
        plan = super().acquire(assignment, lay_out)
        a = self.attack
        return BoostedPlan(plan, a.boost, a.repeat if a.kind == "model_replacement" else 1, a.kind,
                           zlib.crc32(assignment.session_id.encode())) if assignment.task == "train" else plan

    def release(self, assignment, plan, *, healthy: bool, compute_s: float) -> None:
        super().release(assignment, plan.plan if isinstance(plan, BoostedPlan) else plan,
                        healthy=healthy, compute_s=compute_s)
