"""(ε, δ) from a population's recorded DP events, with `dp_accounting`. TensorFlow-free.

A training round under DP is one *event*: the Gaussian mechanism with noise
multiplier z (noise stddev / L2 sensitivity of the sum, after the adaptive
clip's share of the noise has been taken out, as TFF does), applied to a
cohort modelled as Poisson sampling of each device with probability q =
expected reports / population size. The ledger (server.privacy) stores one
event per round; `epsilon` composes them with two accountants and reports
the tighter figure, naming it:

* PLD (privacy loss distributions; tight for the Poisson-subsampled Gaussian);
* RDP (Rényi DP; looser, but the accountant most papers report).

Distributed DP (each device adds a discrete Gaussian share under secure
aggregation) is recorded with the noise the *reported* devices actually
added, so a round with dropouts spends more ε; its z already folds in the
discrete Gaussian's sum-approximation term (`distributed_noise_multiplier` below).

Why Poisson sampling is an approximation here is in server/README.md
("Differential privacy"): phones pick when they check in, and the server
can only bound how often one device contributes (min_separation).
"""
from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Iterable

import dp_accounting
from dp_accounting import pld, rdp

ACCOUNTANTS = ("pld", "rdp")
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512, 1024]
PLD_INTERVAL = 1e-3         # PLD's value discretization; its estimate stays pessimistic (an upper bound)
PLD_MIN_Z = 0.2             # below it PLD's support (∝ 1/z) makes composition take minutes: RDP alone
GRID = math.log(1.01)       # z is rounded down, q up, to powers of 1.01: conservative, and few distinct events


@dataclasses.dataclass(frozen=True)
class Event:
    """One DP round: Gaussian noise multiplier z on a cohort sampled with probability q."""

    mechanism: str              # "central" | "distributed" (how the noise got there; same accounting)
    noise_multiplier: float     # z of the values' sum (the adaptive clip's share taken out)
    sampling_probability: float  # q = expected reports / population size, capped at 1

    def rounded(self) -> "Event":
        """This event with z rounded down and q up to powers of 1.01: never less ε, and rounds whose
        noise differs only by dropouts compose as a few self-composed groups (PLD composes each once)."""
        z, q = self.noise_multiplier, min(1.0, self.sampling_probability)
        z = math.exp(math.floor(math.log(z) / GRID + 1e-9) * GRID) if z > 0 else 0.0
        q = min(1.0, math.exp(math.ceil(math.log(q) / GRID - 1e-9) * GRID)) if q > 0 else 0.0
        return Event(self.mechanism, z, q)

    def dp_event(self) -> dp_accounting.DpEvent:
        if self.noise_multiplier <= 0:
            return dp_accounting.NonPrivateDpEvent()
        gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        q = min(1.0, self.sampling_probability)
        return gaussian if q >= 1.0 else dp_accounting.PoissonSampledDpEvent(q, gaussian)


@dataclasses.dataclass(frozen=True)
class Spent:
    epsilon: float
    delta: float
    accountant: str             # which of ACCOUNTANTS gave `epsilon` (the tighter)
    rounds: int
    by_accountant: dict

    def to_json(self) -> dict:
        return {"epsilon": self.epsilon, "delta": self.delta, "accountant": self.accountant,
                "rounds": self.rounds, "by_accountant": self.by_accountant}


def composed(events: Iterable[Event]) -> tuple[dp_accounting.DpEvent, int]:
    """One dp_accounting event for the sequence (equal events self-composed), and its length."""
    counts = collections.Counter(e.rounded() for e in events)
    parts = [dp_accounting.SelfComposedDpEvent(e.dp_event(), n) for e, n in sorted(
        counts.items(), key=lambda kv: (kv[0].noise_multiplier, kv[0].sampling_probability, kv[0].mechanism))]
    return dp_accounting.ComposedDpEvent(parts), sum(counts.values())


def discrete_gaussian_sum_epsilon(sensitivity: float, sigma: float, n: int, dimension: int) -> float:
    """ε of ½ε²-concentrated DP for the sum of n devices' N_Z(0, σ²) noise on a d-dimensional integer
    vector of L2 sensitivity Δ (Kairouz, Liu and Steinke 2021, Theorem 1 with Δ₁ unused):

        ε = min( sqrt(Δ²/(nσ²) + τd/2), Δ/(σ√n) + τ√d ),  τ = 10 Σ_{k=1}^{n-1} exp(−2π²σ² k/(k+1)).

    τ measures how far a sum of discrete Gaussians is from one discrete Gaussian; for σ of a few
    grid steps it underflows to 0 and ε = Δ/(σ√n), the continuous Gaussian's.
    """
    if n < 1 or sigma <= 0:
        return math.inf
    tau = 10 * sum(math.exp(-2 * math.pi ** 2 * sigma ** 2 * k / (k + 1)) for k in range(1, n))
    base = sensitivity ** 2 / (n * sigma ** 2)
    return min(math.sqrt(base + tau * dimension / 2), math.sqrt(base) + tau * math.sqrt(dimension))


def distributed_noise_multiplier(spec, reports: int) -> float:
    """The Gaussian noise multiplier equivalent to a distributed-DP round's noise with `reports` devices
    summed (`spec`: its contract.update.spec.RoundSpec): values and the unclipped count together.

    Each reported device added its share; fewer reports than planned mean less noise, and a
    smaller z. Sensitivities: the clip in grid steps (the device checks its codes' norm), and
    COUNT_SCALE/2 for the centered unclipped bit, as TFF's quantile estimate has it.
    """
    from contract.update.spec import COUNT_SCALE

    values = discrete_gaussian_sum_epsilon(spec.spec.clip_norm / spec.grid_step, spec.device_noise_units,
                                           reports, spec.padded)
    count = discrete_gaussian_sum_epsilon(COUNT_SCALE / 2, spec.device_count_noise_units, reports, 1)
    return 1 / math.sqrt(values ** 2 + count ** 2)


def epsilon(events: Iterable[Event], delta: float, accountants: Iterable[str] = ACCOUNTANTS) -> Spent:
    """ε at `delta` of the composed `events`: the smaller of the PLD and RDP figures."""
    events_list = list(events)
    event, rounds = composed(events_list)
    if rounds == 0:
        return Spent(0.0, delta, "none", 0, {})
    figures = {}
    small_z = min(e.rounded().noise_multiplier for e in set(events_list)) < PLD_MIN_Z
    for name in accountants:
        if name == "pld" and small_z:
            figures[name] = math.inf
            continue
        accountant = pld.PLDAccountant(value_discretization_interval=PLD_INTERVAL) if name == "pld" else rdp.RdpAccountant(RDP_ORDERS)
        if not accountant.supports(event):
            figures[name] = math.inf
            continue
        figures[name] = float(accountant.compose(event).get_epsilon(delta))
    best = min(figures, key=figures.get)
    return Spent(figures[best], delta, best, rounds, figures)


def would_exceed(events: list[Event], planned: Event, budget_epsilon: float, delta: float) -> tuple[bool, Spent]:
    """Whether one more round like `planned` takes ε past the budget, and what it would spend."""
    spent = epsilon([*events, planned], delta)
    return spent.epsilon > budget_epsilon, spent
